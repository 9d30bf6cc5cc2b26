"""`rl-seg score`: matching predictions to samples, reading every format, the sweep, and clear errors."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from rl_seg.cli import main
from rl_seg.data import SHARED_DATA_DIR, DataError, load_dataset
from rl_seg.score import match_predictions, read_prediction, score_predictions

from conftest import SAMPLES

DRIVE_SAMPLE_TEST = SAMPLES / "DRIVE" / "test"


def run_cli(*args):
    return main(["score", "-q", *map(str, args)])


def test_second_observer_against_first_and_truth_against_itself(tmp_path, capsys):
    out = tmp_path / "second.json"
    assert run_cli("--pred", DRIVE_SAMPLE_TEST / "2nd_manual", "--data", "drive-sample", "--out", out) == 0
    report = json.loads(out.read_text())
    assert {"dice", "iou", "recall", "precision", "cldice"} <= report["mean"].keys()
    assert [r["id"] for r in report["per_image"]] == ["01", "02"]
    assert 0.75 < report["mean"]["dice"] < 0.85  # human inter-observer level
    assert "0.5" in report["thresholds"] and report["binary_predictions"] is True
    assert "mean" in capsys.readouterr().out

    truth = tmp_path / "truth.json"
    assert run_cli("--pred", DRIVE_SAMPLE_TEST / "1st_manual", "--data", "drive-sample", "--out", truth) == 0
    mean = json.loads(truth.read_text())["mean"]
    assert mean["dice"] == mean["iou"] == mean["recall"] == mean["precision"] == mean["cldice"] == 1.0


def soft_predictions(folder, fmt):
    """Blurred ground truths as probability maps: a threshold sweep must move the numbers."""
    folder.mkdir()
    for sample in load_dataset("drive-sample", "test"):
        prob = np.clip(ndimage.gaussian_filter(sample.mask.astype(float), 1.5) * 1.6, 0, 1)
        if fmt == "png8":
            Image.fromarray((prob * 255).round().astype(np.uint8)).save(folder / f"{sample.id}_prob.png")
        elif fmt == "png16":
            Image.fromarray((prob * 65535).round().astype(np.uint16)).save(folder / f"{sample.id}.png")
        else:
            np.save(folder / f"{sample.id}.npy", prob.astype(np.float32))


@pytest.mark.parametrize("fmt", ["png8", "png16", "npy"])
def test_threshold_sweep_moves_metrics_on_probability_maps(tmp_path, fmt):
    soft_predictions(tmp_path / "pred", fmt)
    out = tmp_path / "r.json"
    plot = tmp_path / "sweep.png"
    assert run_cli("--pred", tmp_path / "pred", "--data", "drive-sample", "--thresholds", "0.1,0.3,0.7",
                   "--out", out, "--plot", plot) == 0
    report = json.loads(out.read_text())
    sweep = report["thresholds"]
    assert list(sweep) == ["0.1", "0.3", "0.5", "0.7"]
    assert report["binary_predictions"] is False
    recalls = [sweep[t]["recall"] for t in sweep]
    assert recalls == sorted(recalls, reverse=True) and recalls[0] > recalls[-1] + 0.05
    assert sweep["0.5"] == report["mean"]
    assert plot.stat().st_size > 1000


def test_prediction_matching_rules(tmp_path):
    for name in ["01_manual2.gif", "010.png", "02.png", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    matches = match_predictions(tmp_path, ["01", "02"])
    assert matches["01"].name == "01_manual2.gif" and matches["02"].name == "02.png"
    (tmp_path / "02_extra.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"several predictions for sample '02': 02.png, 02_extra.png"):
        match_predictions(tmp_path, ["01", "02"])
    with pytest.raises(DataError, match=r"no prediction for sample '03'"):
        match_predictions(tmp_path, ["03"])


def test_missing_prediction_is_an_error_naming_the_sample(tmp_path, capsys):
    (tmp_path / "01.png").write_bytes((DRIVE_SAMPLE_TEST / "1st_manual" / "01_manual1.gif").read_bytes())
    assert run_cli("--pred", tmp_path, "--data", "drive-sample") == 2
    err = capsys.readouterr().err
    assert "no prediction for sample '02'" in err and str(tmp_path) in err


def test_wrong_size_prediction_is_an_error_naming_sample_and_file(tmp_path):
    for sid in ("01", "02"):
        Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / f"{sid}.png")
    with pytest.raises(DataError, match=r"prediction for sample '01' has shape \(100, 100\).*01_manual1.gif.*\(584, 565\)"):
        score_predictions(tmp_path, load_dataset("drive-sample", "test"), progress=False)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.npy", np.full((4, 4), 2.5, np.float32), r"must lie in \[0, 1\].*logits\?"),
        ("b.npy", np.full((4, 4), np.nan, np.float32), "NaN"),
        ("c.npy", np.zeros((2, 4, 4), np.float32), "2-D"),
        ("d.png", np.stack([np.zeros((4, 4)), np.ones((4, 4)) * 255, np.zeros((4, 4))], -1).astype(np.uint8),
         "colour image"),
        ("e.png", b"", "empty"),
        ("f.png", b"not a png", "cannot be read"),
    ],
)
def test_bad_prediction_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif name.endswith(".npy"):
        np.save(path, content)
    else:
        Image.fromarray(content).save(path)
    with pytest.raises(DataError, match=message) as info:
        read_prediction(path)
    assert str(path.name) in str(info.value)


def test_binary_label_maps_read_as_zero_one(tmp_path):
    labels = np.zeros((4, 4), np.uint8)
    labels[1, 1] = 1
    Image.fromarray(labels).save(tmp_path / "a.png")
    Image.fromarray(labels * 255).save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_prediction(tmp_path / "a.png"), labels.astype(np.float32))
    np.testing.assert_array_equal(read_prediction(tmp_path / "b.png"), labels.astype(np.float32))


def test_bad_thresholds_are_rejected(capsys):
    with pytest.raises(SystemExit):
        run_cli("--pred", ".", "--data", "drive-sample", "--thresholds", "0.5,1.5")
    assert "thresholds must lie in [0, 1)" in capsys.readouterr().err


@pytest.mark.shared_data
def test_full_drive_second_observer_is_human_level(tmp_path):
    if not (SHARED_DATA_DIR / "DRIVE").is_dir():
        pytest.skip(f"full DRIVE not present at {SHARED_DATA_DIR}")
    out = tmp_path / "r.json"
    assert run_cli("--pred", SHARED_DATA_DIR / "DRIVE" / "test" / "2nd_manual", "--data", "drive", "--out", out) == 0
    report = json.loads(out.read_text())
    assert report["num_images"] == 20
    assert report["mean"]["dice"] == pytest.approx(0.788, abs=0.01)
