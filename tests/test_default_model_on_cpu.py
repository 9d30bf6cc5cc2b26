"""The embedded default policy: the shipped checkpoint, shapes, tokens, batch independence, persistence, and the
per-pixel Bernoulli mask distribution that PPO samples from."""

import json
import math
import shutil
import socket

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, kl_divergence

from rl_seg.data import SHARED_DATA_DIR, load_dataset
from rl_seg.policy import DEFAULT_PROMPT, MaskDistribution, load_policy
from rl_seg.policy.default_model import DEFAULT_CHECKPOINT, DefaultModelConfig, DefaultSegModel
from rl_seg.policy.tokenizer import IMG_CONTEXT

SHIPPED_PARAMETERS = 2_413_841
LONG_PROMPT = "segment all the thin retinal blood vessels in this fundus image please ."


@pytest.fixture(scope="module")
def shipped():
    return load_policy("default").eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DefaultSegModel(DefaultModelConfig.tiny()).eval()


@pytest.fixture(scope="module")
def crops():
    """Three 64x64 RGB crops of the DRIVE sample test images (vessels in each)."""
    images = [s.image for s in load_dataset("drive-sample", "test")]
    return [np.ascontiguousarray(images[0][200:264, 200:264]), np.ascontiguousarray(images[1][300:364, 250:314]),
            np.ascontiguousarray(images[0][260:324, 120:184])]


def n_params(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------------------------- shipped model


def test_shipped_checkpoint_loads_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    model = load_policy("default")
    assert isinstance(model, DefaultSegModel)
    assert model.name_or_path == "default"
    assert n_params(model) == SHIPPED_PARAMETERS < 20_000_000
    size = (DEFAULT_CHECKPOINT / "model.safetensors").stat().st_size
    assert 4 * SHIPPED_PARAMETERS * 0.95 < size < 40 * 2**20  # fp32, lm_head not duplicated
    # the tied output head shares the embedding after loading (it is not stored)
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    card = (DEFAULT_CHECKPOINT / "README.md").read_text()
    assert f"{SHIPPED_PARAMETERS:,}" in card


def test_shipped_model_segments_vessels(shipped):
    """The shipped weights are trained (not a random init): on a whole DRIVE test image, inside the FOV, vessel
    pixels get far higher logits than background and Dice at 0 is near the model card's 0.83."""
    sample = load_dataset("drive-sample", "test")[0]
    with torch.no_grad():
        logits = shipped(shipped.preprocess([sample.image])).logits[0].numpy()
    mask, fov = sample.mask, sample.fov
    assert logits[mask & fov].mean() > logits[~mask & fov].mean() + 5.0
    pred = (logits > 0) & fov
    dice = 2 * (pred & mask).sum() / (pred.sum() + (mask & fov).sum())
    assert dice > 0.75


# ------------------------------------------------------------------------------------------ shapes and tokens


@pytest.mark.parametrize("hw", [(75, 61), (64, 64), (33, 97)])
def test_logits_at_input_resolution(tiny, hw):
    h, w = hw
    images = [np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8) for i in range(2)]
    x = tiny.preprocess(images)
    assert x.shape == (2, 3, h, w) and x.dtype == torch.float32
    out = tiny(x)
    assert out.logits.shape == (2, h, w) == (2, *tiny.output_size((h, w)))
    assert out.seg_hidden.shape == (2, tiny.hidden_size) == (2, tiny.config.llm_hidden)
    assert torch.isfinite(out.logits).all()


def test_shipped_logits_odd_size(shipped, crops):
    image = np.ascontiguousarray(load_dataset("drive-sample", "test")[0].image[100:175, 100:161])
    with torch.no_grad():
        out = shipped(shipped.preprocess([image]))
    assert out.logits.shape == (1, 75, 61)
    assert out.seg_hidden.shape == (1, shipped.hidden_size) == (1, 128)


def test_preprocess_rejects_non_rgb(tiny):
    with pytest.raises(ValueError, match="H x W x 3"):
        tiny.preprocess([np.zeros((16, 16), np.uint8)])


