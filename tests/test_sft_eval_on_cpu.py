"""`rl-seg sft` (run folder, exact resume, the loss) and `rl-seg eval` (report, sweep, overlays, errors)."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from rl_seg import sft
from rl_seg.cli import main
from rl_seg.data import load_dataset
from rl_seg.evaluate import evaluate_policy, overlay, predict_probabilities
from rl_seg.policy import load_policy
from rl_seg.policy.default_model import DefaultModelConfig, DefaultSegModel
from rl_seg.sft import mask_loss

from conftest import SAMPLES

SFT_ARGS = ["model=tiny", "data=[drive-sample,arcade-sample]", "batch_size=2", "crop=64", "val_every=3",
            "progress=false", "val_limit=1", "train_limit=2", "device=cpu"]
WHITE, RED, BLUE = (255, 255, 255), (230, 30, 30), (40, 90, 255)


def run_sft(out, *extra):
    assert main(["sft", f"out={out}", *SFT_ARGS, *extra]) == 0
    return out


def weights(run):
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst == 0.0, f"final weights differ by up to {worst:g}"


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The brief's run: 6 steps of the tiny model on both samples, validating every 3."""
    return run_sft(tmp_path_factory.mktemp("sft") / "full", "steps=6")


# ------------------------------------------------------------------------------------------------------ sft


def test_sft_writes_config_metrics_best_and_checkpoint(full_run):
    assert sorted(p.name for p in full_run.iterdir()) == ["best", "checkpoint", "config.yaml", "logs",
                                                         "metrics.jsonl"]
    assert (full_run / "logs" / "driver.log").is_file()  # what is not for the console: library warnings
    config = yaml.safe_load((full_run / "config.yaml").read_text())
    assert config["steps"] == 6 and config["data"] == ["drive-sample", "arcade-sample"] and config["crop"] == 64
    assert config["model"] == "tiny" and config["out"] == str(full_run)

    rows = records(full_run)
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        assert set(r["val"]) == {"drive-sample", "arcade-sample", "mean_dice"}
        for name in ("drive-sample", "arcade-sample"):
            assert set(r["val"][name]) == {"dice", "recall", "precision"}
            assert all(0.0 <= v <= 1.0 for v in r["val"][name].values())
        assert r["val"]["mean_dice"] == pytest.approx(
            (r["val"]["drive-sample"]["dice"] + r["val"]["arcade-sample"]["dice"]) / 2)
        assert np.isfinite(r["loss"]) and r["loss"] > 0 and r["lr"] > 0
    assert rows[0]["best"] == rows[0]["val"]["mean_dice"]
    assert rows[1]["best"] == max(rows[0]["val"]["mean_dice"], rows[1]["val"]["mean_dice"])

    best = load_policy(full_run / "best")
    assert isinstance(best, DefaultSegModel) and best.config == DefaultModelConfig.tiny()
    state = torch.load(full_run / "checkpoint" / "trainer.pt", weights_only=False)
    assert state["step"] == 6 and state["best"] == rows[1]["best"]
    assert {"optimizer", "scheduler", "sampler_rng", "torch_rng"} <= state.keys()
    # best/ holds the weights of the best validation: the final ones exactly when the last validation was best
    best_w, final_w = load_file(str(full_run / "best" / "model.safetensors")), weights(full_run)
    same = all(torch.equal(best_w[k], final_w[k]) for k in final_w)
    assert same == (rows[1]["val"]["mean_dice"] > rows[0]["val"]["mean_dice"])
    # training moved the weights away from the seed's initialization
    torch.manual_seed(0)
    init = DefaultSegModel(DefaultModelConfig.tiny()).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in final_w.items())


