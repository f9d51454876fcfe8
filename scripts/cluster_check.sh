#!/usr/bin/env bash
# make cluster-check          (as root: a one-node Slurm cluster on this machine, then the smoke matrix on it)
#
# 1. scripts/slurm_local.sh up (installs slurm-wlm + munge if missing; leaves a cluster that was already up alone)
# 2. export-all --matrix smoke hydra/launcher=slurm with a fresh stage cache; once the FP32 cell is exporting its
#    second stage, scancel its job. Expect: that cell FAILED with Slurm's reason, its directory not accepted by
#    `vlmforge verify`, the FP16 cell done (it builds the stages the killed cell had locked).
# 3. the same command again: it finishes only what is missing (the FP32 cell's stages come from the cache),
#    every artifact set passes `vlmforge verify`; prints the final table.
# 4. scripts/slurm_local.sh down, unless the cluster was up before or KEEP_CLUSTER=1.
# Work folder: .work/cluster-check/<time>/ (kept; printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
T0=$(date +%s)
say() { echo "cluster-check: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

was_up=0
if command -v sinfo >/dev/null && sinfo -h >/dev/null 2>&1; then was_up=1; fi
scripts/slurm_local.sh up
teardown() { if [ "$was_up" = 0 ] && [ "${KEEP_CLUSTER:-0}" != 1 ]; then scripts/slurm_local.sh down; fi; }
trap teardown EXIT

WORK=$(pwd)/.work/cluster-check/$(date +%Y%m%d-%H%M%S)
mkdir -p "$WORK"
OUT=$WORK/out
ARGS=(--matrix smoke "out_dir=$OUT" "cache_dir=$WORK/cache" validate.chain_tokens=4 hydra/launcher=slurm
      hydra.launcher.cpus_per_task=1  # mem_gb stays null: estimated from the checkpoint (2 GB here)
      hydra.launcher.timeout_min=20)
LOGS=$OUT/logs
VICTIM=qwen2_5_vl_small

say "run 1: the smoke matrix on Slurm; scancel the $VICTIM job mid-build"
"$VENV/bin/vlmforge" export-all "${ARGS[@]}" >"$WORK/run1.out" 2>"$WORK/run1.err" &
RUN1=$!
job=""
for _ in $(seq 600); do
    if [ -f "$LOGS/$VICTIM.log" ] && grep -q "embedding: exporting" "$LOGS/$VICTIM.log"; then
        job=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["slurm_job"])' "$LOGS/$VICTIM.started.json")
        break
    fi
    kill -0 $RUN1 2>/dev/null || break
    sleep 0.5
done
[ -n "$job" ] || { cat "$WORK/run1.err" >&2; fail "the $VICTIM cell never reached its embedding export"; }
say "scancel $job ($VICTIM is exporting its embedding)"
scancel "$job"
rc1=0; wait $RUN1 || rc1=$?
cat "$WORK/run1.out"
[ "$rc1" = 1 ] || fail "run 1 exited $rc1, expected 1 (one cell failed); see $WORK/run1.err"
grep -E "^$VICTIM +FAILED .*CANCELLED" "$WORK/run1.out" >/dev/null || fail "$VICTIM not reported FAILED/CANCELLED"
grep -E "^qwen2_5_vl_small_fp16 +ok " "$WORK/run1.out" >/dev/null || fail "the FP16 cell did not complete"
if [ -d "$OUT/tiny-qwen2_5_vl/fp32-392" ] && "$VENV/bin/vlmforge" verify "$OUT/tiny-qwen2_5_vl/fp32-392" >/dev/null 2>&1; then
    fail "the cancelled cell left a directory that verify accepts"
fi
say "run 1 as expected: $VICTIM FAILED (cancelled), nothing of it verifies, the FP16 cell ok"

say "run 2: the same matrix again"
rc2=0; "$VENV/bin/vlmforge" export-all "${ARGS[@]}" >"$WORK/run2.out" 2>"$WORK/run2.err" || rc2=$?
[ "$rc2" = 0 ] || { cat "$WORK/run2.out"; tail -20 "$WORK/run2.err"; fail "run 2 exited $rc2"; }
grep -E "^$VICTIM +ok .*3/3 stages" "$WORK/run2.out" >/dev/null || fail "run 2 rebuilt stages the cache held"
for d in "$OUT"/tiny-qwen2_5_vl/fp32-392 "$OUT"/tiny-qwen2_5_vl/fp16-392; do
    "$VENV/bin/vlmforge" verify "$d" | tail -1
done
say "final table:"
cat "$WORK/run2.out"
say "passed in $(( $(date +%s) - T0 )) s (work folder $WORK)"
