"""What a run folder, a checkpoint or a record can make the tool do: never run code."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, TINY_TRAIN_ARGS, assert_one_line_error, run_script, run_worker

OLD_RUN = ROOT / "tests" / "fixtures" / "resume_586846d"
# The settings tests/fixtures/resume_586846d was recorded with (ddp_worker, its tiny model,
# killed in epoch 2), before checkpoints were loaded with weights_only=True.
OLD_RUN_ARGS = ["--arch", "resnet18", "--weights", "none", "--input-size", "16", "--epochs",
                "3", "--batch-size", "8", "--lr", "1e-3", "--deterministic", "--schedule",
                "cosine", "--warmup-epochs", "1", "--select-by", "last", "--mixup", "0.4",
                "--cutmix", "1.0"]


class RunsCode:
    """Unpickling it runs a shell command: what a planted checkpoint would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"finished": False, "payload": RunsCode(f"touch {marker}")}, path)


@pytest.mark.fast
def test_no_checkpoint_is_unpickled_with_code_allowed():
    sources = [path for folder in ("src", "tests") for path in (ROOT / folder).rglob("*.py")]
    sources += list(ROOT.glob("*.py"))
    unsafe = [str(path) for path in sources
              if "weights_only=" + "False" in path.read_text()]
    assert not unsafe


def test_a_planted_last_pt_runs_no_code(finished_run, tmp_path):
    """A run folder as another user could leave it: a real teacher run, its last.pt
    replaced by a pickle that runs a command, so that the run looks interrupted."""
    data_dir, finished_dir, _, _ = finished_run
    marker, out_dir = tmp_path / "marker", tmp_path / "run"
    shutil.copytree(finished_dir, out_dir, ignore=shutil.ignore_patterns("*student*"))
    (out_dir / "teacher" / "train_summary.json").unlink()
    plant(out_dir / "teacher" / "last.pt", marker)
    config = json.loads((out_dir / "teacher" / "config.json").read_text())
    config["args"]["out_dir"] = str(out_dir)
    (out_dir / "teacher" / "config.json").write_text(json.dumps(config))
    # A plain start looks at the folder (is it a finished run?): it must not unpickle it.
    result = run_script("train_teacher.py", "--data-dir", data_dir, "--out-dir", out_dir,
                        *TINY_TRAIN_ARGS)
    assert not marker.exists()
    assert_one_line_error(result, "--resume")
    result = run_script("train_teacher.py", "--data-dir", data_dir, "--out-dir", out_dir,
                        *TINY_TRAIN_ARGS, "--resume")
    assert not marker.exists()
    assert_one_line_error(result, f"{out_dir / 'teacher' / 'last.pt'} holds more than "
                                  f"tensors and plain values", "refused")
    assert "weights_only" not in result.stderr


@pytest.mark.fast
def test_a_planted_checkpoint_is_refused_in_one_line_everywhere(tmp_path):
    from src.cli import ToolError, load_torch
    from src.models import checkpoint_stage, load_checkpoint
    from src.trainer import run_status
    marker = tmp_path / "marker"
    planted = tmp_path / "stage" / "last.pt"
    plant(planted, marker)
    assert run_status(planted.parent) == "unfinished"
    assert checkpoint_stage(planted) is None
    for load in (lambda: load_checkpoint(planted, what="teacher checkpoint"),
                 lambda: load_torch(planted, "--weights")):
        with pytest.raises(ToolError, match="holds more than tensors and plain values") as error:
            load()
        assert "weights_only" not in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_a_last_pt_recorded_before_the_safe_loader_still_resumes(tiny_data, tmp_path):
    """tests/fixtures/resume_586846d: a run killed in epoch 2 of 3, its last.pt written by
    the code of commit 586846d (cosine schedule, mixing: every kind of state last.pt
    keeps). Resumed now, it must end exactly as the same run trained without a stop."""
    old = Path(shutil.copytree(OLD_RUN, tmp_path / "old"))
    config = json.loads((old / "student" / "config.json").read_text())
    config["args"].update(data_dir=str(tiny_data), out_dir=str(old))
    (old / "student" / "config.json").write_text(json.dumps(config))
    tiny = {"DDP_TINY_MODEL": "1"}
    resumed = run_worker("student", tmp_path / "record-old", "--data-dir", tiny_data,
                         "--out-dir", old, *OLD_RUN_ARGS, "--resume", processes=1, env=tiny)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch 1" in resumed.stdout
    straight = run_worker("student", tmp_path / "record-straight", "--data-dir", tiny_data,
                          "--out-dir", tmp_path / "straight", *OLD_RUN_ARGS, processes=1,
                          env=tiny)
    assert straight.returncode == 0, straight.stderr[-2000:]
    # lr_end was added after the fixture was recorded: its first epoch has none.
    histories = [pd.read_csv(run / "student" / "history.csv").drop(columns=["seconds", "lr_end"])
                 for run in (old, tmp_path / "straight")]
    pd.testing.assert_frame_equal(*histories)


