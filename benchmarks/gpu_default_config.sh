#!/usr/bin/env bash
# The reference for the GPU sweep (issue 5): one PPO run of the default train config under the sweep's own fixed
# settings (tune/configs/gpu.yaml's train_overrides: data, iterations, placement), every swept key at its default.
# Its final adapter is evaluated on the test splits like the sweep's best (BENCHMARKS.md, "Tune").
#   usage on the GPU host (after the wheels): bash benchmarks/gpu_default_config.sh
set -u
source .whl/install.sh
export TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())")
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token DATA=/tmp/rlseg-data RL_SEG_DATA_DIR=/tmp/rlseg-data
OUT=${OUT:-/tmp/out}; RUNS=/tmp/rlseg-default; rm -rf "$DATA" "$RUNS"; mkdir -p "$OUT" "$DATA"
cp -r data/samples/DRIVE "$DATA/DRIVE"; cp -r data/samples/ARCADE "$DATA/ARCADE_syntax"
cp -r --update=none .gpu_sweep/DRIVE/. "$DATA/DRIVE/"; cp -r --update=none .gpu_sweep/ARCADE_syntax/. "$DATA/ARCADE_syntax/"
mapfile -t FIXED < <(python3 -c "
from rl_seg.config import load_config
from tune.sweep import CONFIGS, SweepConfig
print('\n'.join(load_config(SweepConfig, CONFIGS / 'gpu.yaml').train_overrides))")
python3 -m rl_seg.cli train name=default run_dir=$RUNS ray_num_cpus=16 progress=true "${FIXED[@]}" \
  > "$OUT/default_config.log" 2>&1
grep "\[iter" "$OUT/default_config.log" | tail -3
cd "$RUNS" && tar -czf "$OUT/default_config.tar.gz" --exclude='ray_train' --exclude='tensorboard' default && ls -la "$OUT"
