"""``compare_recipes.py``: recipes against their own baselines, over several seeds, on one
split and one teacher (or one set of teachers); mean ± std, the paired 95% intervals of
KD - baseline and the share of the teacher-baseline gap closed.

A recipe is a preset name (``consistent``, see ``recipes.py``) or ``NAME=FLAGS``
(``mine=--method METHOD``). Its baseline student trains with the same flags less the
distillation ones, so both share budget, schedule, augmentation and initialisation;
recipes whose baselines would train alike share one. Each run is the stage scripts run as
a user would, in ``<out-dir>/recipes/<name>/seed<k>/`` on a copy of the split; a finished
run is kept when the command is repeated.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from .cli import ToolError, pick_device, publish_table, read_json, write_csv
from .plots import plot_curves
from .distill import normalised_teacher_weights
from .predict import holdout_scores, predict_test_set, read_holdout_labels, score_teachers
from .recipes import RECIPES
from .seeds import run_stage_in
from .arguments import check_stage_flags, given_options, jsonable, parse_train_arguments, \
    replaced_preset_values, stage_flags
from .stages import load_saved_split, with_teacher_weights
from .stats import gap_closed, mean_and_std
from .trainer import Runtime

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_recipe(spec: str) -> tuple[str, list[str]]:
    """``consistent`` -> ("consistent", ["--recipe", "consistent"]);
    ``mine=--lr 1e-3`` -> ("mine", ["--lr", "1e-3"])."""
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


def keep_preset_settings(name: str, flags: list[str], common: list[str]) -> list[str]:
    """A preset named in --recipes keeps its own settings over the flags shared by every
    recipe (after --): ``--recipes consistent teacher-init -- --weights none`` compares
    teacher-init as it is, not as plain consistent. Says so for each setting kept."""
    if flags != ["--recipe", name]:
        return flags        # NAME=FLAGS: the user's own flags, which follow the shared ones
    kept = []
    for option, (shared, preset) in replaced_preset_values(
            "kd_student", [*common, *flags]).items():
        print(f"note: recipe {name} keeps its preset's {option} {preset} over the shared "
              f"{option} {shared}")
        kept += [option, str(preset)]
    return [*flags, *kept]


def uses_flag(flags: list[str], flag: str) -> bool:
    return flag in given_options(flags)


def uses_unlabelled(flags: list[str]) -> bool:
    """A transfer set labelled by the HR teacher: such a recipe gets a self-training
    baseline (a recipe with its own --pseudo-teacher is one already)."""
    return uses_flag(flags, "--unlabelled") and not uses_flag(flags, "--pseudo-teacher")


def for_seed(flags: list[str], seed: int) -> list[str]:
    """``{seed}`` in a recipe's flags names the seed (a pseudo-teacher of the same seed)."""
    return [token.replace("{seed}", str(seed)) for token in flags]


def self_training_flags(flags: list[str], seed: int, baseline_run: Path) -> list[str]:
    """A recipe's flags for its self-training baseline: the same unlabelled images and
    training, with the seed's own LR baseline as the (pseudo-)teacher and no HR teacher."""
    return [*for_seed(flags, seed), "--seed", str(seed), "--pseudo-teacher",
            str(Path(baseline_run) / "student" / "best.pt")]


def compare_recipes(data_dir: Path, out_dir: Path, specs: list[str], seeds: list[int],
                    common: list[str], resamples: int = 10_000,
                    versus: str | None = None, processes: int = 1,
                    teachers: list[Path] | None = None,
                    teacher_weights: list[float] | None = None) -> dict:
    """Train what is missing, then compare every recipe's KD student with its own baseline
    and with the baseline of recipe ``versus`` (default: the first). ``teachers`` (default
    <out-dir>/teacher/best.pt) teach every KD student, their probabilities averaged with
    ``teacher_weights``; the teacher-baseline gap is that average's."""
    out_dir = Path(out_dir)
    recipes = dict(parse_recipe(spec) for spec in specs)
    if len(recipes) != len(specs):
        raise ToolError("--recipes: each name once")
    teachers = _teacher_checkpoints(out_dir, teachers)
    # Checked here, before any work; the summary records the weights as applied.
    applied_weights = normalised_teacher_weights(teacher_weights, len(teachers))
    recipes = {name: keep_preset_settings(name, flags, common) for name, flags in recipes.items()}
    versus = versus or next(iter(recipes))
    if versus not in recipes:
        raise ToolError(f"--versus {versus!r} is not one of --recipes")
    _check_recipes(recipes, seeds, common)
    split = load_saved_split(data_dir, out_dir)
    holdout = read_holdout_labels(data_dir)
    teacher_scores = _score_teachers(teachers, teacher_weights, split, data_dir, out_dir, holdout)
    plans = _train_recipes(recipes, common, seeds, teachers, teacher_weights, out_dir, data_dir,
                           processes)
    results = _collect_results(plans, seeds, data_dir, out_dir, holdout)
    rows = [_recipe_row(plan, plans[versus], results, seeds, teacher_scores, resamples,
                        holdout is not None) for plan in plans.values()]
    teacher_metrics, teacher_holdout = teacher_scores
    summary = {"teacher": {key: teacher_metrics[key] for key in ("accuracy", "macro_f1", "n")},
               "teacher_checkpoints": [str(ckpt) for ckpt in teachers],
               "teacher_weights": applied_weights,
               "teacher_holdout": None if teacher_holdout is None else
               {key: teacher_holdout[key] for key in ("accuracy", "macro_f1", "n")},
               "seeds": seeds, "resamples": resamples, "common_flags": common,
               "versus": versus, "holdout_images": None if holdout is None else len(holdout),
               "split_fingerprint": split.fingerprint, "recipes": rows}
    publish_table(out_dir / "recipes", "summary", recipes_table(summary), summary)
    return summary


