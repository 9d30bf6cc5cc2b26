"""Compare the replica with the public Sa2VA remote code, one part at a time.

    PYTHONPATH=$PWD python tests/sa2va_replica/check_upstream.py --upstream /tmp/sa2va [--part sam2] [--quick]

``--upstream`` is a checkout of bytedance/Sa2VA (the remote code under ``projects/sa2va/hf/``). Each part is one
function ``check_<part>(upstream, quick=False) -> Report``: same state-dict keys and shapes, the upstream weights
loaded into the replica give the same outputs (float32, CPU; the largest absolute differences are reported), and
the same failures. The CLI prints every number and exits 1 when any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from sa2va_replica.cuda_on_cpu import sam2_cuda_on_cpu  # noqa: E402

#: upstream folders that ship a sam2.py (the InternVL family and the Qwen-VL based releases)
SAM2_FOLDERS = ("models", "models_qwen2_5_vl", "models_qwen3vl")


class Report:
    """Numbers measured and checks made for one part; ``failures`` lists what did not hold."""

    def __init__(self, part: str):
        self.part = part
        self.numbers: dict[str, object] = {}
        self.failures: list[str] = []

    def number(self, name: str, value):
        self.numbers[name] = value
        return value

    def expect(self, ok: bool, what: str):
        if not ok:
            self.failures.append(what)
        return ok

    def close(self, name: str, real, replica, rtol: float = 1e-5):
        """Record the largest absolute difference of two (nested) outputs; fail above ``rtol`` times the largest
        magnitude of the real output (at least 1)."""
        diff = self.number(f"max_abs_diff/{name}", max_abs_diff(real, replica))
        bound = rtol * max(max_abs(real), 1.0)
        self.expect(diff <= bound, f"{name}: max abs diff {diff:.3g} > {bound:.3g}")
        return diff


def max_abs_diff(a, b) -> float:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (sorted(a), sorted(b))
        return max((max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (len(a), len(b))
        return max((max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0
    assert a == b, (a, b)
    return 0.0


def max_abs(a) -> float:
    if isinstance(a, dict):
        a = list(a.values())
    if isinstance(a, (list, tuple)):
        return max((max_abs(x) for x in a), default=0.0)
    if isinstance(a, torch.Tensor) and a.numel():
        return float(a.detach().double().abs().max())
    return 0.0


def import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_dir(upstream: str | Path) -> Path:
    path = Path(upstream) / "projects" / "sa2va" / "hf"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: --upstream must be a checkout of bytedance/Sa2VA")
    return path


def outcome(fn):
    """``("ok", result)`` or ``(exception type name, None)``: failures are compared by type."""
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(exc).__name__, None


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _compare_structure(report: Report, tag: str, real, replica) -> bool:
    """Same state-dict keys (in order), shapes, parameter counts and buffer names; True when keys and shapes agree."""
    real_sd, rep_sd = real.state_dict(), replica.state_dict()
    same_keys = report.expect(list(real_sd) == list(rep_sd),
                              f"{tag}: state-dict keys differ: only upstream {sorted(set(real_sd) - set(rep_sd))[:5]}, "
                              f"only replica {sorted(set(rep_sd) - set(real_sd))[:5]}")
    shapes = [k for k in real_sd if k in rep_sd and real_sd[k].shape != rep_sd[k].shape]
    report.expect(not shapes, f"{tag}: shapes differ for {shapes[:5]}")
    report.number(f"{tag}/state-dict entries", len(rep_sd))
    counts = [sum(p.numel() for p in m.parameters()) for m in (real, replica)]
    report.number(f"{tag}/parameters (upstream, replica)", counts)
    report.expect(counts[0] == counts[1], f"{tag}: parameter counts differ {counts}")
    buffers = [sorted(n for n, _ in m.named_buffers()) for m in (real, replica)]
    report.expect(buffers[0] == buffers[1], f"{tag}: buffers differ "
                                            f"{sorted(set(buffers[0]) ^ set(buffers[1]))[:5]}")
    return same_keys and not shapes


# ------------------------------------------------------------------------------------------------------- SAM2
def _upstream_sam2_classes(up, size: str, sizes: dict):
    """Upstream's SAM2 at ``size``: hiera_l is upstream as shipped; tiny overrides only the three builders whose
    widths upstream hard-codes, with upstream's own classes and the replica's tiny widths."""
    if size == "hiera_l":
        return up.SAM2
    d = sizes[size]

    class UpstreamTinySAM2(up.SAM2):
        def build_image_encoder(self):
            trunk = up.Hiera(embed_dim=d["embed_dim"], num_heads=d["num_heads"], head_mul=d["head_mul"],
                             stages=list(d["stages"]), global_att_blocks=list(d["global_att_blocks"]),
                             window_pos_embed_bkg_spatial_size=list(d["window_pos_embed_bkg_spatial_size"]),
                             window_spec=list(d["window_spec"]))
            neck = up.FpnNeck(position_encoding=up.PositionEmbeddingSine(num_pos_feats=d["d_model"]),
                              d_model=d["d_model"], backbone_channel_list=[d["embed_dim"] * m for m in (8, 4, 2, 1)],
                              fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
            return up.ImageEncoder(scalp=1, trunk=trunk, neck=neck)

        def build_memory_attention(self):
            rope = dict(rope_theta=10000.0, feat_sizes=[32, 32], embedding_dim=d["d_model"], num_heads=1,
                        downsample_rate=1, dropout=0.1)
            layer = up.MemoryAttentionLayer(
                activation="relu", dim_feedforward=d["mem_attn_ffn"], dropout=0.1, pos_enc_at_attn=False,
                d_model=d["d_model"], pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
                self_attention=up.RoPEAttention(**rope),
                cross_attention=up.RoPEAttention(rope_k_repeat=True, kv_in_dim=d["mem_dim"], **rope))
            return up.MemoryAttention(d_model=d["d_model"], pos_enc_at_input=True, num_layers=4, layer=layer)

        def build_memory_encoder(self):
            fuser = up.Fuser(layer=up.CXBlock(dim=d["d_model"], kernel_size=7, padding=3), num_layers=2)
            return up.MemoryEncoder(out_dim=d["mem_dim"], in_dim=d["d_model"],
                                    position_encoding=up.PositionEmbeddingSine(num_pos_feats=d["mem_dim"]),
                                    mask_downsampler=up.MaskDownSampler(embed_dim=d["d_model"], kernel_size=3,
                                                                        stride=2, padding=1),
                                    fuser=fuser)

    return UpstreamTinySAM2


def _perturb(module: torch.nn.Module, seed: int):
    """Move every weight off its initial value (zeros, ones, 1e-6 layer scales would hide swapped or dropped
    terms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(module.parameters()) + list(module.buffers()):
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _heads_inputs(sam, feats_out, batch):
    _, feats, _, sizes = sam._prepare_backbone_features(feats_out)
    c, (h, w) = sam.hidden_dim, sizes[-1]
    pix = (feats[-1] + sam.no_mem_embed).permute(1, 2, 0).reshape(batch, c, h, w)
    high = [x.permute(1, 2, 0).reshape(batch, x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1])]
    return pix, high


def _sa2va_pixels(sam2_wrapper, images_uint8):
    """What predict_forward feeds SAM2 in float32: a uint8 1024 x 1024 frame through preprocess_image's default."""
    return torch.stack([sam2_wrapper.preprocess_image(im.to(torch.float32)) for im in images_uint8])


