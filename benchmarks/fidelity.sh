#!/usr/bin/env bash
# Fidelity report (issue 15): one server's rewards (OVERRIDES, default model.quantization=fp8) against plain
# transformers in bfloat16 and float32, over the first N sequences of a workload, on every label of the model:
# max / mean |d|, Spearman, pairs ordered alike (python -m reward_server.check). The references (minutes for an 8B
# model in float32) are computed while the server starts, and kept in $OUT/refs.npz for the next run.
#   OUT=/tmp/fidelity MODEL=/tmp/rm8b bash benchmarks/fidelity.sh
# Env: OUT (/tmp/fidelity), MODEL (/tmp/rm8b, made by benchmarks/make_model.py --fitted-label when missing),
# WORKLOAD (rlhf), N (1000), NPROC (1), OVERRIDES (model.quantization=fp8), CHECK_ARGS (--quantized; empty for a
# bf16 server), READY_S (600), SPEED (concurrencies, e.g. "64": then also tokens/s of the same server under
# benchmarks/perf.py on the workload, and of a baseline server started after it with BASELINE (overrides, default
# none: bf16 defaults), with REQUESTS per point; a table vs the baseline in $OUT/speed.md), GATE (added to OVERRIDES:
# by default model.quantization_min_spearman=-1 model.quantization_min_pairs=0, so that the start-up fidelity gate
# measures and never refuses: the random-weight model fails it; its figures go to $OUT/gate.txt; GATE= keeps the bar).
set -uo pipefail
OUT=${OUT:-/tmp/fidelity}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks:${PYTHONPATH:-}
export REWARD_SERVER_ACCESS_TOKEN=${REWARD_SERVER_ACCESS_TOKEN:-bench-token}
MODEL=${MODEL:-/tmp/rm8b}; WORKLOAD=${WORKLOAD:-rlhf}; N=${N:-1000}
OVERRIDES=${OVERRIDES-model.quantization=fp8}; CHECK_ARGS=${CHECK_ARGS---quantized}
GATE=${GATE-model.quantization_min_spearman=-1 model.quantization_min_pairs=0}
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_model.py --out "$MODEL" --fitted-label
# num_labels from transformers: a config of 2 labels (the default) does not write them
read -r VOCAB LABELS < <(python3 -c "from transformers import AutoConfig; c=AutoConfig.from_pretrained('$MODEL'); print(c.vocab_size, c.num_labels)")
[ -f "$OUT/$WORKLOAD.json" ] || python3 benchmarks/workload.py --kind "$WORKLOAD" --out "$OUT/$WORKLOAD.json" --n "$N" --vocab "$VOCAB"
inputs=(--model "$MODEL" --inputs "$OUT/$WORKLOAD.json" --n "$N" --references "$OUT/refs.npz")

. benchmarks/lib.sh  # wait_ready, stop

python3 -m reward_server.check "${inputs[@]}" --references-only > "$OUT/refs.log" 2>&1 &
refs=$!
start=$(date +%s)
# shellcheck disable=SC2086
torchrun --nproc_per_node "${NPROC:-1}" serve_reward_model.py model.path="$MODEL" $OVERRIDES $GATE > "$OUT/server.log" 2>&1 &
pid=$!
if ! wait_ready localhost:8000 "${READY_S:-600}" "$pid"; then
  echo "$OVERRIDES: not ready"; tail -30 "$OUT/server.log"; stop "$pid"; kill "$refs" 2>/dev/null; exit 1
fi
echo "$OVERRIDES: ready after $(( $(date +%s) - start )) s"
grep -o 'fidelity gate, .*' "$OUT/server.log" | tee "$OUT/gate.txt"
wait "$refs" || { echo "references failed"; tail -30 "$OUT/refs.log"; stop "$pid"; exit 1; }
cat "$OUT/refs.log"
status=0
for label in $(seq 0 $((LABELS - 1))); do
  # shellcheck disable=SC2086
  python3 -m reward_server.check "${inputs[@]}" --label "$label" $CHECK_ARGS | tee "$OUT/label$label.txt" || status=1
  # shellcheck disable=SC2086
  python3 -m reward_server.check "${inputs[@]}" --label "$label" $CHECK_ARGS --json > "$OUT/label$label.json" 2>> "$OUT/check.err"
done
speed() {  # label: perf.py rows for the server on :8000
  # shellcheck disable=SC2086
  python3 benchmarks/perf.py --input "$OUT/$WORKLOAD.json" --concurrency $SPEED --requests "${REQUESTS:-0}" \
    --label "$WORKLOAD: $1" | tee -a "$OUT/perf.md"
}
[ -n "${SPEED:-}" ] && { : > "$OUT/perf.md"; speed "${OVERRIDES:-defaults}"; }
stop "$pid"; wait "$pid" 2>/dev/null
if [ -n "${SPEED:-}" ]; then
  start=$(date +%s)
  # shellcheck disable=SC2086
  torchrun --nproc_per_node "${NPROC:-1}" serve_reward_model.py model.path="$MODEL" ${BASELINE:-} > "$OUT/baseline.log" 2>&1 &
  pid=$!
  if wait_ready localhost:8000 "${READY_S:-600}" "$pid"; then
    echo "baseline ${BASELINE:-(defaults)}: ready after $(( $(date +%s) - start )) s"
    speed "${BASELINE:-defaults}"
  else
    echo "baseline: not ready"; tail -30 "$OUT/baseline.log"; status=1
  fi
  stop "$pid"; wait "$pid" 2>/dev/null
  python3 benchmarks/versus.py "$OUT/perf.md" --base "${BASELINE:-defaults}" | tee "$OUT/speed.md"
fi
exit $status
