"""Distillation methods: each loss by hand, alignment across sizes and architectures,
gradients, several teachers, and every method end to end."""

import copy
import math

import pytest
import torch

from conftest import TINY_TRAIN_ARGS, assert_each_term_trains_the_student, \
    assert_one_line_error, run_script
from src.cli import ToolError
from src.distill import Distiller
from src.methods import METHODS, parse_method
from src.methods.amd import _angular_terms, amd_loss
from src.methods.at import at_loss
from src.methods.cwd import cwd_loss
from src.methods.dkd import dkd_loss_from_probs
from src.methods.fitnet import fitnet_loss
from src.methods.kd import kd_loss
from src.methods.mgd import MGDGenerator
from src.models import build_model

FEATURE_LOSSES = {"at": at_loss, "cwd": lambda s, t: cwd_loss(s, t, 4.0), "amd": amd_loss,
                  "fitnet": fitnet_loss}


@pytest.mark.fast
@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_feature_loss_is_zero_for_equal_features_and_positive_otherwise(name):
    loss = FEATURE_LOSSES[name]
    torch.manual_seed(0)
    features = torch.randn(2, 8, 6, 6)
    assert loss(features, features).abs().item() < 1e-6
    assert loss(features, torch.randn(2, 8, 6, 6)).item() > 0


@pytest.mark.fast
def test_at_by_hand():
    # Attention maps [1, 0] and [0, 1] (already unit length): mean squared difference 1.
    student = torch.tensor([[[[1.0, 0.0]]]])
    teacher = torch.tensor([[[[0.0, 1.0]]]])
    assert at_loss(student, teacher).item() == pytest.approx(1.0)


@pytest.mark.fast
def test_cwd_by_hand():
    # One channel, two locations. Teacher at tau=4: softmax([ln 3, 0]) = [3/4, 1/4];
    # student [1/2, 1/2]; KL = 0.75 ln 1.5 - 0.25 ln 2; loss = tau^2 KL = 2.0929923.
    teacher = torch.tensor([[[[4 * math.log(3.0), 0.0]]]])
    student = torch.zeros(1, 1, 1, 2)
    expected = 16 * (0.75 * math.log(1.5) - 0.25 * math.log(2.0))
    assert cwd_loss(student, teacher, 4.0).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.fast
def test_fitnet_by_hand():
    # Differences 1, -3 over two elements: mean square (1 + 9) / 2 = 5.
    student = torch.tensor([[[[2.0, 0.0]]]])
    teacher = torch.tensor([[[[1.0, 3.0]]]])
    assert fitnet_loss(student, teacher).item() == pytest.approx(5.0)


