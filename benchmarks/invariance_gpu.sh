#!/usr/bin/env bash
# Batch-invariant mode on a GPU (issue #32; NOT RUN YET: the mode is measured on the CPU only, docs/invariance.md).
# For the 8B-shaped model (benchmarks/make_model.py), the mode on and off: check --invariance (bit mismatches alone vs
# random batches, groups, repeats; exit 1 on any) and tokens/s under perf_analyzer for RLHF, GRPO and tree traffic.
# With the mode on the server's start-up self-test may refuse to start (a `cannot start:` line in server.log): on
# the GPU split-K GEMMs, flex_attention's block order and compiled reductions are not made invariant yet.
#   OUT=/tmp/results bash benchmarks/invariance_gpu.sh [server overrides...]
# Results: $OUT/invariant-{on,off}/ (check.json, perf_{rlhf,grpo,tree}.md, server.log), as benchmarks/gpu_suite.sh.
set -uo pipefail
OUT=${OUT:-/tmp/results}
for mode in on off; do
  flag=$([ $mode = on ] && echo true || echo false)
  OUT="$OUT/invariant-$mode" STAGES=server WORKLOADS="rlhf grpo tree" SKIP_FIXED=1 LABEL="invariant-$mode" \
    CHECK_ARGS="--invariance" bash benchmarks/gpu_suite.sh batching.batch_invariant=$flag "$@" \
    || echo "invariant-$mode: the suite failed (see $OUT/invariant-$mode/server.log)"
done
grep -h "PASS\|FAIL\|mismatches" "$OUT"/invariant-*/check.json 2>/dev/null
