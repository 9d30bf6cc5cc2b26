"""Build DeepSpeed's just-in-time C++ ops once, at install time, instead of inside the first test or run.

On CPU, DeepSpeed compiles its shared-memory communication op the first time an engine starts (about a minute
on two cores; the learner's optimizer is torch's AdamW, which needs no build). ``make install`` runs this module so that cost is paid once per
environment. On a GPU host the CUDA ops are built by DeepSpeed itself when first used; nothing is done here.
"""

from __future__ import annotations

import sys
import time


def build_cpu_ops() -> list[str]:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return []
    built = []
    for name in ("ShareMemCommBuilder",):
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            continue
        builder.load(verbose=False)
        built.append(name)
    return built


def main() -> int:
    start = time.time()
    built = build_cpu_ops()
    print(f"deepspeed CPU ops ready: {', '.join(built) or 'none needed'} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
