"""DIST: Pearson correlation of the student's and teacher's predictions, inter-class (per
image) and intra-class (per class over the batch), checked against an independent
float64 recomputation and through the Distiller."""

import pytest
import torch

from conftest import assert_each_term_trains_the_student
from src.distill import Distiller
from src.methods.dist import dist_loss
from src.models import build_model

pytestmark = pytest.mark.fast


def _pearson_loss(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - the mean over rows of numpy-style correlation coefficients, in float64."""
    return 1 - sum(torch.corrcoef(torch.stack([a, b]))[0, 1].item()
                   for a, b in zip(x.double(), y.double())) / len(x)


def test_dist_loss_is_the_papers_inter_and_intra_class_correlation():
    torch.manual_seed(0)
    student_logits, teacher_logits = torch.randn(6, 5) * 2, torch.randn(6, 5) * 2
    tau, beta, gamma = 2.0, 0.5, 3.0
    student_probs = torch.softmax(student_logits.double() / tau, 1)
    teacher_probs = torch.softmax(teacher_logits.double() / tau, 1)
    inter = _pearson_loss(student_probs, teacher_probs)            # rows: images
    intra = _pearson_loss(student_probs.t(), teacher_probs.t())    # rows: classes
    expected = tau ** 2 * (beta * inter + gamma * intra)
    got = dist_loss(student_logits, teacher_probs.float(), tau, beta, gamma)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert 0 < inter < 2 and 0 < intra < 2


def test_dist_is_zero_for_matching_predictions_and_blind_to_scale_and_shift():
    torch.manual_seed(1)
    logits = torch.randn(8, 4)
    probs = torch.softmax(logits, 1)
    assert dist_loss(logits, probs, 1.0, 1.0, 1.0).item() == pytest.approx(0, abs=1e-6)
    # Unlike KL, the inter-class relation asks only for the same relative confidences: a
    # teacher distribution scaled and shifted per image (not a distribution any more) is
    # matched as well; the intra-class term (gamma) sees the change across the batch.
    scaled = probs * torch.linspace(0.5, 2, 8)[:, None] + torch.linspace(0, 1, 8)[:, None]
    assert dist_loss(logits, scaled, 1.0, 1.0, 0.0).item() == pytest.approx(0, abs=1e-6)
    assert dist_loss(logits, scaled, 1.0, 0.0, 1.0).item() > 1e-3


def test_dist_term_in_the_distiller_uses_its_flags_and_trains_the_student():
    torch.manual_seed(0)
    student, teacher = build_model("resnet18", 5), build_model("resnet18", 5).eval()
    settings = {"dist_beta": 2.0, "dist_gamma": 0.5, "dist_tau": 3.0}
    objective = Distiller(student, [teacher], "dist", settings)
    objective.train()
    views = {"lr": torch.randn(4, 3, 32, 32), "hr": torch.randn(4, 3, 32, 32)}
    batch = {"labels": torch.tensor([0, 1, -1, 3]), "index": torch.arange(4)}
    logits, terms = objective(views, batch)
    assert set(terms) == {"ce", "dist"} and objective.alpha == 1.0   # the paper's CE weight
    with torch.no_grad():
        teacher_probs = torch.softmax(teacher(views["hr"]) / 3.0, 1)
    expected = dist_loss(logits.detach(), teacher_probs, 3.0, 2.0, 0.5)
    assert terms["dist"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert_each_term_trains_the_student(terms, student)
