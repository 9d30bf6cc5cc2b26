#!/usr/bin/env bash
# PPO experiments of issue 4 on one GPU host, in one call (see BENCHMARKS.md, "PPO from the warm start").
# Runs side by side on the one GPU, each with its own local Ray instance (token auth on), plus the supervised
# soft-Dice continuation of the warm start for the same number of optimizer updates (ITERATIONS x 2 epochs).
#   EXPERIMENT=baselines (default): pixel / group / value advantages with the default reward, pixel with a
#                                   recall-weighted reward.
#   EXPERIMENT=topology:            the 'topology' advantage (per-pixel credit for clDice and Betti-0) with the
#                                   default reward, at temperature 0.5, with a reward without the recall term,
#                                   at lr 3e-3; and 'pixel' again as the same-session control.
#   EXPERIMENT=regularized:         'topology' and 'pixel' with a KL anchor to the warm start or an entropy bonus.
#   EXPERIMENT=cold:                pixel / topology / group at temperature 0.25, with and without a KL anchor.
#   EXPERIMENT=full:                temperature 0.25 on (nearly) the warm start's whole training set, datasets
#                                   drawn equally often: group at two learning rates and without the recall term,
#                                   pixel with a KL anchor, topology with a light one.
#   EXPERIMENT=pixels:              as 'full', with LoRA also on the decoder's upsampling convolutions and FiLM
#                                   (policy.lora.targets=llm+decoder+pixels: per-pixel features can change).
#   EXPERIMENT=all_layers:          as 'full': group without the recall term and pixel with a KL anchor, each with
#                                   LoRA on llm+decoder and on every layer ('all'), and pixel with KL 0.1 on 'all'.
#   EXPERIMENT=long:                the 'all_layers' recipe for longer (ITERATIONS over several calls, RESUME=1):
#                                   pixel with KL 1.0 and 0.3, KL 0.3 at lr 3e-3, and KL 0.3 trained on DRIVE alone.
#                                   No supervised continuation (it does not resume), here and in 'augment'.
#   EXPERIMENT=augment:             as 'long' with data.augment=true (flips and quarter turns of each drawn image):
#                                   KL 1.0, KL 0.3 at lr 3e-3, and on DRIVE alone with KL 0.3 and 1.0.
#   EXPERIMENT=ship:                the two adapters shipped in rl_seg/assets/adapters (issue 17): the default
#                                   recipe (KL 1.0, lr 1e-3) and the ARCADE recipe (KL 0.3, lr 3e-3), as in 'long'.
#   EXPERIMENT=smoke:               the smoke test alone (builds DeepSpeed's ops on a fresh machine).
#   RESUME=1: continue the runs a previous call on the same (still warm) machine left in /tmp/rlseg-runs, each from
#             its last checkpoint, until they reach ITERATIONS or the DEADLINE stops them again.
# Data: the shipped sample plus $GPU_DATA (default .gpu_ppo/: more DRIVE and ARCADE training and validation
# images, git-ignored, carried with the call; several folders separated by ':', e.g. one left on the machine by
# an earlier call and one carried now, when together they exceed one transfer), merged into $DATA.
# Results (adapters, metrics, logs) are packed into $OUT/ppo_results.tar.gz. A run still going at DEADLINE seconds is asked to stop (the status service's stop
# request: it checkpoints after its iteration); its last checkpoint's adapter is packed as final_adapter and the
# output says so (evaluate such runs knowing they had fewer updates than (c)).
#   usage on the GPU host:  [EXPERIMENT=topology GPU_DATA=.gpu_ppo LR=1e-3 GROUP_LR=3e-4 SMOKE=1 DEADLINE=500] \
#                           bash benchmarks/gpu_ppo_experiments.sh ITERATIONS
set -u
ITER=${1:-60}; LR=${LR:-1e-3}; GROUP_LR=${GROUP_LR:-3e-4}; SMOKE=${SMOKE:-1}; EXPERIMENT=${EXPERIMENT:-baselines}
DEADLINE=${DEADLINE:-100000}; T0=$SECONDS; GPU_DATA=${GPU_DATA:-.gpu_ppo}; RESUME=${RESUME:-0}
LEARNER_CPUS=${LEARNER_CPUS:-1}  # the topology advantage's CPU work runs in this many threads
LORA_TARGETS=${LORA_TARGETS:-llm+decoder}; [ "$EXPERIMENT" = pixels ] && LORA_TARGETS=llm+decoder+pixels
# The experiments before 'full' drew every image equally often (data.balance_datasets did not exist yet).
BALANCE=true; case $EXPERIMENT in baselines|topology|regularized|cold) BALANCE=false ;; esac
AUGMENT=${AUGMENT:-false}; [ "$EXPERIMENT" = augment ] && AUGMENT=true
source .whl/install.sh
# DeepSpeed 0.19 cannot parse arch names like "9.0a" when it derives them itself: name the arch.
export TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())")
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token DATA=/tmp/rlseg-data RL_SEG_DATA_DIR=/tmp/rlseg-data
OUT=${OUT:-/tmp/out}; RUNS=/tmp/rlseg-runs; rm -rf "$DATA"; mkdir -p "$OUT" "$RUNS" "$DATA"
if [ "$RESUME" = 1 ]; then
  [ -n "$(ls "$RUNS")" ] || { echo "RESUME=1 but $RUNS is empty: the machine is not the one the runs started on"; exit 3; }
