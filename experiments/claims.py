"""The claims table: the paper's claims on MNIST, judged from distilled students and the teacher.

    python -m experiments quality [--budget small|full] [--out runs/quality-small] [--jobs N]
                                  [--no-fid] [--lr LR] [--time-limit MIN] [--rows NAME ...]
                                  [--checkpoint last|best] [--select-samples 2000]

Distils students from the shipped teacher (checkpoints/mnist_teacher.eqx) and scores teacher and
students with eval.py's protocol (FID, precision, recall, fd_mnist, label accuracy; `--no-fid`: the
MNIST metrics only, minutes instead of hours on a CPU). Rows (full budget, 38): the teacher at 8,
32, 128 and 512 steps, and at 128 and 512 steps over guidance {0, 0.1, 0.3} x sampling noise gamma
{0, 0.1, 0.3} (the "teacher's best" the claims compare with); students of both variants at k = 8 and
4 (flat and edm weighting) and k = 2 and 1 (flat and dmd; at k = 1 also dmd with `--time-sampling
grid`), 1,000 steps at batch 128 each. `small`: 1,000 samples, k = 8 (edm) and 1 (flat), the teacher
at 8, 32, 128, 512 steps (and 512 with guidance 0.1), the preset's distillation length. Every
finished row (a trained student, a result JSON) is cached in --out under its name and settings, so a
rerun skips it and several runs complete one table; `--jobs N` shares the rows among N worker
processes (claim files; the reference statistics are computed once: eval.reference_statistics' lock
file makes the other workers wait for them). Writes quality.md (verdicts: holds / fails / missing,
and the table), quality.json (the rows, schema QUALITY_SCHEMA; experiments/results/quality.json),
fid_vs_steps.png (or fd_mnist_vs_steps.png), samples.png (the best teacher's and the best student's
grid at each k, same labels) and instant_loss.png. `--checkpoint best` adds a row per student at its
best kept checkpoint (the paper reports its best): every checkpoint scored on --select-samples
samples of sampling seed --seed + 1, the lowest scored again like every row, so the reported number
is not a minimum over noisy values; verdicts are given at the last and at the best checkpoints.
`--preset tiny --num-samples 24 --reference-count 200 --distill-steps 10` is a few-minute dry run of
the whole pipeline on a CPU. On a 2-core CPU a 1,000-sample row of the 512-step teacher takes about
40 minutes (sampling) and Inception 8-20 images/s; on one H200 shared by 6-8 workers a full-budget
row took 1-6.5 minutes (experiments/results/study-gpu.md).
"""

import collections
import dataclasses
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

import data
import eval as evaluation
import options
import train
from checkpoint import read_meta
from experiments.bench import TEACHER, Counts, write_json
from experiments.length import checkpoint_scores, newer

TEACHER_CURVE = (8, 32, 128, 512)
"""Teacher sampling steps of the FID-against-steps curve (guidance 0, gamma 0); 8 steps is the
students' undistilled starting point."""


TEACHER_TUNED = tuple(
    (steps, guidance, gamma)
    for steps in (512, 128)
    for guidance in (0.0, 0.1, 0.3)
    for gamma in (0.0, 0.1, 0.3)
)
"""(steps, guidance, gamma) over which the teacher's best many-step score is taken: the claims'
reference, as the paper compares with a teacher of tuned guidance and sampling noise."""


BUDGETS = {
    "small": {
        "num_samples": 1000,
        "students": {8: ("edm",), 1: ("flat",)},
        "grid": {},
        "tuned": ((512, 0.0, 0.0), (512, 0.1, 0.0)),
        "distill": None,  # the preset's steps and batch
    },
    "full": {
        "num_samples": 10_000,
        "students": {
            8: ("edm", "flat"),
            4: ("edm", "flat"),
            2: ("flat", "dmd"),
            1: ("flat", "dmd"),
        },
        "grid": {1: ("dmd",)},
        "tuned": TEACHER_TUNED,
        "distill": (1000, 128),
    },
}
"""Per budget: samples per row, the students' {k: weightings} (the first is the headline one;
flat or dmd for k <= 2 as the paper prescribes), those also trained with `--time-sampling grid`
(k = 1: study-rings.md section 5), the teacher settings of the best-teacher reference, and
(distillation steps, batch) unless the command line sets them."""


