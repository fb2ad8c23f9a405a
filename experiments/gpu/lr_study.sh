#!/usr/bin/env bash
# The learning-rate study on one GPU: several 8-step students trained at once (one process each),
# every kept checkpoint scored by fd_mnist, the best and the last by FID on 10,000 samples, the
# texture check (score_run.py), and the teacher's row (128 steps, guidance 0.1) as the control.
#
#   experiments/gpu/lr_study.sh                 # the study's six runs, results into $DEST
#   RUNS="alt-edm-1e-5" STEPS=4000 experiments/gpu/lr_study.sh
#   DRY_RUN=1 PYTHON=.venv/bin/python experiments/gpu/lr_study.sh   # tiny preset, CPU, minutes
#
# Each run trains at batch $BATCH for $STEPS steps, at most $TRAIN_S seconds (then SIGTERM:
# train.py checkpoints the step it is at, and the run is scored from there; rerun with RESUME=1 to
# continue it). With OUT set (the device machine's output folder) it writes one results.tar.gz
# (configs, metrics, scores, sample npz of 2,000 images per run, logs) and, if RETURN_RUN names a
# run (`best`: the run of the lowest last FID), that run's newest checkpoint split into 15 MiB parts (ckpt.part-*), which
# `experiments/gpu/resume_parts.sh` reassembles for the next device call.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
DEST=${DEST:-runs/gpu-lr}
BATCH=${BATCH:-512}
STEPS=${STEPS:-2000}
EVERY=${EVERY:-250}
TRAIN_S=${TRAIN_S:-380}
NUM=${NUM:-10000}
CURVE=${CURVE:-2000}
EVAL_BATCH=${EVAL_BATCH:-1000}
# name: variant weighting lr k
declare -A SPEC=(
  [alt-edm-3e-5]="alternating edm 3e-5 8"
  [alt-edm-1e-5]="alternating edm 1e-5 8"
  [alt-edm-3e-6]="alternating edm 3e-6 8"
  [alt-flat-1e-5]="alternating flat 1e-5 8"
  [inst-edm-1e-5]="instant edm 1e-5 8"
  [inst-edm-3e-6]="instant edm 3e-6 8"
  [inst-flat-1e-5]="instant flat 1e-5 8"
  [alt-flat-1e-5-k4]="alternating flat 1e-5 4"
  [alt-flat-1e-5-k2]="alternating flat 1e-5 2"
  [alt-flat-1e-5-k1]="alternating flat 1e-5 1"
)
RUNS=${RUNS:-"alt-edm-3e-5 alt-edm-1e-5 alt-edm-3e-6 alt-flat-1e-5 inst-edm-1e-5 inst-edm-3e-6"}
extra=()
score_extra=()
if [[ -n "${DRY_RUN:-}" ]]; then
  DEST=${DEST/gpu-lr/gpu-lr-dry}
  extra=(--preset tiny)
  score_extra=(--reference-count 200 --teacher checkpoints/tiny_teacher.eqx)
  STEPS=${DRY_STEPS:-20}; EVERY=10; BATCH=16; NUM=64; CURVE=32; EVAL_BATCH=32
fi
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax-cache}
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
jobs=$(wc -w <<<"$RUNS")
threads=$(( $(nproc) / (jobs + 1) )); (( threads < 1 )) && threads=1
export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
mkdir -p "$DEST/logs"
t0=$SECONDS
deadline=$(( $(date +%s) + TRAIN_S + ${SCORE_S:-150} ))
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
git rev-parse HEAD 2>/dev/null | sed 's/^/commit /'

one_run() {  # NAME: train (time-limited), then score
  local name=$1 variant weighting lr k
  read -r variant weighting lr k <<<"${SPEC[$name]}"
  local workdir="$DEST/$name"
  timeout -s TERM -k 60 "$TRAIN_S" "$PYTHON" train.py "${extra[@]}" --variant "$variant" --k "$k" \
    --weighting "$weighting" --lr "$lr" --aux-lr "$lr" --batch-size "$BATCH" --steps "$STEPS" \
    --checkpoint-every "$EVERY" --sample-every "$STEPS" --keep-checkpoints 1000 --seed 0 \
    --workdir "$workdir" ${RESUME:+--resume} >"$DEST/logs/$name.train.log" 2>&1
  echo "$name: train exit $? at $((SECONDS - t0)) s"
  "$PYTHON" experiments/gpu/score_run.py "$workdir" --out "$DEST/$name/scores" \
    --curve-samples "$CURVE" --num-samples "$NUM" --batch-size "$EVAL_BATCH" --deadline "$deadline" "${score_extra[@]}" \
    >"$DEST/logs/$name.score.log" 2>&1
  echo "$name: scored, exit $? at $((SECONDS - t0)) s"
}

