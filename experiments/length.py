"""Length curves: a distilled student's score at every kept checkpoint against its training step.

    python -m experiments length --workdirs RUN [RUN ...] [--steps 200 600 1000]
                                 [--num-samples 2000] [--fid] [--out runs/length]

fd_mnist (with --fid also Inception FID) of every kept checkpoint of train.py distillation runs at
one fixed sampling seed, against the distillation step (cached per checkpoint); writes length.md
(each run's best and last, then one row per checkpoint) and fd_mnist_vs_distill_steps.png (or
fid_vs_distill_steps.png) into --out. For 2-D runs (--preset ring2d) the score is w1_radius, the
Wasserstein-1 distance between the norms of the samples and of as many test points (the rings'
sharpness; energy distance recorded too), with the runs' teacher at the student's k and at the
preset's teacher_k steps as reference lines (w1_radius_vs_distill_steps.png); use --num-samples
20000. train.py keeps only the last 3 checkpoints unless given --keep-checkpoints N: pass it for a
curve.
"""

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jaxtyping import Float
from matplotlib.figure import Figure

import data
import eval as evaluation
import options
import train
from checkpoint import read_meta
from experiments.bench import Counts, write_json


def newer(result: pathlib.Path, *, than: pathlib.Path) -> bool:
    """Whether `result` exists and was written no earlier than `than` was (make's rule: a cached
    score of a checkpoint written since, by a run trained again, is stale)."""
    return result.exists() and result.stat().st_mtime >= than.stat().st_mtime


def _checkpoints_by_step(workdir: pathlib.Path, steps: Sequence[int]) -> dict[int, pathlib.Path]:
    """A distillation run's checkpoints by step (only those at `steps` when given); raises
    FileNotFoundError naming the steps it has."""
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist: pass a train.py workdir")
    by_step = {int(c.stem.split("_")[1]): c for c in (workdir / "checkpoints").glob("ckpt_*.eqx")}
    chosen = sorted(set(steps) & set(by_step) if steps else by_step)
    if not chosen:
        raise FileNotFoundError(
            f"no checkpoints of steps {list(steps)} in {workdir}/checkpoints; it has "
            f"{sorted(by_step)}: pass other --steps"
            if by_step
            else f"no checkpoints in {workdir}/checkpoints: pass a train.py distillation workdir"
        )
    return {step: by_step[step] for step in chosen}


def checkpoint_scores(
    workdir: pathlib.Path,
    *,
    num_samples: int,
    seed: int,
    fid: bool,
    batch_size: int,
    steps: Sequence[int] = (),
    reference_count: int | None = None,
) -> list[dict]:
    """eval.py's record of every checkpoint (or those at `steps`) of a distillation run, by step:
    read from `workdir/eval` when that evaluation exists and is newer than the checkpoint (a run
    trained again is scored again), else computed (fixed sampling seed, so
    the curve compares checkpoints on the same noise and labels; scored against the first
    `reference_count` test images, none: all)."""
    records = []
    for checkpoint in _checkpoints_by_step(workdir, steps).values():
        config = evaluation.EvalConfig(
            checkpoint=str(checkpoint),
            k=read_meta(checkpoint)["config"]["k"],  # the student's own k
            num_samples=num_samples,
            seed=seed,
            fid=fid,
            batch_size=batch_size,
            out=str(workdir / "eval"),
            reference_count=reference_count,
        )
        done = workdir / "eval" / f"{evaluation.result_stem(config, config.k)}.json"
        record = json.loads(done.read_text()) if newer(done, than=checkpoint) else None
        if record is None or (fid and record.get("fid") is None):  # --fid needs an FID record
            record = evaluation.evaluate(config)
        records.append(record)
    return sorted(records, key=lambda r: r["step"])


def radial_w1(a: Float[np.ndarray, "n d"], b: Float[np.ndarray, "m d"]) -> float:
    """Wasserstein-1 distance between the distributions of the norms `|a_i|` and `|b_j|` of two
    equal-size point sets (for equal sizes, the mean gap of the sorted norms), in the points' units:
    on concentric rings, how sharp and well placed the rings are. Raises ValueError for unequal
    sizes."""
    if len(a) != len(b):
        raise ValueError(f"radial_w1 needs equal sizes, got {len(a)} and {len(b)} points")
    ra, rb = (np.sort(np.linalg.norm(np.asarray(x, np.float64), axis=1)) for x in (a, b))
    return float(np.abs(ra - rb).mean())


