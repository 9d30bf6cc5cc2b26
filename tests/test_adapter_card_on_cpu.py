"""Shipped adapters: the card script's numbers are what `rl-seg eval --adapter <name>` prints, every shipped
adapter has its card, and one of them still matches a fresh evaluation on ARCADE test."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rl_seg import adapters
from rl_seg.adapters import CARD_JSON, resolve_adapter, shipped_adapters
from rl_seg.cli import main
from rl_seg.data import SHARED_DATA_DIR
from rl_seg.policy import load_policy
from rl_seg.policy.lora import LoraSettings, attach_lora

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture
def full_data(monkeypatch):
    if not (SHARED_DATA_DIR / "ARCADE_syntax").is_dir():
        pytest.skip(f"full ARCADE not present at {SHARED_DATA_DIR}")
    monkeypatch.delenv("RL_SEG_DATA_DIR", raising=False)


def _card_script():
    spec = importlib.util.spec_from_file_location("adapter_card", REPO / "benchmarks" / "adapter_card.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _eval(name: str, tmp_path: Path, thresholds: list[str], limit: int | None = None) -> dict:
    out = tmp_path / f"{name}.json"
    args = ["eval", "--adapter", name, "--data", "arcade", "--split", "test", "--thresholds", ",".join(thresholds),
            "--out", str(out), "-q", *(["--limit", str(limit)] if limit else [])]
    assert main(args) == 0
    return json.loads(out.read_text())


def _matches(report: dict, card: dict, tolerance: float) -> None:
    assert report["num_images"] == card["num_images"]
    for key, value in card["mean"].items():
        assert report["mean"][key] == pytest.approx(value, abs=tolerance), key
    t = card["val_threshold"]
    for key, value in card["thresholds"][t].items():
        assert report["thresholds"][t][key] == pytest.approx(value, abs=tolerance), (t, key)


@pytest.mark.shared_data
def test_card_of_an_adapter_is_what_eval_prints_for_its_bare_name(full_data, tmp_path, monkeypatch):
    # A small adapter made here (LoRA B drawn at random, so it changes the model): the machinery, not a result.
    torch.manual_seed(0)
    model = attach_lora(load_policy("default"), LoraSettings(r=4, targets="all"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    trained = tmp_path / "run" / "final_adapter"
    model.save_pretrained(str(trained))
    shipped = tmp_path / "adapters"
    assert _card_script().main(["--adapter", str(trained), "--name", "fixture", "--out", str(shipped),
                                "--datasets", "arcade", "--limit", "4", "--resamples", "200"]) == 0

    folder = shipped / "fixture"
    card = json.loads((folder / CARD_JSON).read_text())
    text = (folder / "README.md").read_text()
    result = card["results"]["arcade"]
    assert result["num_images"] == 4 and result["split"] == "test" and card["base_policy"] == "default"
    gap = result["above_curve"]
    assert gap["ci95"][0] <= gap["gap"] <= gap["ci95"][1] and gap["resamples"] == 200
    assert f"{gap['gap']:+.4f}" in text and f"{result['mean']['dice']:.4f}" in text
    assert f"{result['warm_start']['mean']['dice']:.4f}" in text  # the warm start's row, to compare with
    assert result["mean"]["dice"] != pytest.approx(result["warm_start"]["mean"]["dice"], abs=1e-4)

    monkeypatch.setattr(adapters, "ADAPTERS_DIR", shipped)
    assert resolve_adapter("fixture") == folder
    report = _eval("fixture", tmp_path, ["0.5", result["val_threshold"]], limit=4)
    assert report["adapter_path"] == str(folder)
    _matches(report, result, tolerance=1e-4)


def test_a_name_that_is_neither_folder_nor_shipped_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--adapter", "no-such-adapter", "--data", "arcade-sample", "-q"]) == 2
    err = capsys.readouterr().err
    assert "no-such-adapter" in err and "shipped" in err


@pytest.mark.parametrize("name", shipped_adapters())
def test_every_shipped_adapter_has_its_card_and_is_small(name):
    folder = resolve_adapter(name)
    card = json.loads((folder / CARD_JSON).read_text())
    text = (folder / "README.md").read_text()
    assert card["name"] == name and (folder / "train_config.yaml").is_file() and card["command"] in text
    assert card["completed_iterations"] == card["iterations"]
    for data in ("drive", "arcade"):  # the card's claims, as its README states them
        result = card["results"][data]
        assert result["limit"] is None and result["split"] == "test"
        assert f"**{result['above_curve']['gap']:+.4f}**" in text and f"{result['mean']['dice']:.4f}" in text
    assert (folder / "adapter_model.safetensors").stat().st_size < 10 * 2 ** 20  # LoRA: a few MB


@pytest.mark.shared_data
@pytest.mark.parametrize("name", shipped_adapters()[:1])  # one of them: each is a full ARCADE test evaluation
def test_shipped_adapter_matches_its_card_on_arcade_test(full_data, name, tmp_path):
    card = json.loads((resolve_adapter(name) / CARD_JSON).read_text())
    result = card["results"]["arcade"]
    tolerance = 1e-4 if card["evaluated"]["device"] == "cpu" else 5e-3  # bf16 autocast on a GPU differs
    _matches(_eval(name, tmp_path, ["0.5", result["val_threshold"]], limit=result["limit"]), result, tolerance)
    assert result["above_curve"]["gap"] > 0, "the card says this adapter is above the warm start's curve"
