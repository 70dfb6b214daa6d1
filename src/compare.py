"""``compare_recipes.py``: recipes against their own baselines, over several seeds, on one
split and one teacher; mean ± std, the paired 95% intervals of KD - baseline and the share
of the teacher-baseline gap closed.

A recipe is a preset name (``consistent``, see ``recipes.py``) or ``NAME=FLAGS``
(``dkd=--method dkd``). Its baseline student trains with the same flags less the
distillation ones, so both share budget, schedule, augmentation and initialisation;
recipes whose baselines would train alike share one. Each run is the stage scripts run as
a user would, in ``<out-dir>/recipes/<name>/seed<k>/`` on a copy of the split; a finished
run is kept when the command is repeated.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from .cli import ToolError, read_json, write_json, write_text
from .plots import plot_curves
from .recipes import RECIPES
from .seeds import run_script, run_stage_in
from .stages import check_arguments, jsonable, load_saved_split, parse_train_arguments, \
    train_parser
from .stats import gap_closed, mean_and_std

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_recipe(spec: str) -> tuple[str, list[str]]:
    """``consistent`` -> ("consistent", ["--recipe", "consistent"]);
    ``dkd=--method dkd`` -> ("dkd", ["--method", "dkd"])."""
    name, _, flags = spec.partition("=")
    if not NAME.match(name):
        raise ToolError(f"--recipes {spec!r}: a name of letters, digits, '.', '_' or '-' "
                        f"first (NAME or NAME=FLAGS)")
    if not _:
        if name not in RECIPES:
            raise ToolError(f"--recipes {name!r}: not a preset ({', '.join(RECIPES)}); give "
                            f"other settings as NAME=FLAGS")
        return name, ["--recipe", name]
    try:
        return name, shlex.split(flags)
    except ValueError as error:
        raise ToolError(f"--recipes {spec!r}: {error}") from None


def distillation_flags() -> set[str]:
    """The KD student's own flags (the 'distillation' group): a baseline does without."""
    parser = train_parser("kd_student")
    group = next(group for group in parser._action_groups if group.title == "distillation")
    return {option for action in group._group_actions for option in action.option_strings}


def baseline_flags(flags: list[str]) -> list[str]:
    """``flags`` less every distillation flag and its values."""
    kd_only, kept, skipping = distillation_flags(), [], False
    for token in flags:
        if token.startswith("--"):
            skipping = token.split("=")[0] in kd_only
        if not skipping:
            kept.append(token)
    return kept


def _with_teacher(flags: list[str], teacher: Path) -> list[str]:
    """``--weights teacher`` names the shared teacher's file: the runs live elsewhere."""
    return [str(teacher) if token == "teacher" and index and flags[index - 1] == "--weights"
            else token for index, token in enumerate(flags)]