def _teacher_checkpoints(out_dir: Path, teachers: list[Path] | None) -> list[Path]:
    hint = "check --teacher-ckpt" if teachers else f"train_teacher.py --out-dir {out_dir} first"
    teachers = [Path(ckpt) for ckpt in teachers or [out_dir / "teacher" / "best.pt"]]
    for ckpt in teachers:
        if not ckpt.exists():
            raise ToolError(f"compare_recipes needs the teacher every recipe learns from: "
                            f"{ckpt} not found ({hint})")
    return teachers


def _check_recipes(recipes: dict, seeds: list[int], common: list[str]) -> None:
    """Every recipe's settings, for each stage it trains, before any training starts."""
    for name, flags in recipes.items():
        checks = [("kd_student", for_seed(flags, seeds[0])),
                  ("student", stage_flags("student", flags))]
        if uses_unlabelled(flags):
            checks.append(("kd_student", self_training_flags(flags, 0, Path("baseline"))))
        for stage, checked in checks:
            check_stage_flags(stage, [*common, *checked], f"recipe {name}: {' '.join(checked)}")


def _score_teachers(teachers, teacher_weights, split, data_dir: Path, out_dir: Path,
                    holdout: pd.DataFrame | None) -> tuple[dict, dict | None]:
    """The teachers' (averaged) scores on the split's test images and, where the held-out
    images have HR twins, on those."""
    runtime = Runtime(pick_device("auto"), amp=False, channels_last=False)
    test_rows = split.rows("test")
    on_test = score_teachers(teachers, teacher_weights, split.classes, data_dir,
                             test_rows["upscale_img_path"].tolist(), test_rows["label"],
                             out_dir / "cache", "HR", 256, runtime)
    on_holdout = None
    if holdout is not None and "upscale_img_path" in holdout.columns:
        on_holdout = score_teachers(teachers, teacher_weights, split.classes, data_dir,
                                    holdout["upscale_img_path"].tolist(), holdout["label"],
                                    out_dir / "cache", "TEST-HR", 256, runtime)
    return on_test, on_holdout


@dataclass
class RecipePlan:
    """Where a recipe's runs live: its baseline's folder (shared by recipes whose baselines
    train alike), its KD students' and, with a transfer set, its self-training baseline's."""
    name: str
    flags: list[str]                    # as given, after the shared flags
    baseline_folder: Path
    folder: Path
    self_training: Path | None = None


