#!/usr/bin/env bash
# A local Ray cluster for rl-seg: one head node, token authentication on, dashboard on 127.0.0.1.
#
#   cluster/local.sh start    start the head (prints the addresses; writes $STATE/head.env to source: RAY_ADDRESS
#                             is the GCS address, which ray.init / rl-seg train / ray status join, and
#                             RAY_API_SERVER_ADDRESS the dashboard's, which ray job submit / rl-seg submit use)
#   cluster/local.sh status   `ray status` of that head
#   cluster/local.sh stop     stop that head and every process it started (and nothing else)
#
# Settings (environment): RL_SEG_RAY_PORT (6379), RL_SEG_DASHBOARD_PORT (8265), RL_SEG_METRICS_PORT (8080: the
# Prometheus endpoint with the runs' rl_seg_* gauges), RL_SEG_NUM_CPUS (all),
# RL_SEG_NUM_GPUS (all), RL_SEG_CLUSTER_STATE (.ray-local/ in the project: pid group, addresses, Ray's temp dir).
#
# Why not plain `ray start` / `ray stop`: `ray stop` kills every Ray process on the machine (a notebook's,
# a test's); this script starts the head in a process group of its own and stops just that group. Ray's own
# temp dir goes under $STATE too, so `ray.init()` elsewhere on the machine does not mistake it for its cluster.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${RL_SEG_VENV:-$ROOT/.venv}
[ -x "$VENV/bin/ray" ] && export PATH="$VENV/bin:$PATH"   # jobs run the head's python: the project's venv
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
PORT=${RL_SEG_RAY_PORT:-6379}
DASHBOARD_PORT=${RL_SEG_DASHBOARD_PORT:-8265}
METRICS_PORT=${RL_SEG_METRICS_PORT:-8080}
STATE=$(realpath -m "${RL_SEG_CLUSTER_STATE:-$ROOT/.ray-local}")
HEAD_ENV=$STATE/head.env

die() { echo "cluster/local.sh: $*" >&2; exit 1; }

running() { [ -f "$HEAD_ENV" ] && . "$HEAD_ENV" && kill -0 -- "-$RL_SEG_HEAD_PGID" 2>/dev/null; }

start() {
  command -v ray >/dev/null || die "ray is not installed: run 'make install' first"
  if running; then die "a head is already running (pgid $RL_SEG_HEAD_PGID, $RAY_ADDRESS); stop it first"; fi
  mkdir -p "$STATE"
  # Token authentication needs a token before the head starts; Ray keeps it in ~/.ray/auth_token (or
  # $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH), where every client on this machine finds it.
  ray get-auth-token --generate >/dev/null
  local args=(--head --node-ip-address=127.0.0.1 --port="$PORT" --include-dashboard=true
              --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --metrics-export-port="$METRICS_PORT"
              --temp-dir="$STATE/ray"
              --disable-usage-stats)
  [ -n "${RL_SEG_NUM_CPUS:-}" ] && args+=(--num-cpus="$RL_SEG_NUM_CPUS")
  [ -n "${RL_SEG_NUM_GPUS:-}" ] && args+=(--num-gpus="$RL_SEG_NUM_GPUS")
  # setsid: the head's daemons inherit a process group of their own, which `stop` ends as a whole.
  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's single-machine mode: the node keeps 127.0.0.1 as its address
  # (else Ray swaps in the machine's reachable one) and its servers listen there only (README, "What listens where").
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 setsid ray start "${args[@]}" >"$STATE/start.log" 2>&1 &
  local launcher=$!
  wait "$launcher" || { cat "$STATE/start.log" >&2; die "ray start failed (log: $STATE/start.log)"; }
  local pgid
  pgid=$(ps -o pgid= -p "$(pgrep -f -n "gcs_server.*$STATE/ray" || echo 0)" 2>/dev/null | tr -d ' ')
  [ -n "$pgid" ] || die "ray start returned but no GCS of this head is running (log: $STATE/start.log)"
  cat >"$HEAD_ENV" <<EOF
export RL_SEG_HEAD_PGID=$pgid
export RAY_ADDRESS=127.0.0.1:$PORT
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RL_SEG_GCS_ADDRESS=127.0.0.1:$PORT
export RL_SEG_METRICS_URL=http://127.0.0.1:$METRICS_PORT/metrics
export RAY_AUTH_MODE=token
EOF
  echo "Ray head running (token authentication on)."
  echo "  dashboard and job API: http://127.0.0.1:$DASHBOARD_PORT"
  echo "  metrics (Prometheus):  http://127.0.0.1:$METRICS_PORT/metrics (rl_seg_* gauges while a run is live)"
  echo "  cluster (GCS):         127.0.0.1:$PORT"
  echo "  in a shell:            source $HEAD_ENV   (RAY_ADDRESS for rl-seg train, RAY_API_SERVER_ADDRESS for jobs)"
  echo "  submit a run:          rl-seg submit --config rl_seg/configs/quickstart.yaml --follow"
  echo "  status service:        rl-seg serve --runs runs --ray-address http://127.0.0.1:$DASHBOARD_PORT"
  echo "  stop:                  cluster/local.sh stop"
}

stop() {
  if ! running; then
    rm -f "$HEAD_ENV"
    echo "no head running"
    return 0
  fi
  kill -TERM -- "-$RL_SEG_HEAD_PGID" 2>/dev/null || true
  # Ray's daemons get 5 s to shut down on SIGTERM (the GCS often ignores it); what is left is killed.
  for _ in $(seq 10); do
    kill -0 -- "-$RL_SEG_HEAD_PGID" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$RL_SEG_HEAD_PGID" 2>/dev/null || true
  rm -f "$HEAD_ENV"
  echo "Ray head stopped"
}

status() {
  running || die "no head running (cluster/local.sh start)"
  ray status --address "$RL_SEG_GCS_ADDRESS"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: cluster/local.sh start|status|stop" >&2; exit 2 ;;
esac
