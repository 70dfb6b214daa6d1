"""The method registry: a distillation method is one module of ``src/methods``; --method,
the KD student's flags and their range checks, the Distiller and config.json all come
from it, nothing else names a method, and runs recorded before the registry still load."""

import json
import re

import pytest
import torch

from conftest import ROOT
from src.arguments import check_arguments, jsonable, parse_train_arguments, stage_flags, \
    train_parser
from src.cli import ToolError
from src.distill import Distiller
from src.methods import METHODS, Flag, LogitMethod, hard_label_weight, method_settings, \
    parse_method, preset_for_method, register
from src.models import build_model
from src.stages import settings_differences

pytestmark = pytest.mark.fast

OLD_RECORD = ROOT / "tests" / "fixtures" / "kd_student_config_2d715ca.json"


def _outside(flag: Flag) -> list:
    """Values just outside the flag's range, and the ones no range holds."""
    values = [flag.type(flag.low - 1)]
    if flag.type is float:
        values += [float("nan"), float("inf")]
    if not flag.low_inclusive:
        values.append(flag.low)
    if flag.high is not None:
        values.append(flag.high if not flag.high_inclusive else flag.high + 1)
    return values


def test_every_methods_flags_are_the_kd_students_with_default_help_and_range_check():
    actions = {action.dest: action for action in train_parser("kd_student")._actions}
    for method in METHODS.values():
        assert method.name in actions["method"].help
        for flag in method.flags:
            action = actions[flag.name]
            assert flag.option in action.option_strings and action.default == flag.default
            assert method.name in action.help.split(":")[0].split(", ")   # "kd, dkd: ..."
            for value in _outside(flag):
                args = parse_train_arguments("kd_student", [flag.option, str(value)])
                with pytest.raises(ToolError, match=re.escape(flag.option)):
                    check_arguments(args)
    method_dests = {flag.name for method in METHODS.values() for flag in method.flags}
    for stage in ("teacher", "student"):
        assert not method_dests & {action.dest for action in train_parser(stage)._actions}


@pytest.fixture()
def toy_method():
    """A method added the one way there is: a class with @register (here, in the test)."""

    @register
    class Toy(LogitMethod):
        name = "toy"
        summary = "a test's method: squared difference of the probabilities"
        flags = (Flag("toy_weight", 2.0, "weight of the squared difference", high=10.0),
                 Flag("toy_tau", 1.0, "its temperature", low_inclusive=False))

        def loss(self, student_logits, teacher_probs, labels):
            tau = self.settings["toy_tau"]
            return (torch.softmax(student_logits / tau, 1) - teacher_probs(tau)).pow(2).mean()

    yield Toy
    del METHODS["toy"]


