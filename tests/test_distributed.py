"""torchrun and DistributedDataParallel on the CPU (gloo, 2 processes), and the paths a GPU
run takes (bf16 autocast, channels-last, torch.compile) run on the CPU.

The runs go through tests/ddp_worker.py: the stage exactly as its script runs it, plus a
record per rank of the files it wrote, the rows it trained on and its final weights.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from src import distributed
from src.cli import ToolError
from src.data import read_table
from src.trainer import fit

from conftest import ROOT, TINY_TRAIN_ARGS, run_script, run_worker, tensorboard_events

# A sharded run matches a single-process one only where every sample is computed alone:
# BatchNorm normalises each process's share by its own statistics (as in any DDP run
# without SyncBatchNorm, which is CUDA-only). With the worker's BatchNorm-free model the
# difference is float rounding of the gradient all-reduce: 3e-8 measured, 1e-6 allowed.
ROUNDING = 1e-6


def assert_every_rank_refuses(result, message: str) -> None:
    """Each process that gets to print ends with the same one ``error:`` line, starting with
    ``message``. torchrun stops the other process as soon as the first one exits, so the
    second line may never come (CI saw one line in a full run). torchrun's own launcher then
    prints a traceback of its ChildFailedError; no frame may come from this project."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) in (1, 2) and len(set(errors)) == 1, result.stderr
    assert errors[0].startswith(message), errors[0]
    own_frames = re.findall(rf'File "{re.escape(str(ROOT))}/(?!\.venv/)[^"]*"', result.stderr)
    assert not own_frames, result.stderr


def ranks(record, processes: int = 2) -> list[dict]:
    return [json.loads((record / f"rank{rank}.json").read_text()) for rank in range(processes)]


def weights(record, rank: int = 0) -> dict:
    return torch.load(record / f"weights-rank{rank}.pt", weights_only=True)


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[key].double() - second[key].double()).abs().max().item() for key in first)


@pytest.mark.fast
def test_shares_split_every_global_batch_exactly_once():
    for batch_size in (2, 7, 8, 64, 65):
        for world_size in (1, 2, 3):
            if batch_size < world_size:
                continue
            rows = [list(range(batch_size))[distributed.share(batch_size, distributed.Context(
                rank, rank, world_size))] for rank in range(world_size)]
            assert sum(rows, []) == list(range(batch_size))          # in order, no overlap
            assert max(map(len, rows)) - min(map(len, rows)) <= 1


@pytest.fixture(scope="module")
def stages_under_torchrun(tiny_data, tmp_path_factory):
    """The three stages, one epoch each, with 2 processes; KD with paired mixing and a
    trained generator (mgd) inside DDP."""
    out_dir = tmp_path_factory.mktemp("torchrun") / "run"
    extra = {"teacher": ["--tensorboard"], "student": ["--mixup", "0.2", "--cutmix", "1"],
             "kd_student": ["--method", "kd+mgd", "--mixup", "0.2", "--cutmix", "1"]}
    results = {}
    for stage in ("teacher", "student", "kd_student"):
        record = out_dir.parent / f"record-{stage}"
        result = run_worker(stage, record, "--data-dir", tiny_data, "--out-dir", out_dir,
                            *TINY_TRAIN_ARGS, *extra[stage])
        assert result.returncode == 0, result.stderr[-3000:]
        results[stage] = (result, record)
    return tiny_data, out_dir, results


@pytest.mark.parametrize("stage", ["teacher", "student", "kd_student"])
def test_each_stage_trains_under_torchrun(stages_under_torchrun, stage):
    _, out_dir, results = stages_under_torchrun
    result, record = results[stage]
    main, other = ranks(record)
    # The shares of the epoch cover the train rows exactly once.
    split = read_table(out_dir / "split.csv", ("img_path", "subset"))
    train_rows = sorted(split.index[split["subset"] == "train"].tolist())
    assert sorted(main["rows"]["1"] + other["rows"]["1"]) == train_rows
    assert main["rows"]["1"] and other["rows"]["1"]
    # Both ranks end with the same model, weights and BatchNorm statistics alike.
    assert max_difference(weights(record, 0), weights(record, 1)) == 0
    # Rank 0 alone writes files; it prints the epoch lines once.
    assert other["written"] == []
    assert {f"{out_dir / stage / name}" for name in ("best.pt", "last.pt", "history.csv",
                                                      "config.json", "train_summary.json")} \
        <= set(main["written"])
    assert result.stdout.count("epoch   1 ") == 1
    assert "2 processes (torchrun), global batch 8" in result.stdout
    summary = json.loads((out_dir / stage / "train_summary.json").read_text())
    assert summary["processes"] == 2
    # Both ranks trained under the job's one lock, which rank 0 removed at the end.
    assert not (out_dir / f".{stage}.lock").exists()