@pytest.mark.fast
def test_fitnet_of_a_teacher_initialised_student_starts_at_zero():
    # Same architecture: no projection, the maps are compared as they are. A student that
    # is a copy of the teacher, shown the same image, has nothing to regress; shown another
    # image, the term is the weight times the mean squared difference of the last maps.
    torch.manual_seed(0)
    teacher = build_model("resnet18", 5)
    student = copy.deepcopy(teacher)
    hr_images, lr_images = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    batch = {"labels": torch.tensor([0, 1]), "index": torch.arange(2)}
    objective = Distiller(student, [teacher], "fitnet", {"fitnet_weight": 100.0}).eval()
    assert all(isinstance(module, torch.nn.Identity) for module in objective.projections)
    _, terms = objective({"lr": hr_images, "hr": hr_images}, batch)
    assert terms["fitnet"].item() == pytest.approx(0.0, abs=1e-10)
    _, terms = objective({"lr": lr_images, "hr": hr_images}, batch)
    backbone = torch.nn.Sequential(*list(teacher.children())[:-2]).eval()   # to layer4
    with torch.no_grad():
        expected = 100.0 * (backbone(lr_images) - backbone(hr_images)).pow(2).mean()
    assert expected.item() > 0
    assert terms["fitnet"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.fast
def test_a_1x1_map_warns_for_the_spatial_methods_only(capsys):
    # ResNet18 at 32 px ends in a 1x1 map: attention transfer is then exactly zero (one
    # location), while fitnet still regresses the 512 values.
    torch.manual_seed(0)
    teacher = build_model("resnet18", 5)
    student = build_model("resnet18", 5)
    views = {"lr": torch.randn(2, 3, 32, 32), "hr": torch.randn(2, 3, 32, 32)}
    batch = {"labels": torch.tensor([0, 1]), "index": torch.arange(2)}
    for method, warned in (("at", True), ("fitnet", False), ("kd+at+fitnet", True)):
        objective = Distiller(student, [teacher], method, None, probe_size=32).eval()
        printed = capsys.readouterr().out
        assert ("1x1" in printed) == warned, method
        if warned:
            assert "fitnet" not in printed and "at compare maps" in printed
        _, terms = objective(views, batch)
        if "at" in terms:
            assert terms["at"].item() == pytest.approx(0.0, abs=1e-12)
        if "fitnet" in terms:
            assert terms["fitnet"].item() > 0


@pytest.mark.fast
def test_dkd_by_hand():
    # Label 0. Teacher probabilities [1/2, 1/4, 1/4], student [1/2, 3/8, 1/8] (T = 1).
    # TCKD: both binary distributions are [1/2, 1/2], so 0. NCKD: teacher non-target
    # [1/2, 1/2] against student [3/4, 1/4]: 0.5 ln(2/3) + 0.5 ln 2 = 0.1438410...
    teacher_probs = torch.tensor([[0.5, 0.25, 0.25]])
    student_logits = torch.log(torch.tensor([[0.5, 0.375, 0.125]]))
    labels = torch.tensor([0])
    nckd = 0.5 * math.log(2 / 3) + 0.5 * math.log(2)
    result = dkd_loss_from_probs(student_logits, teacher_probs, labels, 1.0, 1.0, 8.0)
    assert result.item() == pytest.approx(8 * nckd, rel=1e-5)
    # And TCKD alone: teacher [0.8 | 0.2] vs student [0.5 | 0.5] on the target class.
    teacher_probs = torch.tensor([[0.8, 0.1, 0.1]])
    student_logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    tckd = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    result = dkd_loss_from_probs(student_logits, teacher_probs, labels, 1.0, 1.0, 0.0)
    assert result.item() == pytest.approx(tckd, rel=1e-5)
    same = dkd_loss_from_probs(student_logits, torch.softmax(student_logits, 1), labels, 1.0,
                               1.0, 8.0)
    assert same.abs().item() < 1e-6


@pytest.mark.fast
def test_mgd_by_hand():
    generator = MGDGenerator(1, mask_ratio=0.5)
    with torch.no_grad():    # make the generator relu(x): identity kernels, no bias
        for conv in (generator.generate[0], generator.generate[2]):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
            conv.bias.zero_()
    student = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    keep_all = torch.ones(1, 1, 2, 2)
    # Generated = student; against a zero teacher: 1 + 4 + 9 + 16 = 30 per image.
    assert generator(student, torch.zeros_like(student), keep_all).item() == pytest.approx(30)
    assert generator(student, student, keep_all).item() == pytest.approx(0.0)
    keep_half = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert generator(student, torch.zeros_like(student), keep_half).item() == pytest.approx(17)


@pytest.mark.fast
def test_amd_angular_terms_by_hand():
    # q = 1/2 with s = 2, m = 1: psi = 2 cos(arccos 1/2) = 1, nu = 2 (1 - 1/2) = 1,
    # log-probability = 1 - ln(e + e) = -ln 2.
    log_probability, positive, negative = _angular_terms(torch.tensor([[0.5]]), 2.0, 1.0)
    assert positive.item() == pytest.approx(1.0, abs=1e-6)
    assert negative.item() == pytest.approx(1.0)
    assert log_probability.item() == pytest.approx(-math.log(2.0), abs=1e-6)
    # The margin makes the positive term smaller: s cos(1.35 * arccos q) < s q for q in (0,1).
    _, with_margin, _ = _angular_terms(torch.tensor([[0.5]]), 64.0, 1.35)
    assert with_margin.item() == pytest.approx(64 * math.cos(1.35 * math.acos(0.5)), rel=1e-5)


@pytest.mark.fast
def test_amd_global_and_local_weighting():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    only_global = amd_loss(student, teacher, global_weight=1.0)
    only_local = amd_loss(student, teacher, global_weight=0.0)
    assert amd_loss(student, teacher).item() == pytest.approx(
        0.8 * only_global.item() + 0.2 * only_local.item(), rel=1e-5)


@pytest.mark.fast
def test_amd_global_loss_matches_a_hand_worked_value():
    """Student attention (1, 0, 0, 0) over a 2x2 map, the teacher's (1, 1, 1, 1) (summed
    over two channels): normalised, q_s = (1, 0, 0, 0) and q_t = (1/2, 1/2, 1/2, 1/2)."""
    s, m = 64.0, 1.35
    student = torch.zeros(1, 2, 2, 2)
    student[0, 0, 0, 0] = 1.0
    teacher = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    # Student at q = 1: psi = s cos(0) = s, nu = s (1 - 1) = 0, log-prob psi - log(e^psi +
    # e^nu) = 0 (to e^-64). At q = 0: psi = s cos(m pi/2), nu = s, log-prob = psi - s (to
    # e^-97, since s >> psi).
    psi0 = s * math.cos(m * math.pi / 2)

    def unit(values):
        norm = math.sqrt(sum(v * v for v in values))
        return [v / norm for v in values]
    student_maps = [unit([0.0, psi0 - s, psi0 - s, psi0 - s]), unit([s, psi0, psi0, psi0]),
                    unit([0.0, s, s, s])]
    # The teacher's maps are constant over the locations: each normalises to +-1/2
    # (log-prob < 0; psi = s cos(m pi/3) > 0; nu = s/2 > 0).
    teacher_maps = [[-0.5] * 4, [0.5] * 4, [0.5] * 4]
    expected = sum(sum((a - b) ** 2 for a, b in zip(sm, tm)) / 4
                   for sm, tm in zip(student_maps, teacher_maps)) / 3
    assert expected == pytest.approx(0.2464, abs=1e-4)       # worked by hand as well
    assert amd_loss(student, teacher, global_weight=1.0).item() == pytest.approx(expected,
                                                                                  rel=1e-5)


@pytest.mark.fast
def test_amd_local_loss_is_the_mean_over_the_four_quadrants():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    quadrants = [(slice(0, 2), slice(0, 2)), (slice(0, 2), slice(2, 4)),
                 (slice(2, 4), slice(0, 2)), (slice(2, 4), slice(2, 4))]
    each = [amd_loss(student[..., rows, cols], teacher[..., rows, cols], global_weight=1.0)
            for rows, cols in quadrants]
    assert amd_loss(student, teacher, global_weight=0.0).item() == pytest.approx(
        sum(each).item() / 4, rel=1e-5)


def _pair(student_arch="resnet18", teacher_arch="mobilenet_v3_large"):
    torch.manual_seed(0)
    return build_model(student_arch, 5), build_model(teacher_arch, 5)


@pytest.mark.fast
@pytest.mark.parametrize("method", [*sorted(METHODS), "dkd+cwd+mgd+amd+fitnet"])
def test_mismatched_sizes_and_channels_give_finite_losses_and_right_gradients(method):
    # ResNet18 student (512 channels, 3x3 map at 96 px); MobileNetV3 teacher (960 channels,
    # 4x4 map at 128 px): feature maps differ in size and channels.
    student, teacher = _pair()
    objective = Distiller(student, [teacher], method, {"dkd_warmup": 0},
                          teacher_input_sizes=[128], probe_size=96)
    objective.train()
    views = {"lr": torch.randn(4, 3, 96, 96), "hr": torch.randn(4, 3, 128, 128)}
    batch = {"labels": torch.tensor([0, 1, 2, 3]), "index": torch.arange(4)}
    _, terms = objective(views, batch)
    assert set(terms) == {"ce", *parse_method(method)}
    for name, value in terms.items():
        assert torch.isfinite(value), name
        if name != "ce":
            assert value.item() > 0, name
    assert_each_term_trains_the_student(terms, student)
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    learned = {name: p for name, p in objective.named_parameters()   # projections, generators
               if not name.startswith(("student.", "teachers."))}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned.values()), learned
    assert all(p.grad is None for p in objective.teachers.parameters())
    if {"cwd", "mgd", "fitnet"} & set(parse_method(method)):
        assert len(list(objective.projections[0].parameters())) == 1   # the 1x1 projection
        assert "projections.0.weight" in objective.extra_state()        # saved with the student


