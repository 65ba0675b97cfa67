#!/usr/bin/env bash
# Start-up time (torchrun launch until /v2/models/reward/ready) of the scalar server and the PRM server on one
# GPU, 8B-shaped random models (make_model.py). Starts in the order given by ORDER (default: scalar prm prm scalar,
# then the compile caches are wiped and the PRM starts once more: "prm!" = wipe the caches first), each stopped
# with SIGTERM once ready; every server output line is prefixed with seconds since launch.
#   OUT=/tmp/results bash benchmarks/startup_time.sh
# Results: $OUT/startup.txt (one line per start), $OUT/phases.txt (the timed log lines), $OUT/logs.tar.gz.
set -uo pipefail
OUT=${OUT:-/tmp/results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks REWARD_SERVER_ACCESS_TOKEN=${REWARD_SERVER_ACCESS_TOKEN:-bench-token}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
export TORCH_LOGS=${TORCH_LOGS:-recompiles}
ORDER=${ORDER:-scalar prm prm scalar prm!}
LOGS=/tmp/startup-logs; mkdir -p "$LOGS"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

[ -f /tmp/rm8b/config.json ] || python3 benchmarks/make_model.py --out /tmp/rm8b
[ -f /tmp/prm8b/config.json ] || python3 benchmarks/make_model.py --out /tmp/prm8b --head lm
du -sh /tmp/rm8b /tmp/prm8b | tee -a "$OUT/gpu.txt"
PRM_ARGS=(reward=math_shepherd reward.step_tag_source=ids "reward.step_tag_ids=[12902]"
          "reward.candidate_token_ids=[648,387]" reward.max_steps=128)

# every line of the server's output, prefixed with the seconds since T0 (the launch)
STAMP='import sys, time, os
t0 = float(os.environ["T0"])
for line in sys.stdin:
    sys.stdout.write("%8.2f %s" % (time.time() - t0, line)); sys.stdout.flush()'

wait_ready() {  # seconds: polls every 0.2 s; prints the seconds since T0 at readiness
  python3 - "$1" <<'EOF'
import sys, time, os, urllib.request
t0, limit = float(os.environ["T0"]), float(sys.argv[1])
while time.time() - t0 < limit:
    try:
        urllib.request.urlopen("http://localhost:8000/v2/models/reward/ready", timeout=2)
        print("%.1f" % (time.time() - t0)); sys.exit(0)
    except Exception:
        time.sleep(0.2)
sys.exit(1)
EOF
}

n=0
for kind in $ORDER; do
  n=$((n + 1))
  cache=""
  case $kind in *!) kind=${kind%!}; rm -rf "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR" ~/.triton/cache; cache=" (caches wiped)";; esac
  if [ "$kind" = prm ]; then args=(model.path=/tmp/prm8b "${PRM_ARGS[@]}"); else args=(model.path=/tmp/rm8b); fi
  log=$LOGS/$n-$kind.log
  export T0=$(date +%s.%N)
  torchrun --nproc_per_node 1 serve_reward_model.py "${args[@]}" > >(python3 -c "$STAMP" > "$log") 2>&1 &
  pid=$!
  if ready=$(wait_ready ${READY_S:-300}); then
    echo "start $n: $kind$cache ready after $ready s" | tee -a "$OUT/startup.txt"
  else
    echo "start $n: $kind$cache NOT ready" | tee -a "$OUT/startup.txt"; tail -30 "$log"
  fi
  t_stop=$(date +%s.%N)
  kill -TERM $pid 2>/dev/null
  for _ in $(seq 120); do kill -0 $pid 2>/dev/null || break; sleep 0.5; done
  kill -0 $pid 2>/dev/null && kill -KILL $pid
  sleep 1
  echo "  stopped in $(python3 -c "print(round($(date +%s.%N) - $t_stop, 1))") s" | tee -a "$OUT/startup.txt"
  { echo "== start $n: $kind$cache"; grep -E "loading|loaded|process reward|model.compile|warm-up|layout|Triton:|serving|ecompil|Error|error" "$log"; } \
    | tee -a "$OUT/phases.txt"
  tar czf "$OUT/logs.tar.gz" -C /tmp startup-logs
done