def test_one_seg_token_and_image_tokens_per_conversation(tiny):
    prompts = [DEFAULT_PROMPT, LONG_PROMPT, "vessels?"]
    ids, attn = tiny.prompt_ids(prompts)
    assert ids.shape == attn.shape and ids.shape[0] == 3
    seg = tiny.tokenizer.convert_tokens_to_ids("[SEG]")
    ctx = tiny.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    assert seg == tiny.seg_token_id and ctx == tiny.img_context_token_id
    assert (ids == seg).sum(1).tolist() == [1, 1, 1]
    assert (ids == ctx).sum(1).tolist() == [tiny.num_image_tokens] * 3 == [tiny.config.image_grid ** 2] * 3
    # left padding: the shorter conversations are padded at the start, and only there
    pad = tiny.tokenizer.pad_token_id
    for row, mask in zip(ids, attn):
        n_pad = int((mask == 0).sum())
        assert (row[:n_pad] == pad).all() and (mask[n_pad:] == 1).all() and (row[n_pad:] != pad).all()
    assert (attn == 0).sum(1).tolist()[1] == 0  # the longest prompt is not padded
    # the answer ends the conversation: [SEG] sits just before ".<|im_end|>" of every row
    assert (ids[:, -3] == seg).all()


def test_seg_token_in_the_prompt_is_refused(tiny):
    with pytest.raises(ValueError, match=r"exactly one \[SEG\]"):
        tiny.prompt_ids(["segment [SEG] the vessels"])


def test_prompt_changes_seg_hidden(shipped, crops):
    x = shipped.preprocess(crops[:1])
    with torch.no_grad():
        a = shipped(x, [DEFAULT_PROMPT]).seg_hidden
        b = shipped(x, [LONG_PROMPT]).seg_hidden
    assert (a - b).abs().max() > 1e-3


def test_wrong_number_of_prompts(tiny):
    x = tiny.preprocess([np.zeros((16, 16, 3), np.uint8)] * 2)
    with pytest.raises(ValueError, match="1 prompts for 2 images"):
        tiny(x, [DEFAULT_PROMPT])


# ------------------------------------------------------------------------------------------ batch independence


def test_batch_independence_float64(shipped, crops):
    """A sample's logits must not depend on its batch-mates (GroupNorm, no BatchNorm), in train mode as PPO's
    learner runs, with batch-mates of other prompts (left padding). float64 isolates real coupling from
    float32 kernel rounding: coupling through batch statistics would show up as O(0.1) differences."""
    model = load_policy("default").double().train()
    x = model.preprocess(crops).double()
    with torch.no_grad():
        alone = [model(x[i:i + 1], [p]) for i, p in enumerate([DEFAULT_PROMPT, LONG_PROMPT, DEFAULT_PROMPT])]
        batches = {
            (0, 1): model(x[[0, 1]], [DEFAULT_PROMPT, LONG_PROMPT]),
            (0, 2): model(x[[0, 2]], [DEFAULT_PROMPT, DEFAULT_PROMPT]),
            (2, 1, 0): model(x[[2, 1, 0]], [DEFAULT_PROMPT, LONG_PROMPT, DEFAULT_PROMPT]),
        }
    for order, out in batches.items():
        for pos, i in enumerate(order):
            assert (out.logits[pos] - alone[i].logits[0]).abs().max() < 1e-5, (order, pos)
            assert (out.seg_hidden[pos] - alone[i].seg_hidden[0]).abs().max() < 1e-5, (order, pos)
    # and the three crops do give different logits (the comparison above is not vacuous)
    assert (alone[0].logits - alone[2].logits).abs().max() > 0.1


def test_batch_independence_float32(shipped, crops):
    """In float32 the batched convolution kernels round differently from batch-1 ones (observed ~3e-5 on logits
    of magnitude ~20, i.e. ~1e-6 relative); nothing beyond that."""
    x = shipped.preprocess(crops)
    with torch.no_grad():
        alone = shipped(x[:1]).logits
        for mates in ([0, 1], [0, 2], [0, 1, 2]):
            batched = shipped(x[mates]).logits[0]
            assert (batched - alone[0]).abs().max() < 1e-4 * max(1.0, float(alone.abs().max()))