def _compare_sam2(report: Report, tag: str, real, replica, all_paths: bool, seed: int = 0):
    """Same inputs through both, outputs compared; ``real``/``replica`` are SAM2 wrappers with equal weights."""
    g = torch.Generator().manual_seed(seed)
    c = real.hidden_dim
    frames = torch.randint(0, 256, (2, 3, 1024, 1024), generator=g, dtype=torch.uint8)
    x_real, x_rep = _sa2va_pixels(real, frames), _sa2va_pixels(replica, frames)
    report.close(f"{tag}/preprocess_image", x_real, x_rep)
    x = x_real if all_paths else x_real[:1]
    b = x.shape[0]
    lang = torch.randn(b, 1, c, generator=g)
    with torch.no_grad(), quiet():
        out_real, out_rep = real.sam2_model.forward_image(x), replica.sam2_model.forward_image(x)
        report.close(f"{tag}/forward_image", out_real, out_rep)
        in_real, in_rep = _heads_inputs(real.sam2_model, out_real, b), _heads_inputs(replica.sam2_model, out_rep, b)
        for multimask in (True, False):
            kw = dict(multimask_output=multimask, language_embd=lang)
            report.close(f"{tag}/_forward_sam_heads(multimask={multimask})",
                         real.sam2_model._forward_sam_heads(in_real[0], high_res_features=in_real[1], **kw),
                         replica.sam2_model._forward_sam_heads(in_rep[0], high_res_features=in_rep[1], **kw))
        if all_paths:
            points = {"point_coords": torch.rand(b, 2, 2, generator=g) * 1024,
                      "point_labels": torch.tensor([[1, 0]] * b, dtype=torch.int32)}
            mask = torch.randn(b, 1, 1024, 1024, generator=g)
            kw = dict(point_inputs=points, mask_inputs=mask, multimask_output=False, language_embd=lang)
            report.close(f"{tag}/_forward_sam_heads(points, mask)",
                         real.sam2_model._forward_sam_heads(in_real[0], high_res_features=in_real[1], **kw),
                         replica.sam2_model._forward_sam_heads(in_rep[0], high_res_features=in_rep[1], **kw))

    # Sa2VA's image path: one frame, one [SEG] embedding; then frames x objects
    cases = [("1 frame x 1 object", x[:1], torch.randn(1, 1, c, generator=g))]
    if all_paths:
        cases.append(("2 frames x 2 objects", x, torch.randn(2, 2, c, generator=g)))
    for name, frames_x, embds in cases:
        masks = []
        for model in (real, replica):
            with sam2_cuda_on_cpu(model), quiet():
                state = model.get_sam2_embeddings(frames_x)
                masks.append(model.language_embd_inference(state, embds))
        # frames and objects share the first dimension: each frame yields objects x 1 x S x S
        report.expect(masks[1].shape == (len(frames_x) * embds.shape[1], 1, 1024, 1024),
                      f"{tag}/language_embd_inference({name}) shape {tuple(masks[1].shape)}")
        report.close(f"{tag}/language_embd_inference({name})", masks[0], masks[1])

    if all_paths:  # the training path keeps gradients: compare the masks and the gradient w.r.t. the embeddings
        results = []
        for model in (real, replica):
            embd = torch.randn(1, 2, c, generator=torch.Generator().manual_seed(seed + 1)).requires_grad_()
            with sam2_cuda_on_cpu(model), quiet():
                low = model.inject_language_embd(model.get_sam2_embeddings(x[:1]), embd)
            low.square().mean().backward()
            results.append((low.detach(), embd.grad))
        report.close(f"{tag}/inject_language_embd", results[0][0], results[1][0])
        report.close(f"{tag}/inject_language_embd grad", results[0][1], results[1][1])
        _compare_memory_modules(report, tag, real, replica, g)
        _compare_failures(report, tag, real, replica, x[:1], c)


def _compare_memory_modules(report, tag, real, replica, g):
    """Memory attention (RoPE, object-pointer tokens excluded from RoPE) and the memory encoder, module by module:
    Sa2VA never reaches them, their parameters are in every checkpoint."""
    c, mem = real.sam2_model.hidden_dim, real.sam2_model.mem_dim
    for side in (32, 64):  # 32 x 32 uses the frequencies made at construction, 64 x 64 recomputes them
        n, b, ptr = side * side, 1, 4
        curr, curr_pos = torch.randn(n, b, c, generator=g), torch.randn(n, b, c, generator=g)
        memory, memory_pos = torch.randn(2 * n + ptr, b, mem, generator=g), torch.randn(2 * n + ptr, b, mem,
                                                                                        generator=g)
        outs = []
        for model in (real, replica):
            with torch.no_grad(), quiet():
                outs.append(model.sam2_model.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory,
                                                              memory_pos=memory_pos, num_obj_ptr_tokens=ptr))
        report.close(f"{tag}/memory_attention({side}x{side}, {ptr} pointer tokens)", outs[0], outs[1])
    side = real.sam2_model.sam_image_embedding_size
    pix, masks = torch.randn(1, c, side, side, generator=g), torch.randn(1, 1, 16 * side, 16 * side, generator=g)
    with torch.no_grad():
        report.close(f"{tag}/memory_encoder", real.sam2_model.memory_encoder(pix, masks),
                     replica.sam2_model.memory_encoder(pix, masks))


def _compare_failures(report, tag, real, replica, x, c):
    """Where upstream fails on these paths, the replica fails with the same exception type."""

    def second_prompt(model):
        with sam2_cuda_on_cpu(model), quiet():
            state = model.get_sam2_embeddings(x)
            for _ in range(2):  # the same frame and object prompted twice
                model.sam2_model.add_language_embd(state, 0, 100, torch.zeros(1, 1, c))

    def object_missing_on_a_frame(model):
        with sam2_cuda_on_cpu(model), quiet():
            state = model.get_sam2_embeddings(torch.cat([x, x]))
            model.sam2_model.add_language_embd(state, 0, 100, torch.zeros(1, 1, c))
            model.sam2_model.add_language_embd(state, 1, 101, torch.zeros(1, 1, c))
            list(model.sam2_model.propagate_in_video(state))

    def cuda_hard_coded(model):
        with quiet():
            model.language_embd_inference(model.get_sam2_embeddings(x), torch.zeros(1, 1, c))

    cases = {"second prompt on a frame": second_prompt, "object missing on a frame": object_missing_on_a_frame}
    if not torch.cuda.is_available():
        cases["CUDA hard-coded, CPU-only torch"] = cuda_hard_coded
    for name, fn in cases.items():
        got = (outcome(lambda: fn(real))[0], outcome(lambda: fn(replica))[0])
        report.number(f"{tag}/failure/{name}", f"upstream {got[0]}, replica {got[1]}")
        report.expect(got[0] == got[1] and got[0] != "ok", f"{tag}/failure/{name}: upstream {got[0]}, replica {got[1]}")


def check_sam2(upstream: str | Path, quick: bool = False) -> Report:
    """SAM2 (``sam2.py``). Upstream's file is the same in every family folder. At hiera_l (upstream as shipped; skipped
    with ``quick``): identical state-dict keys and shapes, and upstream's weights (random, perturbed) loaded into the
    replica give the same forward_image features, _forward_sam_heads outputs for a random language embedding and
    language_embd_inference masks. At tiny (upstream's own classes built with the replica's tiny widths) the same,
    plus: batches of 2, single-mask output (stability fallback), point and mask prompts, 2 frames x 2 objects, the
    training path with gradients, memory attention and the memory encoder, and the failures."""
    from sa2va_replica.remote_code import sam2 as replica_sam2

    report = Report("sam2")
    hf = hf_dir(upstream)
    texts = {f: (hf / f / "sam2.py").read_text() for f in SAM2_FOLDERS if (hf / f / "sam2.py").is_file()}
    report.number("upstream sam2.py copies", sorted(texts))
    report.expect(len(set(texts.values())) == 1, "upstream sam2.py differs between family folders")
    up = import_file(hf / "models" / "sam2.py", "sa2va_upstream_sam2")
    for size in ("tiny",) if quick else ("tiny", "hiera_l"):
        start = time.time()
        torch.manual_seed(0)
        with quiet():
            real = _upstream_sam2_classes(up, size, replica_sam2.SIZES)().eval()
            replica = replica_sam2.SAM2(size=size).eval()
        _compare_structure(report, size, real, replica)
        _perturb(real, seed=1)
        replica.load_state_dict(real.state_dict(), strict=True)
        _compare_sam2(report, size, real, replica, all_paths=size == "tiny")
        report.number(f"{size}/seconds", round(time.time() - start, 1))
        del real, replica
    return report


