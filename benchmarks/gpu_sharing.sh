#!/usr/bin/env bash
# The prefix-sharing table of docs/performance.md on one GPU box, in one call: the 8B Llama-shaped RM (bf16, server
# defaults) under perf_analyzer at 64 clients (benchmarks/perf.py, one sequence per request), sharing on vs off on
# GRPO, tree search and RLHF traffic, and a math-shepherd-style PRM against the scalar RM on the same tree paths
# (tree_tags: a step tag ends every step). For every run the server's own counters (tokens received, computed,
# taken from the prefix cache, forwards) and its engine lines (GPU ms per forward) are kept, so the table also
# gives the saving taken against the workload's ideal, tokens computed per forward and the GPU's computed tokens/s
# (what benchmarks/standin.py's fault_injection.standin.tokens_per_s and shared_speed stand for). Then the parity
# check through the prefix cache (each GRPO group in two requests of 4). Results in $OUT (table.md last).
#   OUT=/tmp/sharing bash benchmarks/gpu_sharing.sh
# Env: OUT (/tmp/sharing), MODEL (/tmp/rm8b) and PRM_MODEL (/tmp/prm8b), made by make_model.py when missing;
# CONCURRENCY (64), REQUESTS (perf.py's --requests; 0: 8 x clients), N (1024 sequences per workload), READY_S (900),
# STAGES (scalar_on scalar_off scalar_i8 prm check soak; scalar_i8: sharing on with 8 Triton instances, the default
# before adf5162, for GRPO and the tree; soak: benchmarks/soak.py against the 8B model in bf16, SOAK_REQUESTS
# requests, 20000 (issue #31: >= 20 k of the 8B model), each reward by the bf16 rule per reward), SERVER_ARGS (overrides for every server).
set -uo pipefail
OUT=${OUT:-/tmp/sharing}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks:${PYTHONPATH:-}
export REWARD_SERVER_ACCESS_TOKEN=${REWARD_SERVER_ACCESS_TOKEN:-bench-token}
MODEL=${MODEL:-/tmp/rm8b}; PRM_MODEL=${PRM_MODEL:-/tmp/prm8b}
CONCURRENCY=${CONCURRENCY:-64}; N=${N:-1024}; STEP_TAG=12902
STAGES=${STAGES:-scalar_on scalar_off scalar_i8 prm check soak}
PRM_ARGS="reward=math_shepherd reward.step_tag_source=ids reward.step_tag_ids=[$STEP_TAG] reward.candidate_token_ids=[648,387] reward.max_steps=128"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse --short HEAD | tee "$OUT/commit.txt"

. benchmarks/lib.sh  # wait_ready, stop

[ -f "$MODEL/config.json" ] || python3 benchmarks/make_model.py --out "$MODEL"
if [[ " $STAGES " == *" prm "* ]] && [ ! -f "$PRM_MODEL/config.json" ]; then
  python3 benchmarks/make_model.py --out "$PRM_MODEL" --head lm
fi
VOCAB=$(python3 -c "import json; print(json.load(open('$MODEL/config.json'))['vocab_size'])")
for w in grpo tree rlhf; do
  [ -f "$OUT/$w.json" ] || python3 benchmarks/workload.py --kind $w --out "$OUT/$w.json" --n "$N" --vocab "$VOCAB" | tee -a "$OUT/workloads.txt"
done
[ -f "$OUT/tree_tags.json" ] || python3 benchmarks/workload.py --kind tree --out "$OUT/tree_tags.json" --n "$N" --vocab "$VOCAB" --step-tag $STEP_TAG | tee -a "$OUT/workloads.txt"

counters() {  # the server's reward_server_* counters as JSON
  python3 - <<'PY'
import json, re, urllib.request
text = urllib.request.urlopen("http://localhost:8002/metrics", timeout=30).read().decode()
print(json.dumps({m[1]: float(m[2]) for m in re.finditer(r"^reward_server_([a-z_]+?)(?:_total)? ([0-9.e+-]+)$", text, re.M)}))
PY
}

run_server() {  # label workloads... -- overrides...
  local label=$1; shift
  local workloads=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do workloads+=("$1"); shift; done; shift
  torchrun --nproc_per_node 1 serve_reward_model.py server.stats_log_s=10 ${SERVER_ARGS:-} "$@" > "$OUT/server_$label.log" 2>&1 &
  local pid=$!
  if ! wait_ready localhost:8000 "${READY_S:-900}" "$pid"; then
    echo "$label: not ready"; tail -40 "$OUT/server_$label.log"; stop "$pid"; return 1
  fi
  for w in "${workloads[@]}"; do
    counters > "$OUT/counters_${label}_${w}_before.json"
    python3 benchmarks/perf.py --input "$OUT/$w.json" --concurrency $CONCURRENCY --requests "${REQUESTS:-0}" \
      --label "$label $w" | tee "$OUT/perf_${label}_${w}.md"
    counters > "$OUT/counters_${label}_${w}_after.json"
  done
  stop "$pid"; wait "$pid" 2>/dev/null
  grep -E "engine:|prefix cache:|warm-up" "$OUT/server_$label.log" > "$OUT/engine_$label.txt"
}