CLAIMS = (
    ("alternating", 8, 1.0),
    ("instant", 8, 1.0),
    ("alternating", 4, 1.25),
    (None, 2, 2.0),
    (None, 1, 3.0),
)
"""(variant or None for the better of the two, k, factor): "the student's score <= factor x the
teacher's best" (the study's targets). Factor 1 at k = 8 is the paper's claim (its 8-step students
match or beat the tuned teacher); 1.25, 2 and 3 at k = 4, 2, 1 are the project's tolerances for
fewer steps (the paper's 1-step FID is about 2.4x its best 8-step one)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the quality table: the teacher sampled with `steps` steps, `guidance` and
    `gamma`, or a student of `variant` distilled for k = `steps` with `weighting` and
    `time_sampling` (train.py's `--time-sampling`), scored at its last checkpoint or (`checkpoint`
    "best", `select_checkpoint`) at the one a held-out selection prefers."""

    variant: str
    steps: int
    guidance: float = 0.0
    gamma: float = 0.0
    weighting: str | None = None
    time_sampling: str = "paper"
    checkpoint: str = "last"

    @property
    def name(self) -> str:
        if self.variant == "teacher":
            noise = f"-gamma{self.gamma:g}" if self.gamma else ""
            return f"teacher-{self.steps}-w{self.guidance:g}{noise}"
        grid = "" if self.time_sampling == "paper" else f"-{self.time_sampling}"
        best = "-best" if self.checkpoint == "best" else ""
        return f"{self.variant}-k{self.steps}-{self.weighting}{grid}{best}"

    @property
    def last(self) -> "Row":
        """The row of the same student scored at its last checkpoint (a teacher row: itself)."""
        return dataclasses.replace(self, checkpoint="last")


def with_best(rows: Sequence[Row]) -> list[Row]:
    """`rows` with each student followed by its best-checkpoint row (`checkpoint="best"`)."""
    out = []
    for row in rows:
        out.append(row)
        if row.variant != "teacher":
            out.append(dataclasses.replace(row, checkpoint="best"))
    return out


def quality_rows(budget: str) -> list[Row]:
    """The rows of a budget, headline first (so that a run cut short has the main comparison): the
    8-step students, the 512- and 8-step teachers, the 1-step students; then the tuned teachers,
    the teacher curve and the other students."""
    spec = BUDGETS[budget]
    students = [
        Row(variant, k, weighting=weighting, time_sampling=sampling)
        for sampling, per_k in (("paper", spec["students"]), ("grid", spec["grid"]))
        for k, weightings in per_k.items()
        for weighting in weightings
        for variant in ("instant", "alternating")
    ]
    first = {k: weightings[0] for k, weightings in spec["students"].items()}
    headline = [r for r in students if r.steps == 8 and r.weighting == first[8]]
    headline += [Row("teacher", 512), Row("teacher", 8)]
    headline += [r for r in students if r.steps == 1 and r.weighting == first[1]]
    teachers = [Row("teacher", s, g, n) for s, g, n in spec["tuned"]]
    teachers += [Row("teacher", s) for s in TEACHER_CURVE]
    rest = teachers + sorted(students, key=lambda r: -r.steps)
    return list(dict.fromkeys(headline + rest))


def student_tag(config: "QualityBench") -> str:
    """What a student's result depends on besides its row: learning rates, length, batch, seed."""
    aux = "" if config.aux_lr == config.lr else f"-aux{config.aux_lr:g}"
    return (
        f"lr{config.lr:g}{aux}-{config.distill_steps}x{config.distill_batch_size}-seed{config.seed}"
    )


def run_name(row: Row, config: "QualityBench") -> str:
    """The row's name, with the student settings (`student_tag`) for a student: the name of its
    training folder, its evaluation folder and its cached result."""
    return row.name if row.variant == "teacher" else f"{row.name}-{student_tag(config)}"


def student_workdir(row: Row, config: "QualityBench") -> pathlib.Path:
    """The training folder of `row`'s student, `out/students/<name>-<tag>` (shared by its last-
    and best-checkpoint rows)."""
    return pathlib.Path(config.out) / "students" / run_name(row.last, config)