# ----------------------------------------------------------------------------------------------- InternVL family
#: tiny shapes compared in full (numerics); real shapes compared on the meta device (keys, shapes, counts)
TINY_CASES = (("qwen2", "tiny"), ("internlm2", "tiny"), ("internlm2", "tiny-6b"))
PROMPT = "<image>\nPlease segment the vessel."


def _use_stubs():
    """The TEST STUB torchvision/timm (tests/stubs) when the real ones are not installed, as tests/conftest.py."""
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))
    from conftest import use_test_stubs

    use_test_stubs()


_fresh = iter(range(10 ** 6))


def _import_fresh(src: Path, module: str, stand_in: bool):
    """``module`` of the remote-code folder ``src`` imported afresh as a package of its own (relative imports as in
    a checkpoint folder), with or without a stand-in for ``transformers.modeling_attn_mask_utils``."""
    from sa2va_replica.build import _attn_mask_utils_stand_in

    name = f"_sa2va_check_{next(_fresh)}"
    package = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None, is_package=True))
    package.__path__ = [str(src)]
    sys.modules[name] = package
    with (_attn_mask_utils_stand_in() if stand_in else contextlib.nullcontext()), \
            contextlib.redirect_stdout(None), quiet():
        return importlib.import_module(f"{name}.{module}")


def _pair(hf: Path, module: str):
    """(upstream module, replica module), both imported with the stand-in when transformers lacks the module."""
    from sa2va_replica.build import REMOTE_CODE

    return _import_fresh(hf / "models", module, True), _import_fresh(REMOTE_CODE, module, True)


def _message(exc_or_outcome) -> str:
    return exc_or_outcome if isinstance(exc_or_outcome, str) else f"{type(exc_or_outcome).__name__}: {exc_or_outcome}"


def _failure(fn):
    """'ok' or 'ExceptionType: message' (messages name modules, keys and attributes: they must agree too)."""
    try:
        fn()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the point is to compare whatever is raised
        return f"{type(exc).__name__}: {exc}"


def _same_failure(report: Report, name: str, real_fn, replica_fn, expect_failure: bool | None = None):
    got = (_failure(real_fn), _failure(replica_fn))
    report.number(f"failure/{name}", {"upstream": got[0][:160], "replica": got[1][:160]})
    report.expect(got[0] == got[1], f"failure/{name}: upstream {got[0][:160]!r} != replica {got[1][:160]!r}")
    if expect_failure is not None:
        wanted = "a failure" if expect_failure else "success"
        report.expect((got[0] != "ok") == expect_failure, f"failure/{name}: expected {wanted}, got {got[0][:120]!r}")
    return got


def _models(hf: Path, config: dict, device=None, dtype=torch.float32):
    """Upstream's and the replica's Sa2VAChatModel for one released-format config (seeded alike). Upstream
    hard-codes SAM2 Hiera-L: for the replica's tiny SAM2 its module's ``SAM2`` is swapped for upstream's own SAM2
    classes at the replica's tiny widths (see check_sam2)."""
    from sa2va_replica.build import _default_dtype
    from sa2va_replica.remote_code import sam2 as replica_sam2

    up, rep = _pair(hf, "modeling_sa2va_chat")
    up_sam2 = sys.modules[up.__name__.rsplit(".", 1)[0] + ".sam2"]
    size = config.get("replica_sam2_size", "hiera_l")
    up.SAM2 = _upstream_sam2_classes(up_sam2, size, replica_sam2.SIZES)
    models = []
    for module in (up, rep):
        cfg_module = sys.modules[module.__name__.rsplit(".", 1)[0] + ".configuration_sa2va_chat"]
        with contextlib.redirect_stdout(None), quiet():
            cfg = cfg_module.Sa2VAChatConfig(**json.loads(json.dumps(config)))
        if str(device) == "meta":
            from accelerate import init_empty_weights

            place = init_empty_weights(include_buffers=False)
        else:
            place = contextlib.nullcontext()
        torch.manual_seed(0)
        with place, _default_dtype(dtype), contextlib.redirect_stdout(None), quiet():
            models.append(module.Sa2VAChatModel(cfg))
    return up, rep, models


def _tokenizer(folder: Path, module):
    """The folder's tokenizer through ``module`` (a tokenization_internlm2 module) or Qwen2's class."""
    if module is None:
        from transformers import AutoTokenizer

        with contextlib.redirect_stdout(None):  # AutoTokenizer reads config.json through the remote config class
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    return module.InternLM2Tokenizer(vocab_file=str(folder / "tokenizer.model"),
                                     **{k: v for k, v in json.loads((folder / "tokenizer_config.json").read_text())
                                        .items() if k in ("add_bos_token", "add_eos_token")})


def _add_tokens(tokenizer, folder: Path):
    """The folder's added tokens (as AutoTokenizer would from tokenizer_config.json)."""
    from transformers import AddedToken

    decoder = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    extra = [AddedToken(v["content"], special=True, normalized=False) for k, v in sorted(decoder.items(),
                                                                                         key=lambda kv: int(kv[0]))
             if int(k) >= tokenizer.vocab_size]
    tokenizer.add_tokens(extra, special_tokens=True)
    return tokenizer


def _compare_tokenizers(report: Report, hf: Path, folder: Path):
    """InternLM2's tokenizers on the folder's tokenizer.model: upstream's and the replica's slow class (with the
    folder's added tokens), and what AutoTokenizer makes of the folder with each side's files."""
    from transformers import AutoTokenizer

    up, rep = _pair(hf, "tokenization_internlm2")
    toks = [_add_tokens(_tokenizer(folder, m), folder) for m in (up, rep)]
    texts = ["<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nPlease segment the vessel.<|im_end|>\n"
             "<|im_start|>assistant\n", "Sure, [SEG].<|im_end|>", "  two  spaces\tand ünïcode ✓ 123", ""]
    ids = [[t.encode(x) for x in texts] for t in toks]
    report.expect(ids[0] == ids[1], f"tokenizer ids differ: {ids[0]} vs {ids[1]}")
    decoded = [[t.decode(i, skip_special_tokens=False) for i in ids[0]] for t in toks]
    report.expect(decoded[0] == decoded[1], f"tokenizer decode differs: {decoded}")
    report.number("tokenizer/slow ids of the chat prompt (upstream == replica)", ids[0][0][:16])
    upf, repf = _pair(hf, "tokenization_internlm2_fast")
    _same_failure(report, "InternLM2TokenizerFast from the slow tokenizer",
                  lambda: upf.InternLM2TokenizerFast(vocab_file=str(folder / "tokenizer.model")).encode(texts[0]),
                  lambda: repf.InternLM2TokenizerFast(vocab_file=str(folder / "tokenizer.model")).encode(texts[0]))
    auto = []
    for side, files in (("upstream", hf / "models"), ("replica", None)):
        path = folder.with_name(f"tok_{side}_{folder.parent.name.strip('_')[-8:]}")
        shutil.copytree(folder, path, dirs_exist_ok=True)
        for src in (files.glob("tokenization_*.py") if files else ()):
            shutil.copy2(src, path / src.name)
        with contextlib.redirect_stdout(None), quiet():
            auto.append(AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, use_fast=False))
    names = [type(t).__name__ for t in auto]
    report.number("tokenizer/AutoTokenizer(use_fast=False) class (upstream, replica)", names)
    report.expect(names[0] == names[1], f"AutoTokenizer classes differ {names}")
    auto_ids = [[t.encode(x) for x in texts] for t in auto]
    report.expect(auto_ids[0] == auto_ids[1], f"AutoTokenizer ids differ: {auto_ids}")
    report.number("tokenizer/AutoTokenizer ids equal to the slow tokenizer's (per text)",
                  [a == b for a, b in zip(auto_ids[1], ids[1])])
    return toks[0]