def test_resume_3_then_6_equals_6(full_run, tmp_path, capsys):
    """Warm-up (100 steps by default) covers all 6 steps, so the schedule does not depend on `steps`: 3 steps,
    then a resume with steps=6, must retrace the 6-step run bit for bit (weights, optimizer, sampler and torch
    RNG are all restored)."""
    part = run_sft(tmp_path / "part", "steps=3")
    assert [r["step"] for r in records(part)] == [3]
    run_sft(part, "steps=6", "resume=true")
    assert "resumed from" in capsys.readouterr().out
    assert_same_weights(full_run, part)
    a, b = records(full_run), records(part)
    assert [r["step"] for r in b] == [3, 6]
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["lr"], ra["val"], ra["best"]) == (rb["loss"], rb["lr"], rb["val"], rb["best"])


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_exactly_with_cosine_schedule(tmp_path, monkeypatch):
    """A run killed after its step-3 checkpoint and resumed with the same config ends where the uninterrupted run
    ends, with the warm-up short enough that the cosine decay is active."""
    schedule = ["steps=6", "warmup_steps=2"]
    whole = run_sft(tmp_path / "whole", *schedule)

    batch = sft.CropSampler.batch
    calls = {"n": 0}

    def dying_batch(self, size):
        calls["n"] += 1
        if calls["n"] == 4:  # after 3 optimizer steps and the checkpoint written at step 3
            raise Interrupt
        return batch(self, size)

    with monkeypatch.context() as m:
        m.setattr(sft.CropSampler, "batch", dying_batch)
        with pytest.raises(Interrupt):
            main(["sft", f"out={tmp_path / 'cut'}", *SFT_ARGS, *schedule])
    assert torch.load(tmp_path / "cut" / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 3
    run_sft(tmp_path / "cut", *schedule, "resume=true")
    assert_same_weights(whole, tmp_path / "cut")
    assert [r["val"] for r in records(whole)] == [r["val"] for r in records(tmp_path / "cut")]


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path):
    """3 steps then resume to 6, with the cosine decay active: the schedule is a function of `steps`, so the
    extended run should follow the 6-step schedule from step 4 on."""
    schedule = ["warmup_steps=2"]
    whole = run_sft(tmp_path / "whole", "steps=6", *schedule)
    part = run_sft(tmp_path / "part", "steps=3", *schedule)
    run_sft(part, "steps=6", "resume=true", *schedule)
    assert_same_weights(whole, part)


def test_mask_loss_is_2_bce_plus_half_soft_dice():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 9, generator=g, dtype=torch.float64) * 2
    target = (torch.rand(3, 7, 9, generator=g) < 0.3).double()
    target[2] = 0  # an image without vessels: Dice smoothing keeps it finite
    p = 1 / (1 + torch.exp(-logits))
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    dice = torch.stack([1 - (2 * (p[i] * target[i]).sum() + 1) / (p[i].sum() + target[i].sum() + 1)
                        for i in range(3)]).mean()
    expected = 2.0 * bce + 0.5 * dice
    assert mask_loss(logits, target, 2.0, 0.5).item() == pytest.approx(expected.item(), rel=1e-12)
    assert mask_loss(logits, target, 1.0, 0.0).item() == pytest.approx(bce.item(), rel=1e-12)
    assert mask_loss(logits, target, 0.0, 1.0).item() == pytest.approx(dice.item(), rel=1e-12)
    # a confident correct prediction scores far below a confident wrong one
    good, bad = (target * 2 - 1) * 8, (1 - target * 2) * 8
    assert mask_loss(good, target, 2.0, 0.5) < 0.2 < 2.0 < mask_loss(bad, target, 2.0, 0.5)


# ----------------------------------------------------------------------------------------------------- eval


def test_overlay_colours():
    image = np.full((2, 3, 3), 100, np.uint8)
    pred = np.array([[1, 1, 0], [0, 1, 1]], bool)
    gt = np.array([[1, 0, 1], [0, 1, 1]], bool)
    fov = np.array([[1, 1, 1], [1, 1, 0]], bool)
    out = overlay(image, pred, gt, fov)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    grey = (45, 45, 45)  # 0.45 x the grey level
    expected = [[WHITE, BLUE, RED], [grey, WHITE, grey]]  # TP FP FN / TN TP (outside the FOV)
    assert out.tolist() == [[list(c) for c in row] for row in expected]
    # without a FOV every pixel counts
    assert tuple(overlay(image, pred, gt)[1, 2]) == WHITE
    # greyscale images work too
    assert tuple(overlay(np.full((2, 3), 200, np.uint8), pred, gt)[1, 0]) == (90, 90, 90)


@pytest.fixture(scope="module")
def tiny_ckpt(full_run):
    return full_run / "best"