# --- what --overwrite may delete ------------------------------------------------------

def test_overwrite_deletes_only_a_folder_this_tool_wrote(tiny_data, tmp_path):
    """``--out-dir ~/thesis --overwrite`` where ~/thesis/teacher is the user's own folder."""
    own = tmp_path / "thesis" / "teacher"
    own.mkdir(parents=True)
    (own / "chapter1.tex").write_text("months of work")
    result = run_script("train_teacher.py", "--data-dir", tiny_data, "--out-dir",
                        tmp_path / "thesis", *TINY_TRAIN_ARGS, "--overwrite")
    assert_one_line_error(result, f"--overwrite: {own} holds files this tool did not write",
                          "nothing deleted")
    assert (own / "chapter1.tex").read_text() == "months of work"


@pytest.mark.fast
def test_overwrite_knows_a_run_folder_of_this_tool(tmp_path):
    from src.cli import run_record, write_json
    from src.stages import _made_by_this_tool
    assert _made_by_this_tool(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert _made_by_this_tool(tmp_path / "empty")
    (tmp_path / "a file").write_text("")
    assert not _made_by_this_tool(tmp_path / "a file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"some": "other tool"}')
    assert not _made_by_this_tool(foreign)
    write_json(tmp_path / "run" / "config.json", run_record({"seed": 0}))
    assert _made_by_this_tool(tmp_path / "run")


# --- files: permissions, a full disk, a damaged cache -----------------------------------

@pytest.mark.fast
def test_result_files_get_the_umasks_permissions(tmp_path):
    from src.cli import write_json
    write_json(tmp_path / "record.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "record.json").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a disk that fills. Needs root (CI and this project's machines run
    as root)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs: {mounted.stderr.strip()}"
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.fast
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_file(small_disk):
    from src.cli import ToolError, save_torch
    checkpoint = small_disk / "last.pt"
    save_torch(checkpoint, {"weights": torch.zeros(1000)})
    before = checkpoint.read_bytes()
    with pytest.raises(ToolError, match=f"cannot write {checkpoint}: the disk or quota is "
                                        f"full .*MiB free") as error:
        save_torch(checkpoint, {"weights": torch.zeros(1_000_000)})     # 4 MB
    assert "\n" not in str(error.value) and "inline_container" not in str(error.value)
    assert checkpoint.read_bytes() == before
    assert [path.name for path in small_disk.iterdir()] == ["last.pt"]  # no temporary left


@pytest.mark.fast
def test_an_image_cache_with_no_room_decodes_into_memory(tiny_data, small_disk, tmp_path,
                                                         capsys):
    """Before, the cache was a sparse file: a disk that filled while decoding killed the
    process with SIGBUS. Now its blocks are reserved first."""
    from src.data import load_images, load_or_create_split
    split = load_or_create_split(tiny_data, tmp_path, seed=0, quiet=True)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 2**20 - 40_000))   # leaves less than the cache needs
    paths = split.frame["upscale_img_path"].tolist()
    pixels = load_images(tiny_data, paths, small_disk, "HR")
    assert f"note: no room for the HR cache {small_disk}" in capsys.readouterr().out
    direct = load_images(tiny_data, paths, None, "HR")
    assert np.array_equal(pixels, direct)
    assert sorted(path.name for path in small_disk.iterdir()) == ["filler"]


