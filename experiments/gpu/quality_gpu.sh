#!/usr/bin/env bash
# Issue 12's whole full-budget quality table on one GPU (resumable). Measured on one H200 (jax 0.11.2,
# experiments/results/study-gpu.md): 14 of the then 36 rows (38 now) in two runs. The first finished 8 rows (reference
# statistics included) before its 510 s WALL_LIMIT stopped 4 more; the second, 6 rows in 196 s. The
# longest rows took 320-400 s with 8 workers sharing the card (512-step teachers, k = 1 and 8
# students).
#
#   experiments/gpu/quality_gpu.sh              # 38 rows into runs/quality-full (resumable: rerun to go on)
#   DRY_RUN=1 experiments/gpu/quality_gpu.sh    # the same pipeline on a CPU in minutes (tiny preset)
#   JOBS=4 TIME_LIMIT=5 experiments/gpu/quality_gpu.sh --no-fid   # extra options go to `python -m experiments quality`
#
# The rows (the teacher at 8-512 steps over guidance and gamma; both variants at k = 1, 2, 4, 8 with
# two weightings each, and at k = 1 with dmd and --time-sampling grid) are shared among JOBS worker processes (`python -m experiments quality --jobs`, claim
# files); the reference statistics are computed once (a lock file). Every finished row is cached, so a
# killed or time-limited run continues where it stopped. No row starts after TIME_LIMIT minutes;
# the report then lists the missing rows.
#
# WALL_LIMIT (whole seconds), for a device lease, stops the claims run and its workers at that time: rows
# in flight are lost (a student resumes from its last checkpoint), the report of the finished rows is
# written (at most 2 minutes more: leave that much before the lease's end) and the script exits with
# status 3 (rerun to go on). TIME_LIMIT then defaults to 6 minutes before WALL_LIMIT, a trade-off:
# rows started later may not finish, and workers idle earlier. Ctrl-C stops everything at once.
# Without WALL_LIMIT the claims run runs in the foreground (Ctrl-C reaches every worker, as usual).
#
# After any failure the report of the finished rows is written too. DEST sets the results folder;
# with OUT set (the device machine's output folder) the report, quality.json and figures are copied
# there, with one results.tar.gz of the rest (row records, logs, evaluations, students' configs,
# metrics and sample grids; no checkpoints): at most 8 files come back. Each student keeps all ten
# checkpoints; `--checkpoint best` (an extra option) adds each student's best-checkpoint row: its ten
# checkpoints scored on --select-samples (2,000) samples of seed 1, the best scored again like every
# row (not yet timed on a GPU). Checkpoints do not come back, so a student finished on an earlier
# device is trained again for its best row.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax-cache}
if [[ -n "${WALL_LIMIT:-}" ]]; then
  if ! [[ $WALL_LIMIT =~ ^[0-9]+$ ]]; then
    echo "WALL_LIMIT must be whole seconds, got '$WALL_LIMIT'" >&2
    exit 2
  fi
  TIME_LIMIT=${TIME_LIMIT:-$(awk -v w="$WALL_LIMIT" 'BEGIN { print (w > 420 ? (w - 360) / 60 : 1) }')}
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
if [[ -z "${WALL_LIMIT:-}" ]]; then
  "$PYTHON" -m experiments quality --budget full "$@" || status=$?
else
  "$PYTHON" -m experiments quality --budget full "$@" &
  bench=$!
  stop() {  # the claims run and its workers (its children), nothing else; it first, so it cannot
    # see its workers die and exit on its own before it is counted as stopped
    kill -STOP "$bench" 2>/dev/null || true
    pkill -KILL -P "$bench" || true
    kill -KILL "$bench" 2>/dev/null || true
  }
  stopped=$(mktemp -u)
  (
    sleep "$WALL_LIMIT" >/dev/null 2>&1 </dev/null  # holds no pipe open
    : >"$stopped"
    stop
    echo "WALL_LIMIT $WALL_LIMIT s: stopped"
  ) &
  watchdog=$!
  end_watchdog() {
    pkill -P "$watchdog" 2>/dev/null || true  # its sleep
    kill "$watchdog" 2>/dev/null || true
  }
  trap 'stop; end_watchdog; exit 130' INT TERM
  wait $bench || status=$?
  end_watchdog
  trap - INT TERM
  if [[ -e $stopped ]]; then
    rm -f "$stopped"
    status=3
  fi
fi
echo "python -m experiments quality finished with status $status after $((SECONDS - start)) s"
if [[ $status -ne 0 ]]; then  # the report of the rows that finished
  timeout 120 "$PYTHON" -m experiments quality --budget full "$@" --jobs 1 --time-limit 0 || true
fi
if [[ -n "${OUT:-}" ]]; then
  cp "$dest"/quality.md "$dest"/quality.json "$dest"/*.png "$OUT"/ 2>/dev/null || true
  tar -czf "$OUT"/results.tar.gz --exclude='*.eqx' --exclude='*.claim' \
    --exclude=./quality.md --exclude=./quality.json -C "$dest" . || true
fi
exit $status
