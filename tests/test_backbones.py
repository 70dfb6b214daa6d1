"""Transformer and timm backbones (torchvision ViT and Swin; timm ViT, BEiT, ConvNeXt) as
teachers and students: building at an input size, feature maps from tokens and
channels-last stages, layer-wise learning-rate decay, checkpoints, and one end-to-end run.
Random weights at 32 px on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from src import backbones
from src.cli import ToolError
from src.distill import Distiller, FeatureTap, HardLabels
from src.methods import parse_method
from src.models import TESTED_TRANSFORMERS, build_model, load_checkpoint, save_checkpoint
from src.trainer import parameter_groups

from conftest import TINY_TRAIN_ARGS, assert_each_term_trains_the_student, \
    assert_one_line_error, run_script


def _batch(size: int = 4) -> dict:
    return {"labels": torch.arange(size) % 5, "index": torch.arange(size)}


def _changed_by_one_step(objective, views: dict) -> bool:
    """One AdamW step of ``objective``; whether every student parameter moved. No weight
    decay, which would move every parameter without a gradient; every distillation term
    is non-zero and puts a gradient on the student by itself."""
    student = objective.student
    before = [parameter.detach().clone() for parameter in student.parameters()]
    optimizer = torch.optim.AdamW(
        [parameter for parameter in objective.parameters() if parameter.requires_grad],
        lr=1e-3, weight_decay=0.0)
    objective.train()
    logits, terms = objective(views, _batch())
    loss = sum(terms.values())
    assert torch.isfinite(loss) and logits.shape == (4, 5)
    assert all(value.item() > 0 for value in terms.values()), terms
    assert_each_term_trains_the_student(terms, student)
    loss.backward()
    optimizer.step()
    return all(not torch.equal(old, new.detach())
               for old, new in zip(before, student.parameters()) if new.requires_grad)


@pytest.mark.parametrize("arch", TESTED_TRANSFORMERS)
def test_family_trains_one_step_as_teacher_and_as_student(arch):
    torch.manual_seed(0)
    # At 64 px every model's last map has more than one location (2x2 for Swin, ConvNeXt
    # and ResNet18; 4x4 patches for the ViTs), where at and cwd are non-zero.
    hr_images, lr_images = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    as_teacher = HardLabels(build_model(arch, 5, input_size=64), "hr")
    assert _changed_by_one_step(as_teacher, {"hr": hr_images})
    # As the student of a ResNet18 teacher, with logit and feature terms; the teacher,
    # built for it, then teaches a ResNet18 student.
    student = build_model(arch, 5, input_size=64)
    objective = Distiller(student, [build_model("resnet18", 5)], "kd+at", None,
                          teacher_input_sizes=[64], probe_size=64)
    assert _changed_by_one_step(objective, {"lr": lr_images, "hr": hr_images})
    objective = Distiller(build_model("resnet18", 5), [as_teacher.student], "kd+cwd",
                          None, teacher_input_sizes=[64], probe_size=64)
    assert _changed_by_one_step(objective, {"lr": lr_images, "hr": hr_images})


@pytest.mark.parametrize("method", ["kd", "dkd", "at", "cwd", "mgd", "amd", "dkd+cwd+mgd+amd"])
@pytest.mark.parametrize("student_arch, teacher_arch",
                         [("resnet18", "timm:vit_tiny_patch16_224"),
                          ("timm:vit_tiny_patch16_224", "resnet18"),
                          ("resnet18", "vit_b_16")])
def test_cnn_and_vit_pairs_give_finite_losses_and_right_gradients(method, student_arch,
                                                                   teacher_arch):
    torch.manual_seed(0)
    # ViT teacher at 64 px (4x4 patch grid), ResNet18 student at 64 px (2x2 last map); a
    # ViT student at 64 px under a ResNet18 teacher at 96 px (3x3): maps differ in size
    # and channels, and cwd's spatial softmax has more than one location.
    student_size, teacher_size = (64, 64) if student_arch == "resnet18" else (64, 96)
    student = build_model(student_arch, 5, input_size=student_size)
    teacher = build_model(teacher_arch, 5, input_size=teacher_size)
    objective = Distiller(student, [teacher], method, {"dkd_warmup": 0},
                          teacher_input_sizes=[teacher_size], probe_size=student_size)
    objective.train()
    views = {"lr": torch.randn(4, 3, student_size, student_size),
             "hr": torch.randn(4, 3, teacher_size, teacher_size)}
    _, terms = objective(views, _batch())
    assert set(terms) == {"ce", *parse_method(method)}
    assert all(torch.isfinite(value) for value in terms.values()), terms
    assert_each_term_trains_the_student(terms, student)
    sum(terms.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    learned = {name: p for name, p in objective.named_parameters()   # projections, generators
               if not name.startswith(("student.", "teachers."))}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned.values()), learned
    assert all(p.grad is None for p in objective.teachers.parameters())


@pytest.mark.fast
def test_vit_tokens_are_laid_out_on_their_grid():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    timm_vit = build_model("timm:vit_tiny_patch16_224", 5, input_size=64).eval()
    tap = FeatureTap(timm_vit, "teacher")
    with torch.no_grad():
        timm_vit(images)
        # timm's own reshaping of the last block's patch tokens.
        expected = timm_vit.forward_intermediates(images, indices=1, norm=False,
                                                  output_fmt="NCHW",
                                                  intermediates_only=True)[-1]
    assert torch.allclose(tap.take()[0], expected, atol=1e-6)

    torch_vit = build_model("vit_b_16", 5, input_size=64).eval()
    tap = FeatureTap(torch_vit, "teacher")
    with torch.no_grad():
        patches = torch_vit._process_input(images)
        tokens = torch_vit.encoder(torch.cat([torch_vit.class_token.expand(2, -1, -1),
                                              patches], dim=1))
        torch_vit(images)
    feature_map = tap.take()[0]
    assert feature_map.shape == (2, 768, 4, 4)
    # Row-major patches: the token of patch (row 1, column 2) is token 1 + 1 * 4 + 2.
    assert torch.allclose(feature_map[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2], atol=1e-5)


@pytest.mark.fast
def test_swin_channels_last_stages_become_maps():
    model = build_model("swin_t", 5, input_size=64).eval()
    images = torch.randn(1, 3, 64, 64)
    tap = FeatureTap(model, "student", ("features.3",))
    with torch.no_grad():
        stage_output = model.features[:4](images)      # (batch, height, width, channels)
        model(images)
    assert torch.equal(tap.take()[0], stage_output.permute(0, 3, 1, 2))


def test_a_model_the_tap_cannot_read_is_refused_in_one_line():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    with pytest.raises(ToolError, match="no layer this tool knows to read"):
        FeatureTap(flat, "student")
    FeatureTap(flat, "student", ("0",))     # the Flatten: (batch, features)
    with pytest.raises(ToolError, match="neither a"):
        flat(torch.randn(2, 3, 8, 8))
    point = backbones.FeaturePoint(nn.Identity(), False, 1, False, "tokens")
    with pytest.raises(ToolError, match="6 tokens less 1 class/register token"):
        point.to_map(torch.randn(2, 6, 8), "blocks.0")


@pytest.mark.fast
def test_input_sizes_resize_position_embeddings_or_are_refused():
    for arch in ("vit_b_16", "timm:vit_tiny_patch16_224", "timm:beit_base_patch16_224"):
        with pytest.raises(ToolError, match="use a multiple of 16"):
            build_model(arch, 5, input_size=40)
    assert build_model("timm:vit_tiny_patch16_224", 5, input_size=48).pos_embed.shape[1] == 1 + 9
    assert build_model("vit_b_16", 5, input_size=48).encoder.pos_embedding.shape[1] == 1 + 9


@pytest.mark.fast
def test_torchvision_vit_imagenet_weights_are_resized_to_the_input(monkeypatch):
    torch.manual_seed(0)
    at_224 = torch.nn.Module.state_dict(build_model("vit_b_16", 1000, input_size=224))
    # On the 14x14 grid, channel 0 holds each patch's row and channel 1 its column.
    rows, cols = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    at_224["encoder.pos_embedding"][0, 1:, 0] = rows.flatten()
    at_224["encoder.pos_embedding"][0, 1:, 1] = cols.flatten()
    monkeypatch.setattr(backbones, "_torchvision_imagenet_state", lambda arch: dict(at_224))
    model = build_model("vit_b_16", 5, "imagenet", input_size=32)
    grid = model.encoder.pos_embedding.detach()
    assert grid.shape[1] == 1 + 4
    # The class token's embedding is kept; the patch grid is resampled, not reinitialised:
    # the 2x2 grid's corners (align_corners) are the 14x14 grid's, so rows and columns
    # come out as 0 and 13, in row-major order.
    assert torch.equal(grid[0, 0], at_224["encoder.pos_embedding"][0, 0])
    assert torch.allclose(grid[0, 1:, 0], torch.tensor([0.0, 0.0, 13.0, 13.0]), atol=1e-4)
    assert torch.allclose(grid[0, 1:, 1], torch.tensor([0.0, 13.0, 0.0, 13.0]), atol=1e-4)
    assert torch.equal(model.conv_proj.weight, at_224["conv_proj.weight"])


def test_timm_imagenet_weights_offline_one_line(tiny_data, tmp_path):
    result = run_script("train_teacher.py", "--data-dir", tiny_data, "--out-dir",
                        tmp_path / "run", "--arch", "timm:convnext_atto",
                        "--weights", "imagenet",
                        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(result, "timm:convnext_atto", "timm/convnext_atto",
                          str(tmp_path / "hf"), "--weights none")


def test_unknown_timm_model_is_one_line():
    with pytest.raises(ToolError, match="timm has no model 'vit_gigantic_nope'"):
        build_model("timm:vit_gigantic_nope", 5)


@pytest.mark.fast
@pytest.mark.parametrize("arch", ["vit_b_16", "timm:vit_tiny_patch16_224"])
def test_layer_decay_scales_from_embedding_to_head(arch):
    model = build_model(arch, 5, input_size=32)
    scales = backbones.layer_scales(model, 0.5)
    head = backbones.classifier_head(model)
    head_names = {name for name, parameter in model.named_parameters()
                  if any(parameter is p for p in head.parameters())}
    assert {scales[name] for name in head_names} == {1.0}
    blocks = "encoder.layers.encoder_layer_{}." if arch == "vit_b_16" else "blocks.{}."
    first, last = (min(scale for name, scale in scales.items()
                       if name.startswith(blocks.format(number))) for number in (0, 11))
    embedding = scales["conv_proj.weight" if arch == "vit_b_16" else "patch_embed.proj.weight"]
    assert embedding < first < last < 1.0
    assert first == pytest.approx(last * 0.5 ** 11)
    assert backbones.is_transformer(model) and not backbones.is_transformer(
        build_model("resnet18", 5))


@pytest.mark.fast
def test_parameter_groups_follow_the_scales_and_keep_alignment_at_full_rate():
    student = build_model("timm:vit_tiny_patch16_224", 5, input_size=32)
    objective = Distiller(student, [build_model("resnet18", 5)], "kd+cwd", None,
                          teacher_input_sizes=[32], probe_size=32)
    groups = parameter_groups(objective, 1e-3, 0.75)
    scales = backbones.layer_scales(student, 0.75)
    rate_of = {id(parameter): group["lr"] for group in groups for parameter in group["params"]}
    for name, parameter in student.named_parameters():
        assert rate_of[id(parameter)] == pytest.approx(1e-3 * scales[name])
    assert all(rate_of[id(p)] == pytest.approx(1e-3) for p in objective.projections.parameters())
    assert len(rate_of) == sum(p.requires_grad for p in objective.parameters())
    assert parameter_groups(objective, 1e-3, 1.0)[0].keys() == {"params"}


@pytest.mark.parametrize("arch", TESTED_TRANSFORMERS)
def test_checkpoints_rebuild_the_same_model(arch, tmp_path):
    model = build_model(arch, 5, input_size=32).eval()
    save_checkpoint(tmp_path / "best.pt", model,
                    {"arch": arch, "classes": list("abcde"), "input_size": 32,
                     "library": backbones.library_of(arch)})
    loaded, meta = load_checkpoint(tmp_path / "best.pt", classes=list("abcde"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    assert meta["library"] == ("timm" if arch.startswith("timm:") else "torchvision")


def test_vit_teacher_distils_into_resnet18_end_to_end(tiny_data, tmp_path):
    common = ["--data-dir", tiny_data, "--out-dir", tmp_path / "run"]
    vit = ["--arch", "timm:vit_tiny_patch16_224", *TINY_TRAIN_ARGS[2:]]
    steps = [("train_teacher.py", *vit, "--schedule", "cosine", "--layer-decay", "0.75"),
             ("train_student.py", *TINY_TRAIN_ARGS),
             ("train_kd_student.py", *TINY_TRAIN_ARGS, "--method", "kd+at"),
             ("test_teacher.py",), ("test_student.py",), ("test_kd_student.py",)]
    for script, *args in steps:
        result = run_script(script, *common, *args)
        assert result.returncode == 0, (script, result.stderr)
        if script == "train_teacher.py":
            assert "layer-wise lr decay 0.75" in result.stdout
        if script == "test_teacher.py":
            assert "timm:vit_tiny_patch16_224" in result.stdout
    meta = torch.load(tmp_path / "run" / "teacher" / "best.pt", weights_only=True)
    assert (meta["arch"], meta["library"]) == ("timm:vit_tiny_patch16_224", "timm")
    # A ViT student too: its checkpoint through predict.py and evaluate_all.py.
    for script, *args in [("train_student.py", *vit, "--overwrite"),
                          ("predict.py", "--stage", "student"),
                          ("evaluate_all.py", "--no-tsne")]:
        result = run_script(script, *common, *args)
        assert result.returncode == 0, (script, result.stderr)
    assert "LR baseline student (timm:vit_tiny_patch16_224)" in result.stdout
