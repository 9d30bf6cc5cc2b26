"""rl-seg's loader runs an unmodified Sa2VA checkpoint's remote code under the installed transformers
(``rl_seg/policy/sa2va/compat.py``): one test per repair shows the break it exists for (on the replica, which breaks
as the public code does; tests/test_sa2va_replica_on_cpu.py reproduces each break without rl-seg) and that the
repair removes it; unsupported versions and broken environments fail at load naming the versions, package and fix;
a damaged checkpoint is refused as "non-finite".
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rl_seg.guards import NonFiniteError, check_finite_weights
from rl_seg.policy import load_policy
from rl_seg.policy.sa2va import compat
from rl_seg.policy.sa2va.internvl import Sa2VAPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sa2va_replica import build_replica  # noqa: E402

TRANSFORMERS_5 = compat.needs_repair()
pytestmark = pytest.mark.skipif(not TRANSFORMERS_5, reason="the repairs exist for transformers 5")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    return {family: build_replica(root / f"src_{family}", family=family) for family in ("qwen2", "internlm2")}


def fresh_copy(src: Path, tmp_path: Path, name: str) -> Path:
    """A copy under its own folder name: transformers names the dynamic module after the folder, so the classes are
    new (a repair patched onto another copy's classes does not carry over)."""
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_the_loader_applies_what_each_family_needs(folders):
    _, _, qwen2 = compat.load_remote_model(folders["qwen2"], dtype=torch.float32)
    _, _, internlm2 = compat.load_remote_model(folders["internlm2"], dtype=torch.float32)
    # every folder imports phi3 (shim) and never calls post_init; buffers are restored wherever they exist
    for applied in (qwen2, internlm2):
        assert {"attn_mask_utils_shim", "post_init_on_construction", "non_persistent_buffers"} <= set(applied)
    assert "legacy_rope_scaling" in internlm2
    assert "transformers.modeling_attn_mask_utils" not in sys.modules  # the stand-in is gone after loading


def test_attn_mask_utils_shim(folders, tmp_path):
    path = fresh_copy(folders["qwen2"], tmp_path, "ckpt_shim")
    with pytest.raises(ModuleNotFoundError, match="modeling_attn_mask_utils"):
        compat.load_remote_model(path, skip=("attn_mask_utils_shim",))
    model, _, _ = compat.load_remote_model(path)
    assert model is not None
    with pytest.raises(compat.UnsupportedEnvironment, match="Phi-3"):  # the stand-in never computes a wrong mask
        compat._phi3_mask_stand_in()


def test_post_init_on_construction(folders, tmp_path):
    path = fresh_copy(folders["qwen2"], tmp_path, "ckpt_post_init")
    with pytest.raises(AttributeError, match="all_tied_weights_keys"):
        compat.load_remote_model(path, skip=("post_init_on_construction",))
    model, _, _ = compat.load_remote_model(path)
    assert hasattr(model, "all_tied_weights_keys")


def test_legacy_rope_scaling(folders, tmp_path):
    """InternLM2 configs with ``rope_scaling: null`` (released 8B/26B ones carry {"type": "dynamic"}, which 5.x keeps)."""
    path = fresh_copy(folders["internlm2"], tmp_path, "ckpt_rope")
    config = json.loads((path / "config.json").read_text())
    config["llm_config"]["rope_scaling"] = None
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="type"):
        compat.load_remote_model(path, skip=("legacy_rope_scaling",))
    model, loaded, _ = compat.load_remote_model(path)
    assert loaded.llm_config.rope_scaling is None  # what the remote code reads, 4.x style
    rotary = model.language_model.model.layers[0].attention.rotary_emb
    assert type(rotary).__name__ == "InternLM2RotaryEmbedding"  # no scaling, as the config says


def test_tied_weights_as_dict(folders, tmp_path):
    path = fresh_copy(folders["internlm2"], tmp_path, "ckpt_tied")
    model, _, _ = compat.load_remote_model(path, skip=("tied_weights_as_dict",))
    with pytest.raises(AttributeError, match="keys"):
        with compat.attn_mask_utils_shim():
            model.save_pretrained(str(tmp_path / "out_broken"))
    path = fresh_copy(folders["internlm2"], tmp_path, "ckpt_tied_ok")
    policy = load_policy(path, trust_remote_code=True)
    saved = policy.save_pretrained(tmp_path / "out")
    again = load_policy(saved, trust_remote_code=True)
    torch.testing.assert_close(dict(again.named_parameters())["model.text_hidden_fcs.0.weight"],
                               dict(policy.named_parameters())["model.text_hidden_fcs.0.weight"])


def _rotary_reference(rotary) -> torch.Tensor:
    return 1.0 / (rotary.base ** (torch.arange(0, rotary.dim, 2).float() / rotary.dim))


def test_non_persistent_buffers(folders, tmp_path):
    path = fresh_copy(folders["internlm2"], tmp_path, "ckpt_buffers")
    broken, _, _ = compat.load_remote_model(path, skip=("non_persistent_buffers",))
    rotary = broken.language_model.model.layers[0].attention.rotary_emb
    # transformers 5 leaves the tables as whatever memory held (sometimes NaN logits, sometimes silently wrong)
    assert not torch.allclose(rotary.inv_freq.float(), _rotary_reference(rotary))
    repaired, _, applied = compat.load_remote_model(path)
    assert "non_persistent_buffers" in applied
    for layer in repaired.language_model.model.layers:
        rotary = layer.attention.rotary_emb
        torch.testing.assert_close(rotary.inv_freq.float(), _rotary_reference(rotary))
        positions = torch.arange(rotary.cos_cached.shape[0]).float()
        angles = torch.outer(positions, _rotary_reference(rotary))
        torch.testing.assert_close(rotary.cos_cached.float(), torch.cat([angles, angles], -1).cos(), atol=1e-5,
                                   rtol=1e-5)


