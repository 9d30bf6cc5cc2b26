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
        real_sd, rep_sd = real.state_dict(), replica.state_dict()
        report.expect(list(real_sd) == list(rep_sd),
                      f"{size}: state-dict keys differ: only upstream {sorted(set(real_sd) - set(rep_sd))[:5]}, "
                      f"only replica {sorted(set(rep_sd) - set(real_sd))[:5]}")
        shapes = [k for k in real_sd if k in rep_sd and real_sd[k].shape != rep_sd[k].shape]
        report.expect(not shapes, f"{size}: shapes differ for {shapes[:5]}")
        report.number(f"{size}/state-dict entries", len(rep_sd))
        counts = [sum(p.numel() for p in m.parameters()) for m in (real, replica)]
        report.number(f"{size}/parameters (upstream, replica)", counts)
        report.expect(counts[0] == counts[1], f"{size}: parameter counts differ {counts}")
        _perturb(real, seed=1)
        replica.load_state_dict(real.state_dict(), strict=True)
        _compare_sam2(report, size, real, replica, all_paths=size == "tiny")
        report.number(f"{size}/seconds", round(time.time() - start, 1))
        del real, replica
    return report


PARTS = {"sam2": check_sam2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="checkout of bytedance/Sa2VA")
    parser.add_argument("--part", action="append", choices=sorted(PARTS), help="default: every part")
    parser.add_argument("--quick", action="store_true", help="tiny sizes only (seconds, not minutes)")
    args = parser.parse_args(argv)
    failed = False
    for part in args.part or sorted(PARTS):
        report = PARTS[part](args.upstream, quick=args.quick)
        print(json.dumps({"part": part, "numbers": report.numbers, "failures": report.failures}, indent=1,
                         default=str))
        failed |= bool(report.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