@pytest.mark.fast
def test_a_damaged_cache_is_named_and_rebuilt_and_dead_partials_removed(tiny_data, tmp_path,
                                                                       capsys):
    from src.data import load_images, load_or_create_split
    split = load_or_create_split(tiny_data, tmp_path, seed=0, quiet=True)
    paths = split.frame["img_path"].tolist()
    cache = tmp_path / "cache"
    good = load_images(tiny_data, paths, cache, "LR")
    cache_file = next(cache.glob("LR-*.npy"))
    # A killed decode's leftover, of a process that no longer runs.
    ended = subprocess.Popen(["true"])
    ended.wait()
    leftover = cache / f"{cache_file.stem}.{platform.node()}-{ended.pid}.partial.npy"
    leftover.write_bytes(b"half")
    cache_file.write_bytes(cache_file.read_bytes()[:200])      # truncated
    capsys.readouterr()
    again = load_images(tiny_data, paths, cache, "LR")
    assert f"note: the LR cache {cache_file} is damaged" in capsys.readouterr().out
    assert np.array_equal(good, again)
    assert sorted(path.name for path in cache.iterdir()) == [cache_file.name]


# --- no score from images a model trained on ------------------------------------------

FINAL_FIT = ["--final-fit", "--schedule", "cosine", "--select-by", "last"]


def test_a_final_fit_is_never_scored_on_the_splits_test_images(finished_run, tmp_path):
    data_dir, finished_dir, _, _ = finished_run
    out_dir = Path(shutil.copytree(finished_dir, tmp_path / "run"))
    trained = run_script("train_teacher.py", "--data-dir", data_dir, "--out-dir", out_dir,
                         *TINY_TRAIN_ARGS, *FINAL_FIT)
    assert trained.returncode == 0, trained.stderr
    final = out_dir / "teacher_final" / "best.pt"
    assert torch.load(final, weights_only=True)["final_fit"] is True
    assert json.loads((final.parent / "config.json").read_text())["args"]["final_fit"]
    metrics = out_dir / "teacher" / "test_metrics.json"
    before = metrics.read_bytes()
    result = run_script("test_teacher.py", "--data-dir", data_dir, "--out-dir", out_dir,
                        "--ckpt", final)
    assert_one_line_error(result, f"teacher checkpoint {final} is a final fit",
                          "use predict.py for test.csv")
    assert metrics.read_bytes() == before            # the split run's score, untouched
    # A KD student selected and scored on the split cannot learn from it either; a final
    # fit of the student can.
    student = run_script("train_kd_student.py", "--data-dir", data_dir, "--out-dir",
                         tmp_path / "kd", *TINY_TRAIN_ARGS, "--teacher-ckpt", final)
    assert_one_line_error(student, f"teacher checkpoint {final} is a final fit")
    final_student = run_script("train_kd_student.py", "--data-dir", data_dir, "--out-dir",
                               out_dir, *TINY_TRAIN_ARGS, *FINAL_FIT, "--teacher-ckpt", final)
    assert final_student.returncode == 0, final_student.stderr


@pytest.mark.fast
def test_a_final_fit_saved_before_the_mark_is_known_by_its_record(tmp_path):
    from src.stages import is_final_fit
    (tmp_path / "config.json").write_text(json.dumps({"args": {"final_fit": True}}))
    assert is_final_fit(tmp_path / "best.pt", {})
    assert not is_final_fit(tmp_path / "best.pt", {"final_fit": False})
    assert not is_final_fit(tmp_path / "elsewhere" / "best.pt", {})


