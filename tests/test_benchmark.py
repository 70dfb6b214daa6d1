"""benchmark.py end to end at a tiny size: every figure the issue asks for is measured,
the ratios are the ratios of the figures, and bad settings get one-line errors."""

import json

import pytest

from conftest import TINY_TRAIN_ARGS, assert_one_line_error, run_script

TINY_BENCH_ARGS = ["--images", "250", "--input-size", "32", "--batch-size", "8", "--steps",
                   "1", "--pipeline-batches", "2", "--pipeline-rounds", "2", "--workers", "1"]
MEASURES = ("pipeline_ours", "pipeline_reference", "floor", "full_ours", "full_reference")


def test_benchmark_reports_every_stage_and_ratio(tmp_path):
    result = run_script("benchmark.py", "--out-dir", tmp_path, *TINY_BENCH_ARGS)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["machine"]["device"] == "CPU"
    assert report["settings"]["images"] == 250 and report["settings"]["pipeline_rounds"] == 2
    assert "kept for reuse" in report["settings"]["host_allocator"]
    assert set(report["stages"]) == {"teacher", "student", "kd_student"}
    for stage, figures in report["stages"].items():
        assert all(figures[measure] > 0 for measure in MEASURES), stage
        rounds = figures["pipeline_rounds"]
        assert len(rounds["ours"]) == len(rounds["reference"]) == 2
        assert figures["pipeline_ours"] == pytest.approx(sum(rounds["ours"]) / 2)
        assert figures["full_over_floor"] == pytest.approx(figures["full_ours"] / figures["floor"])
        assert figures["pipeline_ours_over_reference"] == pytest.approx(
            figures["pipeline_ours"] / figures["pipeline_reference"])
        assert figures["full_ours_over_reference"] == pytest.approx(
            figures["full_ours"] / figures["full_reference"])
        assert f"\n{stage} " in result.stdout  # one row of the printed table per stage


@pytest.mark.fast
def test_benchmark_can_run_with_the_default_allocator(tmp_path):
    result = run_script("benchmark.py", "--out-dir", tmp_path, *TINY_BENCH_ARGS,
                        "--stages", "student", env={"LRKD_DEFAULT_MALLOC": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["settings"]["host_allocator"].startswith("C library default")


@pytest.mark.parametrize("args, message", [
    (["--images", "100"], "--images must be at least 250"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--images", "250", "--pipeline-batches", "100"], "the benchmark needs 101"),
])
def test_benchmark_rejects_bad_settings(tmp_path, args, message):
    assert_one_line_error(run_script("benchmark.py", "--out-dir", tmp_path, *args), message)


def test_processes_benchmark_times_an_epoch_with_each_count(tiny_data, tmp_path):
    """What it prints, not how fast: speed figures belong to the command, not a test."""
    result = run_script("benchmark.py", "--processes", "1", "2", "--data-dir", tiny_data,
                        "--out-dir", tmp_path, "--", *TINY_TRAIN_ARGS, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "processes.json").read_text())
    assert set(report["runs"]) == {"1", "2"}
    for run in report["runs"].values():
        assert len(run["epoch_seconds"]) == 2 and min(run["epoch_seconds"]) > 0
    assert json.loads((tmp_path / "processes2" / "teacher" / "train_summary.json")
                      .read_text())["processes"] == 2
    lines = result.stdout.splitlines()
    assert any(line.split()[:1] == ["1"] for line in lines)
    assert any(line.split()[:1] == ["2"] for line in lines)