def train_student(
    row: Row, *, config: "QualityBench", teacher: pathlib.Path
) -> tuple[pathlib.Path, float]:
    """The final checkpoint of `row`'s student, trained (or resumed) in
    `out/students/<name>-<tag>` unless finished, and its training wall time from metrics.jsonl
    (first step's compilation included). The run keeps all its checkpoints (at most ten, every
    10% of the steps), so `python -m experiments length --workdirs OUT/students/*` gives each
    one's best and last."""
    steps = config.distill_steps
    workdir = student_workdir(row, config)
    final = workdir / "checkpoints" / f"ckpt_{steps:08d}.eqx"
    if not final.exists():
        settings = dataclasses.replace(
            train.PRESETS[config.preset],
            variant=row.variant,
            k=row.steps,
            weighting=row.weighting,
            time_sampling=row.time_sampling,
            lr=config.lr,
            aux_lr=config.aux_lr,
            teacher=str(teacher),
            workdir=str(workdir),
            steps=steps,
            batch_size=config.distill_batch_size,
            # the same values as the preset's distillation defaults, so config.json has one length
            distill_steps=steps,
            distill_batch_size=config.distill_batch_size,
            seed=config.seed,
            resume=True,
            sample_every=max(steps // 5, 1),
            # at most ten checkpoints, all kept: `python -m experiments length` gives best and last
            checkpoint_every=-(-steps // 10),
            keep_checkpoints=10,
        )
        final = train.train(settings)
    last = (workdir / "metrics.jsonl").read_text().splitlines()[-1]
    return final, float(json.loads(last)["time"])


def evaluate_row(row: Row, checkpoint: pathlib.Path, *, config: "QualityBench") -> dict:
    """eval.py's record for `row` (FID, precision, recall unless --no-fid; fd_mnist and label
    accuracy for MNIST models) against the test split, from `checkpoint`."""
    teacher = row.variant == "teacher"
    return evaluation.evaluate(
        evaluation.EvalConfig(
            checkpoint=str(checkpoint),
            num_samples=config.num_samples,
            batch_size=config.eval_batch_size,
            seed=config.seed,
            # absolute: the result records its sample grid's path
            out=str(pathlib.Path(config.out).resolve() / "eval" / run_name(row, config)),
            k=row.steps if teacher else None,
            guidance=row.guidance,
            gamma=row.gamma,
            fid=config.fid,
            reference_count=config.reference_count,
        )
    )


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def select_checkpoint(row: Row, *, config: "QualityBench") -> tuple[pathlib.Path, dict]:
    """The kept checkpoint of `row`'s student with the lowest score (FID, or fd_mnist with
    --no-fid) on `config.select_samples` samples of sampling seed `config.seed + 1`, and the
    selection's record (metric, samples, seed, chosen step, every checkpoint's score). The
    sampling seed is one the table does not report (the reference test images are the same), so
    the chosen checkpoint's reported score is not the minimum of noisy values; the paper reports
    its best checkpoint at fixed seeds."""
    metric = "fid" if config.fid else "fd_mnist"
    workdir, seed = student_workdir(row, config), config.seed + 1
    scores = checkpoint_scores(
        workdir,
        num_samples=config.select_samples,
        seed=seed,
        fid=config.fid,
        batch_size=config.eval_batch_size,
        reference_count=config.reference_count,
    )
    # a non-finite or missing score (a diverged checkpoint) is never the best
    best = min(scores, key=lambda r: r[metric] if _finite(r.get(metric)) else math.inf)
    selection = {
        "metric": metric,
        "num_samples": config.select_samples,
        "seed": seed,
        "step": best["step"],
        "scores": {str(r["step"]): r.get(metric) for r in scores},
    }
    return workdir / "checkpoints" / f"ckpt_{best['step']:08d}.eqx", selection


def score_row(row: Row, final: pathlib.Path, *, config: "QualityBench") -> dict:
    """`evaluate_row`'s record of `row` at `final` (the teacher, or the student's last
    checkpoint), or for a best-checkpoint row at `select_checkpoint`'s choice, with the selection
    recorded (the last row's record when the choice is `final` and that row was cached since
    `final` was written: the same checkpoint, seed and samples)."""
    if row.checkpoint != "best":
        return evaluate_row(row, final, config=config)
    chosen, selection = select_checkpoint(row, config=config)
    last = row_path(row.last, config)
    if chosen.name == final.name and newer(last, than=final):
        record = json.loads(last.read_text())
    else:
        record = evaluate_row(row, chosen, config=config)
    return {**record, "selection": selection}


def row_path(row: Row, config: "QualityBench") -> pathlib.Path:
    """Where a finished row is cached: its name, the student settings, sample count, seed, metric
    set, reference count and, for a best-checkpoint row, the selection's sample count (rows
    measured differently never mix)."""
    ref = "" if config.reference_count is None else f"_ref{config.reference_count}"
    fid = "" if config.fid else "_nofid"
    select = f"_select{config.select_samples}" if row.checkpoint == "best" else ""
    stem = f"{run_name(row, config)}_n{config.num_samples}_seed{config.seed}{fid}{ref}{select}"
    return pathlib.Path(config.out) / "rows" / f"{stem}.json"


def load_rows(rows: Sequence[Row], config: "QualityBench") -> dict[Row, dict]:
    """The cached results of `rows` that exist."""
    return {
        row: json.loads(row_path(row, config).read_text())
        for row in rows
        if row_path(row, config).exists()
    }


def _ordered(results: dict[Row, dict]) -> list[Row]:
    """Teacher rows by steps, guidance and gamma, then students by variant, k and weighting."""
    return sorted(
        results,
        key=lambda r: (
            r.variant != "teacher",
            r.variant,
            r.steps,
            r.guidance,
            r.gamma,
            r.weighting or "",
            r.time_sampling,
        ),
    )


def _weighting_cell(q: dict) -> str:
    """The weighting, with the time sampling where it is not the paper's."""
    grid = "" if q["time_sampling"] in (None, "paper") else f", t {q['time_sampling']}"
    return (q["weighting"] or "—") + grid


def quality_table(results: dict[Row, dict]) -> str:
    """Markdown table of finished rows (quality_json_rows' fields, plus timings)."""
    header = "sampler | k | weighting | guidance | gamma | lr | distillation | FID | precision | "
    header += "recall | fd_mnist | label acc. | samples | train (s) | sampling (s)"
    lines = [f"| {header} |", "|" + " --- |" * (header.count("|") + 1)]
    for row, q in zip(_ordered(results), quality_json_rows(results)):
        r = results[row]
        distill = "—" if q["distill_steps"] is None else f"{q['distill_steps']} @ {q['batch_size']}"
        if q["checkpoint"] == "best":
            distill = f"best {q['checkpoint_step']} of {distill}, {q['selected_from']} kept"
        cells = [
            q["sampler"],
            str(q["k"]),
            _weighting_cell(q),
            f"{q['guidance']:g}",
            f"{q['gamma']:g}",
            evaluation.cell(q["lr"], "g"),
            distill,
            evaluation.cell(q["fid"], ".2f"),
            evaluation.cell(q["precision"], ".3f"),
            evaluation.cell(q["recall"], ".3f"),
            evaluation.cell(q["fd_mnist"], ".2f"),
            evaluation.cell(q["label_accuracy"], ".3f"),
            str(q["num_samples"]),
            evaluation.cell(r["train_seconds"], ".0f"),
            f"{r['timings_s']['sampling']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUALITY_SCHEMA = {
    "sampler": str,
    "k": int,
    "weighting": (str, type(None)),
    "time_sampling": (str, type(None)),
    "guidance": float,
    "gamma": float,
    "lr": (float, type(None)),
    "distill_steps": (int, type(None)),
    "batch_size": (int, type(None)),
    "checkpoint": (str, type(None)),
    "checkpoint_step": (int, type(None)),
    "selected_from": (int, type(None)),
    "fid": (float, type(None)),
    "precision": (float, type(None)),
    "recall": (float, type(None)),
    "fd_mnist": (float, type(None)),
    "label_accuracy": (float, type(None)),
    "num_samples": int,
    "device": str,
    "inception_protocol": str,
}
"""The fields of a experiments/results/quality.json row and their types (None: not measured, e.g.
`--no-fid`, or not applicable); a row has FID or fd_mnist. A student row's `checkpoint` is
"last" or "best" (`select_checkpoint`), `checkpoint_step` the distillation step it was saved at,
of `distill_steps`, and `selected_from` (best rows) the number of kept checkpoints compared."""


SCORES = ("fid", "precision", "recall", "fd_mnist", "label_accuracy")
"""The QUALITY_SCHEMA fields copied from eval.py's record (None where not measured)."""


def quality_json_rows(results: dict[Row, dict]) -> list[dict]:
    """One QUALITY_SCHEMA row per finished result, in `quality_table`'s order."""
    rows = []
    for row in _ordered(results):
        r = results[row]
        student = row.variant != "teacher"
        rows.append(
            validate_quality_row(
                {
                    "sampler": row.variant,
                    "k": row.steps,
                    "weighting": row.weighting,
                    "time_sampling": row.time_sampling if student else None,
                    "guidance": float(row.guidance),
                    "gamma": float(row.gamma),
                    "lr": float(r["config"]["lr"]) if student else None,
                    "distill_steps": r["distill_steps"] if student else None,
                    "batch_size": r["distill_batch_size"] if student else None,
                    "checkpoint": row.checkpoint if student else None,
                    "checkpoint_step": r["step"] if student else None,
                    "selected_from": len(r["selection"]["scores"]) if "selection" in r else None,
                    **{name: r.get(name) for name in SCORES},
                    "num_samples": r["num_samples"],
                    "device": r["machine"]["devices"],
                    "inception_protocol": r["feature_protocol"],
                }
            )
        )
    return rows


def validate_quality_row(row: dict) -> dict:
    """`row` itself if it has exactly QUALITY_SCHEMA's fields with their types, a known sampler
    and checkpoint, k >= 1 and a score (FID or fd_mnist); ValueError otherwise."""
    if set(row) != set(QUALITY_SCHEMA):
        raise ValueError(
            "quality row fields differ from the schema: missing "
            f"{sorted(set(QUALITY_SCHEMA) - set(row))}"
            f", unknown {sorted(set(row) - set(QUALITY_SCHEMA))}"
        )
    wrong = [
        name
        for name, kind in QUALITY_SCHEMA.items()
        if not isinstance(row[name], kind) or isinstance(row[name], bool)
    ]
    if wrong:
        raise ValueError(f"quality row has wrong types in {wrong}: {row}")
    known = row["sampler"] in ("teacher", "alternating", "instant") and row["k"] >= 1
    if not known or row["checkpoint"] not in (None, "last", "best"):
        raise ValueError(f"quality row has an unknown sampler or checkpoint, or k < 1: {row}")
    if row["fid"] is None and row["fd_mnist"] is None:
        raise ValueError(f"quality row has neither fid nor fd_mnist: {row}")
    return row


def _lowest(
    results: dict[Row, dict], metric: str, keep: Callable[[Row], bool]
) -> tuple[Row, float] | None:
    """The kept row with the lowest `metric` (rows without it are skipped), or None. A finite
    score beats a non-finite one (a diverged student), which is returned only when no kept row is
    finite, so that its claim fails rather than goes missing."""
    scores = {
        row: r[metric] for row, r in results.items() if keep(row) and r.get(metric) is not None
    }
    # min() over NaN depends on the order; rank the finite scores first.
    return min(scores.items(), key=lambda item: (not _finite(item[1]), item[1])) if scores else None


def best_teacher(results: dict[Row, dict], metric: str) -> tuple[Row, float] | None:
    """The teacher row with the lowest `metric` among TEACHER_TUNED's settings that finished."""
    tuned = set(TEACHER_TUNED)
    return _lowest(
        results,
        metric,
        lambda row: row.variant == "teacher" and (row.steps, row.guidance, row.gamma) in tuned,
    )


def best_student(
    results: dict[Row, dict],
    metric: str,
    *,
    k: int,
    variants: Sequence[str],
    checkpoints: Sequence[str] = ("last", "best"),
) -> tuple[Row, float] | None:
    """The student row of `variants` at `k` scored at one of `checkpoints` ("last", "best") with
    the lowest `metric` (over weightings)."""
    return _lowest(
        results,
        metric,
        lambda row: row.variant in variants and row.steps == k and row.checkpoint in checkpoints,
    )


def verdicts(
    results: dict[Row, dict], *, metric: str = "fid", checkpoint: str = "last"
) -> list[dict[str, str]]:
    """Issue 12's targets checked on the finished rows, the students scored at their `checkpoint`
    ("last" or "best"): one `{claim, status, detail}` per CLAIMS entry and one for "alternating <=
    instant at k = 4"; status is holds, fails or missing (a row it needs has not finished). Lower
    `metric` is better."""
    teacher = best_teacher(results, metric)
    tuned = sum((r.steps, r.guidance, r.gamma) in set(TEACHER_TUNED) for r in results)
    lines = []
    for variant, k, factor in CLAIMS:
        who = variant or "the better variant"
        claim = f"{who}, k = {k}: {metric} <= {factor:g} x the teacher's best"
        pool = (variant,) if variant else ("alternating", "instant")
        student = best_student(results, metric, k=k, variants=pool, checkpoints=(checkpoint,))
        if teacher is None or student is None:
            missing = "no 128/512-step teacher row" if teacher is None else f"no k = {k} student"
            lines.append({"claim": claim, "status": "missing", "detail": missing})
            continue
        bound = factor * teacher[1]
        lines.append(
            {
                "claim": claim,
                "status": "holds" if student[1] <= bound else "fails",
                "detail": f"{student[0].name} {student[1]:.2f} against {factor:g} x "
                f"{teacher[0].name} {teacher[1]:.2f} = {bound:.2f} (the best of {tuned} tuned "
                f"teacher row{'s' * (tuned != 1)})",
            }
        )
    pair = [
        best_student(results, metric, k=4, variants=(v,), checkpoints=(checkpoint,))
        for v in ("alternating", "instant")
    ]
    claim = f"k = 4: alternating's {metric} <= instant's"
    if None in pair:
        lines.append({"claim": claim, "status": "missing", "detail": "a k = 4 student is missing"})
    else:
        (alt, a), (inst, i) = pair
        status = "holds" if a <= i else "fails"
        detail = f"{alt.name} {a:.2f}, {inst.name} {i:.2f}"
        lines.append({"claim": claim, "status": status, "detail": detail})
    return lines


def against_undistilled(results: dict[Row, dict], *, metric: str = "fid") -> list[str]:
    """One sentence per student whose k has an undistilled teacher row (guidance 0, gamma 0); a
    best-checkpoint row only where its checkpoint is not the last one's."""
    lines = []
    for row in _ordered(results):
        same = Row("teacher", row.steps)
        score = results[row].get(metric)
        step = results[row].get("step")
        repeat = row.checkpoint == "best" and results.get(row.last, {}).get("step") == step
        if row.variant != "teacher" and same in results and score is not None and not repeat:
            lines.append(
                f"{row.name}: {metric} {score:.2f} against the undistilled teacher's "
                f"{results[same][metric]:.2f} with the same {row.steps} steps."
            )
    return lines


def plot_quality(results: dict[Row, dict], path: pathlib.Path, *, metric: str = "fid") -> None:
    """`metric` against sampling steps (log scales): the teacher's curve (guidance 0, gamma 0), its
    tuned best as a dashed line, a marker per student row (open: best checkpoint)."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    points = sorted(
        (row.steps, r[metric])
        for row, r in results.items()
        if row.variant == "teacher" and not row.guidance and not row.gamma and r.get(metric)
    )
    if points:
        ax.plot(*zip(*points), "o-", color="0.3", label="teacher, guidance 0, gamma 0")
    best = best_teacher(results, metric)
    if best:
        ax.axhline(best[1], color="0.5", ls="--", lw=1, label=f"teacher's best ({best[0].name})")
    markers = {"edm": "^", "flat": "v", "dmd": "D"}
    for variant, color in (("alternating", "C0"), ("instant", "C3")):
        for (weighting, marker), checkpoint in itertools.product(markers.items(), ("last", "best")):
            points = sorted(
                (row.steps, r[metric])
                for row, r in results.items()
                if (row.variant, row.weighting, row.checkpoint) == (variant, weighting, checkpoint)
                and r.get(metric)
            )
            if points:
                ax.plot(
                    *zip(*points),
                    marker,
                    color=color,
                    ms=8,
                    ls=":",
                    mfc=color if checkpoint == "last" else "none",  # best checkpoint: open
                    label=f"{variant}, {weighting}"
                    + (", best checkpoint" * (checkpoint == "best")),
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(metric)
    counts = sorted({r["num_samples"] for r in results.values()})
    ax.set_title(f"MNIST, {metric} on {', '.join(map(str, counts))} samples vs the test digits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    evaluation.save_figure(fig, path, dpi=110)


def sample_panels(
    results: dict[Row, dict], metric: str, *, out: pathlib.Path | None = None
) -> list[tuple[str, pathlib.Path]]:
    """(title, grid PNG) of the best teacher and of the best student at k = 8, 4, 2 and 1 by
    `metric`, skipping a k without a finished student and rows whose grid file is gone. Every grid
    is eval.py's first 100 samples of the same seed and labels (column = label). With `out`, the
    grid in `out/eval/<its folder>/` is used where it exists, else its recorded (absolute) path: a
    results folder copied from another machine keeps its panels."""
    picks = [("teacher's best", best_teacher(results, metric))]
    picks += [
        (f"best k = {k}", best_student(results, metric, k=k, variants=("alternating", "instant")))
        for k in (8, 4, 2, 1)
    ]
    panels = []
    for what, pick in picks:
        if pick is None or not results[pick[0]].get("sample_grid"):
            continue
        grid = pathlib.Path(results[pick[0]]["sample_grid"])
        beside = None if out is None else out / "eval" / grid.parent.name / grid.name
        grid = beside if beside is not None and beside.exists() else grid
        if grid.exists():
            panels.append((f"{what}: {pick[0].name}\n{metric} {pick[1]:.2f}", grid))
    return panels


def plot_samples(panels: Sequence[tuple[str, pathlib.Path]], path: pathlib.Path) -> None:
    """The panels' sample grids side by side under their titles, one PNG."""
    grids = [(title, np.asarray(Image.open(grid))) for title, grid in panels]
    evaluation.save_titled_grids(
        # one image each, channels as eval.py wrote them (1 or 3; a grey PNG reads as 2-D)
        [(title, grid.reshape(1, *grid.shape[:2], -1)) for title, grid in grids],
        path,
        title="the same labels (column = label) and sampling seed in every panel",
        columns=1,
    )


def verdict_lines(results: dict[Row, dict], *, metric: str, config: "QualityBench") -> list[str]:
    """The report's verdicts (`verdicts`) as Markdown list items; with `config.checkpoint` "best",
    a paragraph on the selection, then the verdicts at the last and at the best checkpoints."""

    def items(checkpoint: str) -> list[str]:
        return [
            f"- **{v['status']}**: {v['claim']}: {v['detail']}"
            for v in verdicts(results, metric=metric, checkpoint=checkpoint)
        ]

    if config.checkpoint == "last":
        return items("last")
    return [
        "Each student has two rows: its last checkpoint and (`-best`) the kept checkpoint with the "
        f"lowest {metric} on {config.select_samples} samples of sampling seed {config.seed + 1}, "
        f"scored like every row on seed {config.seed} (the paper reports its best checkpoint).",
        "",
        "Students at their last checkpoint:",
        "",
        *items("last"),
        "",
        "Students at their best checkpoint:",
        "",
        *items("best"),
    ]


def write_report(rows: Sequence[Row], config: "QualityBench", header: dict) -> str:
    """quality.md (verdicts and table of the finished rows), quality.json, the figure of the score
    against sampling steps, the best rows' sample grids and the 8-step instant student's loss
    curve, in `config.out`."""
    out = pathlib.Path(config.out)
    results = load_rows(rows, config)
    metric = "fid" if config.fid else "fd_mnist"
    missing = [row.name for row in rows if row not in results]
    lines = [f"# MNIST quality ({header['budget']} budget, {config.num_samples} samples per row)"]
    lines += ["", f"Students: {student_tag(config)} (lr, distillation steps x batch, seed).", ""]
    lines += verdict_lines(results, metric=metric, config=config)
    lines += ["", *(f"- {line}" for line in against_undistilled(results, metric=metric))]
    lines += ["", quality_table(results), ""]
    lines += [f"Not finished yet: {', '.join(missing)}." if missing else "All rows finished.", ""]
    machines = collections.Counter(
        f"{r['machine']['devices']}, {r['machine']['cpu_count']} CPU cores, jax "
        f"{r['machine']['jax_version']}"
        for r in results.values()
    )
    protocols = collections.Counter(r["feature_protocol"] for r in results.values())
    provenance = (
        " Rows computed on: "
        + "; ".join(f"{machine} ({n} rows)" for machine, n in machines.items())
        + ". Inception protocol: "
        + "; ".join(f"`{protocol}` ({n} rows)" for protocol, n in protocols.items())
        + "."
    )
    lines += [
        f"Teacher {header['teacher']} (step {header['teacher_step']})."
        + (provenance if results else ""),
        "",
    ]
    report = "\n".join(lines)
    with data.atomic_path(out / "quality.md") as tmp:
        tmp.write_text(report)
    with data.atomic_path(out / "quality.json") as tmp:
        tmp.write_text(json.dumps(quality_json_rows(results), indent=1) + "\n")
    if results:
        plot_quality(results, out / f"{metric}_vs_steps.png", metric=metric)
    panels = sample_panels(results, metric, out=out)
    if panels:
        plot_samples(panels, out / "samples.png")
    for row in rows:
        metrics = student_workdir(row, config) / "metrics.jsonl"
        if row.variant == "instant" and row.steps == 8 and metrics.exists():
            evaluation.plot_losses(metrics, out / "instant_loss.png", variant="instant")
            break
    return report


def claim_row(path: pathlib.Path) -> bool:
    """Take the row cached at `path` for this process (an exclusively created `.claim` file beside
    it); False when another worker holds it. Creates the rows folder of a fresh `--out`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path.with_suffix(".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def clear_claims(out: pathlib.Path) -> None:
    for claim in out.glob("rows/*.claim"):
        claim.unlink()


def run_rows(
    rows: Sequence[Row],
    *,
    config: "QualityBench",
    teacher: pathlib.Path,
    header: dict,
    deadline: float | None,
    claim: bool,
) -> None:
    """Train (students) and evaluate every unfinished row in order (with `config.checkpoint`
    "best", each student's best-checkpoint row after its last one), caching each result; stop
    starting rows after `deadline` (time.time()); with `claim`, skip rows another worker took (one
    claim per student: one process trains it)."""
    for row in rows:
        both = with_best([row]) if config.checkpoint == "best" else [row]
        todo = [r for r in both if not row_path(r, config).exists()]
        if not todo:
            continue
        if deadline is not None and time.time() > deadline:
            print("--time-limit reached: rerun the same command to continue.", flush=True)
            return
        if claim and not claim_row(row_path(row, config)):
            continue
        print(f"== {row.name} ({config.num_samples} samples)", flush=True)
        checkpoint, train_s = teacher, None
        student = row.variant != "teacher"
        if student:
            checkpoint, train_s = train_student(row, config=config, teacher=teacher)
        for r in todo:
            record = score_row(r, checkpoint, config=config)
            record.update(
                row=dataclasses.asdict(r),
                train_seconds=train_s,
                machine=header,
                distill_steps=config.distill_steps if student else None,
                distill_batch_size=config.distill_batch_size if student else None,
            )
            write_json(str(row_path(r, config)), record, make_folder=True)


def worker_environment(jobs: int, *, cpu_count: int | None = None) -> dict[str, str]:
    """The environment of one of `jobs` worker processes: this one's, with the BLAS thread pools
    (numpy's FID statistics) limited to an equal share of the usable cores unless already set."""
    # Pools spanning all the cores oversubscribe them: four processes on two cores took 20-24 s
    # each for one FID's statistics, 10 s with one thread each.
    if cpu_count is None:
        affinity = getattr(os, "sched_getaffinity", None)
        cpu_count = len(affinity(0)) if affinity else os.cpu_count() or 1
    share = str(max(1, cpu_count // jobs))
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, share)
    return env


def run_workers(config: "QualityBench", *, deadline: float | None) -> None:
    """`config.jobs` processes of `python -m experiments quality --worker`
    (`worker_environment`), sharing the rows through claim files; each one's output goes to
    `out/logs/worker<i>.log`. Raises RuntimeError naming the log of a worker that failed."""
    logs = pathlib.Path(config.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    minutes = None if deadline is None else max(deadline - time.time(), 0.0) / 60
    settings = dataclasses.replace(config, jobs=1, worker=True, time_limit=minutes)
    argv = [sys.executable, "-m", "experiments", "quality", *settings_argv(settings)]
    env, procs = worker_environment(config.jobs), []
    # the workers import `experiments` and the library from this checkout, whatever the directory
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    for i in range(config.jobs):
        with open(logs / f"worker{i}.log", "a") as log:
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))
    print(f"{config.jobs} workers running: tail -f {logs}/worker*.log", flush=True)
    failed = [i for i, proc in enumerate(procs) if proc.wait() != 0]
    if failed:
        raise RuntimeError(
            f"python -m experiments quality worker {failed[0]} failed: see "
            f"{logs}/worker{failed[0]}.log; rerun the same command to continue"
        )


def settings_argv(settings: Any) -> list[str]:
    """The command-line options that reproduce a settings dataclass (options.add_options' flags)."""
    argv = []
    for f in dataclasses.fields(settings):
        value, flag = getattr(settings, f.name), f.metadata.get("flag") or options.flag(f.name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def resolve_quality(config: "QualityBench") -> "QualityBench":
    """`config` with its defaults filled in: out, sample count, distillation length and batch (the
    budget's, else the preset's) and learning rates (the preset's)."""
    preset, budget = train.PRESETS[config.preset], BUDGETS[config.budget]
    steps, batch = budget["distill"] or (preset.distill_steps, preset.distill_batch_size)
    return dataclasses.replace(
        config,
        out=config.out or f"runs/quality-{config.budget}",
        num_samples=config.num_samples or budget["num_samples"],
        distill_steps=config.distill_steps or steps,
        distill_batch_size=config.distill_batch_size or batch,
        lr=preset.lr if config.lr is None else config.lr,
        aux_lr=preset.aux_lr if config.aux_lr is None else config.aux_lr,
    )


def bench_quality(config: "QualityBench") -> str:
    """Run (or resume) every unfinished row of the budget in headline order (or the rows named in
    `config.rows`, in that order), in this process or `config.jobs` worker processes, then write
    the report of all the budget's rows and return it."""
    config = resolve_quality(config)
    deadline = None if config.time_limit is None else time.time() + 60 * config.time_limit
    rows = quality_rows(config.budget)
    by_name = {row.name: row for row in rows}
    unknown = [name for name in config.rows if name not in by_name]
    if unknown:
        best = " (a -best row comes with its student's name and --checkpoint best)"
        raise ValueError(
            f"unknown --rows {', '.join(unknown)}; the {config.budget} budget's rows are "
            f"{', '.join(by_name)} (the full budget's: pass --budget full)"
            + (best if any(name.endswith("-best") for name in unknown) else "")
        )
    out = pathlib.Path(config.out)
    base = dataclasses.replace(
        train.PRESETS[config.preset], teacher=config.teacher, workdir=str(out)
    )
    teacher = train.ensure_teacher(train.resolve(base))
    header = {
        "budget": config.budget,
        "devices": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "teacher": os.path.relpath(teacher),
        "teacher_step": read_meta(teacher)["step"],
    }
    todo = [by_name[name] for name in config.rows] or rows
    work = dict(config=config, teacher=teacher, header=header, deadline=deadline)
    if config.checkpoint == "best":  # reported after their last-checkpoint rows
        rows = with_best(rows)
    if config.worker:
        run_rows(todo, claim=True, **work)
        return ""
    if config.jobs > 1:
        clear_claims(out)  # left by killed workers: their rows run again
        run_workers(
            dataclasses.replace(config, rows=tuple(r.name for r in todo)), deadline=deadline
        )
        clear_claims(out)  # every worker has exited
    else:
        run_rows(todo, claim=False, **work)
    return write_report(rows, config, header)


@dataclasses.dataclass(frozen=True)
class QualityBench(Counts):
    """Settings of `python -m experiments quality`."""

    budget: str = options.field(
        "small",
        "small: 1,000 samples per row, k in {1, 8}; full: 10,000 samples, k in {1, 2, 4, 8}, "
        "two weightings each, the teacher over guidance and gamma",
        choices=tuple(sorted(BUDGETS)),
    )
    preset: str = options.field(
        "mnist",
        "train.py preset of teacher and students (tiny: a dry run)",
        choices=("mnist", "tiny"),
    )
    out: str | None = options.field(
        None, "results and cache directory (none: runs/quality-<budget>)"
    )
    teacher: str = options.field(
        "auto", f"teacher checkpoint (auto: {TEACHER}, trained first if absent)"
    )
    distill_steps: int | None = options.field(
        None, "training steps of each student (none: full: 1000, small: the preset's)"
    )
    distill_batch_size: int | None = options.field(
        None,
        "each student's global batch, instant: both minibatches (none: full: 128, small: the "
        "preset's)",
    )
    lr: float | None = options.field(None, "students' peak learning rate (none: the preset's)")
    aux_lr: float | None = options.field(
        None, "auxiliary's peak learning rate (none: the preset's)"
    )
    eval_batch_size: int = options.field(
        200, "global batch of sampling and Inception (results do not depend on it)"
    )
    fid: bool = options.field(
        True, "Inception FID, precision, recall (--no-fid: fd_mnist only, fast)"
    )
    reference_count: int | None = options.field(
        None,
        "score against the first N test images (none: all 10,000); comparable only at equal N",
    )
    num_samples: int | None = options.field(
        None, "samples per row (none: the budget's); rows are cached per sample count"
    )
    rows: tuple[str, ...] = options.field(
        (),
        "run only these rows, in this order (empty: every row of the budget). Names (with "
        "--budget full; the small budget has the k = 8 edm and k = 1 flat students, the teacher "
        "at 8-512 steps and 512 with w 0.1): " + " ".join(row.name for row in quality_rows("full")),
    )
    jobs: int = options.field(
        1, "worker processes sharing the rows (one GPU: 4-8; a CPU: its core count at most)"
    )
    worker: bool = options.field(False, "internal: run as one of --jobs' processes")
    time_limit: float | None = options.field(
        None, "start no new row after this many minutes (a rerun continues)"
    )
    checkpoint: str = options.field(
        "last",
        "last: score each student's last checkpoint; best: also its best kept checkpoint (the "
        "paper reports its best), a second row <row>-best that comes with the student's row: "
        "every kept checkpoint (ten for students trained by this command) scored on "
        "--select-samples samples of sampling seed --seed + 1 (same reference images), the lowest "
        "scored again like every row; done right after the student's last row, so after "
        "--time-limit's check; its train (s) is the whole run's",
        choices=("last", "best"),
    )
    select_samples: int = options.field(
        2000, "samples per checkpoint of --checkpoint best's selection (FID, or fd_mnist)"
    )
    seed: int = options.field(0, "seed of training, sampling and the sample labels")


def run_quality(config: QualityBench) -> str:
    """The `quality` subcommand: the report's Markdown."""
    if config.jobs > 1:  # before jax starts: processes sharing one GPU must not preallocate it
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return bench_quality(config)
