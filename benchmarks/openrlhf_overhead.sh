#!/usr/bin/env bash
# Does the OpenRLHF endpoint (server.openrlhf_port) slow Triton's path? The same server is started with it off and
# on, in turn (ROUNDS times), and perf_analyzer measures the `reward` model through Triton each time.
#   MODEL=/path/to/ckpt OUT=/tmp/orl bash benchmarks/openrlhf_overhead.sh [hydra overrides]
# Env: MODEL (checkpoint; default: the embedded default model), NPROC (2), ROUNDS (2), CONCURRENCY (8),
# REQUESTS (256), N / FIXED / VOCAB (workload: 256 sequences of 128 tokens over 512 ids).
set -euo pipefail
OUT=${OUT:-/tmp/openrlhf_overhead}; mkdir -p "$OUT"
export REWARD_SERVER_ACCESS_TOKEN=${REWARD_SERVER_ACCESS_TOKEN:-openrlhf-overhead-token}
python3 benchmarks/workload.py --out "$OUT/w.json" --n "${N:-256}" --fixed "${FIXED:-128}" --vocab "${VOCAB:-512}"
. benchmarks/lib.sh  # wait_ready, stop
for round in $(seq "${ROUNDS:-2}"); do
  for mode in off on; do
    extra=(); [ "$mode" = on ] && extra=(server.openrlhf_port=5000)
    torchrun --nproc_per_node "${NPROC:-2}" serve_reward_model.py ${MODEL:+model.path=$MODEL} "${extra[@]}" "$@" \
      > "$OUT/server-$mode-$round.log" 2>&1 &
    pid=$!
    wait_ready localhost:8000 300 || { tail -30 "$OUT/server-$mode-$round.log"; stop $pid; exit 1; }
    python3 benchmarks/perf.py --input "$OUT/w.json" --concurrency "${CONCURRENCY:-8}" --requests "${REQUESTS:-256}" \
      --label "openrlhf endpoint $mode (round $round)" | tee -a "$OUT/perf.md"
    stop $pid; wait $pid || true
  done
done