teacher_row() {  # the control: the teacher's best setting, and its samples' texture check
  local teacher=checkpoints/mnist_teacher.eqx k=128 g=0.1
  [[ -n "${DRY_RUN:-}" ]] && { teacher=checkpoints/tiny_teacher.eqx; k=8; g=0; }
  [[ -f $teacher ]] || { echo "teacher $teacher missing"; return; }
  "$PYTHON" eval.py --checkpoint "$teacher" --k "$k" --guidance "$g" --num-samples "$NUM" \
    --batch-size "$EVAL_BATCH" ${DRY_RUN:+--reference-count 200} --save-samples \
    --out "$DEST/teacher/full" >"$DEST/logs/teacher.eval.log" 2>&1
  echo "teacher: scored, exit $? at $((SECONDS - t0)) s"
  local npz
  npz=$(ls "$DEST"/teacher/full/*_samples.npz 2>/dev/null | head -1)
  [[ -n $npz ]] && "$PYTHON" experiments/gpu/score_run.py --samples "$npz" \
    --out "$DEST/teacher/scores" --batch-size "$EVAL_BATCH" --deadline "$deadline" "${score_extra[@]}" \
    >"$DEST/logs/teacher.score.log" 2>&1
  echo "teacher: texture check exit $? at $((SECONDS - t0)) s"
}

if [[ -n "${DRY_RUN:-}" && ! -f checkpoints/tiny_teacher.eqx ]]; then
  "$PYTHON" train.py --preset tiny --variant teacher --steps 50 --workdir runs/tiny-teacher-dry \
    >"$DEST/logs/tiny-teacher.log" 2>&1 \
    && cp runs/tiny-teacher-dry/teacher.eqx checkpoints/tiny_teacher.eqx
fi
# NO_FID=1: fd_mnist only (no Inception weights needed), no teacher row, no texture check
[[ -n "${NO_FID:-}" ]] && score_extra+=(--no-fid)
[[ -z "${NO_FID:-}" ]] && teacher_row &  # computes and caches the reference statistics while the students compile
for name in $RUNS; do
  one_run "$name" &
done
# Everything ends by the deadline (+30 s): what is still scoring then is stopped, so that the
# results of the finished parts are packed before a device call's own limit.
while [[ -n "$(jobs -rp)" ]] && (( $(date +%s) < deadline + 30 )); do sleep 2; done
if [[ -n "$(jobs -rp)" ]]; then
  echo "deadline: stopping $(jobs -rp | wc -l) unfinished jobs"
  for pid in $(jobs -rp); do pkill -KILL -P "$pid"; kill -KILL "$pid"; done 2>/dev/null
fi
echo "all done at $((SECONDS - t0)) s"
"$PYTHON" experiments/gpu/summarize.py "$DEST" | tee "$DEST/summary.md"

if [[ -n "${OUT:-}" ]]; then
  "$PYTHON" experiments/gpu/summarize.py "$DEST" --pack "$OUT/results.tar.gz"
  cp "$DEST/summary.md" "$OUT/"
  [[ ${RETURN_RUN:-} == best ]] && RETURN_RUN=$("$PYTHON" experiments/gpu/summarize.py "$DEST" --best)
  if [[ -n "${RETURN_RUN:-}" ]]; then
    last=$(ls "$DEST/$RETURN_RUN"/checkpoints/ckpt_*.eqx 2>/dev/null | sort -t_ -k2 -n | tail -1)
    used=$(du -cb "$OUT" | tail -1 | cut -f1)
    # a device call returns at most 64 MiB: the checkpoint only if it fits beside the results
    if [[ -n $last ]] && (( used + $(stat -c %s "$last") < 62 * 1024 * 1024 )); then
      split -b 15M -d "$last" "$OUT/ckpt.part-"
      echo "$(basename "$last") $(sha256sum <"$last" | cut -c1-64)" >"$OUT/ckpt.name"
    else
      echo "checkpoint not returned: $used bytes of results already in $OUT"
    fi
  fi
  ls -la "$OUT"
fi
echo "total $((SECONDS - t0)) s"