def points_scores(
    checkpoint: pathlib.Path, *, num_steps: int, num_samples: int, seed: int
) -> dict[str, Any]:
    """`radial_w1` and energy distance of `num_samples` points of a 2-D checkpoint (k =
    `num_steps`, unguided, labels `i % classes`, sampling seed `seed`) to the first `num_samples`
    points of its data's test split. Raises ValueError when the split is smaller."""
    model, config, meta = train.load_checkpoint(checkpoint)
    reference = data.load(config.data, split="test").images
    if num_samples > len(reference):
        raise ValueError(
            f"--num-samples {num_samples}: {config.data} has {len(reference)} test points; "
            "pass fewer"
        )
    reference = np.asarray(reference[:num_samples], np.float64)
    key = jax.random.key(seed)
    try:
        points = evaluation.draw_points(
            model,
            key,
            dim=config.model.dim,
            num_classes=config.model.num_classes,
            shift=config.shift,
            num_steps=num_steps,
            num_points=num_samples,
        )
    except FloatingPointError as error:
        raise FloatingPointError(f"{checkpoint}: {error}; leave it out with --steps") from error
    return {
        "step": meta["step"],
        "num_steps": num_steps,
        "w1_radius": radial_w1(points, reference),
        "energy_distance": evaluation.energy_distance(points, reference),
        "num_samples": num_samples,
        "seed": seed,
    }


def points_length_scores(
    workdir: pathlib.Path, *, num_samples: int, seed: int, steps: Sequence[int] = ()
) -> tuple[list[dict], train.Config]:
    """`points_scores` of every checkpoint (or those at `steps`) of a 2-D distillation run, cached
    in `workdir/eval` (computed again for a checkpoint newer than its cached score), and the run's
    configuration (from its newest checkpoint)."""
    checkpoints = _checkpoints_by_step(workdir, steps)
    newest = list(checkpoints.values())[-1]
    config = train.config_from_dict(read_meta(newest)["config"])
    records = []
    for step, checkpoint in checkpoints.items():
        done = workdir / "eval" / f"points_k{config.k}_n{num_samples}_seed{seed}_{step:08d}.json"
        if not newer(done, than=checkpoint):
            record = points_scores(
                checkpoint, num_steps=config.k, num_samples=num_samples, seed=seed
            )
            done.parent.mkdir(parents=True, exist_ok=True)
            write_json(str(done), record)
        records.append(json.loads(done.read_text()))
    return records, config


def teacher_references(
    teacher: pathlib.Path, *, num_steps: Sequence[int], num_samples: int, seed: int
) -> dict[str, float]:
    """`radial_w1` of a teacher's samples at each of `num_steps`, lowest first: the reference
    lines beside the students' curves."""
    references = {
        f"teacher, {k} steps": points_scores(
            teacher, num_steps=k, num_samples=num_samples, seed=seed
        )["w1_radius"]
        for k in sorted(set(num_steps))
    }
    return dict(sorted(references.items(), key=lambda item: item[1]))