def test_a_method_registered_in_one_place_reaches_every_consumer(toy_method):
    parser = train_parser("kd_student")
    assert "toy (a test's method" in " ".join(parser.format_help().split())
    args = parse_train_arguments("kd_student", ["--method", "toy+at", "--toy-tau", "2"])
    check_arguments(args)
    with pytest.raises(ToolError, match="--toy-weight must be in"):
        check_arguments(parse_train_arguments("kd_student", ["--toy-weight", "11"]))
    assert parse_method("TOY+at") == ["toy", "at"]
    with pytest.raises(ToolError, match="at most one of kd"):
        parse_method("toy+kd")                        # two logit methods
    assert hard_label_weight("toy") == 1.0
    assert method_settings("toy+at", vars(args)) == {
        "toy": {"toy_weight": 2.0, "toy_tau": 2.0}, "at": {"at_weight": 1000.0}}
    # The baseline student of a runner gets the method's flags dropped like any other
    # distillation flag; a preset's kd weights do not apply to it.
    assert stage_flags("student", ["--toy-weight", "3", "--lr", "1e-3"]) == ["--lr", "1e-3"]
    assert preset_for_method({"alpha": 0.1, "beta": 0.9, "mixup": 0.2}, "toy") == {"mixup": 0.2}
    assert preset_for_method({"alpha": 0.1, "beta": 0.9}, "kd") == {"alpha": 0.1, "beta": 0.9}

    torch.manual_seed(0)
    student, teacher = build_model("resnet18", 4), build_model("resnet18", 4).eval()
    objective = Distiller(student, [teacher], "toy", {"toy_weight": 3.0, "toy_tau": 2.0}).eval()
    views = {"lr": torch.randn(2, 3, 32, 32), "hr": torch.randn(2, 3, 32, 32)}
    _, terms = objective(views, {"labels": torch.tensor([0, 1]), "index": torch.arange(2)})
    with torch.no_grad():
        expected = 3.0 * (torch.softmax(student(views["lr"]) / 2, 1)
                          - torch.softmax(teacher(views["hr"]) / 2, 1)).pow(2).mean()
    assert set(terms) == {"ce", "toy"}
    assert terms["toy"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_flag_two_methods_declare_differently_is_refused():
    with pytest.raises(ValueError, match="--temperature differs"):
        @register
        class Clash(LogitMethod):
            name = "clash"
            summary = "declares --temperature with another default"
            flags = (Flag("temperature", 1.0, "softmax temperature"),)
    assert "clash" not in METHODS


def test_no_module_outside_the_methods_package_names_a_method():
    sources = [*ROOT.glob("*.py"), *(ROOT / "src").glob("*.py")]
    assert len(sources) > 20
    for name in METHODS:
        # As a string, in a combination, in a flag or a --method value; not as part of
        # another word (kd_student) nor as cwd= (a working directory).
        named = re.compile(rf"""["']{name}["'+]|\+{name}\b|--{name}-|--method {name}\b""")
        for path in sources:
            hits = [line for line in path.read_text().splitlines() if named.search(line)]
            assert not hits, f"{path.name} names the method {name}: {hits}"


def _old_record(tmp_path):
    record = json.loads(OLD_RECORD.read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps(record))
    return record["args"], path


def test_a_run_recorded_before_the_registry_reruns_and_resumes_with_its_settings(tmp_path):
    saved, path = _old_record(tmp_path)
    assert "method_settings" not in saved and saved["method"] == "kd+cwd+mgd"
    args = jsonable(parse_train_arguments("kd_student", ["--config", str(path)]))
    assert {key: args[key] for key in saved if key != "config"} == \
        {key: value for key, value in saved.items() if key != "config"}
    # --resume compares the saved settings with the wanted ones: none differ.
    assert settings_differences(saved, args, "kd_student") == []
    assert method_settings(saved["method"], saved) == {
        "kd": {"temperature": 4.0, "beta": 0.3}, "cwd": {"cwd_weight": 3.0, "cwd_tau": 4.0},
        "mgd": {"mgd_weight": 7e-5, "mgd_mask": 0.5}}


def test_learned_modules_keep_the_checkpoint_keys_older_runs_saved():
    # Older checkpoints hold projections.N and generators.N, flat and teacher-major over
    # (teacher, layer) pairs; a resumed run must find its trained modules under them.
    student = build_model("resnet18", 4, "none", 64)
    teachers = [build_model("resnet50", 4, "none", 64), build_model("resnet18", 4, "none", 64)]
    objective = Distiller(student, teachers, "kd+cwd+mgd",
                          {"feature_layers": "layer3,last"}, [64, 64], probe_size=64)
    modules = sorted({key.rsplit(".", 1)[0].split(".generate")[0]
                      for key in objective.extra_state()})
    assert modules == ["generators.0", "generators.1", "generators.2", "generators.3",
                       "projections.0", "projections.1"]   # resnet18 teacher: no projection
    old_shapes = {"projections.0.weight": (1024, 256, 1, 1), "projections.1.weight":
                  (2048, 512, 1, 1), "generators.2.generate.0.weight": (256, 256, 3, 3)}
    state = objective.extra_state()
    assert {key: tuple(state[key].shape) for key in old_shapes} == old_shapes
