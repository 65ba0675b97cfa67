#!/usr/bin/env bash
# The API port against Triton on one GPU (issue 28): the 8B-shaped RM (benchmarks/make_model.py), one rank, defaults,
# and benchmarks/api_load.py's per-sample GRPO load through POST /classify and through Triton's `reward` model,
# rounds alternating the order. Results in $OUT: api_load.md (the table), server.log, gpu.txt, commit.txt.
#   OUT=/tmp/api_load bash benchmarks/api_load_gpu.sh [server overrides...]
# Env: MODEL (/tmp/rm8b, made when missing), N (512 samples per run), CALLERS (64), ROUNDS (4), READY_S (900).
set -uo pipefail
OUT=${OUT:-/tmp/api_load}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks:${PYTHONPATH:-}
MODEL=${MODEL:-/tmp/rm8b}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
. benchmarks/lib.sh  # wait_ready, stop
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_model.py --out "$MODEL"
VOCAB=$(python3 -c "import json; print(json.load(open('$MODEL/config.json'))['vocab_size'])")
torchrun --standalone --nproc_per_node 1 serve_reward_model.py model.path="$MODEL" "$@" > "$OUT/server.log" 2>&1 &
pid=$!
if ! wait_ready localhost:8000 "${READY_S:-900}" "$pid"; then tail -40 "$OUT/server.log"; stop "$pid"; exit 1; fi
python3 benchmarks/api_load.py --triton localhost:8000 --api localhost:30000 --metrics localhost:8002 --n "${N:-512}" \
  --callers "${CALLERS:-64}" --rounds "${ROUNDS:-4}" --vocab "$VOCAB" --max-tokens 8192 | tee "$OUT/api_load.md"
stop "$pid"; wait "$pid" 2>/dev/null
grep -E "engine:|ready after" "$OUT/server.log" | tee -a "$OUT/api_load.md"