def _tiling(report: Report, up, rep):
    """dynamic_preprocess on shapes that exercise every branch of find_closest_aspect_ratio's ties."""
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    sizes = [(448, 448), (896, 448), (448, 896), (1000, 500), (500, 1000), (300, 700), (1344, 448), (2000, 300),
             (50, 50), (900, 600), (600, 900), (1792, 1344), (7, 3)]
    sizes += [tuple(int(v) for v in torch.randint(8, 2400, (2,), generator=g)) for _ in range(25)]
    grids = set()
    for w, h in sizes:
        image = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
        for lo, hi, thumb in ((1, 12, True), (1, 6, False), (2, 8, True)):
            tiles = [m.dynamic_preprocess(image, lo, hi, 64, thumb) for m in (up, rep)]
            same = len(tiles[0]) == len(tiles[1]) and all(a.tobytes() == b.tobytes() for a, b in zip(*tiles))
            report.expect(same, f"dynamic_preprocess({w}x{h}, {lo}, {hi}, thumbnail={thumb}) differs")
            grids.add(len(tiles[0]))
    report.number("tiling/images x settings compared", len(sizes) * 3)
    report.number("tiling/tile counts seen", sorted(grids))


def _inputs(model, tokenizer, n_tiles: int, g):
    img_ctx = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    text = tokenizer.encode("<|im_start|>user\n<img>") + [img_ctx] * (model.num_image_token * n_tiles) + \
        tokenizer.encode("</img>\nsegment<|im_end|>\n<|im_start|>assistant\nSure, [SEG].<|im_end|>")
    ids = torch.tensor([text])
    pixels = torch.randn(n_tiles, 3, 448, 448, generator=g)
    return ids, pixels


def _compare_numerics(report: Report, tag: str, up, rep, real, replica, tokenizer, family: str):
    """Upstream's weights (random, perturbed) in both; extract_feature, the LLM's hidden states and logits, the
    training forward, and predict_forward's answer and masks compared."""
    from sa2va_replica.remote_code.modeling_sa2va_chat import ReplicaForcedAnswer

    # only what a checkpoint holds: non-persistent buffers (rotary tables) stay as each model computed them
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for value in real.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.randn(value.shape, generator=g) * 0.05)
    replica.load_state_dict(real.state_dict(), strict=True)
    real.eval(), replica.eval()
    g = torch.Generator().manual_seed(0)
    for m in (real, replica):
        m.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    with torch.no_grad(), quiet():
        pixels = torch.randn(2, 3, 448, 448, generator=g)
        report.close(f"{tag}/extract_feature", real.extract_feature(pixels), replica.extract_feature(pixels))
        for m in (real, replica):
            m.ps_version = "v1"
        report.close(f"{tag}/extract_feature(ps_version v1)", real.extract_feature(pixels),
                     replica.extract_feature(pixels))
        for m in (real, replica):
            m.ps_version = "v2"
        hidden = real.config.llm_config.hidden_size
        embeds = torch.randn(2, 23, hidden, generator=g)
        mask = torch.ones(2, 23, dtype=torch.long)
        mask[1, :5] = 0  # left padding
        outs = [m.language_model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True,
                                 use_cache=False, return_dict=True) for m in (real, replica)]
        report.close(f"{tag}/LLM hidden states", outs[0].hidden_states, outs[1].hidden_states)
        report.close(f"{tag}/LLM logits", outs[0].logits, outs[1].logits)

        ids, tiles = _inputs(real, tokenizer, 2, g)
        data = {"pixel_values": [tiles], "input_ids": ids, "position_ids": None, "attention_mask": None,
                "labels": ids.clone()}
        _same_failure(report, f"{tag}/forward without _count", lambda: real(data), lambda: replica(data), True)
        for m in (real, replica):
            m._count = 0
        out_real, out_rep = real(data), replica(data)
        report.close(f"{tag}/forward loss", out_real.loss, out_rep.loss)
        report.close(f"{tag}/forward logits", out_real.logits, out_rep.logits)

    _compare_predict_forward(report, tag, real, replica, tokenizer, family, ReplicaForcedAnswer)


def _compare_predict_forward(report, tag, real, replica, tokenizer, family, forced_cls):
    from functools import partial

    import numpy as np
    from PIL import Image
    from transformers import GenerationConfig, LogitsProcessorList

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 700, 3), dtype=np.uint8))
    answer = replica.config.replica_forced_answer
    for m in (real, replica):  # the default torch_dtype (bfloat16) on a float32 model: pixels and weights disagree
        m.preparing_for_generation(tokenizer, max_new_tokens=16)

    def default_dtype(model):
        with sam2_cuda_on_cpu(model), torch.no_grad(), quiet():
            model.predict_forward(image=image, text=PROMPT, tokenizer=tokenizer)

    _same_failure(report, f"{tag}/predict_forward, default torch_dtype on a float32 model",
                  lambda: default_dtype(real), lambda: default_dtype(replica), True)
    for m in (real, replica):
        m.preparing_for_generation(tokenizer, max_new_tokens=16, torch_dtype=torch.float32)
    forced = tokenizer.encode(answer + real.template.get("SUFFIX", ""), add_special_tokens=False)
    generate = real.language_model.generate

    def run(model):
        if model is real:  # the replica's forcing, applied to upstream's generation from outside
            model.language_model.generate = partial(generate,
                                                    logits_processor=LogitsProcessorList([forced_cls(forced)]))
        try:
            with sam2_cuda_on_cpu(model), torch.no_grad(), quiet():
                return model.predict_forward(image=image, text=PROMPT, tokenizer=tokenizer)
        finally:
            model.language_model.__dict__.pop("generate", None)

    got = _same_failure(report, f"{tag}/predict_forward", lambda: run(real), lambda: run(replica))
    if got[0] != "ok" and getattr(real.language_model, "generation_config", None) is None:
        # InternLM2ForCausalLM inherits GenerationMixin only through InternLM2PreTrainedModel, which transformers
        # >= 4.50 does not count (can_generate() is False): no generation_config, so generate() fails
        for m in (real, replica):
            m.language_model.generation_config = GenerationConfig.from_model_config(m.language_model.config)
        got = _same_failure(report, f"{tag}/predict_forward with a generation_config set", lambda: run(real),
                            lambda: run(replica))
    if got[0] != "ok":
        return
    results = [run(m) for m in (real, replica)]
    report.number(f"{tag}/predict_forward answer", [r["prediction"] for r in results])
    report.expect(results[0]["prediction"] == results[1]["prediction"], f"{tag}: answers differ")
    masks = [np.stack(r["prediction_masks"]) for r in results]
    report.expect(masks[0].shape == masks[1].shape, f"{tag}: mask shapes differ {masks[0].shape} {masks[1].shape}")
    if masks[0].shape == masks[1].shape:
        differing = int((masks[0] != masks[1]).sum())
        report.number(f"{tag}/predict_forward mask pixels differing", f"{differing} of {masks[0].size} "
                                                                      f"(foreground {masks[1].mean():.3f})")
        report.expect(differing == 0, f"{tag}: {differing} mask pixels differ")