def test_slow_sentencepiece_tokenizer(folders):
    """Sa2VA-8B/26B tokenize with InternLM2's sentencepiece code. transformers 5's AutoTokenizer substitutes a fast
    tokenizer converted by its own rules that encodes differently; the loader keeps the checkpoint's own."""
    import sentencepiece

    path = folders["internlm2"]
    reference = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    text = "Please segment the blood vessels."
    expected = [reference.bos_id()] + reference.encode(text)
    auto = compat.load_tokenizer(path, skip=("slow_sentencepiece_tokenizer",))
    assert type(auto).__name__ == "InternLM2TokenizerFast"
    assert auto(text)["input_ids"] != expected  # the break
    own = compat.load_tokenizer(path)
    assert type(own).__name__ == "InternLM2Tokenizer" and own(text)["input_ids"] == expected
    policy = load_policy(path, trust_remote_code=True)
    assert type(policy.tokenizer).__name__ == "InternLM2Tokenizer"


def test_unsupported_transformers_is_refused_with_the_fix(monkeypatch):
    # transformers 5 re-registers its lazy module when a model class is first touched: patch the current one
    installed = sys.modules["transformers"]
    for version in ("5.99.0", "4.40.0", "6.0.0"):
        monkeypatch.setattr(installed, "__version__", version)
        with pytest.raises(compat.UnsupportedEnvironment) as info:
            compat.check_versions()
        assert f"transformers {version}" in str(info.value) and "pip install" in str(info.value)
        assert "5.24.0" in str(info.value) and "4.57" in str(info.value)
    monkeypatch.setattr(installed, "__version__", "4.56.2")
    compat.check_versions("Qwen2ForCausalLM")
    with pytest.raises(compat.UnsupportedEnvironment, match="Qwen3VLForConditionalGeneration needs transformers >= 4.57"):
        compat.check_versions("Qwen3VLForConditionalGeneration")


def test_missing_or_broken_packages_are_named(folders, tmp_path, monkeypatch):
    path = fresh_copy(folders["qwen2"], tmp_path, "ckpt_imports")
    modeling = path / "modeling_sa2va_chat.py"
    modeling.write_text("import rl_seg_no_such_package\n" + modeling.read_text())
    with pytest.raises(compat.UnsupportedEnvironment, match=r"rl_seg_no_such_package \(imported by modeling_sa2va_chat.py\) "
                                                     r"is not installed.*make sa2va"):
        load_policy(path, trust_remote_code=True)

    # a torchvision built for another torch (PyPI's CUDA wheel beside a CPU torch) fails deep inside imports
    fake = tmp_path / "site" / "rl_seg_fake_vision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(compat, "REMOTE_CODE_IMPORTS", compat.REMOTE_CODE_IMPORTS + ("rl_seg_fake_vision",))
    modeling.write_text(modeling.read_text().replace("rl_seg_no_such_package", "rl_seg_fake_vision"))
    with pytest.raises(compat.UnsupportedEnvironment, match="does not exist.*torch .* and torchvision do not match"):
        load_policy(path, trust_remote_code=True)


def test_a_nan_weight_is_refused(folders, tmp_path):
    path = fresh_copy(folders["qwen2"], tmp_path, "ckpt_nan")
    weights = load_file(str(path / "model.safetensors"))
    name = next(k for k in weights if k.startswith("text_hidden_fcs"))
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=rf"non-finite.*{name.replace('.', '[.]')}"):
        load_policy(path, trust_remote_code=True)
    result = subprocess.run([sys.executable, "-m", "rl_seg.cli", "eval", "--policy", str(path),
                             "--trust-remote-code", "--data", "drive-sample", "--split", "test"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]  # a refusal, one line, no traceback
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rl-seg eval: error: {path}: ") and "non-finite" in last, last


def test_the_weight_check_finds_what_isfinite_finds_without_a_tensor_sized_temporary(monkeypatch):
    # torch.isfinite(t) keeps five bytes per bf16 element of t alive at once (1.45 GiB on a 4B model's embedding):
    # the check may call it only on a sum or on a slice of at most 2^24 elements
    real, seen = torch.isfinite, []
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or real(t))
    big = torch.nn.Linear(4096, 4096 + 1, bias=False).to(torch.bfloat16)  # more than one 2^24 slice
    with torch.no_grad():
        big.weight.fill_(0.5)
    check_finite_weights(big, "big")
    assert seen == [1]  # a finite tensor: its sum alone
    for bad in (float("nan"), float("inf"), -float("inf")):
        with torch.no_grad():
            big.weight.view(-1)[-1] = bad  # in the last slice
        with pytest.raises(NonFiniteError, match="1 weight tensor.*weight"):
            check_finite_weights(big, "big")
        with torch.no_grad():
            big.weight.view(-1)[-1] = 0.5
    assert max(seen) == 1 << 24 < big.weight.numel()
    overflow = torch.nn.Linear(64, 64, bias=False).half()
    with torch.no_grad():
        overflow.weight.fill_(60000.0)  # finite, but its float16 sum is inf: the exact check decides
    check_finite_weights(overflow, "overflow")


def test_loaded_policy_passes_the_canary_and_keeps_numbers(folders):
    policy = load_policy(folders["internlm2"], trust_remote_code=True)
    assert isinstance(policy, Sa2VAPolicy)
    image = np.random.default_rng(0).integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    with torch.no_grad():
        out = policy(policy.preprocess([image]))
    assert torch.isfinite(out.logits).all() and out.logits.shape == (1, 64, 80)
