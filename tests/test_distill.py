"""The KD loss against hand-worked values, and a teacher that cannot learn."""

import math

import torch
import pytest

from src.data import ImageSet, batch_indices, epoch_generator, load_or_create_split
from src.distill import Distiller
from src.methods.kd import kd_loss
from src.models import FrozenTeacher, build_model
from src.trainer import FitConfig, Runtime, train_one_epoch


# Quick enough for make test-fast.
pytestmark = pytest.mark.fast


def test_kd_loss_equals_hand_computed_value():
    # Teacher at T=4 gives softmax([ln 3, 0]) = [3/4, 1/4]; the student gives [1/2, 1/2].
    # KL = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 0.75 ln 1.5 - 0.25 ln 2 = 0.1308120...
    # and the loss is T^2 * KL = 16 * 0.1308120 = 2.0929923...
    teacher_logits = torch.tensor([[4 * math.log(3.0), 0.0]])
    student_logits = torch.tensor([[0.0, 0.0]])
    expected = 16 * (0.75 * math.log(1.5) - 0.25 * math.log(2.0))
    assert math.isclose(expected, 2.0929923, rel_tol=1e-6)
    assert math.isclose(kd_loss(student_logits, teacher_logits, 4.0).item(), expected,
                        rel_tol=1e-5)


def test_kd_loss_is_a_batch_mean_of_per_sample_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    per_sample = [kd_loss(student[i:i + 1], teacher[i:i + 1], 2.0) for i in range(5)]
    assert torch.allclose(kd_loss(student, teacher, 2.0), torch.stack(per_sample).mean())


def test_kd_loss_scales_with_temperature_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 25), torch.randn(8, 25)
    at_one = kd_loss(student, teacher, 1.0)
    for temperature in (2.0, 4.0, 8.0):
        # Scaling the logits by T leaves the softened distributions as at T=1, so only the
        # T^2 factor remains.
        scaled = kd_loss(student * temperature, teacher * temperature, temperature)
        assert torch.allclose(scaled, temperature ** 2 * at_one, rtol=1e-5)
    assert kd_loss(teacher, teacher, 4.0).abs().item() < 1e-6
    assert at_one.item() > 0


def test_frozen_teacher_stays_in_eval_mode_and_refuses_gradients():
    teacher = FrozenTeacher(build_model("resnet18", 4))
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    output = teacher(torch.randn(2, 3, 32, 32))
    assert not output.requires_grad


def test_teacher_weights_do_not_change_during_kd_training(tiny_data, tmp_path):
    torch.manual_seed(0)
    split = load_or_create_split(tiny_data, tmp_path, seed=0, quiet=True)
    images = ImageSet.load(split, tiny_data, ["lr", "hr"], cache_dir=None, quiet=True)
    student = build_model("resnet18", len(split.classes))
    teacher = build_model("resnet18", len(split.classes))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    objective = Distiller(student, [teacher], "kd", {"alpha": 0.7, "beta": 0.3})
    trainable = [p for p in objective.parameters() if p.requires_grad]
    assert len(trainable) == len(list(student.parameters()))
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    cfg = FitConfig(epochs=1, batch_size=8, lr=1e-2, weight_decay=0.0, lr_factor=0.5,
                    lr_patience=1, min_lr=0.0, patience=1, monitor="val_loss", hflip=True,
                    crop_scale=0.75, seed=0, amp=False, channels_last=False,
                    view_sizes={"lr": 32, "hr": 32})
    generator = epoch_generator(0, 1)
    batches = batch_indices(split.indices("train"), 8, generator)
    result = train_one_epoch(objective, images, batches, cfg.view_sizes, cfg, generator,
                             optimizer, Runtime(torch.device("cpu"), False, False), "test")
    assert {"loss_ce", "loss_kd"} <= set(result)
    assert not objective.teachers[0].training
    assert all(p.grad is None for p in objective.teachers[0].parameters())
    for key, value in teacher.state_dict().items():   # weights and BatchNorm statistics
        assert torch.equal(value, teacher_before[key]), key
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
