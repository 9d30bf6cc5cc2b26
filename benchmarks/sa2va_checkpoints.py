"""Random-weight Sa2VA checkpoint folders of the public shapes, from the replica of the public remote code
(tests/sa2va_replica), for measuring speed and memory where no real weights can be downloaded (issue 18).

    python benchmarks/sa2va_checkpoints.py --shape 4b --out /tmp/ckpt/4b --device cuda --dtype bfloat16
    python benchmarks/sa2va_checkpoints.py --shape 26b --out DIR --device meta     # shapes only: no weights

The folder is what the releases ship (config.json with auto_map, the remote code, tokenizer files, safetensors
weights sharded at 5 GB), so `rl-seg train policy.name=DIR policy.trust_remote_code=true` loads it as a user's
checkpoint. Real shapes are meant to be built on the GPU host in bf16 (a 14B model is ~31 GB: nothing travels);
``--device meta`` writes the folder without weights (what ``rl-seg plan`` reads) and counts the parameters.
Prints one JSON line: shape, family, parameters, bytes written, seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

#: name -> (language-model family, replica shape); build_replica's own shape names are accepted too.
SHAPES = {
    "tiny": ("qwen2", "tiny"), "tiny-internlm2": ("internlm2", "tiny"),
    "1b": ("qwen2", "sa2va-1b"), "4b": ("qwen2", "sa2va-4b"), "8b": ("internlm2", "sa2va-8b"),
    "26b": ("internlm2", "sa2va-26b"), "internvl3-2b": ("qwen2", "sa2va-internvl3-2b"),
    "internvl3-8b": ("qwen2", "sa2va-internvl3-8b"), "14b": ("qwen2", "sa2va-internvl3-14b"),
    "internvl3-14b": ("qwen2", "sa2va-internvl3-14b"),
}


def resolve(shape: str) -> tuple[str, str]:
    from sa2va_replica.build import SHAPES as REPLICA

    if shape in SHAPES:
        return SHAPES[shape]
    if shape in REPLICA:
        return next(iter(REPLICA[shape])), shape
    raise SystemExit(f"--shape {shape!r}: one of {sorted(SHAPES)} or {sorted(REPLICA)}")


def build(shape: str, out: Path, device: str = "cpu", dtype: str | None = None, seed: int = 0) -> dict:
    """Write the checkpoint folder; returns what was built."""
    from sa2va_replica.stubs import use_test_stubs

    use_test_stubs()  # the remote code imports torchvision and timm; hosts without them get the TEST STUBs
    import torch
    from sa2va_replica.build import (REAL_VOCAB, REMOTE_CODE, TOKENIZER_WRITERS, build_model, build_replica,
                                     released_config)

    family, replica_shape = resolve(shape)
    torch_dtype = getattr(torch, dtype) if dtype else None
    start = time.perf_counter()
    if device == "meta":
        # the released folder without weights: config, remote code, tokenizer; parameters counted on meta
        out.mkdir(parents=True, exist_ok=True)
        tokens = TOKENIZER_WRITERS[family](out)
        vocab = tokens if replica_shape.startswith("tiny") else REAL_VOCAB[family]
        config = released_config(family, replica_shape, vocab, torch_dtype or torch.bfloat16)
        params = sum(p.numel() for p in build_model(config, dtype=torch_dtype or torch.bfloat16,
                                                    device="meta").parameters())
        import transformers

        (out / "config.json").write_text(json.dumps(dict(config, transformers_version=transformers.__version__),
                                                    indent=2) + "\n")
        for src in sorted(REMOTE_CODE.glob("*.py")):
            if src.name != "__init__.py":
                shutil.copy2(src, out / src.name)
    else:
        build_replica(out, family=family, shape=replica_shape, seed=seed, dtype=torch_dtype, device=device)
        params = None
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    if params is None:
        from rl_seg.plan import _safetensors_params

        params = _safetensors_params(out)[0]
    return {"shape": shape, "family": family, "replica_shape": replica_shape, "folder": str(out),
            "device": device, "dtype": dtype or ("float32" if replica_shape.startswith("tiny") else "bfloat16"),
            "parameters": params, "weight_bytes": weights, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True, help=f"one of {sorted(SHAPES)} (or the replica's shape names)")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write")
    p.add_argument("--device", default="cpu", help="where the weights are made: cpu, cuda, or meta (no weights)")
    p.add_argument("--dtype", default=None, help="bfloat16 (default for real shapes), float32 (default for tiny)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    result = build(a.shape, a.out, a.device, a.dtype, a.seed)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