def compare_recipes(data_dir: Path, out_dir: Path, specs: list[str], seeds: list[int],
                    common: list[str], resamples: int = 10_000) -> dict:
    out_dir = Path(out_dir)
    recipes = dict(parse_recipe(spec) for spec in specs)
    if len(recipes) != len(specs):
        raise ToolError("--recipes: each name once")
    teacher = out_dir / "teacher" / "best.pt"
    if not teacher.exists():
        raise ToolError(f"compare_recipes needs the teacher every recipe learns from: "
                        f"{teacher} not found (train_teacher.py --out-dir {out_dir} first)")
    # Every recipe's settings are checked before any training starts.
    for name, flags in recipes.items():
        for stage, stage_flags in (("kd_student", flags), ("student", baseline_flags(flags))):
            try:
                check_arguments(parse_train_arguments(stage, [*common, *stage_flags]))
            except SystemExit:
                raise ToolError(f"recipe {name}: {' '.join(stage_flags)} is not valid for "
                                f"train_{stage}.py (its error is above)") from None
    split = load_saved_split(data_dir, out_dir)
    if not (out_dir / "teacher" / "test_metrics.json").exists():
        run_script("test_teacher.py", "--data-dir", str(data_dir), "--out-dir", str(out_dir),
                   "--assets-dir", str(out_dir / "assets"))
    teacher_metrics = read_json(out_dir / "teacher" / "test_metrics.json")

    baselines: dict[str, str] = {}      # baseline settings -> recipe folder that trains it
    rows = []
    for name, flags in recipes.items():
        flags = _with_teacher([*common, *flags], teacher)
        student_flags = baseline_flags(flags)
        settings = jsonable(parse_train_arguments("student", student_flags))
        owner = baselines.setdefault(json.dumps(settings, sort_keys=True), name)
        for seed in seeds:
            folder = out_dir / "recipes" / name / f"seed{seed}"
            seed_flags = ["--seed", str(seed)]
            run_stage_in(out_dir / "recipes" / owner / f"seed{seed}", "student", out_dir,
                         data_dir, [*student_flags, *seed_flags], f"{owner}: baseline, seed {seed}")
            run_stage_in(folder, "kd_student", out_dir, data_dir,
                         [*flags, *seed_flags, "--teacher-ckpt", str(teacher)],
                         f"{name}: KD student, seed {seed}")
        rows.append(recipe_summary(name, flags, out_dir / "recipes" / owner,
                                   out_dir / "recipes" / name, seeds, teacher_metrics,
                                   resamples))
        rows[-1]["curves"] = str(plot_recipe_curves(name, out_dir / "recipes" / owner,
                                                    out_dir / "recipes" / name, seeds))
    summary = {"teacher": {key: teacher_metrics[key] for key in ("accuracy", "macro_f1", "n")},
               "seeds": seeds, "resamples": resamples, "common_flags": common,
               "split_fingerprint": split.fingerprint, "recipes": rows}
    table = recipes_table(summary)
    print()
    print(table)
    write_text(out_dir / "recipes" / "summary.md", table + "\n")
    write_json(out_dir / "recipes" / "summary.json", summary)
    print(f"-> {out_dir / 'recipes' / 'summary.md'}, summary.json")
    return summary


def _seed_results(folder: Path, stage: str, seeds: list[int]) -> list[dict]:
    results = []
    for seed in seeds:
        stage_dir = folder / f"seed{seed}" / stage
        predictions = pd.read_csv(stage_dir / "test_predictions.csv")
        results.append({**read_json(stage_dir / "test_metrics.json"),
                        "correct": (predictions["label"] == predictions["prediction"])
                        .to_numpy(),
                        "predictions": predictions,
                        "train_seconds": read_json(stage_dir / "train_summary.json")
                        ["train_seconds"]})
    return results


def recipe_summary(name: str, flags: list[str], baseline_folder: Path, kd_folder: Path,
                   seeds: list[int], teacher: dict, resamples: int) -> dict:
    baseline = _seed_results(baseline_folder, "student", seeds)
    kd = _seed_results(kd_folder, "kd_student", seeds)
    for base_run, kd_run in zip(baseline, kd):
        if not base_run["predictions"]["img_path"].equals(kd_run["predictions"]["img_path"]):
            raise ToolError(f"recipe {name}: baseline and KD student were tested on other "
                            f"images")
    row = {"recipe": name, "flags": flags, "baseline_folder": str(baseline_folder),
           "per_seed": []}
    for key in ("accuracy", "macro_f1"):
        base_values = [run[key] for run in baseline]
        kd_values = [run[key] for run in kd]
        differences = np.subtract(kd_values, base_values)
        row[key] = {"baseline": mean_and_std(base_values), "kd": mean_and_std(kd_values),
                    "difference": mean_and_std(differences),
                    "gap_closed": gap_closed(teacher[key], float(np.mean(base_values)),
                                             float(np.mean(kd_values)))}
    row["accuracy"]["seed_interval"] = seed_interval(
        [k["accuracy"] - b["accuracy"] for b, k in zip(baseline, kd)])
    row["accuracy"]["image_interval"] = image_bootstrap(
        np.stack([run["correct"] for run in baseline]),
        np.stack([run["correct"] for run in kd]), resamples)
    for seed, base_run, kd_run in zip(seeds, baseline, kd):
        row["per_seed"].append({"seed": seed, "baseline_accuracy": base_run["accuracy"],
                                "kd_accuracy": kd_run["accuracy"],
                                "baseline_macro_f1": base_run["macro_f1"],
                                "kd_macro_f1": kd_run["macro_f1"],
                                "baseline_seconds": base_run["train_seconds"],
                                "kd_seconds": kd_run["train_seconds"]})
    row["n"] = kd[0]["n"]
    return row


