#!/usr/bin/env bash
# One GPU session's measurements: 8B-shaped random model, our server and the naive server under perf_analyzer,
# and the in-process baselines. Run from the repository root on a GPU box (after the box's own set-up); results
# go to $OUT. Stages run in the order given in STAGES.
#   OUT=/tmp/results bash benchmarks/gpu_suite.sh [server overrides...]
#   NPROC=2 bash benchmarks/gpu_suite.sh parallel.tensor_parallel_size=2    # TP=2 (tensor_parallel_size=1: DP=2)
# Environment: STAGES (server inprocess naive), CONCURRENCY (1 8 64), SKIP_CHECK, SKIP_FIXED, CHECK_ARGS,
# INPROC_N, INPROC_ARGS, LABEL (ours), READY_S (600: the first start compiles).
set -uo pipefail
OUT=${OUT:-/tmp/results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks REWARD_SERVER_ACCESS_TOKEN=${REWARD_SERVER_ACCESS_TOKEN:-bench-token}
MODEL=${MODEL:-/tmp/rm8b}
STAGES=${STAGES:-server inprocess naive}
LABEL=${LABEL:-ours}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"

wait_ready() {  # host:port seconds: waits for the model `reward` to be ready
  for _ in $(seq "$2"); do
    python3 -c "import urllib.request,sys; urllib.request.urlopen('http://$1/v2/models/reward/ready', timeout=2)" 2>/dev/null && return 0
    sleep 1
  done
  return 1
}

stop() {  # pid: SIGTERM (the server drains), then wait for it to exit
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq 60); do kill -0 "$1" 2>/dev/null || return 0; sleep 1; done
  kill -KILL "$1" 2>/dev/null
}

[ -f "$MODEL/config.json" ] || python3 benchmarks/make_model.py --out "$MODEL"
VOCAB=$(python3 -c "import json; print(json.load(open('$MODEL/config.json'))['vocab_size'])")
[ -f /tmp/rlhf.json ] || python3 benchmarks/workload.py --out /tmp/rlhf.json --n 1000 --vocab "$VOCAB"
[ -f /tmp/fixed512.json ] || python3 benchmarks/workload.py --out /tmp/fixed512.json --n 1000 --fixed 512 --vocab "$VOCAB"

for stage in $STAGES; do
  case $stage in
  server)
    start=$(date +%s)
    torchrun --nproc_per_node ${NPROC:-1} serve_reward_model.py model.path="$MODEL" "$@" > "$OUT/server.log" 2>&1 &
    pid=$!
    wait_ready localhost:8000 ${READY_S:-600} || { tail -50 "$OUT/server.log"; stop $pid; exit 1; }
    echo "server ready after $(( $(date +%s) - start )) s" | tee "$OUT/startup.txt"
    [ -n "${SKIP_CHECK:-}" ] || python3 benchmarks/check_server.py --model "$MODEL" --n 64 ${CHECK_ARGS:-} | tee "$OUT/check.json"
    [ -n "${SKIP_FIXED:-}" ] || python3 benchmarks/perf.py --input /tmp/fixed512.json --concurrency 64 --label "$LABEL fixed-512" | tee "$OUT/perf_fixed512.md"
    python3 benchmarks/perf.py --input /tmp/rlhf.json --concurrency ${CONCURRENCY:-1 8 64} --label "$LABEL rlhf" | tee "$OUT/perf_rlhf.md"
    stop $pid
    grep -E "warm-up|compile|engine:" "$OUT/server.log" | tee "$OUT/engine_stats.txt"
    ;;
  inprocess)
    python3 benchmarks/inprocess.py --model "$MODEL" --n ${INPROC_N:-384} --chunk 64 ${INPROC_ARGS:-} --json "$OUT/inprocess.json" 2>&1 | grep -v Warning
    ;;
  naive)
    python3 benchmarks/naive_server.py --model "$MODEL" --port 8010 > "$OUT/naive.log" 2>&1 &
    pid=$!
    wait_ready localhost:8010 300 || { tail -50 "$OUT/naive.log"; stop $pid; exit 1; }
    python3 benchmarks/perf.py --url localhost:8010 --input /tmp/rlhf.json --concurrency 64 --label "naive rlhf" | tee "$OUT/perf_naive.md"
    stop $pid
    ;;
  esac
done
