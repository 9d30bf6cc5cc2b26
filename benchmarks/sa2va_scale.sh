#!/usr/bin/env bash
# Sa2VA scale on one GPU (issue 18) in ONE call of at most $DEADLINE seconds (default 540), for the offline GPU host
# (one H200: torch, transformers and peft there; Ray and DeepSpeed from .whl/, see ../shared/gpu/README.md).
# 1. benchmarks/sa2va_action_memory.py (at most $ACTION_MEMORY_S s, default 40): peak memory of one PPO micro-step
#    with actions on the native grid vs at image sizes, K = 1 and 8 -> $OUT/action_memory.json and .txt.
# 2. benchmarks/sa2va_scale.py: builds random-weight real-shape checkpoints on the GPU in bf16 (4B, 14B, InternVL3-8B,
#    1B first; 8B-InternLM2, colocated 4B and 26B if time allows), and for each runs `rl-seg train` (hybrid placement;
#    K=8, 8 images per iteration in one micro-batch, 2 epochs, actions at image resolution, 1 warm-up + 5 timed
#    iterations) and the
#    same settings in one process without Ray; stops at the deadline leaving what finished. results.md,
#    results.json and runs.tar.gz in $OUT are rewritten after every step, so a call cut short keeps what finished.
# Reads nothing outside the repository (data/samples) and .whl/. See benchmarks/sa2va_scale.py.
#   on the GPU host:  bash benchmarks/sa2va_scale.sh          [OUT=/tmp/out DEADLINE=540 TASKS=4b,14b ACTION_MEMORY_S=40]
#   dry run (CPU):    PYTHON=.venv/bin/python OUT=/tmp/dry bash benchmarks/sa2va_scale.sh --dry-run
set -u
STARTED=$(date +%s.%N)
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/sa2va_scale}
mkdir -p "$OUT"
if [ "$DRY" = 0 ]; then
  source .whl/install.sh || exit 1
fi
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# (the dry run has no CUDA device: the script says so and exits 2, which proves only that it starts)
# ACTION_MEMORY_S=0 skips it (a second call that only needs the scale rows).
if [ "${ACTION_MEMORY_S:-40}" != 0 ]; then
  timeout -k 5 "${ACTION_MEMORY_S:-40}" "$PYTHON" benchmarks/sa2va_action_memory.py --out "$OUT/action_memory.json" \
    > "$OUT/action_memory.txt" 2>&1
  echo "exit $? after $(awk "BEGIN {print int($(date +%s.%N) - $STARTED)}") s" >> "$OUT/action_memory.txt"
fi
args=(--out "$OUT" --work "$WORK" --started "$STARTED" --deadline-s "${DEADLINE:-540}")
[ -n "${TASKS:-}" ] && args+=(--tasks "$TASKS")
[ "$DRY" = 1 ] && args+=(--dry-run)
exec "$PYTHON" benchmarks/sa2va_scale.py "${args[@]}"
