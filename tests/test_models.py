"""Model building by name, head replacement, weights from a file."""

import pytest
import torch

from src.cli import ToolError
from src.models import TESTED_ARCHS, build_model


# Quick enough for make test-fast.
pytestmark = pytest.mark.fast


@pytest.mark.parametrize("arch", TESTED_ARCHS)
def test_tested_architectures_build_with_a_new_head_and_run(arch):
    model = build_model(arch, 7).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[-1].out_features == 7


def test_weights_from_a_file_load_all_but_a_differing_head(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet18", 1000)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = build_model("resnet18", 5, str(tmp_path / "weights.pth"))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 5


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    torch.save(build_model("mobilenet_v3_large", 3).state_dict(), tmp_path / "m.pth")
    with pytest.raises(ToolError, match="does not fit resnet18"):
        build_model("resnet18", 3, str(tmp_path / "m.pth"))


def test_a_file_missing_some_tensors_is_refused_unless_partial_and_counted(tmp_path, capsys):
    """A file holding all but one block of the model is refused (it used to load silently
    while half the tensors fitted); with partial it loads what fits and says so."""
    torch.manual_seed(0)
    source = build_model("resnet18", 5)
    state = {key: value for key, value in source.state_dict().items()
             if not key.startswith("layer4.1.")}
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ToolError, match="does not fit resnet18: 12 of its 120 tensors"):
        build_model("resnet18", 5, str(tmp_path / "w.pth"))
    model = build_model("resnet18", 5, str(tmp_path / "w.pth"), partial=True)
    assert torch.equal(model.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    assert not torch.equal(model.layer4[1].conv1.weight, source.layer4[1].conv1.weight)
    assert "loaded 110 tensors, 12 left at their random start, 0 of the file's not used" \
        in capsys.readouterr().out


def test_unknown_architecture():
    with pytest.raises(ToolError, match="unknown --arch 'resnet1000'"):
        build_model("resnet1000", 3)