else rm -rf "$RUNS"/*; fi
cp -r data/samples/DRIVE "$DATA/DRIVE"; cp -r data/samples/ARCADE "$DATA/ARCADE_syntax"
for extra in ${GPU_DATA//:/ }; do
  for d in DRIVE ARCADE_syntax; do [ -d "$extra/$d" ] && cp -r --update=none "$extra/$d/." "$DATA/$d/"; done
done
echo "training images: DRIVE $(ls "$DATA"/DRIVE/training/images | wc -l) (incl. val), ARCADE $(ls "$DATA"/ARCADE_syntax/images | grep -c ^train_)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
COMMON=(run_dir=$RUNS "data.datasets=[drive,arcade]" data.image_size=null data.images_per_iteration=8
        rollout.num_workers=1 rollout.num_gpus=0.1 rollout.samples_per_image=8 reward.num_actors=3
        learner.num_workers=1 learner.use_gpu=true learner.gpus_per_worker=0.1 learner.micro_batch_images=1
        learner.cpus_per_worker=$LEARNER_CPUS
        ppo.epochs=2 ppo.warmup_steps=4 checkpoint_every=10 val_every=10 ray_num_cpus=16 progress=true
        # the settings every run here was measured with, whatever rl-seg train's defaults are now (runs override)
        rollout.temperature=1.0 ppo.loss.kl_coef=0.0 data.balance_datasets=$BALANCE data.augment=$AUGMENT
        "policy.lora={r: 16, alpha: 32, dropout: 0.0, targets: $LORA_TARGETS}")
# smoke test first: a broken stack costs seconds, not the whole budget
if [ "$SMOKE" = 1 ]; then
  timeout 300 python3 -m rl_seg.cli train name=smoke iterations=2 "${COMMON[@]}" > "$OUT/smoke.log" 2>&1 \
    || { tail -50 "$OUT/smoke.log"; exit 1; }
  grep "\[iter" "$OUT/smoke.log" | tail -2
fi
[ "$EXPERIMENT" = smoke ] && exit 0
run() {
  name=$1; shift
  if [ "$RESUME" = 1 ]; then
    # a deadline stop left its last checkpoint's adapter as final_adapter: the resumed run writes its own
    grep -q '"state": "stopped"' "$RUNS/$name/run_state.json" && rm -rf "$RUNS/$name/final_adapter"
    set -- "$@" resume=true
  fi
  python3 -m rl_seg.cli train name=$name iterations=$ITER "${COMMON[@]}" "$@" >> "$RUNS/$name.log" 2>&1
}
case $EXPERIMENT in
  baselines)
    NAMES="pixel group value recall"
    run pixel ppo.advantage=pixel ppo.lr=$LR &
    run group ppo.advantage=group ppo.lr=$GROUP_LR &
    run value ppo.advantage=value ppo.lr=$LR &
    run recall ppo.advantage=pixel ppo.lr=$LR "reward.weights={dice: 0.35, recall: 0.4, cldice: 0.25}" & ;;
  topology)
    NAMES="topology topology_t05 topology_norecall topology_lr3e-3 pixel"
    run topology ppo.advantage=topology ppo.lr=$LR &
    run topology_t05 ppo.advantage=topology ppo.lr=$LR rollout.temperature=0.5 &
    run topology_norecall ppo.advantage=topology ppo.lr=$LR "reward.weights={dice: 0.4, cldice: 0.4, betti0: 0.2}" &
    run topology_lr3e-3 ppo.advantage=topology ppo.lr=3e-3 &
    run pixel ppo.advantage=pixel ppo.lr=$LR & ;;
  regularized)  # the topology runs' per-pixel entropy fell 0.049 -> 0.002: anchor them (KL) or reward entropy
    NAMES="topology_kl0.1 topology_kl1 topology_ent0.1 topology_kl1_lr3e-3 pixel_kl1"
    run topology_kl0.1 ppo.advantage=topology ppo.lr=$LR ppo.loss.kl_coef=0.1 &
    run topology_kl1 ppo.advantage=topology ppo.lr=$LR ppo.loss.kl_coef=1.0 &
    run topology_ent0.1 ppo.advantage=topology ppo.lr=$LR ppo.loss.entropy_coef=0.1 &
    run topology_kl1_lr3e-3 ppo.advantage=topology ppo.lr=3e-3 ppo.loss.kl_coef=1.0 &
    run pixel_kl1 ppo.advantage=pixel ppo.lr=$LR ppo.loss.kl_coef=1.0 & ;;
  cold)  # temperature 0.25: confident pixels become deterministic, only pixels near the threshold are sampled,
         # so reward can no longer rise by de-noising pixels the deployed (thresholded) mask already gets right
    NAMES="pixel_t025 topology_t025 pixel_t025_kl1 topology_t025_kl1 group_t025"
    COLD=rollout.temperature=0.25
    run pixel_t025 ppo.advantage=pixel ppo.lr=$LR $COLD &
    run topology_t025 ppo.advantage=topology ppo.lr=$LR $COLD &
    run pixel_t025_kl1 ppo.advantage=pixel ppo.lr=$LR ppo.loss.kl_coef=1.0 $COLD &
    run topology_t025_kl1 ppo.advantage=topology ppo.lr=$LR ppo.loss.kl_coef=1.0 $COLD &
    run group_t025 ppo.advantage=group ppo.lr=$GROUP_LR $COLD & ;;
  full|pixels)  # the same images the warm start learnt from (the subsets above were a tenth of ARCADE's)
    NAMES="group_t025 group_t025_lr1e-3 group_t025_norecall pixel_t025_kl1 topology_t025_kl0.1"
    COLD=rollout.temperature=0.25
    run group_t025 ppo.advantage=group ppo.lr=$GROUP_LR $COLD &
    run group_t025_lr1e-3 ppo.advantage=group ppo.lr=1e-3 $COLD &
    run group_t025_norecall ppo.advantage=group ppo.lr=$GROUP_LR $COLD "reward.weights={dice: 0.4, cldice: 0.4, betti0: 0.2}" &
    run pixel_t025_kl1 ppo.advantage=pixel ppo.lr=$LR ppo.loss.kl_coef=1.0 $COLD &
    run topology_t025_kl0.1 ppo.advantage=topology ppo.lr=$LR ppo.loss.kl_coef=0.1 $COLD & ;;
  all_layers)
    NAMES="group_t025_norecall pixel_t025_kl1 group_t025_norecall_all pixel_t025_kl1_all pixel_t025_kl0.1_all"
    COLD=rollout.temperature=0.25; NORECALL="reward.weights={dice: 0.4, cldice: 0.4, betti0: 0.2}"
    run group_t025_norecall ppo.advantage=group ppo.lr=$GROUP_LR $COLD "$NORECALL" &
    run pixel_t025_kl1 ppo.advantage=pixel ppo.lr=$LR ppo.loss.kl_coef=1.0 $COLD &
    run group_t025_norecall_all ppo.advantage=group ppo.lr=$GROUP_LR $COLD "$NORECALL" policy.lora.targets=all &
    run pixel_t025_kl1_all ppo.advantage=pixel ppo.lr=$LR ppo.loss.kl_coef=1.0 $COLD policy.lora.targets=all &
    run pixel_t025_kl0.1_all ppo.advantage=pixel ppo.lr=$LR ppo.loss.kl_coef=0.1 $COLD policy.lora.targets=all & ;;
  long)  # validation Dice of the all_layers runs was still rising at iteration 90
    NAMES="long_kl1 long_kl0.3 long_kl0.3_lr3e-3 drive_kl0.3"
    ALL=(ppo.advantage=pixel rollout.temperature=0.25 policy.lora.targets=all)
    run long_kl1 "${ALL[@]}" ppo.lr=$LR ppo.loss.kl_coef=1.0 &
    run long_kl0.3 "${ALL[@]}" ppo.lr=$LR ppo.loss.kl_coef=0.3 &
    run long_kl0.3_lr3e-3 "${ALL[@]}" ppo.lr=3e-3 ppo.loss.kl_coef=0.3 &
    run drive_kl0.3 "${ALL[@]}" ppo.lr=$LR ppo.loss.kl_coef=0.3 "data.datasets=[drive]" & ;;
  ship)  # 'long' with only the two recipes that BENCHMARKS recommends, named as the shipped adapters
    NAMES="ppo-default ppo-arcade"
    ALL=(ppo.advantage=pixel rollout.temperature=0.25 policy.lora.targets=all)
    run ppo-default "${ALL[@]}" ppo.lr=1e-3 ppo.loss.kl_coef=1.0 &
    run ppo-arcade "${ALL[@]}" ppo.lr=3e-3 ppo.loss.kl_coef=0.3 & ;;
  augment)  # the DRIVE-alone run of 'long' lost on DRIVE test while its training reward rose: over-fitting?
    NAMES="aug_kl1 aug_kl0.3_lr3e-3 drive_aug_kl0.3 drive_aug_kl1"
    ALL=(ppo.advantage=pixel rollout.temperature=0.25 policy.lora.targets=all)
    run aug_kl1 "${ALL[@]}" ppo.lr=$LR ppo.loss.kl_coef=1.0 &
    run aug_kl0.3_lr3e-3 "${ALL[@]}" ppo.lr=3e-3 ppo.loss.kl_coef=0.3 &
    run drive_aug_kl0.3 "${ALL[@]}" ppo.lr=$LR ppo.loss.kl_coef=0.3 "data.datasets=[drive]" &
    run drive_aug_kl1 "${ALL[@]}" ppo.lr=$LR ppo.loss.kl_coef=1.0 "data.datasets=[drive]" & ;;
  *) echo "unknown EXPERIMENT=$EXPERIMENT (baselines | topology | regularized | cold | full | pixels | all_layers | long | augment | ship | smoke)"; exit 2 ;;
esac
# supervised continuation, same number of optimizer updates as each PPO run (ITER x epochs)
case $EXPERIMENT in long|augment|ship) ;; *) python3 -m rl_seg.cli sft out=$RUNS/sft_dice model=rl_seg/assets/default_model bce_weight=0.0 dice_weight=1.0 \
  steps=$((ITER * 2)) lr=1e-4 warmup_steps=4 batch_size=8 val_every=$((ITER * 2)) progress=false \
  "data=[drive,arcade]" > "$RUNS/sft_dice.log" 2>&1 & ;; esac
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
# the deadline: ask what still runs to stop after its current iteration (it checkpoints), then wait
( while [ $((SECONDS - T0)) -lt "$DEADLINE" ]; do sleep 5; done
  for n in $NAMES; do [ -d "$RUNS/$n/final_adapter" ] || python3 -c \
    "from pathlib import Path; from rl_seg.run_files import request_stop; request_stop(Path('$RUNS/$n'), 'deadline')"; done
) & WATCH=$!
wait $(jobs -p | grep -v "^$WATCH$")
kill $WATCH 2>/dev/null
for n in $NAMES; do
  grep "\[iter" "$RUNS/$n.log" | tail -1
  if [ ! -d "$RUNS/$n/final_adapter" ]; then  # stopped at the deadline: its last checkpoint's adapter
    last=$(ls -d "$RUNS/$n"/ray_train/*/checkpoint_*/ 2>/dev/null | sort | tail -1)  # folders only
    [ -n "$last" ] && cp -r "$last/adapter" "$RUNS/$n/final_adapter" && echo "$n: stopped at the deadline, adapter of $last"
  fi
done
SFT=(); [ -d "$RUNS/sft_dice" ] && { tail -2 "$RUNS/sft_dice.log"; SFT=(sft_dice/best sft_dice/metrics.jsonl); }
cd "$RUNS" && tar -czf "$OUT/ppo_results.tar.gz" --exclude='ray_train' --exclude='tensorboard' --exclude='checkpoint' \
  $NAMES "${SFT[@]}" ./*.log && ls -la "$OUT"