def _train_recipes(recipes: dict, common: list[str], seeds: list[int], teachers: list[Path],
                   teacher_weights, out_dir: Path, data_dir: Path,
                   processes: int) -> dict[str, RecipePlan]:
    """Train every run that is missing: per recipe and seed, its baseline, its
    self-training baseline (with a transfer set) and its KD student."""
    teacher_flags = ["--teacher-ckpt", *map(str, teachers)] + (
        ["--teacher-weights", *map(str, teacher_weights)] if teacher_weights else [])
    baselines: dict[str, str] = {}      # baseline settings -> recipe folder that trains it
    plans = {}
    for name, flags in recipes.items():
        # --weights teacher (a flag or a preset's) starts from the first teacher's file;
        # the summary keeps the flags as given.
        flags = with_teacher_weights("kd_student", [*common, *flags], teachers[0])
        student_flags = stage_flags("student", flags)
        settings = jsonable(parse_train_arguments("student", student_flags))
        owner = baselines.setdefault(json.dumps(settings, sort_keys=True), name)
        plan = plans[name] = RecipePlan(
            name, [*common, *recipes[name]], out_dir / "recipes" / owner,
            out_dir / "recipes" / name,
            out_dir / "recipes" / f"{name}.self-training" if uses_unlabelled(flags) else None)
        for seed in seeds:
            seed_flags = ["--seed", str(seed)]
            baseline_run = plan.baseline_folder / f"seed{seed}"
            # {seed} is the seed for every run of the recipe, its baselines' too.
            run_stage_in(baseline_run, "student", out_dir, data_dir,
                         [*for_seed(student_flags, seed), *seed_flags],
                         f"{owner}: baseline, seed {seed}", processes)
            if plan.self_training:
                run_stage_in(plan.self_training / f"seed{seed}", "kd_student", out_dir,
                             data_dir, self_training_flags(flags, seed, baseline_run),
                             f"{name}: self-training baseline, seed {seed}", processes)
            # LR pseudo-teachers replace the HR teacher(s) of a recipe that names them.
            teachers_of = [] if uses_flag(flags, "--pseudo-teacher") else teacher_flags
            run_stage_in(plan.folder / f"seed{seed}", "kd_student", out_dir, data_dir,
                         [*for_seed(flags, seed), *seed_flags, *teachers_of],
                         f"{name}: KD student, seed {seed}", processes)
    return plans


def _collect_results(plans: dict[str, RecipePlan], seeds, data_dir: Path, out_dir: Path,
                     holdout) -> dict:
    """Each run's per-seed results, keyed by (folder, stage): a baseline shared by several
    recipes is read once."""
    results = {}
    for plan in plans.values():
        runs = [(plan.baseline_folder, "student"), (plan.folder, "kd_student")]
        if plan.self_training:
            runs.append((plan.self_training, "kd_student"))
        for key in runs:
            if key not in results:
                results[key] = _seed_results(*key, seeds, data_dir, out_dir, holdout)
    return results


def _recipe_row(plan: RecipePlan, versus: RecipePlan, results: dict, seeds: list[int],
                teacher_scores: tuple, resamples: int, with_holdout: bool) -> dict:
    """A recipe's KD students against its own baseline, the ``versus`` recipe's and (with
    a transfer set) its self-training baseline; per-seed figures; its curves."""
    baseline = results[plan.baseline_folder, "student"]
    students = results[plan.folder, "kd_student"]
    row = {"recipe": plan.name, "flags": plan.flags,
           "baseline_folder": str(plan.baseline_folder), "against": {}}
    row["against"]["own"] = compare_runs(baseline, students, *teacher_scores, resamples)
    if versus.baseline_folder != plan.baseline_folder:
        row["against"]["versus"] = compare_runs(results[versus.baseline_folder, "student"],
                                                students, *teacher_scores, resamples)
    if plan.self_training:
        # What the HR teacher adds beyond the unlabelled images themselves, and what
        # those images give without it.
        self_trained = results[plan.self_training, "kd_student"]
        row["against"]["self-training"] = compare_runs(self_trained, students,
                                                       *teacher_scores, resamples)
        row["self_training"] = {
            "folder": str(plan.self_training),
            "against_own": compare_runs(baseline, self_trained, *teacher_scores, resamples),
            "accuracy": [run["accuracy"] for run in self_trained]}
    row["per_seed"] = [{"seed": seed, "baseline_accuracy": base["accuracy"],
                        "kd_accuracy": kd["accuracy"], "baseline_seconds":
                        base["train_seconds"], "kd_seconds": kd["train_seconds"],
                        **({"baseline_holdout_accuracy": base["holdout"]["accuracy"],
                            "kd_holdout_accuracy": kd["holdout"]["accuracy"]}
                           if with_holdout else {})}
                       for seed, base, kd in zip(seeds, baseline, students)]
    if plan.self_training:
        for entry, run in zip(row["per_seed"], results[plan.self_training, "kd_student"]):
            entry["self_training_accuracy"] = run["accuracy"]
            entry["self_training_seconds"] = run["train_seconds"]
            if with_holdout:
                entry["self_training_holdout_accuracy"] = run["holdout"]["accuracy"]
    row["curves"] = str(plot_recipe_curves(plan.name, plan.baseline_folder, plan.folder,
                                           seeds, plan.self_training))
    return row


