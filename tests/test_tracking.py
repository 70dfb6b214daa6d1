"""--tensorboard and --wandb: the logged values read back with each tracker's own format
and checked against history.csv and test_metrics.json; trackers imported only when asked
for, and a missing one a one-line error."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, assert_one_line_error, run_script, tensorboard_events

OFFLINE = {"WANDB_MODE": "offline"}


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``): a 7-byte header, then LevelDB
    log blocks of 32 KiB holding protobuf ``Record`` messages, possibly split in pieces."""
    from wandb.proto import wandb_internal_pb2
    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        if block - position % block < 7:               # block trailer: zero padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):                             # FULL or LAST piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(stage_dir: Path, job: str) -> list[dict]:
    """The logged rows (step, values) of the offline W&B run of ``job`` in ``stage_dir``."""
    rows = []
    for run_file in sorted(stage_dir.glob("wandb/offline-run-*/run-*.wandb")):
        records = wandb_records(run_file)
        jobs = [record.run.job_type for record in records if record.HasField("run")]
        if jobs and jobs[0] != job:
            continue
        for record in records:
            if record.HasField("history"):
                row = {}
                for item in record.history.item:
                    value = json.loads(item.value_json)
                    path = list(item.nested_key) or [item.key]
                    if len(path) > 1:          # an image: {"figures/x": {"_type": ...}}
                        row.setdefault(path[0], {})["/".join(path[1:])] = value
                    else:
                        row[path[0]] = value
                rows.append(row)
    return rows


@pytest.fixture()
def run_copy(finished_run, tmp_path):
    _, out_dir, _, _ = finished_run
    return Path(shutil.copytree(out_dir, tmp_path / "run"))


def test_every_history_figure_and_test_figure_is_logged(finished_run, run_copy):
    data_dir = finished_run[0]
    train = run_script("train_kd_student.py", "--data-dir", data_dir, "--out-dir", run_copy,
                       "--arch", "resnet18", "--weights", "none", "--input-size", "32",
                       "--batch-size", "8", "--epochs", "2", "--overwrite", "--tensorboard",
                       "--wandb", env=OFFLINE)
    assert train.returncode == 0, train.stderr
    stage_dir = run_copy / "kd_student"
    history = pd.read_csv(stage_dir / "history.csv")
    figures = [column for column in history.columns if column != "epoch"]
    assert {"loss_ce", "loss_kd", "lr", "val_macro_f1"} <= set(figures)  # the named terms too

    events = tensorboard_events(stage_dir / "tensorboard")
    assert set(events.Tags()["scalars"]) == set(figures)
    for column in figures:
        logged = events.Scalars(column)
        assert [event.step for event in logged] == history["epoch"].tolist(), column
        np.testing.assert_allclose([event.value for event in logged], history[column],
                                   rtol=1e-6, err_msg=column)       # float32 in the events

    rows = wandb_history(stage_dir, "train")
    assert [row["_step"] for row in rows] == history["epoch"].tolist()
    for row, (_, expected) in zip(rows, history.iterrows()):
        for column in figures:
            assert row[column] == pytest.approx(expected[column], rel=1e-12), column

    test = run_script("test_kd_student.py", "--data-dir", data_dir, "--out-dir", run_copy,
                      "--tensorboard", "--wandb", env=OFFLINE)
    assert test.returncode == 0, test.stderr
    metrics = json.loads((stage_dir / "test_metrics.json").read_text())
    written = sorted(Path(line) for line in
                     next(line for line in test.stdout.splitlines()
                          if line.startswith("figures: "))[len("figures: "):].split(", "))
    assert written, test.stdout
    events = tensorboard_events(stage_dir / "tensorboard")
    assert events.Scalars("test_accuracy")[0].value == pytest.approx(metrics["accuracy"])
    assert sorted(events.Tags()["images"]) == sorted(f"figures/{path.stem}" for path in written)
    for path in written:
        image = events.Images(f"figures/{path.stem}")[0]
        assert (image.width, image.height) == Image.open(path).size, path
    test_rows = wandb_history(stage_dir, "test")
    logged = {key: value for row in test_rows for key, value in row.items()}
    assert logged["test_macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert {f"figures/{path.stem}" for path in written} <= set(logged)
    assert all(logged[f"figures/{path.stem}"]["_type"] == "image-file" for path in written)


@pytest.mark.fast
def test_trackers_are_imported_only_when_asked_for():
    probe = ("import sys, src.stages, src.compare, src.seeds, src.report; "
             "print(sorted(name for name in ('tensorboard', 'wandb') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("script, flag", [("train_student.py", "--tensorboard"),
                                          ("test_student.py", "--wandb")])
def test_a_missing_tracker_is_one_line_naming_the_install(tiny_data, tmp_path, script, flag):
    hidden = tmp_path / "hidden"
    package = hidden / flag[2:]
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"raise ImportError('No module named {flag[2:]}')\n")
    out_dir = tmp_path / "run"
    result = run_script(script, "--data-dir", tiny_data, "--out-dir", out_dir, flag,
                        env={"PYTHONPATH": str(hidden)})
    assert_one_line_error(result, f"{flag} needs the {flag[2:]} package, which is not "
                                  f"installed", "pip install -r requirements-trackers.txt")
    assert not out_dir.exists()