def test_only_rank_0_logs_to_a_tracker(stages_under_torchrun):
    _, out_dir, _ = stages_under_torchrun
    folder = out_dir / "teacher" / "tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1    # one writer: rank 0's
    history = pd.read_csv(out_dir / "teacher" / "history.csv")
    logged = tensorboard_events(folder).Scalars("val_acc")
    assert [(event.step, round(event.value, 6)) for event in logged] == \
        [(row.epoch, round(row.val_acc, 6)) for row in history.itertuples()]


TINY_MODEL = {"DDP_TINY_MODEL": "1"}
# Batches of 7: shares of 4 and 3 images, so each share's loss weight matters.
MATCH_ARGS = [*TINY_TRAIN_ARGS, "--batch-size", "7"]


def test_each_stage_sharded_matches_a_single_process(tiny_data, tmp_path):
    """Same global batch, 1 process against 2, every stage (the students with paired
    mixing, both KD students taught by one teacher): equal to float rounding."""
    mixing = ["--mixup", "0.2", "--cutmix", "1"]
    teacher = tmp_path / "run1" / "teacher" / "best.pt"
    for stage, extra in (("teacher", []), ("student", mixing),
                         ("kd_student", [*mixing, "--teacher-ckpt", teacher])):
        for processes in (1, 2):
            result = run_worker(stage, tmp_path / f"{stage}-{processes}", "--data-dir",
                                tiny_data, "--out-dir", tmp_path / f"run{processes}",
                                *MATCH_ARGS, "--epochs", "2", *extra, processes=processes,
                                env=TINY_MODEL)
            assert result.returncode == 0, result.stderr[-3000:]
        assert max_difference(weights(tmp_path / f"{stage}-1"),
                              weights(tmp_path / f"{stage}-2")) < ROUNDING, stage
        single, sharded = (pd.read_csv(tmp_path / f"run{processes}" / stage / "history.csv")
                           for processes in (1, 2))
        for column in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert (single[column] - sharded[column]).abs().max() < 1e-5, (stage, column)


def test_a_killed_process_fails_the_job_and_resume_finishes_it(tiny_data, tmp_path):
    """Rank 1 is killed in epoch 2: the job fails, and --resume finishes it under
    torchrun, and with another number of processes, both equal to an uninterrupted run."""
    common = ["--data-dir", tiny_data, *MATCH_ARGS, "--epochs", "3"]
    whole = run_worker("teacher", tmp_path / "whole", *common, "--out-dir",
                       tmp_path / "whole-run", env=TINY_MODEL)
    assert whole.returncode == 0, whole.stderr[-3000:]
    uninterrupted = weights(tmp_path / "whole")
    for resume_processes in (2, 1):
        out_dir = tmp_path / f"killed-{resume_processes}"
        killed = run_worker("teacher", tmp_path / f"kill-{resume_processes}", *common,
                            "--out-dir", out_dir, env={**TINY_MODEL, "DDP_KILL": "1:2:1"})
        assert killed.returncode != 0
        history = pd.read_csv(out_dir / "teacher" / "history.csv")
        assert history["epoch"].tolist() == [1]           # epoch 2 died with rank 1
        record = tmp_path / f"resume-{resume_processes}"
        resumed = run_worker("teacher", record, *common, "--out-dir", out_dir, "--resume",
                             processes=resume_processes, env=TINY_MODEL)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert pd.read_csv(out_dir / "teacher" / "history.csv")["epoch"].tolist() == [1, 2, 3]
        assert max_difference(weights(record), uninterrupted) < ROUNDING
        if resume_processes == 1:
            assert "resumes with 1" in resumed.stdout


def test_teacher_cache_is_computed_once_under_torchrun(tiny_data, tmp_path):
    out_dir = tmp_path / "run"
    teacher = run_worker("teacher", tmp_path / "record-teacher", "--data-dir", tiny_data,
                         "--out-dir", out_dir, *TINY_TRAIN_ARGS, processes=1)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    result = run_worker("kd_student", tmp_path / "record", "--data-dir", tiny_data,
                        "--out-dir", out_dir, *TINY_TRAIN_ARGS, "--teacher-cache",
                        "--no-hflip", "--crop-scale", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    main, other = ranks(tmp_path / "record")
    assert [path for path in main["written"] if "teacher-logits-" in path]
    assert other["written"] == []
    assert len(list((out_dir / "cache").glob("teacher-logits-*.pt"))) == 1
    assert max_difference(weights(tmp_path / "record", 0), weights(tmp_path / "record", 1)) == 0


def test_every_process_stops_early_at_the_same_epoch(tiny_data, tmp_path):
    """Validation accuracy on the 4 validation images can rise strictly at most 4 times,
    so with patience 1 the run must stop early within 8 epochs; a process deciding alone
    would leave the other waiting in a collective (caught by the timeout)."""
    result = run_worker("teacher", tmp_path / "record", "--data-dir", tiny_data, "--out-dir",
                        tmp_path / "run", *TINY_TRAIN_ARGS, "--epochs", "8", "--patience", "1",
                        "--select-by", "val_acc", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    main, other = ranks(tmp_path / "record")
    assert main["decisions"]["stopped_early"] and main["decisions"]["epochs_run"] < 8
    assert main["decisions"] == other["decisions"]
    assert "early stop" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--sync-bn"], "error: --sync-bn: PyTorch's SyncBatchNorm runs on CUDA only"),
    (["--device", "cuda:1"], "error: --device cuda:1: under torchrun each process takes the "
                             "GPU of its LOCAL_RANK")])
