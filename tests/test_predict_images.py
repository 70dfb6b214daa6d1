"""predict.py --images: any LR images (a folder, one file, a CSV of paths), top-k and class
probabilities, images at another size, unreadable files."""

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_script


@pytest.fixture()
def trained(finished_run):
    data_dir, out_dir, _, _ = finished_run
    return data_dir, out_dir, ["--data-dir", data_dir, "--out-dir", out_dir]


def test_a_folder_gives_the_submissions_labels_and_skips_what_it_cannot_read(trained, tmp_path):
    data_dir, out_dir, common = trained
    ckpts = [out_dir / "kd_student" / "best.pt", out_dir / "student" / "best.pt"]
    folder = shutil.copytree(data_dir / "test", tmp_path / "photos")
    test_table = pd.read_csv(data_dir / "test.csv")
    submission = tmp_path / "submission.csv"
    assert run_script("predict.py", *common, "--ckpt", *ckpts, "--tta",
                      "--output", submission).returncode == 0
    (folder / "broken.png").write_bytes(b"not a png")
    lr = np.asarray(Image.open(folder / "TEST_00000.png"))
    # Each pixel made a 3x3 block: the box filter gives the very LR image back.
    Image.fromarray(lr).resize((lr.shape[1] * 3, lr.shape[0] * 3),
                               Image.Resampling.NEAREST).save(folder / "big.png")
    output = tmp_path / "predictions.csv"
    result = run_script("predict.py", *common, "--ckpt", *ckpts, "--tta", "--images", folder,
                        "--probabilities", "--output", output)
    # Unreadable files are listed and skipped; the exit status says some were.
    assert result.returncode == 1, result.stderr
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    assert f"{len(test_table) + 1} of {len(test_table) + 2} images predicted" in result.stdout
    assert "1 images were not" in result.stdout and "resized" in result.stdout
    predicted = pd.read_csv(output)
    classes = sorted(set(pd.read_csv(data_dir / "train.csv")["label"]))
    assert list(predicted.columns) == ["path", "label", *[f"p_{name}" for name in classes]]
    probabilities = predicted[[f"p_{name}" for name in classes]].to_numpy()
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert (np.asarray(classes)[probabilities.argmax(1)] == predicted["label"]).all()
    # The test images through --images: the labels of the test.csv submission, image by
    # image (the same decoding, resizing and ensemble), whatever the order of the folder.
    by_name = predicted.assign(name=predicted["path"].map(lambda p: p.rsplit("/", 1)[-1]))
    expected = pd.read_csv(submission).assign(
        name=test_table["img_path"].map(lambda p: p.rsplit("/", 1)[-1]))
    merged = expected.merge(by_name, on="name")
    assert len(merged) == len(test_table)
    assert (merged["label_x"] == merged["label_y"]).all()
    # Box-filtered back to its LR size, the enlarged copy is the original image again.
    rows = by_name.set_index("name")
    columns = [f"p_{name}" for name in classes]
    assert np.allclose(rows.loc["big.png", columns].to_numpy(float),
                       rows.loc["TEST_00000.png", columns].to_numpy(float), atol=1e-6)


def test_one_file_a_csv_and_top_k(trained, tmp_path):
    data_dir, out_dir, common = trained
    image = data_dir / "test" / "TEST_00001.png"
    one = tmp_path / "one.csv"
    assert run_script("predict.py", *common, "--images", image, "--top-k", "3",
                      "--output", one).returncode == 0
    row = pd.read_csv(one)
    assert list(row.columns) == ["path", "label", "probability_1", "label_2",
                                 "probability_2", "label_3", "probability_3"]
    assert len(row) == 1 and row["path"][0] == str(image)
    ranked = row[["probability_1", "probability_2", "probability_3"]].to_numpy()[0]
    assert (np.diff(ranked) <= 0).all() and len({row["label"][0], row["label_2"][0],
                                                 row["label_3"][0]}) == 3
    listed = tmp_path / "list"
    listed.mkdir()
    pd.DataFrame({"img_path": ["./TEST_00001.png"]}).to_csv(listed / "paths.csv", index=False)
    shutil.copy(image, listed / "TEST_00001.png")
    from_csv = tmp_path / "from_csv.csv"
    assert run_script("predict.py", *common, "--images", listed / "paths.csv", "--top-k", "3",
                      "--output", from_csv).returncode == 0
    again = pd.read_csv(from_csv)
    assert again.drop(columns="path").equals(row.drop(columns="path"))


@pytest.mark.parametrize("flags, message", [
    (["--images", "NOWHERE"], "--images NOWHERE: no such file or folder"),
    (["--images", "EMPTY"], "no image files in the folder"),
    (["--images", "TEST", "--top-k", "99"], "--top-k 99 is more than the 4 classes"),
    (["--images", "TEST", "--top-k", "0"], "--top-k must be at least 1"),
    (["--top-k", "2"], "--top-k and --probabilities go with --images"),
])
def test_bad_images_input_is_one_line(trained, tmp_path, flags, message):
    data_dir, _, common = trained
    (tmp_path / "EMPTY").mkdir()
    places = {"NOWHERE": tmp_path / "NOWHERE", "EMPTY": tmp_path / "EMPTY",
              "TEST": data_dir / "test"}
    flags = [str(places.get(flag, flag)) for flag in flags]
    message = message.replace("NOWHERE", str(tmp_path / "NOWHERE"))
    result = run_script("predict.py", *common, *flags, "--output", tmp_path / "out.csv")
    assert_one_line_error(result, message)
    assert not (tmp_path / "out.csv").exists()
