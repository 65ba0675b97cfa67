#!/usr/bin/env bash
# One GPU session's measurements: 8B-shaped random model, our server and the naive server under perf_analyzer,
# and the in-process baselines. Run from the repository root on a GPU box (after the box's own set-up); results
# go to $OUT. Stages run in the order given in STAGES.
#   OUT=/tmp/results bash benchmarks/gpu_suite.sh [server overrides...]
#   NPROC=2 bash benchmarks/gpu_suite.sh parallel.tensor_parallel_size=2    # TP=2 (tensor_parallel_size=1: DP=2)
#   WORKLOADS="rlhf grpo tree" CONCURRENCY=64 LABEL=off bash benchmarks/gpu_suite.sh batching.prefix_sharing=false
# Environment: STAGES (server inprocess naive), WORKLOADS (rlhf; also grpo tree rlhf_tags tree_tags: see
# benchmarks/workload.py; *_tags end steps with token STEP_TAG, 12902), CONCURRENCY (1 8 64), REQUESTS (perf.py's
# --requests), SKIP_CHECK, SKIP_FIXED, CHECK_ARGS, INPROC_N, INPROC_ARGS, LABEL (ours), READY_S (600: the first start
# compiles), MODEL (/tmp/rm8b), MAKE_ARGS (make_model.py's, e.g. --head lm for a PRM).
set -uo pipefail
OUT=${OUT:-/tmp/results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks REWARD_SERVER_ACCESS_TOKEN=${REWARD_SERVER_ACCESS_TOKEN:-bench-token}
MODEL=${MODEL:-/tmp/rm8b}
STAGES=${STAGES:-server inprocess naive}
LABEL=${LABEL:-ours}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"

. benchmarks/lib.sh  # wait_ready, stop

[ -f "$MODEL/config.json" ] || python3 benchmarks/make_model.py --out "$MODEL" ${MAKE_ARGS:-}
VOCAB=$(python3 -c "import json; print(json.load(open('$MODEL/config.json'))['vocab_size'])")
STEP_TAG=${STEP_TAG:-12902}
[ -f /tmp/rlhf.json ] || python3 benchmarks/workload.py --out /tmp/rlhf.json --n 1000 --vocab "$VOCAB"
[ -f /tmp/fixed512.json ] || python3 benchmarks/workload.py --out /tmp/fixed512.json --n 1000 --fixed 512 --vocab "$VOCAB"
for w in ${WORKLOADS:-}; do
  [ -f "/tmp/$w.json" ] && continue
  case $w in
  grpo|tree) python3 benchmarks/workload.py --kind $w --out /tmp/$w.json --n 1024 --vocab "$VOCAB" ;;
  rlhf_tags) python3 benchmarks/workload.py --kind rlhf --out /tmp/$w.json --n 1000 --vocab "$VOCAB" --step-tag $STEP_TAG ;;
  tree_tags) python3 benchmarks/workload.py --kind tree --out /tmp/$w.json --n 1024 --vocab "$VOCAB" --step-tag $STEP_TAG ;;
  esac
done

for stage in $STAGES; do
  case $stage in
  server)
    start=$(date +%s)
    torchrun --nproc_per_node ${NPROC:-1} serve_reward_model.py model.path="$MODEL" "$@" > "$OUT/server.log" 2>&1 &
    pid=$!
    wait_ready localhost:8000 ${READY_S:-600} || { tail -50 "$OUT/server.log"; stop $pid; exit 1; }
    echo "server ready after $(( $(date +%s) - start )) s" | tee "$OUT/startup.txt"
    [ -n "${SKIP_CHECK:-}" ] || python3 -m reward_server.check --model "$MODEL" --n 64 --json ${CHECK_ARGS:-} | tee "$OUT/check.json"
    [ -n "${SKIP_FIXED:-}" ] || python3 benchmarks/perf.py --input /tmp/fixed512.json --concurrency 64 --label "$LABEL fixed-512" | tee "$OUT/perf_fixed512.md"
    for w in ${WORKLOADS:-rlhf}; do
      python3 benchmarks/perf.py --input /tmp/$w.json --concurrency ${CONCURRENCY:-1 8 64} --requests ${REQUESTS:-0} --label "$LABEL $w" | tee "$OUT/perf_$w.md"
    done
    stop $pid
    grep -E "warm-up|compile|engine:|recompil" "$OUT/server.log" | tee "$OUT/engine_stats.txt"
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