def _loading(report: Report, hf: Path, family: str, folder: Path, work: Path):
    """What a user gets from AutoModel.from_pretrained(folder, trust_remote_code=True) with upstream's code and
    with the replica's, step by step as each failure is worked around."""
    import transformers
    from transformers import AutoConfig, AutoModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from sa2va_replica.build import _attn_mask_utils_stand_in
    from sa2va_replica.remote_code import sam2 as replica_sam2

    folders = {}
    for side in ("upstream", "replica"):
        # transformers caches remote code by folder name (~/.cache/huggingface/modules): unique names per run
        target = work / f"{side}_{family}_{work.name.strip('_')[-8:]}"
        shutil.copytree(folder, target, dirs_exist_ok=True)
        if side == "upstream":
            for src in (hf / "models").glob("*.py"):
                shutil.copy2(src, target / src.name)
        folders[side] = target

    def load(side, post_init=False, config_edit=None):
        path = folders[side]
        if config_edit:
            path = folders[side].with_name(f"{folders[side].name}_{config_edit[0]}")
            shutil.copytree(folders[side], path, dirs_exist_ok=True)
            cfg = json.loads((path / "config.json").read_text())
            config_edit[1](cfg)
            (path / "config.json").write_text(json.dumps(cfg))
        with contextlib.redirect_stdout(None), quiet():
            # the config's code first, as from_pretrained does (4.x caches a folder's files as they are imported)
            AutoConfig.from_pretrained(str(path), trust_remote_code=True)
            cls = get_class_from_dynamic_module("modeling_sa2va_chat.Sa2VAChatModel", str(path))
            module = sys.modules[cls.__module__]
            if side == "upstream":  # upstream's SAM2 classes at the replica's tiny widths (see check_sam2)
                module.SAM2 = _upstream_sam2_classes(sys.modules[cls.__module__.rsplit(".", 1)[0] + ".sam2"],
                                                     "tiny", replica_sam2.SIZES)
            init = cls.__init__
            if post_init:
                def patched(self, *a, **k):
                    init(self, *a, **k)
                    self.post_init()

                cls.__init__ = patched
            try:
                return AutoModel.from_pretrained(str(path), trust_remote_code=True, torch_dtype=torch.float32)
            finally:
                cls.__init__ = init

    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        _same_failure(report, f"{family}/from_pretrained", lambda: load("upstream"), lambda: load("replica"), True)
    with _attn_mask_utils_stand_in():
        if major >= 5:
            _same_failure(report, f"{family}/from_pretrained with modeling_attn_mask_utils stood in",
                          lambda: load("upstream"), lambda: load("replica"), True)
        if family == "internlm2":
            def no_rope_scaling(cfg):
                cfg["llm_config"]["rope_scaling"] = None

            _same_failure(report, f"{family}/from_pretrained, rope_scaling null" + (
                ", post_init called" if major >= 5 else ""),
                lambda: load("upstream", major >= 5, ("norope", no_rope_scaling)),
                lambda: load("replica", major >= 5, ("norope", no_rope_scaling)), major >= 5)
        fix = major >= 5  # transformers 5 needs post_init (4.x loads the folder as it is)
        got = _same_failure(report, f"{family}/from_pretrained" + (", post_init called" if fix else ""),
                            lambda: load("upstream", fix), lambda: load("replica", fix))
        if got[0] != "ok":
            return
        models = {side: load(side, fix) for side in ("upstream", "replica")}
    ids = torch.arange(3, 40).unsqueeze(0)
    for side, model in models.items():
        with torch.no_grad(), quiet():
            logits = model.language_model(input_ids=ids, use_cache=False).logits
        report.number(f"{family}/{side} after from_pretrained: logits finite",
                      bool(torch.isfinite(logits).all()))
        wrong = _wrong_rotary_tables(model)
        if wrong is not None:
            report.number(f"{family}/{side} after from_pretrained: rotary inv_freq tables not as computed", wrong)
    # whether the garbage tables give NaN varies from run to run (uninitialised memory); that they are wrong does not
    wrong = [_wrong_rotary_tables(m) for m in models.values()]
    report.expect(wrong[0] == wrong[1], f"{family}: rotary tables after loading differ {wrong}")
    save = {side: (lambda m=m, side=side: m.save_pretrained(str(work / f"saved_{side}_{family}")))
            for side, m in models.items()}
    _same_failure(report, f"{family}/save_pretrained of the loaded model", save["upstream"], save["replica"])


def _wrong_rotary_tables(model):
    """'k of n': rotary ``inv_freq`` buffers of the InternLM2 layers that differ from what their own __init__
    computes (transformers 5 leaves these non-persistent buffers uninitialised); None without InternLM2 layers."""
    tables = [m for m in model.modules() if type(m).__name__.startswith("InternLM2") and hasattr(m, "inv_freq")
              and hasattr(m, "cos_cached")]
    if not tables:
        return None
    wrong = 0
    for m in tables:
        expected = 1.0 / (m.base ** (torch.arange(0, m.dim, 2).float() / m.dim))
        wrong += not torch.allclose(m.inv_freq.float().cpu(), expected)
    return f"{wrong} of {len(tables)}"


def _real_shapes(report: Report, hf: Path, quick: bool):
    from sa2va_replica.build import FAMILIES, REAL_VOCAB, SHAPES, released_config

    names = [n for n in SHAPES if not n.startswith("tiny")]
    for name in names[:2] if quick else names:
        family = next(f for f in FAMILIES if f in SHAPES[name])
        config = released_config(family, name, REAL_VOCAB[family], torch.bfloat16)
        _, _, (real, replica) = _models(hf, config, device="meta", dtype=torch.bfloat16)
        _compare_structure(report, name, real, replica)
        del real, replica