for stage in $STAGES; do
  case $stage in
  scalar_on) run_server scalar_on grpo tree rlhf tree_tags -- model.path="$MODEL" ;;
  scalar_off) run_server scalar_off grpo tree rlhf -- model.path="$MODEL" batching.prefix_sharing=false ;;
  scalar_i8) run_server scalar_i8 grpo tree -- model.path="$MODEL" batching.instances=8 ;;  # the default before adf5162
  prm) run_server prm_on tree_tags -- model.path="$PRM_MODEL" $PRM_ARGS ;;
  check)
    torchrun --nproc_per_node 1 serve_reward_model.py ${SERVER_ARGS:-} model.path="$MODEL" > "$OUT/server_check.log" 2>&1 &
    pid=$!
    if wait_ready localhost:8000 "${READY_S:-900}" "$pid"; then
      python3 -m reward_server.check --model "$MODEL" --n 256 --inputs "$OUT/grpo.json" --request-rows 4 --json \
        > "$OUT/check_grpo.json" 2> "$OUT/check_grpo.err"; echo "check exit $?" | tee -a "$OUT/check_grpo.err"
    fi
    stop "$pid"; wait "$pid" 2>/dev/null
    ;;
  soak)
    python3 benchmarks/soak.py --model "$MODEL" --nproc 1 --device cuda --requests "${SOAK_REQUESTS:-20000}" --clients 64 \
      --out "$OUT/soak" --json "$OUT/soak.json" ${SERVER_ARGS:-} > "$OUT/soak.log" 2>&1; echo "soak exit $?" | tee -a "$OUT/soak.log"
    ;;
  esac
done

# the table: tokens/s from perf.py; received / computed and per forward from the counters; ideal from workload.py
python3 - "$OUT" <<'PY' | tee "$OUT/table.md"
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
def perf(label, w):
    f = out / f"perf_{label}_{w}.md"
    rows = [l.split("|") for l in f.read_text().splitlines() if l.startswith(f"| {label} {w} |")] if f.exists() else []
    return float(rows[-1][4]) if rows else None
def delta(label, w):
    try:
        a = json.loads((out / f"counters_{label}_{w}_after.json").read_text())
        b = json.loads((out / f"counters_{label}_{w}_before.json").read_text())
    except FileNotFoundError:
        return None
    return {k: a.get(k, 0) - b.get(k, 0) for k in ("tokens_received", "tokens_computed", "tokens_reused", "forwards")}
ideal = {m[1]: m[2] for m in re.finditer(r"/(\w+)\.json: .*?: ([0-9.]+)x fewer tokens", (out / "workloads.txt").read_text())} \
    if (out / "workloads.txt").exists() else {}
print("| workload | server | tokens/s (64 clients) | on / off | received / computed (ideal) | computed per forward |")
print("|---|---|---|---|---|---|")
for w, label, base in [("grpo", "scalar_on", "scalar_off"), ("grpo", "scalar_off", None), ("tree", "scalar_on", "scalar_off"),
                       ("tree", "scalar_off", None), ("rlhf", "scalar_on", "scalar_off"), ("rlhf", "scalar_off", None),
                       ("tree_tags", "scalar_on", None), ("tree_tags", "prm_on", "scalar_on"),
                       ("grpo", "scalar_i8", None), ("tree", "scalar_i8", None)]:
    t, d = perf(label, w), delta(label, w)
    if t is None:
        continue
    ref = perf(base, w) if base else None
    ratio = f"{t / ref:.2f}x" if ref else "-"
    saved = f"{d['tokens_received'] / max(1, d['tokens_computed']):.2f}x ({ideal.get(w, '?')}x)" if d else "?"
    per = f"{d['tokens_computed'] / max(1, d['forwards']):,.0f}" if d else "?"
    print(f"| {w} | {label} | {t:,.0f} | {ratio} | {saved} | {per} |")
print()
print("prm_on vs scalar_on on tree_tags is the PRM / scalar ratio (same tokens); scalar_i8: 8 Triton instances (16 by")
print("default since adf5162). GPU ms per forward and computed")
print("tokens/s: engine_*.txt (the engine's lines every 10 s).")
PY