def length_report(
    runs: dict[str, list[dict]],
    *,
    metric: str,
    out: pathlib.Path,
    references: dict[str, float] | None = None,
    data_name: str = "MNIST",
) -> str:
    """Markdown of each run's `metric` by distillation step with its best and last checkpoint, and
    `<metric>_vs_distill_steps.png` in `out`; `references` (name: value, e.g. the teacher's) are
    listed first and drawn as horizontal lines."""
    spec = ".4f" if metric == "w1_radius" else ".2f"  # radii differ in the third decimal
    lines = ["| run | " + " | ".join(["step", metric, "label acc.", "samples"]) + " |"]
    lines.append("| --- " * 5 + "|")
    summary = [f"- {name}: {metric} {value:{spec}}." for name, value in (references or {}).items()]
    fig = Figure(figsize=(8.5, 4.2))
    ax = fig.subplots()
    dashes = ((6, 2), (1, 2), (6, 2, 1, 2), (3, 3), (6, 2, 1, 2, 1, 2))
    for i, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, color=str(0.1 + 0.12 * (i % 5)), dashes=dashes[i % 5], lw=1, label=name)
    for i, (name, records) in enumerate(runs.items()):
        scored = [r for r in records if r.get(metric) is not None]
        for r in scored:
            accuracy = evaluation.cell(r.get("label_accuracy"), ".3f")
            lines.append(
                f"| {name} | {r['step']} | {r[metric]:{spec}} | {accuracy} | {r['num_samples']} |"
            )
        if scored:
            best = min(scored, key=lambda r: r[metric])
            summary.append(
                f"- {name}: best {metric} {best[metric]:{spec}} at step {best['step']}, last "
                f"{scored[-1][metric]:{spec}} at step {scored[-1]['step']}."
            )
            style = ("o-", "s--", "^:")[i // 10 % 3]  # matplotlib's cycle repeats 10 colours
            ax.plot([r["step"] for r in scored], [r[metric] for r in scored], style, label=name)
    ax.set_xlabel("distillation step")
    ax.set_ylabel(metric)
    ax.set_yscale("log")
    if references:  # a diverged run would squash the rest: its points above this are in the table
        ax.set_ylim(top=3 * max(references.values()))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    counts = sorted({r["num_samples"] for records in runs.values() for r in records})
    ax.set_title(f"{data_name}, {metric} on {', '.join(map(str, counts))} samples by checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    evaluation.save_figure(fig, out / f"{metric}_vs_distill_steps.png", dpi=110)
    report = "\n".join([*summary, "", *lines, ""])
    with data.atomic_path(out / "length.md") as tmp:
        tmp.write_text(report)
    return report


@dataclasses.dataclass(frozen=True)
class LengthBench(Counts):
    """Settings of `python -m experiments length`."""

    workdirs: tuple[str, ...] = options.field(
        (), "train.py workdirs of distillation runs (all images or all 2-D)", required=True
    )
    num_samples: int = options.field(
        2000,
        "samples per checkpoint (2-D runs: use 20000; two such samples of the rings differ by "
        "0.003)",
    )
    fid: bool = options.field(False, "also Inception FID (--fid; slow on a CPU); fd_mnist always")
    batch_size: int = options.field(200, "global batch of sampling and Inception")
    seed: int = options.field(0, "sampling seed, the same for every checkpoint")
    steps: tuple[int, ...] = options.field(
        (), "evaluate only the checkpoints of these steps (none: all)"
    )
    out: str = options.field("runs/length", "report and figure directory")


def _is_points_run(workdir: pathlib.Path) -> bool:
    """Whether a distillation workdir holds a 2-D (MLP) run, from its newest checkpoint; raises
    ValueError for a teacher run (its checkpoints are not a student's)."""
    newest = list(_checkpoints_by_step(workdir, ()).values())[-1]
    config = train.config_from_dict(read_meta(newest)["config"])
    if config.variant == "teacher":
        raise ValueError(f"{workdir} is a teacher run: pass distillation (student) workdirs")
    return train.is_points(config)


def _check_workdirs(workdirs: Sequence[pathlib.Path], *, fid: bool) -> bool:
    """Whether the runs are 2-D; raises ValueError for repeated run names (the report's keys), a
    mix of 2-D and image runs, or --fid with 2-D runs."""
    names = [w.name for w in workdirs]
    if len(set(names)) < len(names):
        raise ValueError(
            f"--workdirs repeats a run name ({names}): the report names runs by folder"
        )
    kinds = {w: _is_points_run(w) for w in workdirs}
    if len(set(kinds.values())) > 1:
        points = [w.name for w, is_points in kinds.items() if is_points]
        raise ValueError(f"--workdirs mixes 2-D runs ({points}) with image runs: report them apart")
    if fid and any(kinds.values()):
        raise ValueError("--fid is for image runs; 2-D runs are scored by w1_radius: drop --fid")
    return any(kinds.values())


def run_length(config: LengthBench) -> str:
    """The `length` subcommand: the report's Markdown (image runs: fd_mnist or FID; 2-D runs:
    `radial_w1` with the teacher's as references). Raises ValueError for unusable `--workdirs`
    (`_check_workdirs`) or 2-D runs of different teachers (whose references would collide)."""
    if not config.workdirs:
        raise ValueError("--workdirs is required: one or more train.py distillation workdirs")
    workdirs = [pathlib.Path(w) for w in config.workdirs]
    out = pathlib.Path(config.out)
    if _check_workdirs(workdirs, fid=config.fid):
        runs, configs = {}, []
        for w in workdirs:
            runs[w.name], run_config = points_length_scores(
                w, num_samples=config.num_samples, seed=config.seed, steps=config.steps
            )
            configs.append(run_config)
        teachers = {train.teacher_file(c).resolve() for c in configs}
        if len(teachers) > 1:
            raise ValueError(
                f"the runs have different teachers ({', '.join(map(str, teachers))}): report "
                "each teacher's runs separately"
            )
        references = teacher_references(
            teachers.pop(),
            num_steps=[k for c in configs for k in (c.k, c.teacher_k)],
            num_samples=config.num_samples,
            seed=config.seed,
        )
        return length_report(
            runs, metric="w1_radius", out=out, references=references, data_name="2-D points"
        )
    runs = {
        w.name: checkpoint_scores(
            w,
            num_samples=config.num_samples,
            seed=config.seed,
            fid=config.fid,
            batch_size=config.batch_size,
            steps=config.steps,
        )
        for w in workdirs
    }
    metric = "fid" if config.fid else "fd_mnist"
    return length_report(runs, metric=metric, out=out)
