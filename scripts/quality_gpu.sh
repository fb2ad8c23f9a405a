#!/usr/bin/env bash
# Issue 12's whole full-budget quality table on one GPU (resumable). Measured on one H200 (jax 0.11.2):
# 14 of the 36 rows in two runs, 510 s (8 rows, reference statistics included) and 196 s (6 rows);
# the 512-step teacher rows are the slowest (about 120 s of sampling each, 8 workers sharing).
#
#   scripts/quality_gpu.sh              # 36 rows into runs/quality-full (resumable: rerun to go on)
#   DRY_RUN=1 scripts/quality_gpu.sh    # the same pipeline on a CPU in minutes (tiny preset)
#   JOBS=4 TIME_LIMIT=5 scripts/quality_gpu.sh --no-fid   # extra options go to bench.py quality
#
# The rows (the teacher at 8-512 steps over guidance and gamma; both variants at k = 1, 2, 4, 8 with
# two weightings each) are shared among JOBS worker processes (`bench.py quality --jobs`, claim
# files); the reference statistics are computed once (a lock file). Every finished row is cached, so a
# killed or time-limited run continues where it stopped. No row starts after TIME_LIMIT minutes;
# the report then lists the missing rows. WALL_LIMIT (seconds) stops every worker at that time, for a
# device lease: rows in flight are lost, and the report is written from the finished ones. DEST sets
# the results folder; with OUT set (the device machine's output folder) the report, quality.json and
# figures are copied there, with one results.tar.gz of the rest (row records, logs, evaluations,
# students' configs, metrics and sample grids; no checkpoints): at most 8 files come back.
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
"$PYTHON" bench.py quality --budget full "$@" &
bench=$!
if [[ -n "${WALL_LIMIT:-}" ]]; then  # the workers are children of bench.py: stop them all
  (sleep "$WALL_LIMIT" && pkill -KILL -f "bench.py quality" && echo "WALL_LIMIT $WALL_LIMIT s: stopped") &
  watchdog=$!
fi
wait $bench || status=$?
[[ -n "${watchdog:-}" ]] && { kill $watchdog 2>/dev/null || true; }
echo "bench.py quality finished with status $status after $((SECONDS - start)) s"
if [[ $status -ne 0 && -n "${WALL_LIMIT:-}" ]]; then  # the report of the rows that finished
  "$PYTHON" bench.py quality --budget full "$@" --jobs 1 --time-limit 0 || true
fi
if [[ -n "${OUT:-}" ]]; then
  cp "$dest"/quality.md "$dest"/quality.json "$dest"/*.png "$OUT"/ 2>/dev/null || true
  tar -czf "$OUT"/results.tar.gz --exclude='*.eqx' --exclude='*.claim' -C "$dest" . || true
fi
exit $status
