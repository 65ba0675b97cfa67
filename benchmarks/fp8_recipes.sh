#!/usr/bin/env bash
# FP8 recipes on one GPU (issue 30): bf16 and each model.quantization recipe served in turn on the same box, each
# measured three ways: tokens/s under perf_analyzer (benchmarks/perf.py, CONCURRENCY clients), the order of its
# rewards against float32 transformers on every label (python -m reward_server.check --quantized --json), and the
# start-up fidelity gate's own figures against the unquantized bf16 model (the reward_server_quantization_* metrics)
# with its start-up seconds; then one table, $OUT/table.md (benchmarks/fp8_table.py), speed vs bf16 beside Spearman.
#   OUT=/tmp/fp8 MODEL=/tmp/rm8b bash benchmarks/fp8_recipes.sh
# Env: OUT (/tmp/fp8), MODEL (/tmp/rm8b, made by make_model.py --fitted-label when missing), WORKLOAD (rlhf), N (1000:
# sequences of the workload, for both the check and perf_analyzer), CONCURRENCY (64), REQUESTS (1024 per point),
# RECIPES ("bf16 fp8 fp8_tensor fp8_mlp fp8_skip_ends fp8_mlp_skip_ends"; each one's results stay in $OUT/<recipe>/ and
# the table takes every recipe found there, so a later run of a few RECIPES adds to it), GATE (overrides of every FP8
# server, default: the gate measures and never refuses, as the random-weight model fails it), EXTRA (overrides of every
# server), READY_S (900). The float32 references (3 min for 8B) are computed once, while the first server starts, and
# kept in $OUT/refs.npz. Every server runs alone on GPU 0; cards and versions go to $OUT/box.txt.
set -uo pipefail
OUT=${OUT:-/tmp/fp8}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks:${PYTHONPATH:-}
export REWARD_SERVER_ACCESS_TOKEN=${REWARD_SERVER_ACCESS_TOKEN:-bench-token}
MODEL=${MODEL:-/tmp/rm8b}; WORKLOAD=${WORKLOAD:-rlhf}; N=${N:-1000}
RECIPES=${RECIPES:-bf16 fp8 fp8_tensor fp8_mlp fp8_skip_ends fp8_mlp_skip_ends}
GATE=${GATE-model.quantization_min_spearman=-1 model.quantization_min_pairs=0}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  git rev-parse --short HEAD
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "import torchao; print('torchao', torchao.__version__)" 2>/dev/null || echo "no torchao"; } > "$OUT/box.txt"
cat "$OUT/box.txt"
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_model.py --out "$MODEL" --fitted-label
read -r VOCAB LABELS < <(python3 -c "from transformers import AutoConfig; c=AutoConfig.from_pretrained('$MODEL'); print(c.vocab_size, c.num_labels)")
[ -f "$OUT/$WORKLOAD.json" ] || python3 benchmarks/workload.py --kind "$WORKLOAD" --out "$OUT/$WORKLOAD.json" --n "$N" --vocab "$VOCAB"
inputs=(--model "$MODEL" --inputs "$OUT/$WORKLOAD.json" --n "$N" --references "$OUT/refs.npz")

. benchmarks/lib.sh  # wait_ready, stop

refs=""
if [ ! -f "$OUT/refs.npz" ]; then
  python3 -m reward_server.check "${inputs[@]}" --references-only > "$OUT/refs.log" 2>&1 &
  refs=$!
fi
status=0
for recipe in $RECIPES; do
  dir="$OUT/$recipe"; rm -rf "$dir"; mkdir -p "$dir"
  overrides="model.path=$MODEL server.stats_log_s=10 ${EXTRA:-}"; check_args=()
  [ "$recipe" != bf16 ] && { overrides="$overrides model.quantization=$recipe $GATE"; check_args=(--quantized); }
  start=$(date +%s)
  # shellcheck disable=SC2086
  torchrun --nproc_per_node 1 serve_reward_model.py $overrides > "$dir/server.log" 2>&1 &
  pid=$!
  if ! wait_ready localhost:8000 "${READY_S:-900}" "$pid"; then
    echo "$recipe: not ready"; tail -5 "$dir/server.log"; stop "$pid"; wait "$pid" 2>/dev/null; status=1; continue
  fi
  echo "$(( $(date +%s) - start ))" > "$dir/ready_s"
  echo "$recipe: ready after $(cat "$dir/ready_s") s"
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://localhost:8002/metrics', timeout=10).read().decode())" \
    | grep '^reward_server_quantization_' > "$dir/gate.prom"
  grep -o 'fidelity gate, .*' "$dir/server.log" > "$dir/gate.txt"
  if [ -n "$refs" ]; then
    wait "$refs" || { echo "references failed"; tail -30 "$OUT/refs.log"; stop "$pid"; exit 1; }
    refs=""
  fi
  for label in $(seq 0 $((LABELS - 1))); do
    python3 -m reward_server.check "${inputs[@]}" --label "$label" "${check_args[@]}" --json > "$dir/label$label.json" \
      2>> "$dir/check.err"
  done
  python3 benchmarks/perf.py --input "$OUT/$WORKLOAD.json" --concurrency "${CONCURRENCY:-64}" \
    --requests "${REQUESTS:-1024}" --label "$WORKLOAD: $recipe" > "$dir/perf.md" || status=1
  cat "$dir/perf.md"
  stop "$pid"; wait "$pid" 2>/dev/null
done
python3 benchmarks/fp8_table.py "$OUT" | tee "$OUT/table.md"
exit $status