def check_internvl(upstream: str | Path, quick: bool = False) -> Report:
    """The InternVL-family remote code (everything but sam2.py): imports and the transformers-version failures
    (each reproduced on upstream's files and compared with the replica's: same exception and message), configs,
    state-dict keys/shapes/parameter counts at tiny and (meta device) real shapes, tokenizers, tiling, and with
    upstream's weights loaded into the replica: extract_feature, LLM hidden states and logits, the training
    forward and predict_forward's answer and masks (float32, CPU). ``quick``: two real shapes only."""
    import tempfile

    import transformers

    from sa2va_replica.build import REMOTE_CODE, build_replica

    _use_stubs()
    report = Report("internvl")
    report.number("transformers", transformers.__version__)
    hf = hf_dir(upstream)
    files = sorted(p.name for p in (hf / "models").glob("*.py"))
    report.number("upstream files", files)
    report.expect(files == sorted(p.name for p in REMOTE_CODE.glob("*.py") if p.name != "__init__.py"),
                  "the replica's remote_code files are not upstream's")
    _same_failure(report, "import modeling_sa2va_chat",
                  lambda: _import_fresh(hf / "models", "modeling_sa2va_chat", False),
                  lambda: _import_fresh(REMOTE_CODE, "modeling_sa2va_chat", False))
    up, rep = _pair(hf, "modeling_sa2va_chat")
    _tiling(report, up, rep)
    templates = _pair(hf, "templates")
    for key, value in templates[1].PROMPT_TEMPLATE.items():
        report.expect(templates[0].PROMPT_TEMPLATE.get(key) == value, f"template {key} differs")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for family, shape in TINY_CASES:
            start = time.time()
            tag = f"{family}/{shape}"
            folder = build_replica(work / f"{family}_{shape}", family=family, shape=shape)
            config = json.loads((folder / "config.json").read_text())
            config.pop("transformers_version")
            cfgs = _pair(hf, "configuration_sa2va_chat")
            dicts = []
            for module in cfgs:
                with contextlib.redirect_stdout(None), quiet():
                    # a fresh copy each time: transformers 5 rewrites the rope dicts it is given in place
                    made = module.Sa2VAChatConfig(**json.loads(json.dumps(config)))
                    dicts.append(json.loads(json.dumps(made.to_dict(), default=str)))
            report.expect(dicts[0] == dicts[1], f"{tag}: Sa2VAChatConfig.to_dict differs in "
                                                f"{sorted(k for k in dicts[0] if dicts[0][k] != dicts[1].get(k))}")
            up, rep, (real, replica) = _models(hf, config)
            if _compare_structure(report, tag, real, replica):
                if family == "internlm2":
                    tokenizer = _compare_tokenizers(report, hf, folder)
                else:
                    tokenizer = _tokenizer(folder, None)
                _compare_numerics(report, tag, up, rep, real, replica, tokenizer, family)
            if shape == "tiny":
                _loading(report, hf, family, folder, work)
            report.number(f"{tag}/seconds", round(time.time() - start, 1))
            del real, replica
    _real_shapes(report, hf, quick)
    return report


# --------------------------------------------------------------------------------------------- Qwen-VL releases
#: upstream folder of each Qwen-VL family (models_qwen is a copy of models_qwen2_5_vl)
QWEN_FOLDERS = {"qwen2_5_vl": "models_qwen2_5_vl", "qwen3_vl": "models_qwen3vl"}
QWEN_PROMPT = "<image>Please segment the vessels."
QWEN_CLASS = "modeling_sa2va_qwen.Sa2VAChatModelQwen"


def _qwen_folders(hf: Path, family: str, folder: Path, work: Path) -> dict[str, Path]:
    """The replica's folder and a copy of it carrying upstream's four .py files instead (same weights)."""
    up = work / f"upstream_{family}"
    shutil.copytree(folder, up, dirs_exist_ok=True)
    for src in (hf / QWEN_FOLDERS[family]).glob("*.py"):
        shutil.copy2(src, up / src.name)
    return {"upstream": up, "replica": folder}