def plot_recipe_curves(name: str, baseline_folder: Path, kd_folder: Path,
                       seeds: list[int]) -> Path:
    """Validation accuracy per epoch of the recipe's baseline and KD student, each the
    mean over seeds (epochs that every seed ran)."""
    curves = {}
    for label, folder, stage in (("baseline", baseline_folder, "student"),
                                 ("KD student", kd_folder, "kd_student")):
        histories = [pd.read_csv(folder / f"seed{seed}" / stage / "history.csv")
                     for seed in seeds]
        epochs = min(len(history) for history in histories)
        curves[f"{label} (mean of {len(seeds)} seeds)"] = pd.DataFrame({
            "epoch": histories[0]["epoch"][:epochs],
            "val_acc": np.mean([history["val_acc"][:epochs] for history in histories], 0)})
    return plot_curves(curves, "val_acc", f"{name}: validation accuracy",
                       kd_folder / "val_acc.png")


def seed_interval(differences, level: float = 0.95) -> list[float] | None:
    """Student-t interval of the mean paired difference over seeds (training noise)."""
    differences = np.asarray(differences, dtype=float)
    if len(differences) < 2:
        return None
    mean, std = mean_and_std(differences)
    half = scipy_stats.t.ppf(0.5 + level / 2, len(differences) - 1) * std / np.sqrt(
        len(differences))
    return [mean - half, mean + half]


def image_bootstrap(baseline_correct: np.ndarray, kd_correct: np.ndarray, resamples: int,
                    seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile interval of the seed-averaged accuracy difference when the test images
    are resampled (every seed was tested on the same images, so one resample serves all:
    paired). Arrays are (seeds, images) of 0/1."""
    per_image = (kd_correct.astype(float) - baseline_correct.astype(float)).mean(0)
    rng = np.random.default_rng(seed)
    n = len(per_image)
    means = np.array([per_image[rng.integers(0, n, n)].mean() for _ in range(resamples)])
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def recipes_table(summary: dict) -> str:
    teacher = summary["teacher"]
    seeds = summary["seeds"]
    lines = ["| recipe | baseline acc | KD acc | KD - baseline [95% CI images] [95% CI seeds] "
             "| gap closed | baseline F1 | KD F1 | F1 gap closed | s/run (base, KD) |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in summary["recipes"]:
        acc, f1 = row["accuracy"], row["macro_f1"]
        seconds = [np.mean([s[f"{kind}_seconds"] for s in row["per_seed"]])
                   for kind in ("baseline", "kd")]
        lines.append(
            f"| {row['recipe']} | {_pm(acc['baseline'])} | {_pm(acc['kd'])} | "
            f"{_pm(acc['difference'], True)} {_interval(acc['image_interval'])} "
            f"{_interval(acc['seed_interval'])} | {_share(acc['gap_closed'])} | "
            f"{_pm(f1['baseline'])} | {_pm(f1['kd'])} | {_share(f1['gap_closed'])} | "
            f"{seconds[0]:.0f}, {seconds[1]:.0f} |")
    lines.append("")
    lines.append("Per seed (accuracy, baseline -> KD):")
    for row in summary["recipes"]:
        lines.append(f"- {row['recipe']} (`{' '.join(row['flags'])}`): " + "; ".join(
            f"seed {s['seed']}: {100 * s['baseline_accuracy']:.2f} -> "
            f"{100 * s['kd_accuracy']:.2f}" for s in row["per_seed"]))
    lines.append("")
    lines.append(f"Teacher: {100 * teacher['accuracy']:.2f}% accuracy, "
                 f"{100 * teacher['macro_f1']:.2f}% macro-F1. {len(seeds)} seeds "
                 f"({', '.join(map(str, seeds))}), one split, n = {teacher['n']} test images; "
                 f"mean ± sample std over seeds, in %; differences in points. CI images: "
                 f"{summary['resamples']} paired bootstrap resamples of the test images "
                 f"(seed-averaged difference); CI seeds: Student t over the per-seed "
                 f"differences. Gap closed: (KD - baseline) / (teacher - baseline), means.")
    return "\n".join(lines)


def _pm(value, signed: bool = False) -> str:
    mean, std = value
    return f"{100 * mean:{'+' if signed else ''}.2f} ± {100 * std:.2f}"


def _interval(interval) -> str:
    if interval is None:
        return "[n/a]"
    return f"[{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]"


def _share(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"