# -------------------------------------------------------------------------------------------------- persistence


def test_save_and_load_round_trip(tiny, tmp_path, crops):
    path = tiny.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "rl_seg_policy.json"]
    assert json.loads((path / "rl_seg_policy.json").read_text()) == {"policy": "default"}
    loaded = load_policy(path).eval()
    assert isinstance(loaded, DefaultSegModel) and loaded.config == tiny.config
    assert loaded.name_or_path == str(path)
    x = tiny.preprocess(crops[:2])
    with torch.no_grad():
        a, b = tiny(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.seg_hidden, b.seg_hidden)
    for (name, p), (_, q) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name


def test_fresh_models_differ_by_seed():
    torch.manual_seed(1)
    a = DefaultSegModel(DefaultModelConfig.tiny())
    torch.manual_seed(2)
    b = DefaultSegModel(DefaultModelConfig.tiny())
    assert not torch.equal(a.vision_model.stages[0][0].weight, b.vision_model.stages[0][0].weight)


def _break(path, case):
    if case == "missing model.safetensors":
        (path / "model.safetensors").unlink()
        return "model.safetensors"
    if case == "missing config.json":
        (path / "config.json").unlink()
        return "config.json"
    if case == "missing rl_seg_policy.json":
        (path / "rl_seg_policy.json").unlink()
        return "rl_seg_policy.json"
    if case == "unknown policy in rl_seg_policy.json":
        (path / "rl_seg_policy.json").write_text(json.dumps({"policy": "nonesuch"}))
        return "rl_seg_policy.json"
    if case == "garbage model.safetensors":
        (path / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
        return "model.safetensors"
    if case == "truncated model.safetensors":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
        return "model.safetensors"
    if case == "invalid config.json":
        (path / "config.json").write_text("{not json")
        return "config.json"
    if case == "config.json does not fit the weights":
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "llm_hidden": 48}))
        return "config.json"
    if case == "unknown field in config.json":
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "colour": "blue"}))
        return "config.json"
    raise AssertionError(case)




@pytest.mark.parametrize("case", [
    "missing model.safetensors", "missing config.json", "missing rl_seg_policy.json",
    "unknown policy in rl_seg_policy.json",
    "garbage model.safetensors",
    "truncated model.safetensors",
    "invalid config.json",
    "config.json does not fit the weights",
    "unknown field in config.json",
])
def test_broken_checkpoint_errors_name_the_file(tiny, tmp_path, case):
    path = tiny.save_pretrained(tmp_path / "ckpt")
    name = _break(path, case)
    with pytest.raises(Exception) as info:
        load_policy(path)
    assert name in str(info.value), f"{type(info.value).__name__}: {info.value}"
    assert isinstance(info.value, (FileNotFoundError, ValueError)), type(info.value)


def test_unknown_policy_name_or_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a registered name"):
        load_policy("no-such-policy")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        load_policy(tmp_path / "absent")


def test_missing_shipped_checkpoint_is_reported(monkeypatch, tmp_path):
    from rl_seg.policy import default_model

    empty = tmp_path / "default_model"
    shutil.copytree(DEFAULT_CHECKPOINT, empty, ignore=shutil.ignore_patterns("model.safetensors"))
    monkeypatch.setattr(default_model, "DEFAULT_CHECKPOINT", empty)
    with pytest.raises(FileNotFoundError, match="shipped default checkpoint is missing"):
        load_policy("default")


# ------------------------------------------------------------------------------------------ MaskDistribution