def _qwen_class(path: Path, side: str):
    """The folder's wrapper class as AutoModel resolves it; on upstream's side its ``SAM2`` is upstream's own SAM2
    at the folder's replica_sam2_size (see check_sam2)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from sa2va_replica.remote_code import sam2 as replica_sam2

    with contextlib.redirect_stdout(None), quiet():
        cls = get_class_from_dynamic_module(QWEN_CLASS, str(path))
    if side == "upstream":
        size = json.loads((path / "config.json").read_text()).get("replica_sam2_size", "hiera_l")
        package = cls.__module__.rsplit(".", 1)[0]
        sys.modules[cls.__module__].SAM2 = _upstream_sam2_classes(sys.modules[package + ".sam2"], size,
                                                                 replica_sam2.SIZES)
    return cls


def _qwen_load(path: Path, side: str, post_init: bool):
    from transformers import AutoModel

    from sa2va_replica.qwen_on_cpu import post_init_on_load

    _qwen_class(path, side)
    with (post_init_on_load(path) if post_init else contextlib.nullcontext()), contextlib.redirect_stdout(None), \
            quiet():
        return AutoModel.from_pretrained(str(path), trust_remote_code=True, dtype=torch.float32)


def _qwen_structure(report: Report, tag: str, modules: dict, config_dict: dict, meta: bool):
    """Both wrappers (``modules``: side -> modeling module) built from one released config, seeded alike: state-dict
    keys and shapes; parameter counts per part."""
    from sa2va_replica.build_qwen import build_model

    models = []
    for module in modules.values():
        torch.manual_seed(0)
        with contextlib.redirect_stdout(None), quiet():
            models.append(build_model(module, config_dict, torch.bfloat16 if meta else torch.float32,
                                      "meta" if meta else None))
    _compare_structure(report, tag, *models)
    for name, model in zip(modules, models):
        counts = {part: sum(p.numel() for p in getattr(model, part).parameters())
                  for part in ("model", "text_hidden_fcs", "grounding_encoder")}
        report.number(f"{tag}/{name} parameters", dict(counts, total=sum(counts.values())))
    return models


def _qwen_real_shapes(report: Report, hf: Path, work: Path, quick: bool):
    """Every real shape on the meta device: upstream's wrapper (its Hiera-L SAM2) against the replica's, and the
    counts against the published base-model counts (build_qwen.expected_parameters)."""
    from sa2va_replica import build_qwen as bq

    for family in bq.FAMILIES:
        replica_code = work / f"remote_code_{family}"
        replica_code.mkdir(exist_ok=True)
        bq.write_remote_code(replica_code, family)
        with contextlib.redirect_stdout(None), quiet():
            modules = {"upstream": bq.import_remote_code(hf / QWEN_FOLDERS[family]),
                       "replica": bq.import_remote_code(replica_code)}
        shapes = [s for s in bq.SHAPES[family] if s != "tiny"]
        for shape in shapes[:1] if quick else shapes:
            expected = bq.expected_parameters(family, shape)
            ids = {t: bq.QWEN_BASE_VOCAB + i for i, (t, _) in enumerate(bq.added_tokens(family))}
            config = bq.released_config(family, bq.base_config(family, shape, ids), expected["vocab"],
                                        torch.bfloat16, {})
            models = _qwen_structure(report, f"{family}/{shape}", modules, config, meta=True)
            for side, model in zip(modules, models):
                for part in ("model", "text_hidden_fcs", "grounding_encoder"):
                    got = sum(p.numel() for p in getattr(model, part).parameters())
                    report.expect(got == expected[part], f"{family}/{shape}/{side}: {part} has {got} parameters, "
                                                         f"published counts give {expected[part]}")
            del models


def _qwen_convert_layout(report: Report, hf: Path, family: str, folder: Path, work: Path):
    """tools/convert_to_hf.py's qwen branch run with upstream's classes under the installed transformers (base
    config -> Sa2VAChatConfigQwen.to_dict -> edits -> Sa2VAChatModelQwen(config, model=base model).save_pretrained)
    against the builder's folder: config.json and weight names. On 4.57 (upstream's pin) they must be equal; on 5.x
    the differences are what a folder converted today would have, reported."""
    import transformers
    from safetensors import safe_open

    from sa2va_replica import build_qwen as bq
    from sa2va_replica.remote_code import sam2 as replica_sam2

    ids = json.loads((folder / "added_tokens.json").read_text())
    base_dir = work / f"base_{family}"
    base_dir.mkdir(exist_ok=True)
    (base_dir / "config.json").write_text(json.dumps(bq.base_config(family, "tiny", ids)))
    with contextlib.redirect_stdout(None), quiet():
        up = bq.import_remote_code(hf / QWEN_FOLDERS[family])
        up_sam2 = sys.modules[up.__name__.rsplit(".", 1)[0] + ".sam2"]
        up.SAM2 = _upstream_sam2_classes(up_sam2, "tiny", replica_sam2.SIZES)
        base_cls = getattr(transformers, "Qwen2_5_VLForConditionalGeneration" if family == "qwen2_5_vl"
                           else "Qwen3VLForConditionalGeneration")
        inner = base_cls(base_cls.config_class.from_pretrained(base_dir))
        inner.resize_token_embeddings(max(ids.values()) + 1)
        config_dict = up.Sa2VAChatConfigQwen.from_pretrained(base_dir).to_dict()
        config_dict["text_config"]["vocab_size"] = max(ids.values()) + 1
        config_dict["tie_word_embeddings"] = False
        config_dict["template"] = "qwen_chat"
        config_dict["auto_map"] = dict(bq.AUTO_MAP)
        config = up.Sa2VAChatConfigQwen(**config_dict)
        config.text_config.tie_word_embeddings = False
        out = work / f"converted_{family}"
        up.Sa2VAChatModelQwen(config, model=inner).save_pretrained(str(out))
    ignore = {"transformers_version", "dtype", "replica_forced_answer", "replica_sam2_size"}
    converted = {k: v for k, v in json.loads((out / "config.json").read_text()).items() if k not in ignore}
    built = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k not in ignore}
    differing = sorted(k for k in set(converted) | set(built) if converted.get(k) != built.get(k))
    names = {}
    for side, path in (("converted", out), ("built", folder)):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            names[side] = {k for k in f.keys() if not k.startswith("grounding_encoder.")}
    only = (sorted(names["converted"] - names["built"])[:4], sorted(names["built"] - names["converted"])[:4])
    major = int(transformers.__version__.split(".")[0])
    report.number(f"{family}/convert_to_hf under {transformers.__version__}: config keys differing from the "
                  f"released layout", differing)
    report.number(f"{family}/convert_to_hf under {transformers.__version__}: weight names only converted / "
                  f"only built", only)
    if major < 5:
        report.expect(not differing, f"{family}: config.json differs from 4.57's conversion in {differing}")
        # 4.57 drops a tied lm_head from the file; upstream's training untied it (LoRA modules_to_save), the
        # replica writes it: the only name allowed to differ
        report.expect(not only[0] and set(only[1]) <= {"model.lm_head.weight"},
                      f"{family}: weight names differ from 4.57's conversion: {only}")


def _qwen_messages(image, text):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _qwen_token_counts(report: Report, family: str, processor):
    """Image tokens the checkpoint's processor makes for a DRIVE (565 x 584) and an ARCADE (512 x 512) image with
    predict_forward's settings (qwen_vl_utils' resize, then min/max pixels 512*28*28 / 2048*28*28)."""
    import numpy as np
    from PIL import Image
    from qwen_vl_utils import process_vision_info

    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for name, (w, h) in (("DRIVE 565x584", (565, 584)), ("ARCADE 512x512", (512, 512)), ("64x64", (64, 64))):
        messages = _qwen_messages(Image.fromarray(np.zeros((h, w, 3), np.uint8)), "Please segment the vessels.")
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images, _ = process_vision_info(messages)
        with quiet():
            inputs = processor(text=[text], images=images, return_tensors="pt", min_pixels=512 * 28 * 28,
                               max_pixels=2048 * 28 * 28)
        report.number(f"{family}/tokens {name}", {
            "qwen_vl_utils size": list(images[0].size), "image_grid_thw": inputs["image_grid_thw"][0].tolist(),
            "patches": int(inputs["pixel_values"].shape[0]), "image tokens": int((inputs["input_ids"] == pad).sum()),
            "prompt tokens": int(inputs["input_ids"].shape[1])})


def _qwen_forced_generate(model, forced_ids, forced_cls):
    """Upstream's generate with the replica's forcing applied from outside (random weights never say [SEG])."""
    from transformers import LogitsProcessorList

    generate = type(model.model).generate

    def forced_generate(*args, **kwargs):  # a fresh processor per call: it remembers the prompt length
        return generate(model.model, *args, logits_processor=LogitsProcessorList([forced_cls(forced_ids)]), **kwargs)

    model.model.generate = forced_generate


def _qwen_predict(model, processor, image, text=QWEN_PROMPT, adapter=True):
    """predict_forward with the [SEG] embedding captured (text_hidden_fcs' input)."""
    from sa2va_replica.qwen_on_cpu import cuda_on_cpu

    captured = []
    hook = model.text_hidden_fcs.register_forward_hook(lambda m, i, o: captured.append(i[0].detach().clone()))
    try:
        with (cuda_on_cpu(model) if adapter else contextlib.nullcontext()), torch.no_grad(), quiet():
            result = model.predict_forward(image=image, text=text, processor=processor)
    finally:
        hook.remove()
    return result, captured


def _qwen_teacher_forced_seg(model, processor, image, sequence, seg_id):
    """The [SEG] states read from one forward pass over prompt + answer (what a training-time adapter computes):
    the last layer's hidden state at every position whose input token is [SEG]."""
    from qwen_vl_utils import process_vision_info

    messages = _qwen_messages(image, QWEN_PROMPT.replace("<image>", ""))
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, _ = process_vision_info(messages)
    with quiet():
        inputs = dict(processor(text=[text], images=images, return_tensors="pt", min_pixels=512 * 28 * 28,
                                max_pixels=2048 * 28 * 28))
    ids = sequence[None, :-1]
    pad = ids.shape[1] - inputs["input_ids"].shape[1]
    inputs["input_ids"], inputs["attention_mask"] = ids, torch.ones_like(ids)
    if "mm_token_type_ids" in inputs:  # transformers 5 reads image positions from it for the 3-D RoPE
        inputs["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, pad))
    with torch.no_grad(), quiet():
        states = model.model(**inputs, output_hidden_states=True).hidden_states[-1][0]
    return states[ids[0] == seg_id]


def _qwen_run(report: Report, hf: Path, family: str, folder: Path, work: Path):
    import numpy as np
    import transformers
    from PIL import Image

    from sa2va_replica import build_qwen as bq
    from sa2va_replica.qwen_on_cpu import load_processor

    tag = family
    folders = _qwen_folders(hf, family, folder, work)
    major = int(transformers.__version__.split(".")[0])
    _same_failure(report, f"{tag}/from_pretrained", lambda: _qwen_load(folders["upstream"], "upstream", False),
                  lambda: _qwen_load(folders["replica"], "replica", False), major >= 5)
    models = {side: _qwen_load(path, side, major >= 5) for side, path in folders.items()}
    real, replica = models["upstream"], models["replica"]
    sd = [m.state_dict() for m in (real, replica)]
    report.expect(list(sd[0]) == list(sd[1]), f"{tag}: loaded state dicts have different keys")
    report.close(f"{tag}/loaded weights", sd[0], sd[1], rtol=0.0)
    for side, m in models.items():
        report.number(f"{tag}/{side} after from_pretrained", {
            "dtype": str(next(m.parameters()).dtype), "torch_dtype attribute": str(m.torch_dtype),
            "min/max pixels": [m.min_pixels, m.max_pixels], "DirectResize": m.extra_image_processor.target_length})
    ids = torch.tensor([[1, 2, 3]])
    _same_failure(report, f"{tag}/model(input_ids=...) (no forward defined)", lambda: real(input_ids=ids),
                  lambda: replica(input_ids=ids), True)
    _same_failure(report, f"{tag}/model() (no forward defined)", lambda: real(), lambda: replica(), True)

    processor = load_processor(folder)
    _qwen_token_counts(report, family, processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8))
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8))
    _same_failure(report, f"{tag}/DirectResize of a grayscale image",
                  lambda: real.extra_image_processor.apply_image(np.array(gray)),
                  lambda: replica.extra_image_processor.apply_image(np.array(gray)), True)

    replica.processor = processor
    forced = replica._replica_generate_kwargs()["logits_processor"][0].token_ids
    forced_cls = type(replica._replica_generate_kwargs()["logits_processor"][0])
    _qwen_forced_generate(real, forced, forced_cls)
    _same_failure(report, f"{tag}/predict_forward on CPU, no adapter",
                  lambda: real.predict_forward(image=image, text=QWEN_PROMPT, processor=processor),
                  lambda: replica.predict_forward(image=image, text=QWEN_PROMPT, processor=processor), True)
    from sa2va_replica.cuda_on_cpu import sam2_cuda_on_cpu

    def only_cuda_calls_adapted(model):
        with sam2_cuda_on_cpu(model), torch.no_grad(), quiet():
            return model.predict_forward(image=image, text=QWEN_PROMPT, processor=processor)

    _same_failure(report, f"{tag}/predict_forward float32, CUDA calls adapted, autocast('cuda') off",
                  lambda: only_cuda_calls_adapted(real), lambda: only_cuda_calls_adapted(replica), True)
    text_only = [m.predict_forward(text="Please describe the vessels.", processor=processor) for m in (real, replica)]
    report.number(f"{tag}/predict_forward text only", [r["prediction"] for r in text_only])
    report.expect(text_only[0] == text_only[1], f"{tag}: text-only predictions differ")

    got = _same_failure(report, f"{tag}/predict_forward float32 with cuda_on_cpu",
                        lambda: _qwen_predict(real, processor, image), lambda: _qwen_predict(replica, processor, image))
    if got[0] != "ok":
        return
    (r_real, seg_real), (r_rep, seg_rep) = _qwen_predict(real, processor, image), _qwen_predict(replica, processor, image)
    report.number(f"{tag}/predict_forward answer", [r_real["prediction"], r_rep["prediction"]])
    report.expect(r_real["prediction"] == r_rep["prediction"], f"{tag}: answers differ")
    report.expect(len(seg_real) == len(seg_rep) == 1, f"{tag}: [SEG] embeddings {len(seg_real)} / {len(seg_rep)}")
    if len(seg_real) == len(seg_rep) == 1:
        report.close(f"{tag}/[SEG] hidden state", seg_real[0], seg_rep[0], rtol=0.0)
    masks = [np.stack(r["prediction_masks"]) for r in (r_real, r_rep)]
    same_shape = report.expect(masks[0].shape == masks[1].shape, f"{tag}: mask shapes {masks[0].shape} {masks[1].shape}")
    if same_shape:
        differing = int((masks[0] != masks[1]).sum())
        report.number(f"{tag}/predict_forward mask", f"{differing} of {masks[0].size} pixels differ "
                                                     f"(shape {masks[0].shape}, foreground {masks[1].mean():.3f})")
        report.expect(differing == 0, f"{tag}: {differing} mask pixels differ")
    # where the [SEG] state is read: the same as a teacher-forced pass (what a training adapter computes)
    seg_id = processor.tokenizer.convert_tokens_to_ids("[SEG]")
    with quiet():
        generated = replica.model.generate(**_qwen_generate_inputs(processor, image), max_new_tokens=16,
                                           do_sample=False, logits_processor=replica._replica_generate_kwargs()
                                           ["logits_processor"])
    for side, m, seg in (("upstream", real, seg_real), ("replica", replica, seg_rep)):
        forced_pass = _qwen_teacher_forced_seg(m, processor, image, generated[0], seg_id)
        report.close(f"{tag}/{side} [SEG] state: predict_forward vs one teacher-forced pass", seg[0],
                     forced_pass, rtol=1e-4)

    saved = {side: (lambda m=m, side=side: m.save_pretrained(str(work / f"saved_{side}_{family}")))
             for side, m in models.items()}
    _same_failure(report, f"{tag}/save_pretrained of the loaded model", saved["upstream"], saved["replica"])
    from safetensors import safe_open

    with safe_open(str(work / f"saved_replica_{family}" / "model.safetensors"), "pt") as f:
        report.number(f"{tag}/save_pretrained under {transformers.__version__}: LLM weight names",
                      sorted(k for k in f.keys() if "layers.0.self_attn.q_proj.weight" in k))
    saved_config = json.loads((work / f"saved_replica_{family}" / "config.json").read_text())
    report.number(f"{tag}/save_pretrained under {transformers.__version__}: text rope keys",
                  sorted(k for k in saved_config["text_config"] if k.startswith("rope")))
    report.number(f"{tag}/expected parameters of the shapes", {s: bq.expected_parameters(family, s)["total"]
                                                               for s in bq.SHAPES[family] if s != "tiny"})