def _seed_results(folder: Path, stage: str, seeds: list[int], data_dir: Path, out_dir: Path,
                  holdout: pd.DataFrame | None) -> list[dict]:
    """Each seed's test metrics, per-image correctness and training time; with held-out
    labels also its scores on test.csv (predicted once, kept in holdout_predictions.csv)."""
    results = []
    for seed in seeds:
        stage_dir = folder / f"seed{seed}" / stage
        predictions = pd.read_csv(stage_dir / "test_predictions.csv")
        result = {**read_json(stage_dir / "test_metrics.json"),
                  "img_path": predictions["img_path"],
                  "correct": (predictions["label"] == predictions["prediction"]).to_numpy(),
                  "train_seconds": read_json(stage_dir / "train_summary.json")["train_seconds"]}
        if holdout is not None:
            result["holdout"] = _holdout_scores(stage_dir, data_dir, out_dir, holdout)
        results.append(result)
    return results


def _holdout_scores(stage_dir: Path, data_dir: Path, out_dir: Path,
                    holdout: pd.DataFrame) -> dict:
    saved = stage_dir / "holdout_predictions.csv"
    if saved.exists():
        predicted = pd.read_csv(saved, dtype=str, keep_default_na=False)
    else:
        runtime = Runtime(pick_device("auto"), amp=False, channels_last=False)
        predicted = predict_test_set(data_dir, [stage_dir / "best.pt"], Path(out_dir) / "cache",
                                     256, runtime, tta=False)
        write_csv(saved, predicted)
    return holdout_scores(predicted, holdout, saved)


def compare_runs(baseline: list[dict], kd: list[dict], teacher: dict,
                 teacher_holdout: dict | None, resamples: int) -> dict:
    """Baseline and KD student, seed by seed on the same images: means ± std, the mean
    paired difference with its two intervals, and the share of the teacher-baseline gap
    closed (where the teacher was scored on the same images)."""
    for base_run, kd_run in zip(baseline, kd):
        if not base_run["img_path"].equals(kd_run["img_path"]):
            raise ToolError("baseline and KD student were tested on other images")
    sets = {"test": (baseline, kd, teacher)}
    if "holdout" in baseline[0]:
        sets["holdout"] = ([run["holdout"] for run in baseline], [run["holdout"] for run in kd],
                           teacher_holdout)
    compared = {}
    for set_name, (base_runs, kd_runs, teacher_scores) in sets.items():
        entry = {}
        for key in ("accuracy", "macro_f1"):
            base_values = [run[key] for run in base_runs]
            kd_values = [run[key] for run in kd_runs]
            entry[key] = {"baseline": mean_and_std(base_values),
                          "kd_student": mean_and_std(kd_values),
                          "difference": mean_and_std(np.subtract(kd_values, base_values))}
            entry[key]["gap_closed"] = None if teacher_scores is None else gap_closed(
                teacher_scores[key], float(np.mean(base_values)), float(np.mean(kd_values)))
        entry["accuracy"]["seed_interval"] = seed_interval(
            [k["accuracy"] - b["accuracy"] for b, k in zip(base_runs, kd_runs)])
        entry["accuracy"]["image_interval"] = image_bootstrap(
            np.stack([run["correct"] for run in base_runs]),
            np.stack([run["correct"] for run in kd_runs]), resamples)
        entry["n"] = len(base_runs[0]["correct"])
        compared[set_name] = entry
    return compared


