#!/usr/bin/env bash
# Scale-out table (issue 13): the same model and workload through the server in several layouts, one after the
# other on the same box, each under perf_analyzer at several concurrencies; then one table with tokens/s vs the
# first layout. Each layout is "NPROC [overrides...]"; separate layouts with ';'.
#   OUT=/tmp/scaling MODEL=/tmp/rm8b bash benchmarks/scaling.sh
#   LAYOUTS="1; 2 parallel.tensor_parallel_size=1; 4 parallel.tensor_parallel_size=1" CONCURRENCY="64 128 256" ...
# Env: LAYOUTS (default: TP=1 on 1 rank; DP=2; TP=2; TP=2 with model.compile=true), CONCURRENCY (64 128),
# REQUESTS (perf.py's --requests, 0: its default), WORKLOADS (rlhf: benchmarks/workload.py's kinds, each run in
# every layout; WORKLOAD is the old name), N (1000),
# VOCAB (the model's), MODEL (/tmp/rm8b, made by benchmarks/make_model.py when missing), READY_S (600),
# CHECK (indices of the layouts, from 0, whose rewards `python -m reward_server.check` compares with plain
# transformers after the perf runs: check<i>.json; CHECK_ARGS its extra arguments, e.g. --device cuda:1).
set -uo pipefail
OUT=${OUT:-/tmp/scaling}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks:${PYTHONPATH:-}
export REWARD_SERVER_ACCESS_TOKEN=${REWARD_SERVER_ACCESS_TOKEN:-bench-token}
MODEL=${MODEL:-/tmp/rm8b}
LAYOUTS=${LAYOUTS:-"1; 2 parallel.tensor_parallel_size=1; 2 parallel.tensor_parallel_size=2; 2 parallel.tensor_parallel_size=2 model.compile=true"}
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_model.py --out "$MODEL"
VOCAB=${VOCAB:-$(python3 -c "import json; print(json.load(open('$MODEL/config.json'))['vocab_size'])")}
WORKLOADS=${WORKLOADS:-${WORKLOAD:-rlhf}}
for wl in $WORKLOADS; do
  [ -f "$OUT/$wl.json" ] || python3 benchmarks/workload.py --kind "$wl" --out "$OUT/$wl.json" --n "${N:-1000}" --vocab "$VOCAB"
done

. benchmarks/lib.sh  # wait_ready, stop

: > "$OUT/perf.md"
i=0
IFS=';' read -ra layouts <<< "$LAYOUTS"
for layout in "${layouts[@]}"; do
  read -ra words <<< "$layout"
  nproc=${words[0]}; overrides=("${words[@]:1}")
  label="nproc=$nproc ${overrides[*]}"
  start=$(date +%s)
  torchrun --nproc_per_node "$nproc" serve_reward_model.py model.path="$MODEL" "${overrides[@]}" > "$OUT/server$i.log" 2>&1 &
  pid=$!
  if wait_ready localhost:8000 "${READY_S:-600}" "$pid"; then
    echo "$label: ready after $(( $(date +%s) - start )) s" | tee -a "$OUT/startup.txt"
    for wl in $WORKLOADS; do
      python3 benchmarks/perf.py --input "$OUT/$wl.json" --concurrency ${CONCURRENCY:-64 128} --requests "${REQUESTS:-0}" \
        --label "$wl: $label" | tee -a "$OUT/perf.md"
    done
    if [[ " ${CHECK:-} " == *" $i "* ]]; then
      python3 -m reward_server.check --model "$MODEL" --n 64 --json ${CHECK_ARGS:-} > "$OUT/check$i.json" 2> "$OUT/check$i.err"
      python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'parity:', 'PASS' if r['pass'] else 'FAIL', {k: round(v['mean_abs_diff'], 4) for k, v in r.items() if isinstance(v, dict)})" "$OUT/check$i.json" "$label" | tee -a "$OUT/startup.txt"
    fi
  else
    echo "$label: not ready" | tee -a "$OUT/startup.txt"; tail -30 "$OUT/server$i.log"
  fi
  stop "$pid"; wait "$pid" 2>/dev/null
  i=$((i + 1))
done

python3 benchmarks/versus.py "$OUT/perf.md" | tee "$OUT/scaling.md"