@pytest.mark.fast
def test_two_identical_teachers_equal_one():
    student, teacher = _pair("resnet18", "resnet18")
    views = {"lr": torch.randn(3, 3, 64, 64), "hr": torch.randn(3, 3, 64, 64)}
    batch = {"labels": torch.tensor([0, 1, 2]), "index": torch.arange(3)}
    for method in ("kd", "dkd+at"):
        single = Distiller(student, [teacher], method, {"dkd_warmup": 0}).eval()
        double = Distiller(student, [teacher, copy.deepcopy(teacher)], method,
                           {"dkd_warmup": 0, "teacher_weights": [0.3, 0.7]}).eval()
        _, single_terms = single(views, batch)
        _, double_terms = double(views, batch)
        for name in single_terms:
            assert torch.allclose(single_terms[name], double_terms[name], rtol=1e-5), name


@pytest.mark.fast
def test_soft_targets_average_teacher_probabilities():
    student, teacher = _pair("resnet18", "resnet18")
    other = build_model("resnet18", 5)
    views = {"lr": torch.randn(2, 3, 32, 32), "hr": torch.randn(2, 3, 32, 32)}
    batch = {"labels": torch.tensor([0, 1]), "index": torch.arange(2)}
    objective = Distiller(student, [teacher, other], "kd",
                          {"teacher_weights": [1, 3]}).eval()
    _, terms = objective(views, batch)
    with torch.no_grad():
        # In float64 from the same logits: the KL here (~0.01) is a difference of nearly
        # equal terms, so float32 rounding alone moves it by ~1e-5 relative.
        probs = 0.25 * torch.softmax(teacher(views["hr"]).double() / 4, 1) \
            + 0.75 * torch.softmax(other(views["hr"]).double() / 4, 1)
        student_log = torch.log_softmax(student(views["lr"]).double() / 4, 1)
        expected = 0.3 * 16 * (probs * (probs.log() - student_log)).sum(1).mean()
    assert terms["kd"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert kd_loss(student(views["lr"]), teacher(views["hr"]), 4.0).item() > 0


@pytest.mark.fast
def test_method_names_are_checked():
    assert parse_method("KD+at") == ["kd", "at"]
    for bad in ("kd+dkd", "xyz", "at+at", ""):
        with pytest.raises(ToolError):
            parse_method(bad)


@pytest.mark.parametrize("method", [*sorted(METHODS), "kd+at"])   # every registered one
def test_every_method_trains_one_epoch_end_to_end(finished_run, tmp_path, method):
    data_dir, out_dir, _, _ = finished_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("split.csv", "split.json"):
        (run / name).write_bytes((out_dir / name).read_bytes())
    # At 64 px the student's last map is 2x2: at, cwd and amd compare maps over locations,
    # and are exactly zero on a 1x1 map (the teacher's, at 32 px, is spread over the 2x2).
    result = run_script("train_kd_student.py", "--data-dir", data_dir, "--out-dir", run,
                        *TINY_TRAIN_ARGS, "--input-size", "64", "--method", method,
                        "--teacher-ckpt", out_dir / "teacher" / "best.pt")
    assert result.returncode == 0, result.stderr
    assert "1x1" not in result.stdout
    history = __import__("pandas").read_csv(run / "kd_student" / "history.csv")
    for part in parse_method(method):
        # Each term was computed and learnt from: a student that trained as the baseline
        # would record nothing, or zero.
        assert (history[f"loss_{part}"] > 0).all(), (part, history[f"loss_{part}"].tolist())
    best = torch.load(run / "kd_student" / "best.pt", weights_only=True)
    for part in parse_method(method):   # a method's own modules are saved with the student
        if getattr(METHODS[part], "pair_modules", None):
            assert any(key.startswith(METHODS[part].pair_modules + ".")
                       for key in best["distill_modules"])


def test_two_teachers_end_to_end_and_bad_method(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("split.csv", "split.json"):
        (run / name).write_bytes((out_dir / name).read_bytes())
    teacher = out_dir / "teacher" / "best.pt"
    result = run_script("train_kd_student.py", "--data-dir", data_dir, "--out-dir", run,
                        *TINY_TRAIN_ARGS, "--method", "kd+amd", "--teacher-ckpt", teacher,
                        teacher, "--teacher-weights", "1", "2")
    assert result.returncode == 0, result.stderr
    bad = run_script("train_kd_student.py", "--data-dir", data_dir, "--out-dir", tmp_path / "b",
                     *TINY_TRAIN_ARGS, "--method", "kd+crd")
    assert_one_line_error(bad, "--method", "crd")
    weights = run_script("train_kd_student.py", "--data-dir", data_dir, "--out-dir",
                         tmp_path / "c", *TINY_TRAIN_ARGS, "--teacher-ckpt", teacher,
                         "--teacher-weights", "1", "2")
    assert_one_line_error(weights, "--teacher-weights gives 2 weight(s) for 1 teacher(s)")


@pytest.mark.fast
@pytest.mark.parametrize("student_arch,teacher_arch", [("efficientnet_b0", "resnet50"),
                                                       ("mobilenet_v3_large", "resnet18")])
def test_student_and_teacher_families_combine(student_arch, teacher_arch):
    student, teacher = _pair(student_arch, teacher_arch)
    objective = Distiller(student, [teacher], "kd+at+cwd+mgd+amd", None,
                          teacher_input_sizes=[96], probe_size=64)
    views = {"lr": torch.randn(2, 3, 64, 64), "hr": torch.randn(2, 3, 96, 96)}
    _, terms = objective.train()(views, {"labels": torch.tensor([0, 1]), "index": torch.arange(2)})
    assert all(torch.isfinite(value) for value in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is None for p in objective.teachers.parameters())
