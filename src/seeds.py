"""``run_seeds.py``: the same stages for several seeds on one split, then mean and std.

Each seed gets ``<out-dir>/seeds/seed<k>/`` holding a copy of the main ``split.csv`` (so
every seed sees exactly the same train, validation and test images), and all seeds share
one image cache. The stage scripts themselves do the work, so a seed's run is exactly what
a user would get by hand; a finished seed is skipped and an interrupted one resumed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from .cli import ToolError, publish_table, read_json
from .data import copy_split, load_or_create_split
from .distributed import launcher
from .arguments import STAGES, check_stage_flags, stage_flags
from .stats import mean_and_std
from .stages import check_kept_run, with_teacher_weights
from .trainer import run_status

ROOT = Path(__file__).resolve().parent.parent


def run_seeds(data_dir: Path, out_dir: Path, seeds: list[int], stages: list[str],
              train_args: list[str], split_seed: int, processes: int = 1) -> dict:
    out_dir = Path(out_dir)
    teacher_ckpt = out_dir / "teacher" / "best.pt"
    if "kd_student" in stages and "teacher" not in stages and not teacher_ckpt.exists():
        raise ToolError(f"kd_student needs a teacher: train it first ({teacher_ckpt} not "
                        f"found) or add teacher to --stages")

    def flags_for(stage: str, seed: int) -> list[str]:
        # Each stage gets the flags it takes: the distillation ones go to the KD student.
        flags = ["--seed", str(seed), *stage_flags(stage, train_args)]
        if "teacher" not in stages:
            # The students learn from (and may start from) the main folder's teacher.
            flags = with_teacher_weights(stage, flags, teacher_ckpt)
            if stage == "kd_student":
                flags += ["--teacher-ckpt", str(teacher_ckpt)]
        return flags
    # Every stage's flags are checked before anything trains.
    for stage in stages:
        check_stage_flags(stage, flags_for(stage, seeds[0]),
                          f"flags after -- ({' '.join(train_args)})")
    load_or_create_split(data_dir, out_dir, split_seed)      # the one shared split
    for seed in seeds:
        for stage in stages:
            flags = flags_for(stage, seed)
            run_stage_in(out_dir / "seeds" / f"seed{seed}", stage, out_dir, data_dir,
                         flags, f"seed {seed}: {stage}", processes)
    summary = summarize(out_dir, seeds, stages)
    publish_table(out_dir / "seeds", "summary", summary_table(summary), summary)
    return summary


def run_stage_in(folder: Path, stage: str, main_out_dir: Path, data_dir: Path,
                 train_args: list[str], label: str, processes: int = 1) -> None:
    """Train and test ``stage`` in ``folder`` on a copy of the main run's split, sharing
    its image cache. A finished stage is kept, an unfinished one resumed. ``processes`` >
    1 trains under torchrun on this node."""
    folder.mkdir(parents=True, exist_ok=True)
    copy_split(main_out_dir, folder)
    common = ["--data-dir", str(data_dir), "--out-dir", str(folder),
              "--cache-dir", str(Path(main_out_dir) / "cache")]
    status = run_status(folder / stage)
    if status == "finished":
        check_kept_run(folder / stage, stage, [*common, *train_args])
    else:
        print(f"== {label}", flush=True)
        run_script(f"train_{stage}.py", *common, *train_args,
                   *(["--resume"] if status == "unfinished" else []), processes=processes)
    if not (folder / stage / "test_metrics.json").exists():
        run_script(f"test_{stage}.py", *common, "--assets-dir", str(folder / "assets"))


def add_processes_argument(parser) -> None:
    parser.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                        help="train each model with N processes on this node under torchrun "
                             "(one per GPU; --batch-size stays the global batch)")


def run_script(script: str, *args: str, processes: int = 1) -> None:
    result = subprocess.run([*launcher(processes), str(ROOT / script), *args], cwd=ROOT)
    if result.returncode != 0:
        raise ToolError(f"{script} {' '.join(args)} failed (exit {result.returncode}); fix "
                        f"that and rerun: finished seeds are kept")


def summarize(out_dir: Path, seeds: list[int], stages: list[str]) -> dict:
    per_seed = {stage: [read_json(Path(out_dir) / "seeds" / f"seed{seed}" / stage /
                                  "test_metrics.json") for seed in seeds] for stage in stages}
    summary = {"seeds": seeds, "stages": {}}
    for stage, runs in per_seed.items():
        summary["stages"][stage] = {}
        for key in ("accuracy", "macro_f1"):
            values = [run[key] for run in runs]
            mean, std = mean_and_std(values)
            summary["stages"][stage][key] = {"mean": mean, "std": std, "values": values}
    if {"student", "kd_student"} <= set(stages):
        summary["kd_minus_baseline"] = {}
        for key in ("accuracy", "macro_f1"):
            differences = np.array([kd[key] - base[key] for kd, base in
                                    zip(per_seed["kd_student"], per_seed["student"])])
            mean, std = mean_and_std(differences)
            summary["kd_minus_baseline"][key] = {"mean": mean, "std": std,
                                                 "values": differences.tolist()}
    summary["n"] = per_seed[stages[0]][0]["n"]
    return summary


def summary_table(summary: dict) -> str:
    seeds = summary["seeds"]
    lines = ["| model | accuracy (mean ± std) | macro-F1 (mean ± std) |",
             "| --- | ---: | ---: |"]
    for stage, scores in summary["stages"].items():
        lines.append(f"| {STAGES[stage]['title']} | {_pm(scores['accuracy'])} | "
                     f"{_pm(scores['macro_f1'])} |")
    if "kd_minus_baseline" in summary:
        difference = summary["kd_minus_baseline"]
        lines.append(f"| KD - baseline (paired by seed) | {_pm(difference['accuracy'], True)} | "
                     f"{_pm(difference['macro_f1'], True)} |")
    lines.append("")
    lines.append(f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), one split, "
                 f"n = {summary['n']} test images; std is the sample standard deviation over "
                 f"seeds.")
    return "\n".join(lines)


def _pm(scores: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{100 * scores['mean']:{sign}.2f} ± {100 * scores['std']:.2f}"