def _logits_and_valid(seed=0, shape=(3, 9, 11)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    valid = torch.rand(shape, generator=g) < 0.7
    return logits, valid


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_log_prob_matches_bernoulli_on_valid_pixels(temperature):
    logits, valid = _logits_and_valid()
    actions = torch.rand(logits.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    dist = MaskDistribution(logits, temperature=temperature, valid=valid)
    lp = dist.log_prob(actions)
    ref = Bernoulli(logits=logits / temperature).log_prob(actions.double())
    assert lp.shape == logits.shape
    torch.testing.assert_close(lp[valid], ref[valid], rtol=1e-10, atol=1e-12)
    assert (lp[~valid] == 0).all()
    assert (ref[~valid] != 0).all()  # the masking is what makes them zero
    # without a valid mask every pixel counts
    torch.testing.assert_close(MaskDistribution(logits, temperature).log_prob(actions), ref, rtol=1e-10, atol=1e-12)


def test_log_prob_is_finite_for_confident_pixels_and_has_gradients():
    logits = torch.tensor([[[-200.0, -30.0, 0.0, 30.0, 200.0]]], requires_grad=True)
    actions = torch.tensor([[[True, True, False, False, False]]])
    lp = MaskDistribution(logits).log_prob(actions)
    assert torch.isfinite(lp).all()
    assert lp[0, 0, 0].item() == pytest.approx(-200.0) and lp[0, 0, 4].item() == pytest.approx(-200.0)
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_sampling_never_marks_invalid_pixels():
    logits = torch.full((4, 16, 16), 20.0)  # p ~ 1 everywhere
    valid = torch.zeros(4, 16, 16, dtype=torch.bool)
    valid[:, 4:12, 2:9] = True
    dist = MaskDistribution(logits, valid=valid)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        masks = dist.sample(g)
        assert masks.dtype == torch.bool and masks.shape == logits.shape
        assert not masks[~valid].any()
        assert masks[valid].all()
    assert (dist.probs[~valid] == 0).all()
    assert dist.num_valid().tolist() == [8 * 7] * 4
    assert MaskDistribution(logits).num_valid().tolist() == [256] * 4


def test_sampling_frequency_follows_the_temperature_scaled_probability():
    logits = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0]).expand(20000, 5).reshape(20000, 1, 5)
    for temperature in (1.0, 2.0):
        dist = MaskDistribution(logits, temperature=temperature)
        freq = dist.sample(torch.Generator().manual_seed(3)).double().mean(0)[0]
        expected = torch.sigmoid(logits[0, 0].double() / temperature)
        assert (freq - expected).abs().max() < 0.015  # ~4.5 sigma at n=20000
    # the same generator seed gives the same masks
    dist = MaskDistribution(logits)
    assert torch.equal(dist.sample(torch.Generator().manual_seed(7)), dist.sample(torch.Generator().manual_seed(7)))


def test_temperature_flattens_probabilities():
    logits = torch.linspace(-6, 6, 25).reshape(1, 5, 5).double()
    p1 = MaskDistribution(logits, 1.0).probs
    p2 = MaskDistribution(logits, 2.0).probs
    p_half = MaskDistribution(logits, 0.5).probs
    nonzero = logits != 0
    assert ((p2 - 0.5).abs() < (p1 - 0.5).abs())[nonzero].all()
    assert ((p_half - 0.5).abs() > (p1 - 0.5).abs())[nonzero].all()
    assert torch.allclose(p1[~nonzero], torch.tensor(0.5, dtype=torch.float64))
    assert (MaskDistribution(logits, 2.0).entropy() >= MaskDistribution(logits, 1.0).entropy()).all()
    torch.testing.assert_close(MaskDistribution(logits, 3.0).probs, torch.sigmoid(logits / 3.0))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be positive"):
            MaskDistribution(logits, bad)


def test_valid_mask_shape_is_checked():
    with pytest.raises(ValueError, match="valid mask shape"):
        MaskDistribution(torch.zeros(2, 4, 4), valid=torch.ones(2, 4, 5, dtype=torch.bool))