def test_a_teacher_of_another_split_is_refused(finished_run, tmp_path):
    """Same data, another --seed: another assignment of rows to train/val/test, so the
    teacher trained on some of this split's validation and test images."""
    data_dir, finished_dir, _, _ = finished_run
    teacher = finished_dir / "teacher" / "best.pt"
    other = ["--data-dir", data_dir, "--out-dir", tmp_path / "seed1", *TINY_TRAIN_ARGS,
             "--seed", "1"]
    result = run_script("train_kd_student.py", *other, "--teacher-ckpt", teacher)
    assert_one_line_error(result, f"teacher checkpoint {teacher} was trained on another split",
                          "validation and test images")
    result = run_script("train_student.py", *other, "--weights", teacher)
    assert_one_line_error(result, f"--weights {teacher} was trained on another split")
    # The same split (the same seed, in another --out-dir) is accepted.
    result = run_script("train_kd_student.py", "--data-dir", data_dir, "--out-dir",
                        tmp_path / "same", *TINY_TRAIN_ARGS, "--teacher-ckpt", teacher)
    assert result.returncode == 0, result.stderr


@pytest.mark.fast
def test_the_split_fingerprint_covers_which_rows_went_where(tiny_data, tmp_path):
    from src.data import load_or_create_split
    first = load_or_create_split(tiny_data, tmp_path / "a", seed=0, quiet=True)
    again = load_or_create_split(tiny_data, tmp_path / "a", seed=0, quiet=True)
    other = load_or_create_split(tiny_data, tmp_path / "b", seed=1, quiet=True)
    assert first.fingerprint == again.fingerprint
    assert first.data_fingerprint == other.data_fingerprint      # the same rows
    assert first.fingerprint != other.fingerprint                # assigned otherwise


@pytest.mark.fast
def test_predict_checks_its_checkpoints_before_reading_any_image(data_copy, tmp_path):
    """Before, every test image was decoded first: a wrong --ckpt was named only after
    that, and a damaged test image hid it."""
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    test_table = pd.read_csv(data_copy / "test.csv")
    (data_copy / test_table["img_path"].iloc[0]).unlink()
    result = run_script("predict.py", "--data-dir", data_copy, "--out-dir", tmp_path / "run",
                        "--ckpt", tmp_path / "junk.pt", "--output", tmp_path / "out.csv")
    assert_one_line_error(result, "junk.pt is not a readable checkpoint")


# --- a record (--config) gets every check a command line gets --------------------------

@pytest.mark.parametrize("setting, value, message", [
    ("schedule", "bogus", "argument --schedule: invalid choice: 'bogus'"),
    ("batch_size", 8.5, "argument --batch-size: invalid int value: '8.5'"),
    ("deterministic", "yes", "--deterministic is recorded as 'yes', not true or false"),
])
def test_a_bad_value_in_a_record_is_refused_before_any_work(finished_run, tmp_path, setting,
                                                           value, message):
    data_dir, finished_dir, _, _ = finished_run
    record = json.loads((finished_dir / "teacher" / "config.json").read_text())
    record["args"][setting] = value
    (tmp_path / "config.json").write_text(json.dumps(record))
    out_dir = tmp_path / "rerun"
    result = run_script("train_teacher.py", "--config", tmp_path / "config.json",
                        "--data-dir", data_dir, "--out-dir", out_dir)
    assert_one_line_error(result, f"--config {tmp_path / 'config.json'}: {message}",
                          "a value in the record")
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.mark.fast
def test_a_record_never_switches_a_tracker_on(finished_run, tmp_path):
    from src.arguments import parse_train_arguments
    _, finished_dir, _, _ = finished_run
    record = json.loads((finished_dir / "teacher" / "config.json").read_text())
    record["args"].update(wandb=True, tensorboard=True, wandb_project="their-project")
    (tmp_path / "config.json").write_text(json.dumps(record))
    args = parse_train_arguments("teacher", ["--config", str(tmp_path / "config.json")])
    assert (args.wandb, args.tensorboard, args.wandb_project) == (False, False, "lowres-kd")
    assert args.lr == record["args"]["lr"] and args.epochs == record["args"]["epochs"]
    asked = parse_train_arguments("teacher", ["--config", str(tmp_path / "config.json"),
                                              "--tensorboard"])
    assert asked.tensorboard


