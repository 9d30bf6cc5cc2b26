#!/usr/bin/env bash
# The real sweep of issue 5 on one GPU host: tune/configs/gpu.yaml (8 trials, Optuna TPE, ASHA on validation Dice).
# Data: the shipped sample plus .gpu_sweep/ (more DRIVE/ARCADE train and val images) merged into $DATA.
# Results are packed into $OUT/sweep.tar.gz.      usage on the GPU host: bash benchmarks/gpu_tune_sweep.sh
set -u
source .whl/install.sh
export TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())")
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token DATA=/tmp/rlseg-data RL_SEG_DATA_DIR=/tmp/rlseg-data
OUT=${OUT:-/tmp/out}; rm -rf "$DATA" /tmp/sweeps; mkdir -p "$OUT" "$DATA"
cp -r data/samples/DRIVE "$DATA/DRIVE"; cp -r data/samples/ARCADE "$DATA/ARCADE_syntax"
cp -r --update=none .gpu_sweep/DRIVE/. "$DATA/DRIVE/"; cp -r --update=none .gpu_sweep/ARCADE_syntax/. "$DATA/ARCADE_syntax/"
python3 -m tune --config tune/configs/gpu.yaml out_dir=/tmp/sweeps ray_num_cpus=16 "$@" > "$OUT/sweep.log" 2>&1
tail -30 "$OUT/sweep.log" | grep -v PlacementGroupCleaner
cd /tmp/sweeps/gpu && tar -czf "$OUT/sweep.tar.gz" --exclude='ray_train' --exclude='tensorboard' --exclude='tune' . && ls -la "$OUT"
