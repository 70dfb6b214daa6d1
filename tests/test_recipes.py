"""The distillation recipes' parts: paired mixup/cutmix, the warm-up + cosine schedule and
final-epoch selection, the teacher-initialised student, feature taps at several layers,
presets, and every numeric flag checked before work starts."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_TRAIN_ARGS, assert_one_line_error, run_script
from src.cli import ToolError
from src.mixing import MixParams, mix_views, sample_mix_params
from src.distill import Distiller, FeatureTap, HardLabels, hard_label_loss, match_spatial
from src.methods.at import at_loss
from src.models import build_model
from src.recipes import RECIPES
from src.arguments import check_arguments, parse_train_arguments, train_parser
from src.trainer import FitConfig, make_scheduler


def _paired_views(batch: int = 6, lr_side: int = 8, scale: int = 4):
    """An LR view and its exact HR twin (nearest upsampling): any mixing that treats both
    alike keeps hr == upsample(lr)."""
    torch.manual_seed(0)
    lr = torch.randn(batch, 3, lr_side, lr_side)
    return {"lr": lr, "hr": F.interpolate(lr, scale_factor=scale, mode="nearest")}


@pytest.mark.fast
@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0)])
def test_paired_mixing_gives_lr_and_hr_the_same_partner_and_share(mixup, cutmix):
    views = _paired_views()
    for epoch in range(20):
        generator = torch.Generator().manual_seed(epoch)
        mix = sample_mix_params(6, generator, mixup, cutmix, grid=8)
        mixed = mix_views(views, mix)
        assert (mix.box is not None) == (cutmix > 0)
        assert sorted(mix.partner.tolist()) == list(range(6))
        expected_hr = F.interpolate(mixed["lr"], scale_factor=4, mode="nearest")
        assert torch.allclose(mixed["hr"], expected_hr, atol=1e-6)
        if mix.box is None:
            own = mixed["lr"] - mix.lam * views["lr"]
            assert torch.allclose(own, (1 - mix.lam) * views["lr"][mix.partner], atol=1e-5)
        else:
            top, left, height, width = mix.box
            inside = mixed["lr"][..., top:top + height, left:left + width]
            assert torch.equal(inside, views["lr"][mix.partner][..., top:top + height,
                                                               left:left + width])
            assert mix.lam == pytest.approx(1 - height * width / 64)
    # A mix that treated the two views differently would break the pairing: this check
    # sees it.
    wrong = {"lr": mix_views({"lr": views["lr"]}, mix)["lr"],
             "hr": mix_views({"hr": views["hr"]}, MixParams(mix.partner.roll(1), mix.lam,
                                                            mix.box, mix.grid))["hr"]}
    assert not torch.allclose(wrong["hr"], F.interpolate(wrong["lr"], scale_factor=4,
                                                         mode="nearest"))


@pytest.mark.fast
def test_mixing_is_off_by_default_and_repeats_for_a_generator():
    assert sample_mix_params(4, torch.Generator(), 0.0, 0.0, 8) is None
    first = sample_mix_params(4, torch.Generator().manual_seed(3), 0.2, 1.0, 8)
    again = sample_mix_params(4, torch.Generator().manual_seed(3), 0.2, 1.0, 8)
    assert torch.equal(first.partner, again.partner) and first.lam == again.lam \
        and first.box == again.box


@pytest.mark.fast
def test_mixed_cross_entropy_weighs_both_labels():
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    mix = MixParams(torch.tensor([1, 0, 3, 2]), 0.3)
    expected = 0.3 * F.cross_entropy(logits, labels) \
        + 0.7 * F.cross_entropy(logits, labels[mix.partner])
    batch = {"labels": labels, "mix": mix, "partner_labels": labels[mix.partner]}
    assert hard_label_loss(logits, batch).item() == \
        pytest.approx(expected.item(), rel=1e-6)
    assert hard_label_loss(logits, {"labels": labels}).item() == \
        pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def _config(**overrides) -> FitConfig:
    settings = dict(epochs=4, batch_size=8, lr=1e-3, weight_decay=0.0, lr_factor=0.5,
                    lr_patience=1, min_lr=1e-5, patience=1, monitor="last", hflip=True,
                    crop_scale=1.0, seed=0, amp=False, channels_last=False,
                    view_sizes={"lr": 32}, schedule="cosine", warmup_epochs=1.0)
    settings.update(overrides)
    return FitConfig(**settings)


@pytest.mark.fast
def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1e-3)
    scheduler = make_scheduler(optimizer, _config(), steps_per_epoch=10)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup, decay = rates[:10], rates[10:]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))          # rises
    assert warmup[-1] < 1e-3 and decay[0] == pytest.approx(1e-3)   # peak after warm-up
    assert all(a >= b for a, b in zip(decay, decay[1:]))           # then only falls
    # Half-way through the decay the rate is midway between peak and floor.
    assert decay[15] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2, rel=1e-6)
    assert decay[-1] > 1e-5                                         # last batch: just above
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)   # the floor, at the end


def test_cosine_runs_the_whole_budget_and_keeps_the_last_epoch(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = [*TINY_TRAIN_ARGS[:-4], "--epochs", "3", "--batch-size", "8", "--lr", "1e-3",
            "--schedule", "cosine", "--warmup-epochs", "1", "--monitor", "last",
            "--patience", "1", "--mixup", "0.2", "--cutmix", "1"]
    result = run_script("train_student.py", "--data-dir", tiny_data, "--out-dir", out, *args)
    assert result.returncode == 0, result.stderr
    history = __import__("pandas").read_csv(out / "student" / "history.csv")
    assert len(history) == 3                       # patience 1 stops nothing under cosine
    assert history["lr"].iloc[1] > history["lr"].iloc[2]
    best = torch.load(out / "student" / "best.pt", weights_only=True)
    assert best["epoch"] == 3


def test_teacher_initialised_student_starts_from_the_teachers_weights(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    args = parse_train_arguments("student", ["--out-dir", str(out_dir), "--arch", "resnet18",
                                             "--weights", "teacher"])
    from src.stages import resolve_init_weights
    resolve_init_weights(args, out_dir)
    assert args.weights == str(out_dir / "teacher" / "best.pt")
    student = build_model("resnet18", 4, args.weights)
    teacher = torch.load(out_dir / "teacher" / "best.pt", weights_only=True)["model"]
    # Every layer is the teacher's but the classification head, which starts fresh (as
    # after any --weights: build_model replaces the head), as in the measured runs.
    for key, value in student.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, teacher[key]), key
    assert not torch.equal(student.fc.weight, teacher["fc.weight"])
    scratch = build_model("resnet18", 4, "none")
    assert not torch.equal(scratch.conv1.weight, student.conv1.weight)

    # End to end, recorded in config.json; another architecture is refused in one line.
    run = tmp_path / "run"
    run.mkdir()
    for name in ("split.csv", "split.json"):
        (run / name).write_bytes((out_dir / name).read_bytes())
    (run / "teacher").mkdir()
    (run / "teacher" / "best.pt").write_bytes((out_dir / "teacher" / "best.pt").read_bytes())
    result = run_script("train_student.py", "--data-dir", data_dir, "--out-dir", run,
                        *TINY_TRAIN_ARGS, "--weights", "teacher")
    assert result.returncode == 0, result.stderr
    config = __import__("json").loads((run / "student" / "config.json").read_text())
    assert config["args"]["weights"] == str(run / "teacher" / "best.pt")
    other = run_script("train_kd_student.py", "--data-dir", data_dir, "--out-dir", run,
                       *TINY_TRAIN_ARGS, "--arch", "resnet34", "--weights", "teacher")
    assert_one_line_error(other, "--weights teacher", "resnet18", "resnet34", "same --arch")


@pytest.mark.fast
def test_feature_taps_read_every_named_layer():
    model = build_model("resnet18", 4)
    tap = FeatureTap(model, "student", ("layer1", "layer2", "layer3", "last"))
    model.eval()(torch.zeros(2, 3, 64, 64))
    shapes = [tuple(features.shape) for features in tap.take()]
    assert shapes == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    with pytest.raises(ToolError, match="has no such layer.*layer1"):
        FeatureTap(model, "student", ("layer9",))
    with pytest.raises(ToolError, match="neither a \\(batch, channels"):
        FeatureTap(model, "student", ("fc",))
        model(torch.zeros(1, 3, 64, 64))


@pytest.mark.fast
def test_multi_layer_attention_transfer_sums_layers_with_larger_hr_maps_aligned():
    torch.manual_seed(0)
    student, teacher = build_model("resnet18", 4), build_model("resnet18", 4).eval()
    layers = ("layer1", "layer2", "layer3")
    objective = Distiller(student, [teacher], "at", {"alpha": 1.0, "at_weight": 1.0,
                                                  "feature_layers": layers},
                          probe_size=32).train()
    # The HR teacher sees 64 px, the student 32 px: teacher maps are twice the size.
    views = {"lr": torch.randn(2, 3, 32, 32), "hr": torch.randn(2, 3, 64, 64)}
    batch = {"labels": torch.tensor([0, 1]), "index": torch.arange(2)}
    _, terms = objective(views, batch)

    student_tap = FeatureTap(student, "s", layers)
    teacher_tap = FeatureTap(teacher, "t", layers)
    student(views["lr"])
    with torch.no_grad():
        teacher(views["hr"])
    expected = sum(at_loss(s, match_spatial(t, s.shape[-2:]))
                   for s, t in zip(student_tap.take(), teacher_tap.take()))
    assert terms["at"].item() == pytest.approx(expected.item(), rel=1e-4)
    terms["at"].backward()
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0     # an early layer learns
    assert all(p.grad is None for p in objective.teachers.parameters())


@pytest.mark.fast
def test_cwd_projections_per_layer_and_teacher():
    student = build_model("resnet18", 4)
    teachers = [build_model("resnet50", 4), build_model("resnet34", 4)]
    objective = Distiller(student, teachers, "cwd",
                          {"feature_layers": ("layer2", "layer4"),
                           "teacher_weights": [1, 1]}, probe_size=32)
    # resnet50's maps are 4x wider than resnet18's: projections there; resnet34's match.
    assert [type(p).__name__ for p in objective.projections] == \
        ["Conv2d", "Conv2d", "Identity", "Identity"]
    assert len(objective.projections) == 4
    # 64 px: layer4's map is 2x2, so every layer's channel distributions have several
    # locations and cwd is non-zero at each (at 32 px layer4's 1x1 map gives exactly zero).
    views = {"lr": torch.randn(2, 3, 64, 64), "hr": torch.randn(2, 3, 64, 64)}
    _, terms = objective.train()(views, {"labels": torch.tensor([0, 1]),
                                         "index": torch.arange(2)})
    assert terms["cwd"].item() > 0
    terms["cwd"].backward()
    # Every projection is trained by the term, and the student through each tapped layer.
    for projection in objective.projections:
        for parameter in projection.parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert student.layer2[-1].conv2.weight.grad.abs().sum() > 0
    assert student.layer4[-1].conv2.weight.grad.abs().sum() > 0


@pytest.mark.fast
def test_presets_fill_defaults_and_explicit_flags_win():
    consistent = parse_train_arguments("kd_student", ["--recipe", "consistent"])
    for key, value in RECIPES["consistent"].items():
        assert getattr(consistent, key) == value
    override = parse_train_arguments("kd_student", ["--recipe", "consistent", "--alpha", "0.5"])
    assert override.alpha == 0.5 and override.schedule == "cosine"
    reference = parse_train_arguments("kd_student", [])
    assert (reference.recipe, reference.method, reference.temperature, reference.beta,
            reference.schedule, reference.mixup) == ("reference", "kd", 4.0, 0.3, "plateau", 0)
    # The baseline takes the same training settings and none of the distillation ones.
    baseline = parse_train_arguments("student", ["--recipe", "consistent"])
    assert baseline.schedule == "cosine" and baseline.mixup == consistent.mixup
    assert not hasattr(baseline, "alpha")
    # teacher-init starts students (baseline too) from the teacher, never the teacher.
    for stage in ("student", "kd_student"):
        assert parse_train_arguments(stage, ["--recipe", "teacher-init"]).weights == "teacher"
    teacher = parse_train_arguments("teacher", ["--recipe", "teacher-init"])
    assert teacher.weights == "imagenet" and teacher.schedule == "cosine"


@pytest.mark.fast
def test_presets_say_what_an_explicit_flag_replaces_and_weigh_ce_only_against_kd():
    from src.arguments import preset_overrides
    from src.stages import resolve_train_arguments
    assert preset_overrides("student", ["--recipe", "teacher-init", "--weights", "none"]) == \
        ["note: --weights none replaces the teacher-init preset's teacher"]
    assert preset_overrides("kd_student", ["--recipe", "consistent", "--alpha=0.5",
                                           "--mixup", "0.2"]) == \
        ["note: --alpha 0.5 replaces the consistent preset's 0.1"]      # 0.2 is the preset's
    assert preset_overrides("teacher", ["--recipe", "teacher-init", "--weights", "none"]) == []
    assert preset_overrides("kd_student", ["--recipe", "consistent"]) == []
    # The preset's alpha 0.1 / beta 0.9 split the loss between CE and kd; without kd the
    # cross-entropy keeps its full weight.
    for method, alpha in (("kd", 0.1), ("kd+at", 0.1), ("at", 1.0), ("dkd", 1.0)):
        args = resolve_train_arguments("kd_student", ["--recipe", "consistent", "--method",
                                                      method, "--weights", "none"])
        assert args.alpha == alpha, method


@pytest.mark.fast
@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "-1", "--lr must be positive"),
    ("--lr", "0", "--lr must be positive"),
    ("--weight-decay", "-1", "--weight-decay must be at least 0"),
    ("--lr-factor", "2", "--lr-factor must be in (0, 1)"),
    ("--lr-factor", "1", "--lr-factor must be in (0, 1)"),
    ("--lr-patience", "-1", "--lr-patience must be at least 0"),
    ("--min-lr", "-0.001", "--min-lr must be at least 0"),
    ("--min-lr", "1", "--min-lr 1.0 is above --lr"),
    ("--crop-scale", "0", "--crop-scale must be in (0, 1]"),
    ("--mixup", "-0.2", "--mixup must be at least 0"),
    ("--cutmix", "nan", "--cutmix must be a finite number"),
    ("--lr", "inf", "--lr must be a finite number"),
    ("--seed", "-1", "--seed must be at least 0"),
    ("--teacher-weights", "nan", "--teacher-weights must be finite"),
    ("--warmup-epochs", "-1", "--warmup-epochs must be at least 0"),
    ("--temperature", "0", "--temperature must be positive"),
    ("--beta", "-1", "--beta must be at least 0"),
    ("--mgd-mask", "1", "--mgd-mask must be in [0, 1)"),
    ("--fitnet-weight", "-1", "--fitnet-weight must be at least 0"),
    ("--epochs", "0", "--epochs must be at least 1"),
    ("--split-per-class", "0", "--split-per-class must be at least 1"),
])
def test_every_numeric_flag_is_checked_before_work(flag, value, message):
    with pytest.raises(ToolError) as error:
        check_arguments(parse_train_arguments("kd_student", [flag, value]))
    assert message in str(error.value)


def _numeric_flags() -> list:
    """Every int or float flag of the three train scripts, read from their parsers: a flag
    added later joins the next test without being listed anywhere."""
    flags = {}
    for stage in ("teacher", "student", "kd_student"):
        for action in train_parser(stage)._actions:
            if action.type in (int, float):
                flags.setdefault(action.option_strings[0], (stage, action.type))
    return sorted(flags.items())


@pytest.mark.fast
@pytest.mark.parametrize("flag, where", _numeric_flags(),
                         ids=[flag for flag, _ in _numeric_flags()])
def test_every_numeric_flag_refuses_negative_and_non_finite_values(flag, where):
    """No flag of ours takes -1, NaN or infinity: each is refused by the check that runs
    before any work, naming the flag (a flag with no bounds was accepted and failed later,
    with a traceback or a NaN loss)."""
    stage, kind = where
    for value in ("-1",) if kind is int else ("-1", "nan", "inf"):
        with pytest.raises(ToolError, match=re.escape(flag)):
            check_arguments(parse_train_arguments(stage, [flag, value]))


@pytest.mark.fast
def test_cosine_warmup_must_leave_a_decay():
    with pytest.raises(ToolError, match="--warmup-epochs 5.0 leaves nothing") as refused:
        check_arguments(parse_train_arguments(
            "student", ["--schedule", "cosine", "--epochs", "5", "--warmup-epochs", "5"]))
    assert "preset" not in str(refused.value)       # no preset set any of it


@pytest.mark.fast
def test_an_error_caused_by_a_preset_value_names_the_preset():
    """--recipe consistent --epochs 1: the user never typed --warmup-epochs 1."""
    with pytest.raises(ToolError) as refused:
        check_arguments(parse_train_arguments("student", ["--recipe", "consistent",
                                                          "--epochs", "1"]))
    assert str(refused.value) == ("--warmup-epochs 1.0 leaves nothing of --epochs 1 for the "
                                  "cosine decay (the --recipe consistent preset sets "
                                  "--warmup-epochs 1)")
    # A value given on the command line is the user's own, even under a preset.
    with pytest.raises(ToolError) as refused:
        check_arguments(parse_train_arguments("student", ["--recipe", "consistent",
                                                          "--epochs", "2",
                                                          "--warmup-epochs", "2"]))
    assert "preset" not in str(refused.value)


@pytest.mark.parametrize("flag,value", [("--lr", "-1"), ("--weight-decay", "-1"),
                                        ("--lr-factor", "2")])
def test_the_known_tracebacks_are_one_line_errors(tiny_data, tmp_path, flag, value):
    result = run_script("train_student.py", "--data-dir", tiny_data, "--out-dir",
                        tmp_path / "run", *TINY_TRAIN_ARGS, flag, value)
    assert_one_line_error(result, flag)
    assert not (tmp_path / "run" / "split.csv").exists()     # refused before any work


def test_teacher_cache_refuses_mixing(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    result = run_script("train_kd_student.py", "--data-dir", data_dir, "--out-dir",
                        tmp_path / "run", *TINY_TRAIN_ARGS, "--teacher-cache", "--mixup", "0.2",
                        "--teacher-ckpt", out_dir / "teacher" / "best.pt")
    assert_one_line_error(result, "--teacher-cache", "--mixup")


@pytest.mark.fast
def test_hard_labels_objective_uses_the_mix():
    model = build_model("resnet18", 3)
    objective = HardLabels(model, "lr").eval()
    views = {"lr": torch.randn(2, 3, 32, 32)}
    mix = MixParams(torch.tensor([1, 0]), 0.25)
    batch = {"labels": torch.tensor([0, 2]), "mix": mix, "partner_labels": torch.tensor([2, 0])}
    logits, terms = objective(views, batch)
    assert terms["ce"].item() == pytest.approx(hard_label_loss(logits, batch).item())
    assert not math.isclose(terms["ce"].item(),
                            F.cross_entropy(logits, torch.tensor([0, 2])).item())


@pytest.mark.fast
@pytest.mark.parametrize("monitor,best_epoch", [("val_macro_f1", 3), ("val_acc", 2),
                                                ("val_loss", 4)])
def test_select_by_keeps_the_epoch_best_on_its_own_measure(monkeypatch, tmp_path, monitor,
                                                           best_epoch):
    """Validation loss, accuracy and macro-F1 peak at different epochs here: best.pt is
    the epoch that is best on the measure --select-by names."""
    import numpy as np
    from types import SimpleNamespace
    from src import trainer
    scripted = iter([(0.5, 0.60, 0.50), (0.4, 0.70, 0.40), (0.6, 0.50, 0.65),
                     (0.3, 0.65, 0.45)])           # (loss, accuracy, macro-F1) per epoch

    def fake_evaluate(*args, **kwargs):
        loss, accuracy, f1 = next(scripted)
        return {"loss": loss, "accuracy": accuracy, "macro_f1": f1}
    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    monkeypatch.setattr(trainer, "train_one_epoch",
                        lambda *args, **kwargs: {"loss": 1.0, "ce": 1.0, "acc": 0.5})
    split = SimpleNamespace(indices=lambda subset: np.arange(8) if subset == "train"
                            else np.arange(8, 10))
    cfg = FitConfig(epochs=4, batch_size=4, lr=1e-3, weight_decay=0.0, lr_factor=0.5,
                    lr_patience=10, min_lr=0.0, patience=10, monitor=monitor, hflip=False,
                    crop_scale=1.0, seed=0, amp=False, channels_last=False,
                    view_sizes={"lr": 8})
    objective = HardLabels(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2)),
                           "lr")
    summary = trainer.fit(objective, SimpleNamespace(split=split), cfg, tmp_path,
                          trainer.Runtime(torch.device("cpu"), False, False), {}, resume=False)
    assert summary["best_epoch"] == best_epoch
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == best_epoch
