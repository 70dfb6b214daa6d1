"""Every preset through the stage scripts, and the presets a runner treats apart through
run_seeds.py and compare_recipes.py: each trains the baseline and the KD student with the
preset's settings, ``--weights teacher`` meaning the split's teacher everywhere.

A runner passes a preset's flags on to each stage alike, except two things:
``--weights teacher`` (replaced by the split's teacher's path: ``teacher-init``) and the
transfer set (``--unlabelled`` for the KD student only, a self-training baseline:
``transfer``). Those two presets go through every runner; ``reference`` and
``consistent`` set nothing a runner handles apart, and go through the stage scripts (and
compare_recipes.py's own tests in test_reporting.py and test_config.py)."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_script
from src.arguments import parse_train_arguments, stage_flags, train_parser
from src.demo import write_demo_dataset
from src.recipes import NEEDS_UNLABELLED, RECIPES, recipe_defaults

# Two epochs: the presets' one warm-up epoch must leave a cosine decay.
BUDGET = ["--arch", "resnet18", "--input-size", "16", "--epochs", "2", "--batch-size", "8",
          "--lr", "1e-3"]
# The presets a runner handles apart (module docstring): a new preset that sets --weights or
# needs a transfer set joins them by itself.
HANDLED_APART = [preset for preset in RECIPES
                 if "weights" in RECIPES[preset] or preset in NEEDS_UNLABELLED]
RUNS = [(preset, "stage scripts") for preset in RECIPES] + \
    [(preset, runner) for preset in HANDLED_APART
     for runner in ("run_seeds.py", "compare_recipes.py")]


@pytest.fixture(scope="module")
def split_with_teacher(tmp_path_factory):
    """Tiny data with unlabelled HR images (for transfer), a split and its teacher."""
    root = tmp_path_factory.mktemp("presets")
    data = write_demo_dataset(root / "data", per_class=10, test_images=6, lr_size=8, scale=4,
                              seed=1, num_classes=4, progress=False, unlabelled=16)
    out_dir = root / "run"
    result = run_script("train_teacher.py", "--data-dir", data, "--out-dir", out_dir,
                        "--weights", "none", *BUDGET, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    return data, out_dir


def new_run(split_with_teacher, folder: Path) -> Path:
    _, out_dir = split_with_teacher
    (folder / "teacher").mkdir(parents=True)
    for name in ("split.csv", "split.json"):
        shutil.copy(out_dir / name, folder / name)
    shutil.copy(out_dir / "teacher" / "best.pt", folder / "teacher" / "best.pt")
    return folder


def preset_flags(preset: str, data: Path) -> list[str]:
    """The preset as a user gives it: --weights none unless the preset sets the weights
    (an explicit one would replace the preset's, and say so); transfer's images."""
    flags = ["--recipe", preset]
    if "weights" not in RECIPES[preset]:
        flags += ["--weights", "none"]
    if preset in NEEDS_UNLABELLED:
        flags += ["--unlabelled", str(data / "unlabelled.csv")]
    return flags


@pytest.mark.parametrize("preset, runner", RUNS, ids=[f"{p}-{r}" for p, r in RUNS])
def test_every_preset_through_every_runner(split_with_teacher, tmp_path, preset, runner):
    data, _ = split_with_teacher
    run = new_run(split_with_teacher, tmp_path / "run")
    flags = preset_flags(preset, data)
    common = ["--data-dir", data, "--out-dir", run]
    if runner == "stage scripts":
        for stage in ("student", "kd_student"):
            result = run_script(f"train_{stage}.py", *common, *BUDGET,
                                *stage_flags(stage, flags))
            assert result.returncode == 0, result.stderr[-2000:]
        folder = run
    elif runner == "run_seeds.py":
        result = run_script(runner, *common, "--seeds", "0", "--", *BUDGET, *flags,
                            timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        folder = run / "seeds" / "seed0"
    else:
        # A bare preset name, with --weights none shared by every recipe as the README's
        # commands do: a named preset keeps its own settings over shared flags. Transfer's
        # --unlabelled (a KD flag) goes in NAME=FLAGS.
        spec = f"{preset}={' '.join(flags)}" if preset in NEEDS_UNLABELLED else preset
        result = run_script(runner, *common, "--seeds", "0", "--resamples", "50", "--recipes",
                            spec, "--", *BUDGET, "--weights", "none", timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        kept = "note: recipe teacher-init keeps its preset's --weights teacher over the " \
               "shared --weights none"
        assert (kept in result.stdout) == (preset == "teacher-init")
        folder = run / "recipes" / preset / "seed0"
        # The summary records the recipe's flags as given, not the runner's teacher path.
        summary = json.loads((run / "recipes" / "summary.json").read_text())
        assert str(run / "teacher") not in " ".join(summary["recipes"][0]["flags"])
    assert "replaces the" not in result.stdout          # nothing overrode the preset
    for stage in ("student", "kd_student"):
        saved = json.loads((folder / stage / "config.json").read_text())
        expected = recipe_defaults(preset, {action.dest for action in
                                            train_parser(stage)._actions}, stage)
        if expected.get("weights") == "teacher":
            expected["weights"] = str(run / "teacher" / "best.pt")
        assert saved["args"]["recipe"] == preset, stage
        for key, value in expected.items():
            assert saved["args"][key] == value, (stage, key)
        # What the preset leaves alone stays at the parser's default.
        defaults = vars(parse_train_arguments(stage, ["--recipe", preset]))
        assert saved["args"]["crop_scale"] == defaults["crop_scale"]
    kd = json.loads((folder / "kd_student" / "config.json").read_text())
    assert kd["teacher"]["checkpoints"] == [str(run / "teacher" / "best.pt")]
    if preset in NEEDS_UNLABELLED:
        assert kd["unlabelled"]["used"] == 16
        student = json.loads((folder / "student" / "config.json").read_text())
        assert student["unlabelled"] is None
        if runner == "compare_recipes.py":
            assert (run / "recipes" / f"{preset}.self-training" / "seed0" / "kd_student" /
                    "best.pt").exists()


@pytest.mark.fast
@pytest.mark.parametrize("runner", ["run_seeds.py", "compare_recipes.py"])
def test_runners_check_every_stage_before_training(split_with_teacher, tmp_path, runner):
    data, _ = split_with_teacher
    run = new_run(split_with_teacher, tmp_path / "run")
    # Valid for the baseline, invalid for the KD student: refused before the baseline trains.
    bad = ["--weights", "none", "--beta", "-1"]
    if runner == "run_seeds.py":
        result = run_script(runner, "--data-dir", data, "--out-dir", run, "--seeds", "0",
                            "--", *BUDGET, *bad)
    else:
        result = run_script(runner, "--data-dir", data, "--out-dir", run, "--seeds", "0",
                            "--recipes", "x=--beta -1", "--", *BUDGET, "--weights", "none")
    assert_one_line_error(result, "--beta must be")
    assert not list(run.glob("**/student/config.json"))
    final = run_script(runner, "--data-dir", data, "--out-dir", run, "--seeds", "0",
                       *(["--recipes", "consistent"] if runner == "compare_recipes.py" else []),
                       "--", *BUDGET, "--final-fit")
    assert_one_line_error(final, "--final-fit trains on the split's test images",
                          "train_*.py --final-fit yourself")
    assert not list(run.glob("**/student/config.json"))
    in_recipe = run_script("compare_recipes.py", "--data-dir", data, "--out-dir", run,
                           "--seeds", "0", "--recipes", "final=--final-fit", "--", *BUDGET)
    assert_one_line_error(in_recipe, "recipe final: --final-fit", "--final-fit trains on")