def test_settings_torchrun_cannot_honour_are_refused_in_one_line(tiny_data, tmp_path, flags,
                                                                 message):
    result = run_worker("teacher", tmp_path / "record", "--data-dir", tiny_data, "--out-dir",
                        tmp_path / "run", *TINY_TRAIN_ARGS, *flags, timeout=120)
    assert_every_rank_refuses(result, message)
    assert not (tmp_path / "run" / "teacher").exists()


def test_a_global_batch_too_small_for_the_processes_is_refused(tiny_data, tmp_path):
    result = run_worker("teacher", tmp_path / "record", "--data-dir", tiny_data, "--out-dir",
                        tmp_path / "run", *TINY_TRAIN_ARGS, "--batch-size", "3", timeout=120)
    assert_every_rank_refuses(result, "error: --batch-size 3 is the global batch: it must "
                                      "give each of the 2 processes at least 2 images")


def test_too_few_validation_images_for_the_processes_is_refused(monkeypatch, tmp_path):
    """Every process needs a share of the validation images; checked before DDP starts."""
    monkeypatch.setattr(distributed, "_context", distributed.Context(0, 0, 8))
    split = SimpleNamespace(indices=lambda subset: np.arange(40 if subset == "train" else 4))
    with pytest.raises(ToolError, match="4 validation images cannot be shared among 8"):
        fit(None, SimpleNamespace(split=split), None, tmp_path, None, {}, resume=False)


def test_gpu_paths_run_on_the_cpu(tiny_data, tmp_path):
    """bf16 autocast and channels-last (on by default on CUDA) and torch.compile, on the
    CPU: the KD student trains with the first two, a small model compiles and trains."""
    # 32 px: at 16 px ResNet18's last stages see 1x1 maps, whose BatchNorm statistics in
    # bf16 can turn the first step's loss into NaN (seen once in a full run).
    common = ["--data-dir", tiny_data, "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS,
              "--input-size", "32", "--amp", "on", "--channels-last", "on"]
    for stage in ("teacher", "kd_student"):
        result = run_worker(stage, tmp_path / f"record-{stage}", *common, processes=1)
        assert result.returncode == 0, result.stderr[-3000:]
        history = pd.read_csv(tmp_path / "run" / stage / "history.csv")
        assert history["train_loss"].notna().all() and history["val_acc"].notna().all()
        in_force = ranks(tmp_path / f"record-{stage}", 1)[0]["in_force"]
        assert in_force["logits_dtype"] == "torch.bfloat16", (stage, in_force)
        assert in_force["channels_last"] is True, (stage, in_force)
        assert in_force["compiled_graphs"] == 0, (stage, in_force)
    compiled = run_worker("teacher", tmp_path / "record-compiled", "--data-dir", tiny_data,
                          "--out-dir", tmp_path / "compiled", *TINY_TRAIN_ARGS, "--compile",
                          processes=1, env={"DDP_TINY_MODEL": "1"}, timeout=600)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    plain = run_worker("teacher", tmp_path / "record-plain", "--data-dir", tiny_data,
                       "--out-dir", tmp_path / "plain", *TINY_TRAIN_ARGS, processes=1,
                       env={"DDP_TINY_MODEL": "1"})
    assert plain.returncode == 0, plain.stderr[-3000:]
    compiled_in_force = ranks(tmp_path / "record-compiled", 1)[0]["in_force"]
    plain_in_force = ranks(tmp_path / "record-plain", 1)[0]["in_force"]
    assert compiled_in_force["compiled_graphs"] > 0, compiled_in_force
    assert plain_in_force == {"logits_dtype": "torch.float32", "channels_last": False,
                              "compiled_graphs": 0}
    # Compiled kernels fuse and reorder float operations: close, not equal.
    assert max_difference(weights(tmp_path / "record-compiled"),
                          weights(tmp_path / "record-plain")) < 1e-4


def test_run_seeds_trains_its_children_under_torchrun(tiny_data, tmp_path):
    result = run_script("run_seeds.py", "--data-dir", tiny_data, "--out-dir", tmp_path,
                        "--seeds", "0", "--stages", "teacher", "--nproc-per-node", "2", "--",
                        *TINY_TRAIN_ARGS, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "seeds" / "seed0" / "teacher" / "train_summary.json")
                         .read_text())
    assert summary["processes"] == 2
    assert (tmp_path / "seeds" / "summary.md").exists()
