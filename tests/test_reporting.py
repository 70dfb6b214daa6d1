"""evaluate_all.py, predict.py, run_seeds.py and compare_recipes.py on a tiny finished run."""

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from scipy.stats import binomtest

import evaluate_all
from conftest import TINY_TRAIN_ARGS, assert_one_line_error, run_script
from src import report
from src.data import load_images
from src.models import load_checkpoint
from src.predict import predict_probabilities
from src.trainer import Runtime

FIGURES = ("test_accuracy_comparison", "kd_vs_hard_train_acc", "kd_vs_hard_train_loss",
           "kd_vs_hard_val_acc", "kd_vs_hard_val_loss", "per_class_f1", "confusion_matrix",
           "sample_predictions", "tsne")


def test_evaluate_all_writes_table_json_and_every_figure(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out_dir, run)
    result = run_script("evaluate_all.py", "--data-dir", data_dir, "--out-dir", run,
                        "--assets-dir", tmp_path / "assets", "--resamples", "300")
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "results.json").read_text())
    rows = {row["stage"]: row for row in summary["rows"]}
    assert set(rows) == {"teacher", "student", "kd_student"}
    assert "vs_baseline" not in rows["student"]
    baseline = pd.read_csv(run / "student" / "test_predictions.csv")
    baseline_right = (baseline["prediction"] == baseline["label"]).to_numpy()
    for stage in ("teacher", "kd_student"):
        versus = rows[stage]["vs_baseline"]
        assert versus["accuracy"]["low"] <= versus["accuracy"]["difference"] \
            <= versus["accuracy"]["high"]
        # Recomputed from the two runs' per-image predictions (the same test images, in
        # the same order): the difference, and the exact McNemar p by scipy's binomial test.
        predictions = pd.read_csv(run / stage / "test_predictions.csv")
        assert predictions["label"].tolist() == baseline["label"].tolist()
        right = (predictions["prediction"] == predictions["label"]).to_numpy()
        assert versus["accuracy"]["difference"] == pytest.approx(
            right.mean() - baseline_right.mean(), abs=1e-12)
        only_stage, only_baseline = int((right & ~baseline_right).sum()), \
            int((~right & baseline_right).sum())
        p_value = binomtest(min(only_stage, only_baseline), only_stage + only_baseline,
                            0.5).pvalue if only_stage + only_baseline else 1.0
        assert versus["mcnemar"]["p_value"] == pytest.approx(p_value, rel=1e-9)
        metrics = json.loads((run / stage / "test_metrics.json").read_text())
        assert rows[stage]["accuracy"] == metrics["accuracy"]
    table = (run / "results.md").read_text()
    assert "| LR KD student (resnet18) |" in table and "McNemar p" in table
    assert table.strip() in result.stdout
    for name in FIGURES:
        png = (tmp_path / "assets" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name


@pytest.mark.fast
def test_evaluate_all_compares_each_model_with_the_baseline(finished_run, tmp_path,
                                                             monkeypatch):
    """Predictions set per image so that every pair of models differs: student right on
    image 0, teacher on 0-2, KD student on 1. Each model's row must hold its difference
    from the student and McNemar's p on their discordant images (compared with the wrong
    model, the numbers change)."""
    data_dir, out_dir, _, _ = finished_run
    run = Path(shutil.copytree(out_dir, tmp_path / "run"))
    right_on = {"student": {0}, "teacher": {0, 1, 2}, "kd_student": {1}}
    real_test_stage = report.test_stage

    def planted(stage, *args, **kwargs):
        result = real_test_stage(stage, *args, **kwargs)
        labels, classes = result["labels"], result["logits"].shape[1]
        wrong = (labels + 1) % classes
        chosen = torch.tensor([labels[i] if i in right_on[stage] else wrong[i]
                               for i in range(len(labels))])
        return {**result, "logits": torch.nn.functional.one_hot(chosen, classes).float()}
    monkeypatch.setattr(report, "test_stage", planted)
    monkeypatch.setattr(sys, "argv", ["evaluate_all.py", "--data-dir", str(data_dir),
                                      "--out-dir", str(run), "--assets-dir",
                                      str(tmp_path / "assets"), "--resamples", "200",
                                      "--no-tsne"])
    assert evaluate_all.main() == 0
    rows = {row["stage"]: row for row in json.loads((run / "results.json").read_text())["rows"]}
    images = rows["student"]["n"]
    assert images >= 3
    teacher, kd = rows["teacher"]["vs_baseline"], rows["kd_student"]["vs_baseline"]
    assert teacher["accuracy"]["difference"] == pytest.approx(2 / images)
    # Teacher: 2 discordant images, both its own: p = 2 * (1/2)^2.
    assert teacher["mcnemar"]["p_value"] == pytest.approx(0.5)
    assert kd["accuracy"]["difference"] == pytest.approx(0.0)
    # KD student: one discordant image each way: p = min(1, 2 * 3/4) = 1.
    assert (kd["mcnemar"]["only_a"], kd["mcnemar"]["only_b"]) == (1, 1)
    assert kd["mcnemar"]["p_value"] == pytest.approx(1.0)


def test_evaluate_all_without_trained_stages(tiny_data, tmp_path):
    assert run_script("check_data.py", "--data-dir", tiny_data).returncode == 0
    result = run_script("evaluate_all.py", "--data-dir", tiny_data, "--out-dir", tmp_path)
    assert_one_line_error(result, "no split")


def test_predict_writes_one_row_per_test_id_in_order(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    test_table = pd.read_csv(data_dir / "test.csv")
    classes = set(pd.read_csv(data_dir / "train.csv")["label"])
    for flags in ([], ["--tta"]):
        output = tmp_path / f"submission{len(flags)}.csv"
        result = run_script("predict.py", "--data-dir", data_dir, "--out-dir", out_dir,
                            "--stage", "kd_student", "--output", output, *flags)
        assert result.returncode == 0, result.stderr
        submission = pd.read_csv(output)
        assert list(submission.columns) == ["ID", "label"]
        assert submission["ID"].tolist() == test_table["ID"].tolist()
        assert set(submission["label"]) <= classes
    # The tiny data come with test.csv's labels: the printed score is the submission's.
    submission = pd.read_csv(tmp_path / "submission0.csv")
    truth = submission.merge(pd.read_csv(data_dir / "test_labels.csv"), on="ID")
    accuracy = 100 * (truth["label_x"] == truth["label_y"]).mean()
    printed = run_script("predict.py", "--data-dir", data_dir, "--out-dir", out_dir,
                         "--stage", "kd_student", "--output", tmp_path / "again.csv").stdout
    assert f"held-out (test_labels.csv): accuracy {accuracy:.2f}%  macro-F1 " in printed
    dacon_like = Path(shutil.copytree(data_dir, tmp_path / "dacon"))
    (dacon_like / "test_labels.csv").unlink()
    unlabelled = run_script("predict.py", "--data-dir", dacon_like, "--out-dir", out_dir,
                            "--no-cache", "--output", tmp_path / "unlabelled.csv")
    assert unlabelled.returncode == 0, unlabelled.stderr
    assert "held-out" not in unlabelled.stdout
    labels = pd.read_csv(data_dir / "test_labels.csv")
    labels.iloc[1:].to_csv(dacon_like / "test_labels.csv", index=False)
    mislabelled = run_script("predict.py", "--data-dir", dacon_like, "--out-dir", out_dir,
                             "--no-cache", "--output", tmp_path / "mislabelled.csv")
    assert_one_line_error(mislabelled, "test_labels.csv does not label exactly the IDs")
    assert not (tmp_path / "mislabelled.csv").exists()
    again = run_script("predict.py", "--data-dir", data_dir, "--out-dir", out_dir,
                       "--output", tmp_path / "submission0.csv")
    assert_one_line_error(again, "exists", "--overwrite")
    teacher = run_script("predict.py", "--data-dir", data_dir, "--out-dir", out_dir,
                         "--ckpt", out_dir / "teacher" / "best.pt", "--output", tmp_path / "t.csv")
    assert_one_line_error(teacher, "is an HR model", "the images to classify are LR")


def test_predict_averages_the_probabilities_of_several_checkpoints(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    # Members that must disagree: the student, and the same with its classifier negated
    # (its ranking reversed), beside the KD student.
    negated = torch.load(out_dir / "student" / "best.pt", weights_only=True)
    for name in ("fc.weight", "fc.bias"):
        negated["model"][name] = -negated["model"][name]
    torch.save(negated, tmp_path / "negated.pt")
    ckpts = [out_dir / "student" / "best.pt", tmp_path / "negated.pt",
             out_dir / "kd_student" / "best.pt"]
    result = run_script("predict.py", "--data-dir", data_dir, "--out-dir", tmp_path,
                        "--ckpt", *ckpts, "--tta")
    assert result.returncode == 0, result.stderr
    assert f"the mean probabilities of 3 checkpoints: {', '.join(map(str, ckpts))}" \
        in result.stdout
    submission = pd.read_csv(tmp_path / "ensemble_submission.csv")
    # Recomputed here, one checkpoint at a time: the mean of their TTA probabilities.
    runtime = Runtime(torch.device("cpu"), amp=False, channels_last=False)
    pixels = load_images(data_dir, pd.read_csv(data_dir / "test.csv")["img_path"].tolist(),
                         None, "TEST")
    each = []
    for ckpt in ckpts:
        model, meta = load_checkpoint(ckpt)
        each.append(predict_probabilities(model, meta, ckpt, pixels, "TEST", 4, runtime,
                                          tta=True))
    expected = [meta["classes"][i] for i in (sum(each) / 3).argmax(1).tolist()]
    assert submission["label"].tolist() == expected
    singles = [[meta["classes"][i] for i in probs.argmax(1).tolist()] for probs in each]
    assert singles[0] != singles[1]     # else one member alone could pass for the mean
    twice = run_script("predict.py", "--data-dir", data_dir, "--out-dir", tmp_path,
                       "--ckpt", ckpts[0], ckpts[0])
    assert_one_line_error(twice, "each checkpoint once")
    mixed = run_script("predict.py", "--data-dir", data_dir, "--out-dir", tmp_path,
                       "--ckpt", ckpts[0], out_dir / "teacher" / "best.pt",
                       "--output", tmp_path / "mixed.csv")
    assert_one_line_error(mixed, "is an HR model")
    assert not (tmp_path / "mixed.csv").exists()


def test_final_fit_trains_on_every_labelled_image_into_its_own_folder(finished_run,
                                                                       tmp_path):
    data_dir, out_dir, _, _ = finished_run
    run = Path(shutil.copytree(out_dir, tmp_path / "run"))
    kept = (run / "kd_student" / "best.pt").read_bytes()
    common = ["--data-dir", data_dir, "--out-dir", run, *TINY_TRAIN_ARGS, "--final-fit"]
    no_budget = run_script("train_kd_student.py", *common)
    assert_one_line_error(no_budget, "--final-fit", "--schedule cosine --select-by last")
    result = run_script("train_kd_student.py", *common, "--recipe", "consistent",
                        "--warmup-epochs", "0.5")
    assert result.returncode == 0, result.stderr
    labelled = len(pd.read_csv(data_dir / "train.csv"))
    assert f"{labelled} train / 0 val images (final fit: every labelled image)" in result.stdout
    final = run / "kd_student_final"
    assert json.loads((final / "config.json").read_text())["args"]["final_fit"] is True
    history = pd.read_csv(final / "history.csv")
    assert history["val_acc"].isna().all() and history["train_acc"].notna().all()
    # Trained on the test rows too: the split's own run is untouched, and its test scripts
    # never read the final fit.
    assert (run / "kd_student" / "best.pt").read_bytes() == kept
    submission = run_script("predict.py", "--data-dir", data_dir, "--out-dir", run, "--ckpt",
                            final / "best.pt", run / "kd_student" / "best.pt")
    assert submission.returncode == 0, submission.stderr
    assert "held-out (test_labels.csv): accuracy" in submission.stdout
    assert (run / "ensemble_submission.csv").exists()
    # One checkpoint: its submission goes beside it, not into --stage's folder.
    alone = run_script("predict.py", "--data-dir", data_dir, "--out-dir", run, "--ckpt",
                       final / "best.pt")
    assert alone.returncode == 0, alone.stderr
    assert f"-> {final / 'submission.csv'}" in alone.stdout
    assert (final / "submission.csv").exists()
    assert not (run / "kd_student" / "submission.csv").exists()


def test_run_seeds_reports_mean_and_std_on_one_split(tiny_data, tmp_path):
    args = ["--data-dir", tiny_data, "--out-dir", tmp_path, "--seeds", "0", "1",
            "--stages", "student", "--", *TINY_TRAIN_ARGS]
    result = run_script("run_seeds.py", *args)
    assert result.returncode == 0, result.stderr
    main_split = (tmp_path / "split.csv").read_bytes()
    metrics = []
    for seed in (0, 1):
        seed_dir = tmp_path / "seeds" / f"seed{seed}"
        assert (seed_dir / "split.csv").read_bytes() == main_split
        assert json.loads((seed_dir / "student" / "config.json").read_text())["args"]["seed"] \
            == seed
        metrics.append(json.loads((seed_dir / "student" / "test_metrics.json").read_text()))
    summary = json.loads((tmp_path / "seeds" / "summary.json").read_text())
    accuracy = summary["stages"]["student"]["accuracy"]
    assert accuracy["values"] == [m["accuracy"] for m in metrics]
    assert abs(accuracy["mean"] - sum(accuracy["values"]) / 2) < 1e-12
    assert "LR baseline student" in (tmp_path / "seeds" / "summary.md").read_text()
    rerun = run_script("run_seeds.py", *args)
    assert rerun.returncode == 0 and "== seed" not in rerun.stdout   # nothing retrained
    # A kept run must match what is asked now: another budget is refused, not mixed in.
    other_budget = run_script("run_seeds.py", *args, "--epochs", "2")
    assert_one_line_error(other_budget, "seed0/student holds a finished run trained with other "
                          "settings", "--epochs 1 -> 2")
    refused = run_script("run_seeds.py", *args[:-len(TINY_TRAIN_ARGS)], "--seed", "3")
    assert_one_line_error(refused, "--seed after --")


def run_on_split_of(out_dir: Path, folder: Path) -> Path:
    """A new run folder holding a copy of ``out_dir``'s split, as a runner's own runs do."""
    folder.mkdir()
    for name in ("split.csv", "split.json"):
        shutil.copy(out_dir / name, folder / name)
    return folder


def test_compare_recipes_pairs_each_recipe_with_its_own_baseline(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    run = run_on_split_of(out_dir, tmp_path / "run")
    shutil.copytree(out_dir / "teacher", run / "teacher")
    args = ["--data-dir", data_dir, "--out-dir", run, "--seeds", "0", "1", "--resamples", "200",
            "--recipes", "reference", "at=--method kd+at --feature-layers layer1,layer2",
            "mixed=--mixup 0.2 --alpha 0.1 --beta 0.9", "--versus", "mixed", "--",
            *TINY_TRAIN_ARGS]
    result = run_script("compare_recipes.py", *args, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "recipes" / "summary.json").read_text())
    rows = {row["recipe"]: row for row in summary["recipes"]}
    assert list(rows) == ["reference", "at", "mixed"]
    # reference and at train their baselines alike: one baseline serves both; mixed's
    # baseline trains with mixup too, as its KD student does.
    assert rows["at"]["baseline_folder"] == rows["reference"]["baseline_folder"]
    assert rows["mixed"]["baseline_folder"].endswith("mixed")
    assert not (run / "recipes" / "at" / "seed0" / "student").exists()
    # --versus mixed: the other recipes' KD students also face mixed's baseline.
    assert "versus" not in rows["mixed"]["against"]
    for name in ("reference", "at"):
        assert rows[name]["against"]["versus"]["test"]["accuracy"]["baseline"] == \
            rows["mixed"]["against"]["own"]["test"]["accuracy"]["baseline"]
    mixed_baseline = json.loads((run / "recipes" / "mixed" / "seed1" / "student" /
                                 "config.json").read_text())["args"]
    assert mixed_baseline["mixup"] == 0.2 and mixed_baseline["seed"] == 1
    for name, row in rows.items():
        base = [s["baseline_accuracy"] for s in row["per_seed"]]
        kd = [s["kd_accuracy"] for s in row["per_seed"]]
        assert row["against"]["own"]["test"]["accuracy"]["difference"][0] == pytest.approx(
            (kd[0] - base[0] + kd[1] - base[1]) / 2)
        test = row["against"]["own"]["test"]["accuracy"]
        low, high = test["image_interval"]
        assert low <= test["difference"][0] <= high
        low, high = test["seed_interval"]
        assert low <= test["difference"][0] <= high
        for seed in (0, 1):
            kd_args = json.loads((run / "recipes" / name / f"seed{seed}" / "kd_student" /
                                  "config.json").read_text())["args"]
            assert kd_args["seed"] == seed and kd_args["epochs"] == 1
        assert Path(row["curves"]).read_bytes().startswith(b"\x89PNG")
        # Held-out images (test_labels.csv): every seed's score recomputed from its saved
        # predictions, and the teacher scored on their HR twins.
        labels = pd.read_csv(data_dir / "test_labels.csv")
        for seed, scores in zip((0, 1), row["per_seed"]):
            predicted = pd.read_csv(run / "recipes" / name / f"seed{seed}" / "kd_student" /
                                    "holdout_predictions.csv")
            assert scores["kd_holdout_accuracy"] == pytest.approx(
                (predicted["label"] == labels["label"]).mean())
        held = row["against"]["own"]["holdout"]["accuracy"]
        assert held["image_interval"][0] <= held["difference"][0] <= held["image_interval"][1]
    assert 0 <= summary["teacher_holdout"]["accuracy"] <= 1
    assert summary["holdout_images"] == len(pd.read_csv(data_dir / "test_labels.csv"))
    table = (run / "recipes" / "summary.md").read_text()
    assert "| reference |" in table and "| mixed |" in table and "gap closed" in table
    rerun = run_script("compare_recipes.py", *args)
    assert rerun.returncode == 0 and "== " not in rerun.stdout       # nothing retrained
    refused = run_script("compare_recipes.py", *args[:-len(TINY_TRAIN_ARGS) - 1], "--",
                         "--seed", "3")
    assert_one_line_error(refused, "--seed after -- is set by compare_recipes.py")
    bad = run_script("compare_recipes.py", "--data-dir", data_dir, "--out-dir", run,
                     "--recipes", "x=--mixup -1")
    assert_one_line_error(bad, "--mixup must be at least 0")
    unknown = run_script("compare_recipes.py", "--data-dir", data_dir, "--out-dir", run,
                         "--recipes", "fancy")
    assert_one_line_error(unknown, "'fancy': not a preset")
    bad_versus = run_script("compare_recipes.py", "--data-dir", data_dir, "--out-dir", run,
                            "--recipes", "fresh=--mixup 0.3", "--versus", "nope")
    assert_one_line_error(bad_versus, "--versus 'nope' is not one of --recipes")
    assert not (run / "recipes" / "fresh").exists()          # refused before any training
    no_teacher = run_script("compare_recipes.py", "--data-dir", data_dir, "--out-dir",
                            tmp_path / "empty")
    assert_one_line_error(no_teacher, "needs the teacher")


def test_compare_recipes_learns_from_several_teachers(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    second = run_on_split_of(out_dir, tmp_path / "second")
    for script in ("train_teacher.py", "test_teacher.py"):
        made = run_script(script, "--data-dir", data_dir, "--out-dir", second,
                          *(TINY_TRAIN_ARGS + ["--seed", "1"] if script.startswith("train")
                            else []))
        assert made.returncode == 0, made.stderr
    teachers = [out_dir / "teacher" / "best.pt", second / "teacher" / "best.pt"]
    # A teacher given weight 0 drops out of the average: the score is then the other
    # teacher's own, as test_teacher.py measured it by another route.
    for weights, alone in (("1 0", out_dir), ("0 1", second)):
        run = run_on_split_of(out_dir, tmp_path / f"weights {weights}")
        result = run_script("compare_recipes.py", "--data-dir", data_dir, "--out-dir", run,
                            "--seeds", "0", "--resamples", "100", "--recipes", "reference",
                            "--teacher-ckpt", *teachers, "--teacher-weights", *weights.split(),
                            "--", *TINY_TRAIN_ARGS)
        assert result.returncode == 0, result.stderr
        summary = json.loads((run / "recipes" / "summary.json").read_text())
        own = json.loads((alone / "teacher" / "test_metrics.json").read_text())
        assert summary["teacher"]["accuracy"] == pytest.approx(own["accuracy"])
        assert summary["teacher"]["macro_f1"] == pytest.approx(own["macro_f1"])
        assert summary["teacher_checkpoints"] == [str(ckpt) for ckpt in teachers]
        kd_args = json.loads((run / "recipes" / "reference" / "seed0" / "kd_student" /
                              "config.json").read_text())["args"]
        assert kd_args["teacher_ckpt"] == [str(ckpt) for ckpt in teachers]
        assert kd_args["teacher_weights"] == [float(w) for w in weights.split()]
        assert "probabilities averaged with weights" in \
            (run / "recipes" / "summary.md").read_text()
    # The finished runs of "0 1" were taught with other weights: not reused for "1 0".
    mixed = run_script("compare_recipes.py", "--data-dir", data_dir, "--out-dir", run,
                       "--seeds", "0", "--recipes", "reference", "--teacher-ckpt", *teachers,
                       "--teacher-weights", "1", "0", "--", *TINY_TRAIN_ARGS)
    assert_one_line_error(mixed, "holds a finished run trained with other settings",
                          "--teacher-weights [0.0, 1.0] -> [1.0, 0.0]")
    uneven = run_script("compare_recipes.py", "--data-dir", data_dir, "--out-dir", run,
                        "--recipes", "reference", "--teacher-ckpt", *teachers,
                        "--teacher-weights", "1")
    assert_one_line_error(uneven, "--teacher-weights gives 1 weight(s) for 2 teacher(s)")