def _qwen_generate_inputs(processor, image):
    from qwen_vl_utils import process_vision_info

    messages = _qwen_messages(image, QWEN_PROMPT.replace("<image>", ""))
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, _ = process_vision_info(messages)
    with quiet():
        return processor(text=[text], images=images, return_tensors="pt", min_pixels=512 * 28 * 28,
                         max_pixels=2048 * 28 * 28)


def check_qwen(upstream: str | Path, quick: bool = False) -> Report:
    """The Qwen2.5-VL / Qwen3-VL based releases (modeling_sa2va_qwen.py, configuration_sa2va_chat.py): the written
    files against upstream's, the conversion layout, state dicts at tiny and (meta device) real shapes with
    parameter counts against the published ones, then with identical weights in both: the transformers-version
    failures (same exception and message), answers, [SEG] hidden states and predict_forward masks (float32, CPU),
    save_pretrained. ``quick``: one real shape per family."""
    import tempfile

    _use_stubs()  # before transformers is imported: it decides once whether a torchvision exists
    import transformers

    from sa2va_replica import build_qwen as bq

    report = Report("qwen")
    report.number("transformers", transformers.__version__)
    hf = hf_dir(upstream)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for family in bq.FAMILIES:
            start = time.time()
            up_files = {p.name: p.read_text() for p in (hf / QWEN_FOLDERS[family]).glob("*.py")}
            written = bq.remote_code_files(family)
            report.expect(sorted(up_files) == sorted(written), f"{family}: files {sorted(written)} != upstream's")
            for name in ("sam2.py", "templates.py"):  # why the builder ships the InternVL family's copies
                report.expect(up_files.get(name) == (hf / "models" / name).read_text(),
                              f"{family}: upstream's {name} is not models/{name}")
            folder = bq.build_qwen_replica(work / f"replica_{family}", family=family)
            _qwen_convert_layout(report, hf, family, folder, work)
            modules = {side: sys.modules[_qwen_class(path, side).__module__]
                       for side, path in _qwen_folders(hf, family, folder, work).items()}
            _qwen_structure(report, f"{family}/tiny", modules, json.loads((folder / "config.json").read_text()),
                            meta=False)
            _qwen_run(report, hf, family, folder, work)
            report.number(f"{family}/seconds", round(time.time() - start, 1))
        _qwen_real_shapes(report, hf, work, quick)
    return report


PARTS = {"sam2": check_sam2, "internvl": check_internvl, "qwen": check_qwen}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="checkout of bytedance/Sa2VA")
    parser.add_argument("--part", action="append", choices=sorted(PARTS), help="default: every part")
    parser.add_argument("--quick", action="store_true", help="tiny sizes only (seconds, not minutes)")
    args = parser.parse_args(argv)
    _use_stubs()  # before any part imports transformers, which decides once whether a torchvision exists
    failed = False
    for part in args.part or sorted(PARTS):
        report = PARTS[part](args.upstream, quick=args.quick)
        print(json.dumps({"part": part, "numbers": report.numbers, "failures": report.failures}, indent=1,
                         default=str))
        failed |= bool(report.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