def test_eval_cli_report_overlays_and_sweep(tiny_ckpt, tmp_path, capsys):
    out, overlays = tmp_path / "eval.json", tmp_path / "overlays"
    assert main(["eval", "--policy", str(tiny_ckpt), "--data", "drive-sample", "--split", "test",
                 "--thresholds", "0.3,0.7", "--overlays", str(overlays), "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "threshold sweep" in printed and str(out) in printed
    report = json.loads(out.read_text())

    # the keys of `rl-seg score`'s report
    score_out = tmp_path / "score.json"
    assert main(["score", "-q", "--pred", str(SAMPLES / "DRIVE" / "test" / "2nd_manual"), "--data",
                 "drive-sample", "--thresholds", "0.3,0.7", "--out", str(score_out)]) == 0
    score = json.loads(score_out.read_text())
    assert set(score) - {"pred_dir"} <= set(report)
    assert report["mean"].keys() == score["mean"].keys()
    assert {"dice", "iou", "recall", "precision", "cldice"} <= report["mean"].keys()
    assert report["thresholds"].keys() == score["thresholds"].keys() == {"0.3", "0.5", "0.7"}
    assert [r["id"] for r in report["per_image"]] == ["01", "02"]
    assert set(report["per_image"][0]) == set(score["per_image"][0]) - {"prediction"}
    assert report["thresholds"]["0.5"] == report["mean"] and report["binary_predictions"] is False
    assert report["num_images"] == 2 and report["split"] == "test" and report["policy"] == str(tiny_ckpt)
    assert out.with_suffix(".sweep.png").is_file()

    # overlays: one per image, the pixels coloured by outcome at 0.5 inside the FOV
    assert sorted(p.name for p in overlays.iterdir()) == ["01.png", "02.png"]
    dataset = load_dataset("drive-sample", "test")
    probs = predict_probabilities(load_policy(tiny_ckpt), dataset)
    for sample, prob in zip(dataset, probs):
        picture = np.asarray(Image.open(overlays / f"{sample.id}.png").convert("RGB"))
        assert picture.shape == sample.image.shape
        pred, gt, fov = prob > 0.5, sample.mask, sample.fov
        for where, colour in (((pred & gt & fov), WHITE), ((~pred & gt & fov), RED), ((pred & ~gt & fov), BLUE)):
            assert where.any()
            assert (picture[where] == colour).all()
        rest = ~((pred | gt) & fov)
        assert (picture[rest][:, 0] == picture[rest][:, 1]).all() and (picture[rest][:, 1] == picture[rest][:, 2]).all()
        assert np.array_equal(picture, overlay(sample.image, pred, gt, fov))


def test_threshold_sweep_moves_the_shipped_models_numbers():
    report = evaluate_policy(load_policy("default"), load_dataset("drive-sample", "test"), [0.3, 0.7],
                             progress=False)
    sweep = report["thresholds"]
    assert list(sweep) == ["0.3", "0.5", "0.7"]
    assert sweep["0.3"]["recall"] > sweep["0.5"]["recall"] > sweep["0.7"]["recall"]
    assert sweep["0.3"]["precision"] < sweep["0.5"]["precision"] < sweep["0.7"]["precision"]
    assert sweep["0.3"]["dice"] != sweep["0.7"]["dice"]
    assert report["binary_predictions"] is False
    assert sweep["0.5"]["dice"] > 0.75  # the shipped model, on two DRIVE test images


def test_eval_with_bad_adapter_path_is_clear(tiny_ckpt, tmp_path, capsys):
    missing = tmp_path / "no-adapter"
    try:
        code = main(["eval", "--policy", str(tiny_ckpt), "--adapter", str(missing), "--data", "drive-sample", "-q"])
        message = capsys.readouterr().err
        assert code == 2
    except FileNotFoundError as exc:  # cmd_eval does not turn it into exit status 2 (reported)
        message = str(exc)
    assert str(missing) in message and "adapter_config.json" in message


def test_eval_with_missing_dataset_folder_exits_2(tiny_ckpt, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dataset"
    assert main(["eval", "--policy", str(tiny_ckpt), "--data", str(missing), "-q"]) == 2
    err = capsys.readouterr().err
    assert "rl-seg eval: error" in err and str(missing) in err and "does not exist" in err