def test_entropy_matches_bernoulli():
    logits, valid = _logits_and_valid(seed=4)
    logits = torch.cat([logits, torch.full((1, 9, 11), 60.0, dtype=torch.float64)])  # confident pixels too
    valid = torch.cat([valid, torch.ones(1, 9, 11, dtype=torch.bool)])
    for temperature in (1.0, 1.7):
        ent = MaskDistribution(logits, temperature, valid).entropy()
        ref = Bernoulli(logits=logits / temperature).entropy()
        torch.testing.assert_close(ent[valid], ref[valid], rtol=1e-9, atol=1e-12)
        assert (ent[~valid] == 0).all()
        assert torch.isfinite(ent).all() and (ent >= 0).all()
        assert ent.max() <= math.log(2) + 1e-12


def test_kl_closed_form():
    logits_p, valid = _logits_and_valid(seed=5)
    logits_q, _ = _logits_and_valid(seed=6)
    for temperature in (1.0, 0.7):
        p = MaskDistribution(logits_p, temperature, valid)
        q = MaskDistribution(logits_q, temperature, valid)
        kl = p.kl(q)
        # explicit sum over the two outcomes, and torch's own closed form
        pp, qq = torch.sigmoid(logits_p / temperature), torch.sigmoid(logits_q / temperature)
        explicit = pp * torch.log(pp / qq) + (1 - pp) * torch.log((1 - pp) / (1 - qq))
        torch.testing.assert_close(kl[valid], explicit[valid], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(kl[valid], kl_divergence(Bernoulli(logits=logits_p / temperature),
                                                            Bernoulli(logits=logits_q / temperature))[valid])
        assert (kl[~valid] == 0).all() and (kl >= 0).all()
        assert kl[valid].sum() > 1.0  # the two distributions differ
        assert (p.kl(p) == 0).all()
        assert p.kl(MaskDistribution(logits_p.clone(), temperature, valid)).abs().max() == 0


def test_kl_monte_carlo():
    """E_{a~p}[log p(a) - log q(a)] over sampled masks converges to the closed form."""
    g = torch.Generator().manual_seed(11)
    lp_, lq_ = torch.randn(1, 4, 4, generator=g, dtype=torch.float64), torch.randn(1, 4, 4, generator=g,
                                                                                  dtype=torch.float64)
    n = 40000
    p = MaskDistribution(lp_.expand(n, 4, 4))
    q = MaskDistribution(lq_.expand(n, 4, 4))
    a = p.sample(torch.Generator().manual_seed(12))
    mc = (p.log_prob(a) - q.log_prob(a)).mean(0)
    closed = p.kl(q)[0]
    assert (mc - closed).abs().max() < 0.05
    assert abs(float(mc.sum() - closed.sum())) < 0.1
    assert closed.sum() > 0.5


def test_kl_is_finite_for_confident_logits():
    a = torch.tensor([[[50.0, -50.0, 100.0]]])
    b = torch.tensor([[[-50.0, 50.0, 100.0]]])
    kl = MaskDistribution(a).kl(MaskDistribution(b))
    assert torch.isfinite(kl).all()
    # p ~ 1, q ~ e^-50: KL ~ log(1 / e^-50) = 50; identical confident logits give exactly 0
    assert kl[0, 0, 0].item() == pytest.approx(50.0, rel=1e-4) and kl[0, 0, 1].item() == pytest.approx(50.0, rel=1e-4)
    assert kl[0, 0, 2] == 0


# ----------------------------------------------------------------------------- the model card, on full DRIVE


@pytest.mark.shared_data
def test_eval_reproduces_the_model_card_on_drive(tmp_path, monkeypatch):
    if not (SHARED_DATA_DIR / "DRIVE").is_dir():
        pytest.skip(f"full DRIVE not present at {SHARED_DATA_DIR}")
    from rl_seg.cli import main

    monkeypatch.delenv("RL_SEG_DATA_DIR", raising=False)
    out = tmp_path / "drive.json"
    assert main(["eval", "--policy", "default", "--data", "drive", "--split", "test", "--out", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    card = json.loads((DEFAULT_CHECKPOINT / "eval.json").read_text())["drive"]
    assert report["num_images"] == card["num_images"] == 20
    assert report["mean"].keys() == card["mean"].keys()
    for key, value in card["mean"].items():
        assert report["mean"][key] == pytest.approx(value, abs=1e-4), key