# --- hostile or odd image files ----------------------------------------------------------

@pytest.mark.fast
def test_a_fifo_among_the_images_is_refused_not_waited_on(tmp_path):
    from src.cli import ToolError
    from src.data import decode_image
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    with pytest.raises(ToolError, match=f"not a regular file: {fifo}"):
        decode_image(fifo)         # before, open() blocked until SIGKILL


@pytest.mark.fast
def test_a_decompression_bomb_is_one_line_and_listed_by_check_data(data_copy, tmp_path):
    from PIL import Image
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)            # a few kB on disk, 400 Mpx decoded
    assert bomb.stat().st_size < 1_000_000
    from src.cli import ToolError
    from src.data import decode_image
    with pytest.raises(ToolError, match="is 400,000,000 pixels, over the 67,108,864 this tool"):
        decode_image(bomb)
    table = pd.read_csv(data_copy / "train.csv")
    shutil.copy(bomb, data_copy / table["img_path"].iloc[0])
    result = run_script("check_data.py", "--data-dir", data_copy)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "is 400,000,000 pixels, over the 67,108,864 this tool decodes" in result.stdout


@pytest.mark.fast
def test_16_bit_grey_is_scaled_not_clipped_to_white(tmp_path):
    from PIL import Image
    from src.data import decode_image
    ramp = (np.arange(64, dtype=np.uint16) * 1040).reshape(8, 8)        # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    pixels = decode_image(tmp_path / "grey16.png")
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 8, 3)
    assert np.array_equal(pixels[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


@pytest.mark.fast
def test_a_class_name_with_dollars_is_drawn_as_written(tmp_path):
    from src import plots
    classes = ["$x$", r"$\notacommand$", "plain"]     # the second stopped the figures
    path = plots.plot_confusion({"model": np.eye(3)}, classes, tmp_path / "confusion.png")
    assert path.stat().st_size > 0
    plots.plot_per_class_f1({"model": np.ones(3)}, classes, tmp_path / "f1.png")


# --- paths that lead outside the data folder ----------------------------------------------

def _escaping_data(data_copy: Path, outside: Path) -> Path:
    """The tiny data with one LR image read through '..' and one HR image through a
    symbolic link to a folder outside the data folder (the same pixels)."""
    table = pd.read_csv(data_copy / "train.csv")
    outside.mkdir()
    lr, hr = table["img_path"].iloc[0], table["upscale_img_path"].iloc[1]
    shutil.copy(data_copy / lr, outside / "lr.png")
    shutil.copy(data_copy / hr, outside / "hr.png")
    (data_copy / "elsewhere").symlink_to(outside)
    table.loc[0, "img_path"] = f"../{outside.name}/lr.png"
    table.loc[1, "upscale_img_path"] = "elsewhere/hr.png"
    table.to_csv(data_copy / "train.csv", index=False)
    return data_copy


def test_paths_outside_the_data_folder_warn_and_strict_paths_refuses(data_copy, tmp_path):
    data = _escaping_data(data_copy, data_copy.parent / "outside")
    common = ["--data-dir", data, *TINY_TRAIN_ARGS]
    warned = run_script("train_teacher.py", *common, "--out-dir", tmp_path / "a")
    assert warned.returncode == 0, warned.stderr
    assert (f"warning: HR images: 1 image path(s) lead outside {data} (absolute, '..' or a "
            f"symbolic link; first: elsewhere/hr.png); --strict-paths refuses them") \
        in warned.stdout
    refused = run_script("train_student.py", *common, "--out-dir", tmp_path / "b",
                         "--strict-paths")
    assert_one_line_error(refused, "LR images: 1 image path(s) lead outside",
                          "first: ../outside/lr.png", "refused by --strict-paths")
    listed = run_script("check_data.py", "--data-dir", data)
    assert "../outside/lr.png leads outside" in listed.stdout
    assert "elsewhere/hr.png leads outside" in listed.stdout