def plot_recipe_curves(name: str, baseline_folder: Path, kd_folder: Path,
                       seeds: list[int], self_training_folder: Path | None = None) -> Path:
    """Validation accuracy per epoch of the recipe's baseline, self-training baseline (if
    any) and KD student, each the mean over seeds (epochs that every seed ran)."""
    curves = {}
    over = f"mean of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    runs = [("baseline", baseline_folder, "student")] + (
        [("self-training", self_training_folder, "kd_student")] if self_training_folder
        else []) + [("KD student", kd_folder, "kd_student")]
    for label, folder, stage in runs:
        histories = [pd.read_csv(folder / f"seed{seed}" / stage / "history.csv")
                     for seed in seeds]
        epochs = min(len(history) for history in histories)
        curves[f"{label} ({over})"] = pd.DataFrame({
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
    teacher, seeds, versus = summary["teacher"], summary["seeds"], summary["versus"]
    holdout = summary["holdout_images"]
    header = ("| recipe | baseline | baseline acc | KD acc | KD - baseline [95% CI images] "
              "[95% CI seeds] | gap closed | F1: baseline | KD | F1 gap closed |")
    if holdout:
        header += " held-out: baseline | KD | KD - baseline [95% CI images] | gap closed |"
    lines = [header, "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"
             + (" ---: | ---: | --- | ---: |" if holdout else "")]
    for row in summary["recipes"]:
        entries = [(row["recipe"], {"own": "own", "self-training": "self-training"}.get(
            against, f"{versus}'s"), compared) for against, compared in row["against"].items()]
        if "self_training" in row:
            entries.append((f"{row['recipe']}: self-training", "own",
                            row["self_training"]["against_own"]))
        for recipe, baseline, compared in entries:
            lines.append(_table_line(recipe, baseline, compared, holdout))
    lines.append("")
    lines.append("Per seed (accuracy on the split's test images, baseline -> KD"
                 + ("; held-out" if holdout else "") + "; training seconds):")
    for row in summary["recipes"]:
        lines.append(f"- {row['recipe']} (`{' '.join(row['flags'])}`): " + "; ".join(
            f"seed {s['seed']}: {100 * s['baseline_accuracy']:.2f} -> "
            f"{100 * s['kd_accuracy']:.2f}"
            + (f" (held-out {100 * s['baseline_holdout_accuracy']:.2f} -> "
               f"{100 * s['kd_holdout_accuracy']:.2f})" if holdout else "")
            + f", {s['baseline_seconds']:.0f} s + {s['kd_seconds']:.0f} s"
            + (f"; self-training {100 * s['self_training_accuracy']:.2f}"
               + (f" (held-out {100 * s['self_training_holdout_accuracy']:.2f})"
                  if holdout else "") + f", {s['self_training_seconds']:.0f} s"
               if "self_training_accuracy" in s else "")
            for s in row["per_seed"]))
    lines.append("")
    checkpoints = summary.get("teacher_checkpoints", [])
    who = "Teacher" if len(checkpoints) <= 1 else (
        f"Teachers ({', '.join(checkpoints)}; probabilities averaged with weights "
        f"{', '.join(f'{weight:.2f}' for weight in summary['teacher_weights'])})")
    lines.append(
        f"{who}: {100 * teacher['accuracy']:.2f}% accuracy, {100 * teacher['macro_f1']:.2f}% "
        f"macro-F1 on the split's n = {teacher['n']} test images. {len(seeds)} "
        f"seed{'s' if len(seeds) > 1 else ''} "
        f"({', '.join(map(str, seeds))}), one split; mean ± sample std over seeds, in %; "
        f"differences in points. 'own': the recipe's baseline (same flags less the "
        f"distillation ones); '{versus}'s': the baseline of recipe {versus}. CI images: "
        f"{summary['resamples']} paired bootstrap resamples of the test images "
        f"(seed-averaged difference); CI seeds: Student t over the per-seed differences. "
        f"Gap closed: (KD - baseline) / (teacher - baseline), of the means."
        + (" 'self-training': the same recipe and unlabelled images with the seed's own LR "
           "baseline as its only teacher (no HR teacher); '<recipe>: self-training' rows "
           "compare that student with the plain baseline."
           if any("self_training" in row for row in summary["recipes"]) else "")
        + (f" Held-out: the {holdout} labelled images of test.csv (test_labels.csv), never "
           f"used for training or selection"
           + (f"; teacher {100 * summary['teacher_holdout']['accuracy']:.2f}% there on their HR "
              f"twins." if summary["teacher_holdout"] else "; no HR twins, so no teacher score "
              "and no gap there.") if holdout else ""))
    return "\n".join(lines)


def _table_line(recipe: str, baseline: str, compared: dict, holdout) -> str:
    """One row of the recipes table: a student against one baseline."""
    acc, f1 = compared["test"]["accuracy"], compared["test"]["macro_f1"]
    line = (f"| {recipe} | {baseline} | {_pm(acc['baseline'])} | {_pm(acc['kd_student'])} | "
            f"{_pm(acc['difference'], True)} {_interval(acc['image_interval'])} "
            f"{_interval(acc['seed_interval'])} | {_share(acc['gap_closed'])} | "
            f"{_pm(f1['baseline'])} | {_pm(f1['kd_student'])} | {_share(f1['gap_closed'])} |")
    if holdout:
        held = compared["holdout"]["accuracy"]
        line += (f" {_pm(held['baseline'])} | {_pm(held['kd_student'])} | "
                 f"{_pm(held['difference'], True)} {_interval(held['image_interval'])} | "
                 f"{_share(held['gap_closed'])} |")
    return line


def _pm(value, signed: bool = False) -> str:
    mean, std = value
    return f"{100 * mean:{'+' if signed else ''}.2f} ± {100 * std:.2f}"


def _interval(interval) -> str:
    if interval is None:
        return "[n/a]"
    return f"[{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]"


def _share(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"
