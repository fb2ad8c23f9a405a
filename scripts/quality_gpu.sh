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
# the report then lists the missing rows. WALL_LIMIT (seconds) stops bench.py and its workers at that
# time, for a device lease: rows in flight are lost, the report is written from the finished ones
# and the script exits with status 3 (rerun to go on); TIME_LIMIT then defaults to 5 minutes before
# WALL_LIMIT (a guided 512-step row took about that long with 8 workers). After any other failure
# the report of the finished rows is written too, and bench.py's status returned. DEST sets
# the results folder; with OUT set (the device machine's output folder) the report, quality.json and
# figures are copied there, with one results.tar.gz of the rest (row records, logs, evaluations,
# students' configs, metrics and sample grids; no checkpoints): at most 8 files come back.
# Each student keeps all ten checkpoints: `python bench.py length --workdirs $DEST/students/*`
# afterwards scores them (best and last checkpoint; the quality table scores the last).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax-cache}
if [[ -n "${WALL_LIMIT:-}" ]]; then
  TIME_LIMIT=${TIME_LIMIT:-$(awk -v w="$WALL_LIMIT" 'BEGIN { print (w > 360 ? (w - 300) / 60 : 1) }')}
fi
if [[ -n "${DRY_RUN:-}" ]]; then
  dest=${DEST:-runs/quality-dry}
  set -- --preset tiny --num-samples 24 --reference-count 200 --distill-steps 10 \
    --jobs "${JOBS:-2}" ${TIME_LIMIT:+--time-limit "$TIME_LIMIT"} --out "$dest" "$@"
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
if [[ -n "${WALL_LIMIT:-}" ]]; then  # bench.py and its workers (its children), nothing else
  (
    sleep "$WALL_LIMIT" >/dev/null 2>&1 </dev/null  # holds no pipe open once the watchdog is killed
    pkill -KILL -P "$bench" || true
    kill -KILL "$bench" 2>/dev/null || true
    echo "WALL_LIMIT $WALL_LIMIT s: stopped"
  ) &
  watchdog=$!
fi
wait $bench || status=$?
if [[ -n "${watchdog:-}" ]]; then kill $watchdog 2>/dev/null || true; fi
echo "bench.py quality finished with status $status after $((SECONDS - start)) s"
if [[ $status -ne 0 ]]; then  # the report of the rows that finished
  timeout 300 "$PYTHON" bench.py quality --budget full "$@" --jobs 1 --time-limit 0 || true
  if [[ $status -eq 137 && -n "${WALL_LIMIT:-}" ]]; then status=3; fi
fi
if [[ -n "${OUT:-}" ]]; then
  cp "$dest"/quality.md "$dest"/quality.json "$dest"/*.png "$OUT"/ 2>/dev/null || true
  tar -czf "$OUT"/results.tar.gz --exclude='*.eqx' --exclude='*.claim' \
    --exclude=./quality.md --exclude=./quality.json -C "$dest" . || true
fi
exit $status
