#!/usr/bin/env bash
# Put a checkpoint that came back from a device call in parts (lr_study.sh with RETURN_RUN: files
# ckpt.part-00, -01, ... and ckpt.name) back into a run's work directory, checked against its
# sha256, so that `RESUME=1 RUNS=NAME experiments/gpu/lr_study.sh` continues that run.
#
#   experiments/gpu/resume_parts.sh PARTS_DIR WORKDIR [CONFIG_JSON]
#
# WORKDIR gets checkpoints/<the checkpoint's own name>; CONFIG_JSON (the run's config.json, from
# results.tar.gz) is copied beside it when WORKDIR has none.
set -euo pipefail
parts=$1 workdir=$2 config=${3:-}
read -r name digest <"$parts/ckpt.name"
mkdir -p "$workdir/checkpoints"
cat "$parts"/ckpt.part-* >"$workdir/checkpoints/$name.tmp"
echo "$digest  $workdir/checkpoints/$name.tmp" | sha256sum -c --quiet - \
  || { rm -f "$workdir/checkpoints/$name.tmp"
       echo "parts in $parts do not rebuild $name (sha256 mismatch): fetch them again" >&2; exit 1; }
mv "$workdir/checkpoints/$name.tmp" "$workdir/checkpoints/$name"
[[ -n $config && ! -f $workdir/config.json ]] && cp "$config" "$workdir/config.json"
echo "rebuilt $workdir/checkpoints/$name"
