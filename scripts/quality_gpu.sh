#!/usr/bin/env bash
# Issue 12's whole full-budget quality table on one GPU in one run (aim: at most 9 minutes).
#
#   scripts/quality_gpu.sh              # 36 rows into runs/quality-full (resumable: rerun to go on)
#   DRY_RUN=1 scripts/quality_gpu.sh    # the same pipeline on a CPU in minutes (tiny preset)
#   JOBS=4 TIME_LIMIT=5 scripts/quality_gpu.sh --no-fid   # extra options go to bench.py quality
#
# The rows (the teacher at 8-512 steps over guidance and gamma; both variants at k = 1, 2, 4, 8 with
# two weightings each) are shared among JOBS worker processes (`bench.py quality --jobs`, claim
# files); the reference statistics are computed once (a lock file). Every finished row is cached, so a
# killed or time-limited run continues where it stopped. No row starts after TIME_LIMIT minutes;
# the report then lists the missing rows. DEST sets the results folder; with OUT set (the device
# machine's output folder) the report, quality.json, figures, row records and logs are copied there.
# Each student keeps all ten checkpoints: `python bench.py length --workdirs $DEST/students/*`
# afterwards scores them (best and last checkpoint; the quality table scores the last).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax-cache}
if [[ -n "${DRY_RUN:-}" ]]; then
  dest=${DEST:-runs/quality-dry}
  set -- --preset tiny --num-samples 24 --reference-count 200 --distill-steps 10 \
    --jobs "${JOBS:-2}" --out "$dest" "$@"
else
  dest=${DEST:-runs/quality-full}
  set -- --jobs "${JOBS:-8}" --eval-batch-size 500 --time-limit "${TIME_LIMIT:-7}" \
    --out "$dest" "$@"
fi
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
start=$SECONDS
status=0
"$PYTHON" bench.py quality --budget full "$@" || status=$?
echo "bench.py quality finished with status $status after $((SECONDS - start)) s"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT/rows" "$OUT/logs"
  cp "$dest"/quality.md "$dest"/quality.json "$dest"/*.png "$OUT"/ 2>/dev/null || true
  cp "$dest"/rows/*.json "$OUT"/rows/ 2>/dev/null || true
  cp "$dest"/logs/*.log "$OUT"/logs/ 2>/dev/null || true
fi
exit $status
