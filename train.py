"""Training: the teacher and both distillation variants (alternating, instant), one command,
resumable, data-parallel over every local device (and every host).

    python train.py --variant instant               # the whole job on MNIST (the default run)
    python train.py --variant teacher --workdir runs/my-teacher --steps 3000
    python train.py --variant alternating --teacher runs/my-teacher/teacher.eqx --k 4
    python train.py --variant instant --resume      # continue from the last checkpoint
    python train.py --config runs/x/config.json --steps 5   # replay a run (options override it)
    python train.py --preset ring2d --variant alternating   # 2-D walkthrough: a minute on a CPU
    python train.py --help                          # every option, in sections, and its default

Read top to bottom: configuration (`Config`, `PRESETS`, `resolve`), set-up (every input checked
before a file is written), the loop (`train`), checkpoints (the file format is checkpoint.py's), the
command line. Sampling, sample grids and figures are eval.py's.

The default run distils the shipped teacher `checkpoints/mnist_teacher.eqx` (18,000 steps at batch
128, about 3 minutes on one H200) into an 8-step student: 1000 instant steps at batch 32 take about
20 minutes on a 2-core CPU. Without the teacher file the run trains it first (`--teacher auto`).
The work directory (`--workdir`, default `runs/<preset>-<variant>`) holds config.json (the resolved
configuration, replayable with `--config`), metrics.jsonl (one JSON object per step), the last
`keep_checkpoints` checkpoints, sample grids with a fixed key (`samples/`; students: k steps), the
loss curves (loss.png), and for a teacher run its export teacher.eqx (parameter average, Adam's nu).

Update i uses `fold_in(train_key, i)` and the data stream's i-th global batch, and checkpoints hold
the optimiser states and the iterator position, so `--resume` gives the parameters of an
uninterrupted run, on any device count. Ctrl-C (or SIGTERM) finishes the step, writes a checkpoint
and prints the command that resumes (exit 130); a non-finite loss stops the run naming its step. A
multi-process job (`JAX_COORDINATOR_ADDRESS`, SLURM, Open MPI, a TPU slice) initialises
`jax.distributed` first; process 0 alone writes files; `--batch-size` is the global batch.

Optimisers: the teacher clip 1, Adam(0.9, 0.99), warm-up then constant, with a parameter average
(`teacher_ema`) that exports, grids and distillation use; distillation (Appendix B) clip 1,
Adam(b1=0, b2=0.99, eps=1e-12), warm-up then linear decay to 0, the warm-up capped at 10% of the
generator's updates (`resolve`), peak rates 1e-4 (our choice).
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import shlex
import shutil
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, UInt8
from tqdm import tqdm

import checkpoint
import data
import eval
import mmd
import options
import uvit
from options import field

CHECKPOINT_DIR = pathlib.Path(__file__).resolve().parent / "checkpoints"
DISTILL_WARMUP_FRACTION = 0.1


# ----------------------------------------------------------------------------------------------
# Configuration

GROUPS = {
    "run": (
        "run: what to train, where, how long",
        "variant preset workdir resume seed num_devices steps batch_size".split(),
    ),
    "data": (
        "data",
        "data data_resolution".split(),
    ),
    "teacher": (
        "teacher: training the diffusion model (also the auto-trained teacher)",
        (
            "teacher_steps teacher_batch_size teacher_lr teacher_warmup teacher_b1 teacher_b2 "
            "teacher_ema label_dropout shift teacher_k"
        ).split(),
    ),
    "distillation": (
        "distillation: the paper's options (Algorithms 2 and 3, Appendix B)",
        (
            "teacher k distill_steps distill_batch_size lr aux_lr warmup weighting guidance "
            "clip zs regularize_aux instant_form precond_steps precond_eps"
        ).split(),
    ),
    "study": (
        "study options: not in the paper, kept for the study's measurements "
        "(experiments/decisions.md); the defaults are the paper's",
        "aux_steps b1 student_ema time_sampling center center_steps precond_eps_mode".split(),
    ),
    "output": (
        "output: logging, sample grids, checkpoints",
        "log_every sample_every checkpoint_every keep_checkpoints grid_size".split(),
    ),
    "model": (
        "model: the network (defaults: the preset's)",
        "model".split(),
    ),
}
"""The sections of `python train.py --help`, in order: (title, the Config fields listed there)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run; `PRESETS` holds named instances, the command line overrides any
    field (`--config FILE` first replays a saved config.json)."""

    variant: str = field("instant", "what to train", choices=mmd.VARIANTS)
    preset: str = field("mnist", "the starting configuration, a name in PRESETS (listed below)")
    workdir: str | None = field(None, "output directory (none: runs/<preset>-<variant>)")
    resume: bool = field(
        False,
        "continue from the workdir's latest checkpoint (starts fresh if it has none)",
        group="run",
    )
    seed: int = field(0, "seed of initialisation, data order and every random draw")
    num_devices: int = field(0, "use the first N local devices (0: all devices of all processes)")
    steps: int | None = field(None, "training steps (none: teacher_steps or distill_steps)")
    batch_size: int | None = field(
        None, "global batch size (none: teacher_batch_size or distill_batch_size)"
    )
    data: str = field("mnist", f"data source, one of {', '.join(data.SOURCES)}")
    data_resolution: int | None = field(
        None, "downsample the data to this side length (none: native)"
    )
    teacher_steps: int = field(18_000, "steps of teacher training")
    teacher_batch_size: int = field(128, "batch size of teacher training")
    teacher_lr: float = field(1e-3, "teacher's peak learning rate")
    teacher_warmup: int = field(100, "teacher's linear warm-up steps")
    teacher_b1: float = field(0.9, "teacher's Adam beta1")
    teacher_b2: float = field(0.99, "teacher's Adam beta2 (its nu gives Lambda)")
    teacher_ema: float = field(
        0.999,
        "decay of the teacher's parameter average, warmed up as min(decay, (1+t)/(10+t)); "
        "exports, sample grids and distillation use it (0: none)",
        group="teacher",
    )
    label_dropout: float = field(
        0.1, "probability of replacing a label by the null label (guidance)"
    )
    shift: float | None = field(
        None,
        "log-SNR shift of the noise schedule, teacher and students (none: 2 log(64 / "
        "resolution), Simple Diffusion's; config.json records the value used)",
        group="teacher",
    )
    teacher_k: int = field(64, "sampling steps of the teacher's sample grids")
    teacher: str = field(
        "auto",
        "teacher checkpoint or teacher run directory (auto: checkpoints/<preset>_teacher.eqx, "
        "trained first if absent); config.json records the file used",
        group="distillation",
    )
    k: int = field(8, "the student's sampling steps")
    distill_steps: int = field(1000, "steps of distillation")
    distill_batch_size: int = field(
        32, "batch size of distillation (instant: both minibatches together)"
    )
    lr: float = field(1e-4, "generator's peak learning rate")
    aux_lr: float = field(1e-4, "auxiliary's peak learning rate (alternating)")
    warmup: int = field(
        1000,
        "distillation warm-up updates as the paper's; the run uses min(WARMUP, 10%% of the "
        "generator's updates) (the default run: 100), printed at the start and recorded in "
        "config.json",
        group="distillation",
    )
    weighting: str = field("edm", "loss weighting w(lambda)", choices=mmd.WEIGHTINGS)
    guidance: float = field(0.0, "classifier-free guidance weight w of the teacher")
    clip: bool = field(False, "clip the guided teacher's prediction to [-1, 1]")
    zs: str = field("conditional", "how z_s is drawn", choices=mmd.ZS_MODES)
    regularize_aux: bool = field(True, "the auxiliary's teacher regulariser (alternating)")
    instant_form: str = field(
        "symmetric",
        "instant objective: symmetric G1^T Lambda G2, or one_sided (Algorithm 3 as printed, eq. 8)",
        choices=mmd.INSTANT_FORMS,
        group="distillation",
    )
    precond_steps: int = field(
        0,
        "estimate Lambda from N fresh teacher gradients (0: the teacher's Adam state)",
        group="distillation",
    )
    precond_eps: float = field(1e-8, "eps of Lambda = 1 / (sqrt(nu_hat) + eps)")
    aux_steps: int = field(
        1,
        "auxiliary updates per generator update (alternating; --steps counts both kinds). The "
        "paper's: 1; 3 removed the alternating students' mid-run transients but not their ends",
        group="study",
    )
    b1: float = field(
        0.0,
        "Adam's beta1 of generator and auxiliary. The paper's: 0; 0.9 left the ends within the "
        "seed-to-seed spread and destabilised k = 1",
        group="study",
    )
    student_ema: float = field(
        0.0,
        "decay of a moving average of the generator (min(DECAY, (1+t)/(10+t)) at generator "
        "update t), sampled and evaluated instead of it. The paper keeps none (0); 0.999 moved "
        "the ends by about a sampling seed's change",
        group="study",
    )
    time_sampling: str = field(
        "paper",
        "the generator's level t: paper (t = min(s + U[0, 1/k], 1)) or grid (the sampler's level "
        "just above s; k = 1: t = 1). grid halved the 1-step student's distance",
        choices=mmd.TIME_SAMPLINGS,
        group="study",
    )
    center: str = field(
        "none",
        "data centring of the instant variant's gradients. batch cured the flat-weighted "
        "student's drift, did not help edm",
        choices=mmd.CENTERINGS,
        group="study",
    )
    center_steps: int = field(
        16, "real-data batches averaged for center=fixed (when precond_steps is 0)"
    )
    precond_eps_mode: str = field(
        "fixed",
        "fixed: eps as given (the paper's); median: eps times the median sqrt(nu_hat). median "
        "x 1 gave no gain",
        choices=mmd.EPS_MODES,
        group="study",
    )
    log_every: int = field(
        10, "fetch metrics, check them and update the progress bar every N steps"
    )
    sample_every: int = field(200, "write a sample grid every N steps (and at the end)")
    checkpoint_every: int = field(200, "write a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = field(3, "how many recent checkpoints to keep")
    grid_size: int = field(
        50,
        "images per sample grid (labels i %% num_classes: one class per column); eval.py's "
        "--num-samples is the scored sample count",
        group="output",
    )
    model: uvit.UViTConfig | uvit.MLPConfig = field(
        uvit.MNIST,
        "the network: a U-ViT (images) or an MLP (2-D points, preset ring2d)",
        group="model",
    )

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "log_every",
            "sample_every",
            "checkpoint_every",
            "keep_checkpoints",
            "k",
            "teacher_k",
            "grid_size",
            "aux_steps",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{options.flag(name)} must be >= 1, got {value}")
        for name in ("precond_steps", "num_devices"):
            if getattr(self, name) < 0:
                raise ValueError(f"{options.flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("b1", "teacher_ema", "student_ema"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(
                    f"{options.flag(name)} must be in [0, 1), got {getattr(self, name)}"
                )
        if self.variant not in mmd.VARIANTS:
            valid = ", ".join(mmd.VARIANTS)
            raise ValueError(f"unknown --variant {self.variant!r}; valid: {valid}")


TINY = uvit.UViTConfig(
    resolution=8,
    channels=1,
    num_classes=10,
    widths=(8,),
    blocks=(1,),
    transformer_width=16,
    transformer_depth=1,
    heads=2,
    emb_width=16,
    fourier_features=8,
    groups=4,
)
"""A U-ViT small enough to compile and run in seconds: for smoke tests."""

_IMAGENET64 = Config(
    preset="imagenet64",
    data="imagenet64:data/imagenet64",
    model=uvit.IMAGENET64,
    teacher_steps=1_000_000,
    teacher_batch_size=2048,
    teacher_lr=1e-4,
    teacher_warmup=10_000,
    distill_steps=200_000,
    distill_batch_size=2048,
    lr=1e-5,
    aux_lr=1e-5,
    log_every=100,
    sample_every=5000,
    checkpoint_every=5000,
    teacher_k=256,
    grid_size=100,
)

PRESETS = {
    "mnist": Config(),
    "tiny": Config(
        preset="tiny",
        data_resolution=8,
        model=TINY,
        teacher_steps=200,
        distill_steps=100,
        teacher_batch_size=32,
        distill_batch_size=32,
        warmup=10,
        sample_every=50,
        checkpoint_every=50,
        teacher_k=16,
    ),
    "ring2d": Config(
        preset="ring2d",
        data="rings",
        model=uvit.MLPConfig(width=256),
        shift=0.0,
        teacher_steps=6000,
        teacher_batch_size=256,
        teacher_ema=0.99,
        teacher_k=64,
        k=4,
        distill_steps=2000,
        distill_batch_size=256,
        lr=2e-4,
        aux_lr=2e-4,
        weighting="flat",
        log_every=100,
        sample_every=1000,
        checkpoint_every=1000,
    ),
    "imagenet64": _IMAGENET64,
    "imagenet128": dataclasses.replace(
        _IMAGENET64,
        preset="imagenet128",
        data="folder:data/imagenet128",
        data_resolution=128,
        model=uvit.IMAGENET128,
    ),
}
"""Named configurations. ImageNet values follow the paper (batch 2048, 200k distillation steps);
their learning rates are our choice and untested at that scale."""


# Settings that may change when a run is resumed: they do not affect the numbers it computes.
RUN_FIELDS = (
    "resume",
    "workdir",
    "num_devices",
    "log_every",
    "sample_every",
    "checkpoint_every",
    "keep_checkpoints",
)


def resolve(config: Config) -> Config:
    """Fill the fields whose value depends on others with the values the run uses: steps, batch
    size, shift, workdir, the teacher file (`auto`: the preset's) and the warm-up applied."""
    teacher = config.variant == "teacher"
    steps = config.steps or (config.teacher_steps if teacher else config.distill_steps)
    updates = generator_updates(config, steps)
    warmup = min(config.warmup, max(1, int(DISTILL_WARMUP_FRACTION * updates)))
    auto = config.teacher == "auto"
    return dataclasses.replace(
        config,
        steps=steps,
        batch_size=config.batch_size
        or (config.teacher_batch_size if teacher else config.distill_batch_size),
        shift=mmd.resolution_shift(config.model.resolution)
        if config.shift is None
        else config.shift,
        workdir=config.workdir or str(pathlib.Path("runs") / f"{config.preset}-{config.variant}"),
        teacher=str(default_teacher_path(config.preset)) if auto else config.teacher,
        warmup=config.warmup if teacher else warmup,
    )


def generator_updates(config: Config, steps: int) -> int:
    """The generator's updates in `steps` steps: every step (instant, teacher), one in each cycle
    of `aux_steps` + 1 (alternating)."""
    return steps // (config.aux_steps + 1) if config.variant == "alternating" else steps


def default_teacher_path(preset: str) -> pathlib.Path:
    """Where `--teacher auto` looks for (and caches) a preset's teacher."""
    return CHECKPOINT_DIR / f"{preset}_teacher.eqx"


def config_to_dict(config: Config) -> dict:
    """The configuration as JSON-serialisable nested dicts."""
    return dataclasses.asdict(config)


def config_from_dict(values: dict) -> Config:
    """Inverse of `config_to_dict`; reads the names of earlier versions too
    (`checkpoint.RENAMED`)."""
    renamed = {checkpoint.RENAMED.get(name, name): value for name, value in values.items()}
    return options.from_dict(Config, renamed)


def _config_differences(a: Config, b: Config, *, ignore: Sequence[str] = ()) -> list[str]:
    da, db = config_to_dict(a), config_to_dict(b)
    out = []
    for name in da:
        if name in ignore:
            continue
        if isinstance(da[name], dict):
            out += [f"{name}.{k}" for k in da[name] if da[name][k] != db[name].get(k)]
        elif da[name] != db[name]:
            out.append(name)
    return out


def read_config(path: str | os.PathLike) -> Config:
    """A run's config.json (or any file of `config_to_dict`'s form) as a `Config`."""
    path = pathlib.Path(path)
    try:
        return config_from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"no configuration file {path}: pass a run's config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); restore it, or use another file") from e


def _workdir_config(workdir: pathlib.Path) -> Config | None:
    path = workdir / "config.json"
    return read_config(path) if path.exists() else None


def replay_config(path: str | os.PathLike) -> Config:
    """The configuration of `--config FILE`: the run FILE records (a config.json), to be run again
    in `<its workdir>-replay` (its own workdir holds its checkpoints), not resumed."""
    config = read_config(path)
    return dataclasses.replace(config, workdir=f"{config.workdir}-replay", resume=False)


# ----------------------------------------------------------------------------------------------
# Set-up: devices, data, teacher, optimisers; everything checked before a file is written


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when the environment shows a multi-process job; True if it
    ran."""
    env = os.environ
    multi = (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
    if not multi or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize()
    return True


def global_batch(
    batch: tuple[np.ndarray, np.ndarray], sharding: NamedSharding
) -> tuple[Float[Array, "b *dims"], Int[Array, " b"]]:
    """This process's slice of a global batch -> one global array sharded over "data"."""
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in batch)


def check_batch(config: Config, n_devices: int) -> None:
    """Refuse, before compiling, a batch size the devices (and the instant variant's halves) cannot
    split."""
    minibatches = 2 if config.variant == "instant" else 1
    try:
        mmd.check_batch_size(
            config.batch_size,
            num_devices=n_devices,
            minibatches=minibatches,
            num_processes=jax.process_count(),
        )
    except ValueError as error:
        raise ValueError(f"--batch-size {config.batch_size}: {error}") from error


def is_points(config: Config) -> bool:
    """The one branch between image models (sample grids, FID) and the 2-D MLP of the `ring2d`
    walkthrough (a scatter figure with energy distances): the model family."""
    return isinstance(config.model, uvit.MLPConfig)


def check_inputs(config: Config) -> data.Dataset:
    """Refuse, before anything is written or compiled, any input a later stage cannot handle, and
    return the training data. Sample grids and eval.py's Inception take 1 or 3 channels; the data
    must fit the model (`check_data`, `check_points`), a distillation teacher the model and guidance
    (`check_teacher`)."""
    if not is_points(config) and config.model.channels not in (1, 3):
        raise ValueError(
            f"--model-channels {config.model.channels}: sample grids and FID "
            "(Inception, eval.py) take 1 or 3 channels; use 1- or 3-channel data and "
            "set --model-channels to match"
        )
    if config.variant != "teacher":
        check_teacher(config)
    dataset = load_data(config)
    (check_points if is_points(config) else check_data)(dataset, config.model)
    return dataset


def check_teacher(config: Config) -> None:
    """Refuse a teacher that cannot serve this distillation: unreadable, not a teacher, another
    model, or guidance on a teacher whose null label never trained (`mmd.check_guidance`). A
    teacher still to be trained (`--teacher auto`) is checked against this configuration."""
    path = teacher_file(config)
    if not path.is_file():
        mmd.check_guidance(
            guidance=config.guidance,
            num_classes=config.model.num_classes,
            label_dropout=config.label_dropout,
            where=f"the teacher to be trained for {path}",
        )
        return
    meta = checkpoint.read_meta(path)
    saved = saved_config(path, meta)
    if saved.variant != "teacher":
        raise checkpoint.CheckpointError(
            f"{path} is a checkpoint of a {saved.variant} run, not of a teacher; "
            "pass --teacher a teacher.eqx or a ckpt_*.eqx of a --variant teacher "
            "run"
        )
    params_like = checkpoint.model_skeleton(config.model)[0]
    checkpoint.check_manifest(path, meta, checkpoint.network_group(meta), params_like)
    differ = [
        f.name
        for f in dataclasses.fields(config.model)
        if f.name not in ("dtype", "remat")
        and getattr(saved.model, f.name) != getattr(config.model, f.name)
    ]
    if differ:
        options = " ".join(
            f"--model-{n.replace('_', '-')} {getattr(saved.model, n)}" for n in differ
        )
        raise checkpoint.CheckpointError(
            f"{path} was trained with another model ({', '.join(differ)}): pass {options}"
        )
    mmd.check_guidance(
        guidance=config.guidance,
        num_classes=saved.model.num_classes,
        label_dropout=saved.label_dropout,
        where=f"teacher {path}",
    )


def _check_classes(dataset: data.Dataset, num_classes: int) -> None:
    if dataset.num_classes != num_classes:
        raise ValueError(
            f"{dataset.name} has {dataset.num_classes} classes, the model {num_classes}: "
            f"pass --model-num-classes {dataset.num_classes}"
        )


def check_data(dataset: data.Dataset, model: uvit.UViTConfig) -> None:
    """The data must be images of 1 or 3 channels with the model's shape and classes."""
    expected = (model.resolution, model.resolution, model.channels)
    channels = dataset.images.shape[-1]
    if dataset.images.ndim != 4:
        raise ValueError(
            f"{dataset.name} holds {channels}-D points, which the image model (U-ViT) cannot "
            "take: for the 2-D walkthrough use --preset ring2d (an MLP denoiser on --data rings)"
        )
    if channels not in (1, 3):
        raise ValueError(
            f"{dataset.name} has {channels}-channel images; sample grids and FID "
            "(Inception, eval.py) take 1 or 3 channels: convert the data (drop alpha)"
        )
    if dataset.images.shape[1:] != expected:
        raise ValueError(
            f"{dataset.name} has images {dataset.images.shape[1:]}, the model expects {expected}: "
            "set --data-resolution or the --model-* options"
        )
    _check_classes(dataset, model.num_classes)


def check_points(dataset: data.Dataset, model: uvit.MLPConfig) -> None:
    """The data must be points with the MLP's number of coordinates and classes."""
    if dataset.images.ndim != 2 or dataset.images.shape[1] != model.dim:
        raise ValueError(
            f"{dataset.name} holds data of shape {dataset.images.shape[1:]}, the MLP "
            f"takes points of {model.dim} coordinates: use --data rings or gmm, or "
            "an image preset"
        )
    _check_classes(dataset, model.num_classes)


def optimizers(
    config: Config,
) -> tuple[optax.GradientTransformation, optax.GradientTransformation | None, Callable]:
    """`(optimizer, aux optimizer, lr(i))` of a resolved configuration; `lr(i)` is the rate of
    update i (0-based). Both distillation optimisers warm up over `config.warmup` updates
    (see `resolve`)."""
    if config.variant == "teacher":
        opt = mmd.teacher_optimizer(
            peak_lr=config.teacher_lr,
            warmup_steps=config.teacher_warmup,
            b1=config.teacher_b1,
            b2=config.teacher_b2,
        )
        schedule = mmd.warmup_linear_schedule(
            peak_lr=config.teacher_lr, warmup_steps=config.teacher_warmup, total_steps=None
        )
        return opt, None, lambda i: float(schedule(jnp.asarray(i)))

    def distill(peak_lr: float, updates: int) -> tuple[optax.GradientTransformation, Callable]:
        kwargs = dict(peak_lr=peak_lr, warmup_steps=config.warmup, total_steps=updates)
        optimizer = mmd.distill_optimizer(**kwargs, b1=config.b1)
        return optimizer, mmd.warmup_linear_schedule(**kwargs)

    if config.variant == "instant":
        opt, schedule = distill(config.lr, config.steps)
        return opt, None, lambda i: float(schedule(jnp.asarray(i)))
    # Each cycle of aux_steps + 1 updates: the auxiliary's aux_steps, then the generator's one.
    n, updates = config.aux_steps, generator_updates(config, config.steps)
    opt, gen_schedule = distill(config.lr, updates)
    aux_opt, aux_schedule = distill(config.aux_lr, config.steps - updates)

    def learning_rate(i: int) -> float:
        cycle, position = divmod(i, n + 1)
        if position == n:
            return float(gen_schedule(jnp.asarray(cycle)))
        return float(aux_schedule(jnp.asarray(cycle * n + position)))

    return opt, aux_opt, learning_rate


def fresh_statistics(
    config: Config,
    *,
    teacher: PyTree,
    static: PyTree,
    mesh: jax.sharding.Mesh,
    dataset: data.Dataset,
    key: PRNGKeyArray,
    teacher_cfg: mmd.TeacherConfig,
    distill_cfg: mmd.DistillConfig,
) -> tuple[PyTree | None, PyTree | None]:
    """`(Lambda, real_grad)` from passes over real data (a stream separate from training's): Lambda
    from `precond_steps` teacher-loss gradients, `real_grad` (center=fixed) the mean real-data
    gradient."""
    n = config.precond_steps or (config.center_steps if config.center == "fixed" else 0)
    if n == 0:
        return None, None
    local = functools.partial(
        mmd.real_data_gradients, static=static, teacher_cfg=teacher_cfg, distill_cfg=distill_cfg
    )
    grad_fn = mmd.data_parallel(local, mesh=mesh, donate=False)
    batches = data.batches(dataset, batch_size=config.batch_size, seed=(config.seed + 1) % 2**32)
    sharding = NamedSharding(mesh, P("data"))
    real_sum: list[PyTree] = []

    def teacher_grads() -> Iterator[PyTree]:
        for i in tqdm(range(n), desc="teacher gradients", disable=not _show_bars()):
            x, labels = global_batch(next(batches), sharding)
            g_teacher, g_real = grad_fn(teacher, x, labels, jax.random.fold_in(key, i))
            real_sum[:] = [g_real if not real_sum else jax.tree.map(jnp.add, real_sum[0], g_real)]
            yield g_teacher

    if config.precond_steps:
        precond = mmd.estimate_preconditioner(
            teacher_grads(),
            b2=config.teacher_b2,
            eps=config.precond_eps,
            eps_mode=config.precond_eps_mode,
        )
    else:
        precond = None
        for _ in teacher_grads():
            pass
    real_grad = jax.tree.map(lambda g: g / n, real_sum[0]) if config.center == "fixed" else None
    return precond, real_grad


def _show_bars() -> bool:
    """Progress bars only on process 0 and only on a terminal (a log file gets plain lines)."""
    return jax.process_index() == 0 and sys.stderr.isatty()


def _print(message: str) -> None:
    """One line from process 0, above the progress bar when there is one."""
    if jax.process_index() == 0:
        if _show_bars():
            tqdm.write(message)
        else:
            print(message, flush=True)


PATH_SOURCES = ("mnist", "imagenet64", "folder", "npz")  # data.SOURCES whose argument is a path


def load_data(config: Config) -> data.Dataset:
    """The training split of `--data`; errors name the options to change."""
    kind, _, path = config.data.partition(":")
    if kind in PATH_SOURCES and path and not pathlib.Path(path).exists():
        raise FileNotFoundError(f"--data {config.data}: {path} does not exist")
    if kind == "folder" and config.data_resolution is None:
        raise ValueError(
            f"--data {config.data} resizes its images: pass --data-resolution N "
            f"(the model's --model-resolution is {config.model.resolution})"
        )
    try:
        dataset = data.load(config.data, resolution=config.data_resolution)
    except data.DataError as error:
        raise data.DataError(f"--data {config.data}: {error}") from error
    return dataset


def check_variant_options(config: Config) -> None:
    """Refuse an option that the configured variant would ignore. Checked on the final
    configuration (after a resumed run's saved one is merged), not in `Config.__post_init__`."""
    if config.aux_steps != 1 and config.variant != "alternating":
        raise ValueError(f"--aux-steps is for --variant alternating, not {config.variant}")
    if config.student_ema and config.variant == "teacher":
        raise ValueError(
            "--student-ema is for distillation; the teacher's average is --teacher-ema"
        )


def check_run(config: Config) -> tuple[jax.sharding.Mesh, list[pathlib.Path]]:
    """`(mesh, existing checkpoints)` after every check that needs no data: the variant's options,
    devices and batch size, the work directory's state, the teacher file. Nothing is written
    before these (and the data) pass."""
    check_variant_options(config)
    try:
        mesh = mmd.data_mesh(num_devices=config.num_devices)
    except ValueError as error:
        raise ValueError(f"--num-devices {config.num_devices}: {error}") from error
    check_batch(config, mesh.devices.size)
    workdir = pathlib.Path(config.workdir)
    existing = list_checkpoints(workdir)
    if existing and not config.resume:
        raise ValueError(
            f"{workdir} already holds checkpoints; pass --resume to continue that run, or choose "
            "another --workdir"
        )
    saved = _workdir_config(workdir)
    changed = _config_differences(saved, config, ignore=RUN_FIELDS) if saved is not None else []
    if changed and existing:
        raise ValueError(
            f"{workdir}/config.json differs from this configuration in {changed}; "
            "use another --workdir"
        )
    if config.variant != "teacher" and not teacher_file(config).is_file():
        raise FileNotFoundError(
            f"teacher checkpoint {config.teacher} not found; train it first "
            "(`python train.py --teacher auto` does) or pass --teacher PATH"
        )
    return mesh, existing


def teacher_file(config: Config) -> pathlib.Path:
    """The file `--teacher` names: a checkpoint, a teacher run's directory (its teacher.eqx), or for
    `auto` the preset's cached teacher (which may not exist yet)."""
    default = default_teacher_path(config.preset)
    if config.teacher == "auto" or pathlib.Path(config.teacher) == default:
        return default
    path = pathlib.Path(config.teacher)
    usage = (
        "pass --teacher a teacher.eqx, a ckpt_*.eqx of a --variant teacher run, its "
        "directory, or auto"
    )
    if path.is_dir():
        if (path / "teacher.eqx").is_file():
            return path / "teacher.eqx"
        found = list_checkpoints(path)
        unfinished = f" (the run is unfinished: resume it, or pass {found[-1]})" if found else ""
        raise FileNotFoundError(
            f"teacher directory {path} holds no teacher.eqx{unfinished}; {usage}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} not found; {usage}")
    return path


def mmd_configs(config: Config) -> tuple[mmd.TeacherConfig, mmd.DistillConfig]:
    """The settings of mmd.py's losses, from the run's configuration."""
    null_label = config.model.num_classes
    teacher_cfg = mmd.TeacherConfig(
        shift=config.shift,
        null_label=null_label,
        label_dropout=config.label_dropout,
        ema_decay=config.teacher_ema,
    )
    distill_cfg = mmd.DistillConfig(
        num_steps=config.k,
        shift=config.shift,
        weighting=config.weighting,
        zs_mode=config.zs,
        guidance=config.guidance,
        clip=config.clip,
        null_label=null_label,
        regularize_aux=config.regularize_aux,
        center=config.center,
        instant_form=config.instant_form,
        time_sampling=config.time_sampling,
        ema_decay=config.student_ema,
    )
    return teacher_cfg, distill_cfg


class Run(typing.NamedTuple):
    """What the training loop reads, built by `set_up` before the first step."""

    config: Config
    workdir: pathlib.Path
    devices: list[Any]
    static: PyTree
    frozen: mmd.Frozen
    programs: tuple[Callable, ...]  # used in turn (alternating: aux_steps x aux, then generator)
    batches: data.Batches
    batch_sharding: NamedSharding
    learning_rate: Callable[[int], float]
    train_key: PRNGKeyArray
    sample_key: PRNGKeyArray
    last_checkpoint: pathlib.Path | None


def _frozen(
    config: Config,
    teacher: PyTree,
    precond: PyTree,
    *,
    static: PyTree,
    mesh: jax.sharding.Mesh,
    dataset: data.Dataset,
    key: PRNGKeyArray,
) -> mmd.Frozen:
    """What distillation reads but never updates, replicated: the teacher, Lambda (the teacher's
    Adam state's, or fresh with `precond_steps`) and, for `center="fixed"`, the real-data G."""
    fresh_precond, real_grad = None, None
    if config.variant == "instant":
        teacher_cfg, distill_cfg = mmd_configs(config)
        fresh_precond, real_grad = fresh_statistics(
            config,
            teacher=teacher,
            static=static,
            mesh=mesh,
            dataset=dataset,
            key=key,
            teacher_cfg=teacher_cfg,
            distill_cfg=distill_cfg,
        )
    precond = precond if fresh_precond is None else fresh_precond
    frozen = mmd.Frozen(teacher=teacher, precond=precond, real_grad=real_grad)
    return jax.device_put(frozen, NamedSharding(mesh, P()))


def _initial_params(config: Config, *, key: PRNGKeyArray) -> tuple[PyTree, PyTree | None, PyTree]:
    """A fresh teacher's (params, None, static), or the distillation teacher's (params, precond,
    static) read from its checkpoint: the student starts as a copy of the teacher."""
    if config.variant == "teacher":
        params, static = eqx.partition(uvit.make_model(config.model, key=key), eqx.is_inexact_array)
        return params, None, static
    params, precond = load_teacher(teacher_file(config), config)
    return params, precond, checkpoint.model_skeleton(config.model)[1]


def set_up(config: Config) -> tuple[Run, mmd.TrainState]:
    """Check the configuration, work directory, teacher and data; only then write config.json,
    build the step function (compiled on its first call) and the initial or restored state."""
    mesh, existing = check_run(config)
    dataset = check_inputs(config)
    k_init, k_train, k_sample, k_stats = jax.random.split(jax.random.key(config.seed), 4)
    params, precond, static = _initial_params(config, key=k_init)
    workdir = pathlib.Path(config.workdir)
    if jax.process_index() == 0:
        with data.atomic_path(workdir / "config.json") as tmp:
            tmp.write_text(json.dumps(config_to_dict(config), indent=1) + "\n")
    replicated = NamedSharding(mesh, P())
    teacher_cfg, distill_cfg = mmd_configs(config)
    frozen = mmd.Frozen()
    if config.variant != "teacher":
        params = jax.device_put(params, replicated)
        frozen = _frozen(
            config, params, precond, static=static, mesh=mesh, dataset=dataset, key=k_stats
        )
    optimizer, aux_optimizer, learning_rate = optimizers(config)
    state = mmd.init_train_state(
        params=params,
        optimizer=optimizer,
        aux_optimizer=aux_optimizer,
        ema=_ema_decay(config) > 0,
    )
    batches = data.batches(dataset, batch_size=config.batch_size, seed=config.seed)
    resumed = None
    if existing:
        resumed, state, k_train = _restore_newest(existing, state, batches)
        _print(f"Resuming {workdir} from {resumed.name} (step {int(state.step)}).")
    programs = mmd.train_steps(
        config.variant,
        static=static,
        mesh=mesh,
        optimizer=optimizer,
        aux_optimizer=aux_optimizer,
        teacher_cfg=teacher_cfg,
        distill_cfg=distill_cfg,
        aux_steps=config.aux_steps,
    )
    run = Run(
        config,
        workdir,
        list(mesh.devices.flat),
        static,
        frozen,
        tuple(programs),
        batches,
        NamedSharding(mesh, P("data")),
        learning_rate,
        k_train,
        k_sample,
        resumed,
    )
    return run, jax.device_put(state, replicated)


# ----------------------------------------------------------------------------------------------
# Sampling, images and figures


def _ema_decay(config: Config) -> float:
    """The decay of the trained model's parameter average (0: none kept)."""
    return config.teacher_ema if config.variant == "teacher" else config.student_ema


def _sampler_name(config: Config, network: str) -> tuple[str, int]:
    """(what samples, how many steps) for a grid's title; `network` is "teacher" or "student"."""
    if network == "teacher":
        k = config.teacher_k if config.variant == "teacher" else config.k
        return f"teacher ({'parameter average' if config.teacher_ema > 0 else 'parameters'})", k
    average = " (parameter average)" if config.student_ema > 0 else ""
    return f"{config.variant} student{average}", config.k


def sample_images(run: Run, params: PyTree, *, network: str) -> UInt8[np.ndarray, "n h w c"]:
    """`grid_size` images of the run's fixed sample key (same noise and labels every time)."""
    config = run.config
    # Each process samples on its own devices from its own copy of the (replicated) parameters: a
    # transfer from another process's devices is not supported on CPU.
    params = jax.tree.map(lambda a: a.addressable_data(0), params)
    return eval.generate(
        eqx.combine(params, run.static),
        run.sample_key,
        num_samples=config.grid_size,
        batch_size=config.grid_size,
        num_classes=config.model.num_classes,
        num_steps=_sampler_name(config, network)[1],
        shift=config.shift,
        guidance=0.0,
        clip=False,
        gamma=0.0,
        null_label=config.model.num_classes,
        image_shape=(config.model.resolution, config.model.resolution, config.model.channels),
        devices=[d for d in run.devices if d.process_index == jax.process_index()],
    )


def write_samples(run: Run, params: PyTree, *, step: int, network: str) -> pathlib.Path:
    """`samples/step_<step>.png`: a titled grid (sampler, steps, training step)."""
    images = sample_images(run, params, network=network)
    path = run.workdir / "samples" / f"step_{step:08d}.png"
    if jax.process_index() == 0:
        name, k = _sampler_name(run.config, network)
        start = step == 0 and network == "teacher"
        when = "step 0, before distillation" if start else f"after {step} training steps"
        eval.save_titled_grids(
            [(f"{name}, {k} sampling steps", images)],
            path,
            columns=eval.grid_columns(run.config.model.num_classes),
            title=f"{run.workdir}: {when}",
        )
    return path


def write_comparison(run: Run, params: PyTree, *, step: int) -> pathlib.Path:
    """`samples/teacher_vs_student.png`: the teacher and the student, both with k sampling steps,
    from the same noise and labels, so that what distillation changed is visible."""
    teacher, student = (
        sample_images(run, p, network=n)
        for p, n in ((run.frozen.teacher, "teacher"), (params, "student"))
    )
    path = run.workdir / "samples" / "teacher_vs_student.png"
    if jax.process_index() == 0:
        name, k = _sampler_name(run.config, "student")
        after = f"{name}, {k} steps, after {step} training steps"
        panels = [(f"teacher, {k} steps (before distillation)", teacher), (after, student)]
        eval.save_titled_grids(
            panels,
            path,
            columns=eval.grid_columns(run.config.model.num_classes),
            title=f"{run.workdir}: same noise and labels (label = column)",
        )
    return path


POINTS_FIGURE = "points.png"  # the 2-D walkthrough's figure, in the workdir


def sample_points(run: Run, params: PyTree, *, num_steps: int) -> Float[np.ndarray, "n d"]:
    """`eval.draw_points` of the run's fixed sample key, `eval.NUM_POINTS` of them."""
    params = jax.tree.map(lambda a: a.addressable_data(0), params)  # as in `sample_images`
    model = eqx.combine(params, run.static)
    return eval.draw_points(
        model,
        run.sample_key,
        dim=run.config.model.dim,
        num_classes=run.config.model.num_classes,
        shift=run.config.shift,
        num_steps=num_steps,
        num_points=eval.NUM_POINTS,
    )


def write_points_figure(run: Run, params: PyTree, *, step: int) -> pathlib.Path:
    """`points.png` (`eval.points_figure`): the teacher with the student's k and with `teacher_k`
    steps, and the student with k steps, against fresh data."""
    config, k = run.config, run.config.k
    samples = {
        f"teacher, {k} steps": sample_points(run, run.frozen.teacher, num_steps=k),
        f"teacher, {config.teacher_k} steps": sample_points(
            run, run.frozen.teacher, num_steps=config.teacher_k
        ),
        f"{_sampler_name(config, 'student')[0]}, {k} steps": sample_points(
            run, params, num_steps=k
        ),
    }
    path = run.workdir / POINTS_FIGURE
    eval.points_figure(
        samples,
        data_source=config.data,
        seed=config.seed,
        path=path if jax.process_index() == 0 else None,
        title=f"{run.workdir}: {config.variant} distillation, {step} steps",
        echo=_print,
    )
    return path


# ----------------------------------------------------------------------------------------------
# The training loop


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step; `checkpoint` holds that step."""

    def __init__(self, step: int, path: pathlib.Path):
        super().__init__(f"stopped at step {step}; checkpoint {path}")
        self.step, self.checkpoint = step, path


class StopSignals:
    """Inside the block the first SIGINT or SIGTERM sets `requested`: the loop finishes its step,
    writes a checkpoint and stops. A second one raises KeyboardInterrupt at once. Main thread only
    (elsewhere the signals keep their handlers)."""

    def __enter__(self) -> "StopSignals":
        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            signals = (signal.SIGINT, signal.SIGTERM)
            self.previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        _print(
            f"{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
            "(Ctrl-C again aborts at once)."
        )

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class MetricsLog:
    """The steps' metrics: kept on device until `flush`, then written to metrics.jsonl, checked."""

    def __init__(self, run: Run):
        self.run, self.pending = run, []
        self.path = run.workdir / "metrics.jsonl"
        self.t_start = self.t_window = time.perf_counter()

    def append(self, step: int, metrics: dict[str, Array]) -> None:
        self.pending.append((step, metrics))

    def flush(self, last_good: pathlib.Path | None) -> dict[str, Any]:
        """Fetch, write and return the last record; a non-finite value raises FloatingPointError."""
        host, window = jax.device_get(self.pending), len(self.pending)
        self.pending = []
        now = time.perf_counter()
        rate = window * self.run.config.batch_size / max(now - self.t_window, 1e-9)
        self.t_window = now
        records = [
            _metric_record(
                self.run.config,
                step,
                {k: float(v) for k, v in metrics.items()},
                self.run.learning_rate(step - 1),
            )
            | {"images_per_s": rate, "time": now - self.t_start}
            for step, metrics in host
        ]
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        for record in records:
            bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                kept = (
                    f"the last good checkpoint is {last_good}"
                    if last_good
                    else "no checkpoint was written"
                )
                raise FloatingPointError(
                    f"non-finite {', '.join(bad)} at step {record['step']} of {self.run.workdir}; "
                    f"{kept}. Lower the learning rate (or check the data and teacher), then rerun "
                    "(--resume continues from that checkpoint)."
                )
        return records[-1]


def _metric_record(
    config: Config, step: int, metrics: dict[str, float], lr: float
) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step}
    if config.variant == "alternating":
        record["generator_loss" if metrics.pop("generator_step") else "aux_loss"] = metrics.pop(
            "loss"
        )
    record.update(metrics)
    record["lr"] = lr
    return record


SHOWN = ("loss", "aux_loss", "moment_gap", "grad_norm")


class Progress:
    """On a terminal a tqdm bar; otherwise (a log file) a plain line about 50 times a run and at
    the first and last step, with an ETA measured after the first step (which compiles); never a
    carriage return."""

    def __init__(self, config: Config, start: int):
        self.config, self.start, self.first = config, start, None
        self.every = config.log_every * max(1, round(config.steps / 50 / config.log_every))
        self.bar = (
            tqdm(
                total=config.steps,
                initial=start,
                desc=config.variant,
                dynamic_ncols=True,
                unit="step",
            )
            if _show_bars()
            else None
        )

    def show(self, step: int, record: dict[str, Any]) -> None:
        shown = {k: f"{record[k]:.4g}" for k in SHOWN if k in record}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(shown, refresh=False)
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        if step % self.every and step != self.config.steps and step != self.first[0]:
            return
        done, since = step - self.first[0], now - self.first[1]
        left = self.config.steps - step
        eta = f", eta {_duration(since / done * left)}" if done else " (compiled)"
        values = " ".join(f"{k} {v}" for k, v in shown.items())
        _print(
            f"{self.config.variant} step {step}/{self.config.steps}: {values}, "
            f"{record['images_per_s']:.1f} images/s{eta}"
        )

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _network(state: mmd.TrainState) -> PyTree:
    """The parameters to sample: the trained model's parameter average (teacher's, or with
    `--student-ema` the generator's) when the run keeps one."""
    return state.params if state.ema is None else state.ema


def start_line(run: Run, *, start: int) -> str:
    """The line that opens a run: steps, devices, batch, the warm-up used (distillation: capped by
    `resolve`), work directory, and what samples use."""
    config, n, decay = run.config, len(run.devices), _ema_decay(run.config)
    average = f" Samples use the parameter average (decay {decay})." if decay > 0 else ""
    warmup = config.teacher_warmup if config.variant == "teacher" else config.warmup
    return (
        f"{config.variant}: steps {start}..{config.steps} on {n} device{'s' if n > 1 else ''}, "
        f"batch {config.batch_size}, warm-up {warmup} updates, in {run.workdir} (the first step "
        f"compiles).{average}"
    )


def train(config: Config) -> pathlib.Path:
    """Run (or resume) the configured training; returns the final checkpoint (teacher: teacher.eqx).

    The teacher must exist (`main` trains a missing default teacher first). On SIGINT or SIGTERM the
    current step finishes, a checkpoint and sample grids are written, and `Interrupted` is raised.
    """
    config = resolve(config)
    run, state = set_up(config)
    start = step = int(state.step)
    t_start, log, last_good = time.perf_counter(), MetricsLog(run), run.last_checkpoint
    if jax.process_index() == 0:
        _truncate_metrics(log.path, start)
        _remove_temporary_files(run.workdir)
    _print(start_line(run, start=start))
    grids = not is_points(config)  # points get one scatter figure at the end instead
    grid_title = "teacher" if config.variant == "teacher" else "student"
    if grids and start == 0 and config.variant != "teacher":  # the teacher with the student's k
        write_samples(run, run.frozen.teacher, step=0, network="teacher")
    stopping, in_flight = False, None
    with StopSignals() as stop, Progress(config, start) as progress:
        for i in range(start, config.steps):
            x, labels = global_batch(next(run.batches), run.batch_sharding)
            key = jax.random.fold_in(run.train_key, i)
            step_fn = run.programs[i % len(run.programs)]  # alternating: auxiliary, ..., generator
            state, metrics = step_fn(state, run.frozen, x, labels, key)
            # At most one step in flight: without this wait the host would dispatch up to
            # `log_every` steps ahead, and a Ctrl-C would be seen only at the next flush.
            jax.block_until_ready(in_flight)
            in_flight, step = metrics, i + 1
            log.append(step, metrics)
            stopping = stop.requested  # read once: a later signal stops after the next step
            end = step == config.steps or stopping
            save_now = step % config.checkpoint_every == 0 or end
            if i == start or step % config.log_every == 0 or save_now:
                progress.show(step, log.flush(last_good))
            if save_now:
                last_good = _save(run, state, step)
            if grids and (step % config.sample_every == 0 or end):
                write_samples(run, _network(state), step=step, network=grid_title)
            if stopping:
                break
    if config.variant != "teacher" and step > start:
        (write_comparison if grids else write_points_figure)(run, _network(state), step=step)
    if stopping:
        raise Interrupted(step, last_good)
    if start == config.steps:
        _print(f"{run.workdir} already finished all {config.steps} steps.")
    final = last_good  # not a directory listing: only process 0 writes, maybe to its own disk
    if config.variant == "teacher" and jax.process_index() == 0:
        checkpoint.export_teacher(final, run.workdir / "teacher.eqx")
    result = run.workdir / "teacher.eqx" if config.variant == "teacher" else final
    if jax.process_index() == 0:  # it lists process 0's files
        _print(summary(run, result, steps=step - start, seconds=time.perf_counter() - t_start))
    return result


def summary(run: Run, result: pathlib.Path, *, steps: int, seconds: float) -> str:
    """The end-of-run report: steps, wall time, final loss, the files written (those that exist)
    and the command to run next."""
    config, workdir = run.config, run.workdir
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    final = {k: f"{last[k]:.4g}" for k in SHOWN if k in last}
    samples = workdir / "samples"
    files = [
        result,
        workdir / "loss.png",
        workdir / "metrics.jsonl",
        samples / "teacher_vs_student.png",
        samples / f"step_{config.steps:08d}.png",
        workdir / POINTS_FIGURE,
    ]
    if config.variant == "teacher":
        same = config.data == PRESETS[config.preset].data
        data_option = "" if same else f" --data {shlex.quote(config.data)}"
        command = (
            f"{python_command('train.py')} --preset {config.preset}{data_option} --variant instant "
            f"--teacher {result}"
        )
    elif is_points(config):  # eval.py's FID is for images; the figure is the evaluation
        other = "instant" if config.variant == "alternating" else "alternating"
        command = (
            f"look at {workdir / POINTS_FIGURE}; {python_command('train.py')} --preset "
            f"{config.preset} "
            f"--variant {other}"
        )
    else:
        command = f"{python_command('eval.py')} --checkpoint {result} --num-samples 1000"
    return "\n".join(
        [
            f"Finished {config.variant} in {workdir}: {steps} steps in {_duration(seconds)} "
            f"(step {config.steps} of {config.steps}); final "
            + ", ".join(f"{k} {v}" for k, v in final.items())
            + ".",
            *(f"  {path}" for path in files if path.exists()),
            f"Next: {command}",
        ]
    )


# ----------------------------------------------------------------------------------------------
# Checkpoints: one zip file per checkpoint


def saved_config(path: str | os.PathLike, meta: dict) -> Config:
    """The training configuration stored in a checkpoint's meta, with an error naming the file."""
    try:
        return config_from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(
            f"{path}: its configuration does not fit this version of train.py "
            f"({e}); use the version that wrote it"
        ) from e


def load_checkpoint(
    path: str | os.PathLike,
) -> tuple[uvit.Denoiser | uvit.MLPDenoiser, Config, dict]:
    """`(model, config, meta)` from any checkpoint of train.py: `checkpoint.load_network`, the
    configuration as a `Config`."""
    model, _, meta = checkpoint.load_network(path)
    return model, saved_config(path, meta), meta


def list_checkpoints(workdir: pathlib.Path) -> list[pathlib.Path]:
    return sorted((workdir / "checkpoints").glob("ckpt_*.eqx"))


def load_teacher(path: pathlib.Path, config: Config) -> tuple[PyTree, PyTree | None]:
    """`(teacher params, Lambda or None)`; Lambda from the checkpoint's Adam state when
    `precond_steps` is 0."""
    params_like, _ = checkpoint.model_skeleton(config.model)
    meta = checkpoint.read_meta(path)
    params = checkpoint.load_group(path, checkpoint.network_group(meta), params_like)
    if config.variant != "instant" or config.precond_steps:
        return params, None
    adam = checkpoint.teacher_adam(path, meta, params_like)
    if adam is None:
        raise checkpoint.CheckpointError(
            f"{path} holds no teacher Adam state for Lambda; pass --precond-steps N to estimate it"
        )
    nu, count, b2 = adam
    return params, mmd.preconditioner(
        nu, count=count, b2=b2, eps=config.precond_eps, eps_mode=config.precond_eps_mode
    )


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Keep one line per step up to `step` (the checkpoint resumed from): drop later lines and
    lines a kill cut short; say what was dropped or is missing (metrics newer or older than the
    checkpoint)."""
    if not path.exists():
        return
    kept: dict[int, str] = {}
    later = cut = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            cut += bool(line.strip())
            continue
        if record_step > step:
            later += 1
        else:
            kept.setdefault(record_step, line)
    with data.atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept.values()))
    notes = [f"{later} lines after step {step} (the checkpoint resumed from)"] if later else []
    notes += [f"{cut} unreadable lines (cut short by a kill)"] if cut else []
    missing = step - len(kept)
    if notes or missing:
        gap = f"; {missing} of steps 1..{step} have no line (lost with a killed run)"
        gap = gap if missing else ""
        _print(f"{path}: dropped {' and '.join(notes) or 'nothing'}{gap}.")


def _remove_temporary_files(workdir: pathlib.Path) -> None:
    """Delete temporary files of writes a kill interrupted (`data.atomic_path`), saying which."""
    leftovers = [
        p
        for folder in (workdir, workdir / "checkpoints", workdir / "samples")
        for p in data.temporary_files(folder)
    ]
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        _print(
            f"Removed {len(leftovers)} temporary files of interrupted writes: "
            f"{', '.join(str(p) for p in leftovers)}."
        )


def _save(run: Run, state: mmd.TrainState, step: int) -> pathlib.Path:
    """Write a checkpoint (process 0), keep the newest `keep_checkpoints`, redraw the loss plot."""
    config, workdir = run.config, run.workdir
    path = workdir / "checkpoints" / f"ckpt_{step:08d}.eqx"
    if jax.process_index() != 0:
        return path
    meta = {
        "kind": config.variant,
        "step": step,
        "config": config_to_dict(config),
        "key": np.asarray(jax.random.key_data(run.train_key)).tolist(),
        "data_state": run.batches.get_state(),
    }
    checkpoint.save(
        path,
        meta=meta,
        groups={
            "params": state.params,
            "opt_state": state.opt_state,
            "aux_params": state.aux_params,
            "aux_opt_state": state.aux_opt_state,
            "ema": state.ema,
        },
    )
    for old in list_checkpoints(workdir)[: -config.keep_checkpoints]:
        old.unlink()
    eval.plot_losses(workdir / "metrics.jsonl", workdir / "loss.png", variant=config.variant)
    return path


def _restore(
    path: pathlib.Path, like: mmd.TrainState, batches: data.Batches
) -> tuple[mmd.TrainState, PRNGKeyArray]:
    """Training state, PRNG key and data position from a checkpoint of this run."""
    meta = checkpoint.read_meta(path)
    state = like._replace(
        step=jnp.asarray(meta["step"], jnp.int32),
        **{name: checkpoint.load_group(path, name, getattr(like, name)) for name in meta["groups"]},
    )
    try:
        batches.set_state(meta["data_state"])
    except data.DataError as e:
        raise checkpoint.CheckpointError(f"{path}: {e}") from e
    return state, jax.random.wrap_key_data(jnp.asarray(meta["key"], jnp.uint32))


def _restore_newest(
    paths: list[pathlib.Path], like: mmd.TrainState, batches: data.Batches
) -> tuple[pathlib.Path, mmd.TrainState, PRNGKeyArray]:
    """`_restore` from the newest of `paths` that reads back intact, saying what it skipped."""
    for path in reversed(paths):
        try:
            return path, *_restore(path, like, batches)
        except checkpoint.CheckpointError as e:
            _print(f"Skipping damaged checkpoint {path.name} (kept for inspection): {e}")
    raise checkpoint.CheckpointError(
        f"no intact checkpoint in {paths[0].parent} (messages above); move the "
        "damaged files away to start the run afresh, or use another --workdir"
    )


# ----------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake prints one line and a pointer to --help, not the whole usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"train.py: error: {message} (python train.py --help lists every option)\n")


def parser(base: Config, *, origin: str) -> argparse.ArgumentParser:
    """The command line: one option per `Config` field in the sections of `GROUPS`, defaults from
    `base` (named by `origin`), and `--config FILE`."""
    p = _Parser(
        description="Train a diffusion teacher or distil it with Moment Matching "
        "(alternating or instant).",
        epilog=f"Presets: {', '.join(PRESETS)}. Defaults shown are those of {origin}.",
    )
    sections = options.add_options(p, Config, base, groups=GROUPS)
    sections["run"].add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="replay the run that FILE (a run's config.json) records, in <its workdir>-replay "
        "unless --workdir is given; the other options given override its values",
    )
    return p


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """The resolved configuration from the command line: the preset (or `--config FILE`'s run),
    then (with --resume) the workdir's saved configuration, then the options given. A resumed run
    may change only `RUN_FIELDS`."""
    pre = _Parser(add_help=False)
    pre.add_argument("--preset", default="mnist", choices=sorted(PRESETS))
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        base, origin = PRESETS[known.preset], f"--preset {known.preset}"
    else:
        base, origin = replay_config(known.config), f"--config {known.config}"
    overrides = vars(parser(base, origin=origin).parse_args(argv))
    overrides.pop("config", None)
    config = resolve(options.apply(base, overrides))
    saved = _workdir_config(pathlib.Path(config.workdir)) if config.resume else None
    if saved is None:
        check_variant_options(config)
        return config
    resumed = resolve(
        options.apply(saved, {k: v for k, v in overrides.items() if k.split(".")[0] in RUN_FIELDS})
    )
    changed = _config_differences(saved, config, ignore=RUN_FIELDS)
    explicitly = [name for name in changed if name in overrides]
    if explicitly:
        steps = " (--steps cannot be extended: the learning rate decays to 0 at the saved --steps)"
        raise ValueError(
            f"--resume continues the run in {config.workdir} with its saved configuration, but "
            f"these options differ from it: {', '.join(map(options.flag, explicitly))}. Drop them, "
            f"or start a new run in another --workdir{steps if 'steps' in explicitly else ''}."
        )
    check_variant_options(resumed)
    return resumed


def ensure_teacher(config: Config) -> pathlib.Path:
    """The teacher file of a distillation configuration: `config.teacher` when it exists; the
    preset's default teacher (`--teacher auto`) is trained first (in WORKDIR/teacher) and cached
    when absent."""
    config = resolve(config)
    path = teacher_file(config)
    if path.is_file():
        return path
    teacher_config = resolve(
        dataclasses.replace(
            config,
            variant="teacher",
            steps=None,
            batch_size=None,
            workdir=str(pathlib.Path(config.workdir) / "teacher"),
            # distillation-only options, refused for a teacher run (check_variant_options)
            aux_steps=1,
            student_ema=0.0,
        )
    )
    _print(
        f"No teacher at {path}: training the {config.preset} teacher first "
        f"({teacher_config.steps} steps in "
        f"{teacher_config.workdir}), then caching it there."
    )
    exported = train(teacher_config)
    if jax.process_index() == 0:
        with data.atomic_path(path) as tmp:
            shutil.copyfile(exported, tmp)
        _print(f"Cached the teacher at {path}.")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("teacher cached")  # the other processes read it next
    return path


def python_command(script: str) -> str:
    """`script` (a file beside this one) run as a user would type it from the working directory:
    the interpreter's path relative to it when it lives there (e.g. `.venv/bin/python`), else
    `python`; the script's relative path when it lies below it, else its absolute path."""
    cwd, path = pathlib.Path.cwd(), pathlib.Path(__file__).resolve().with_name(script)
    python = pathlib.Path(sys.executable)
    interpreter = str(python.relative_to(cwd)) if python.is_relative_to(cwd) else "python"
    return shlex.join(
        [interpreter, str(path.relative_to(cwd) if path.is_relative_to(cwd) else path)]
    )


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues the run `argv` started (the same options plus --resume)."""
    resume = [] if "--resume" in argv else ["--resume"]
    return python_command("train.py") + " " + shlex.join([*argv, *resume])


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    """Command-line entry point: parse, (multi-host) initialise, train a missing default teacher,
    then the configured run. Returns the final checkpoint. On SIGINT/SIGTERM prints where the
    checkpoint is and the command that resumes, then raises `Interrupted`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    maybe_initialize_distributed()
    config = parse_config(argv)
    try:
        default = default_teacher_path(config.preset)
        if config.variant != "teacher" and config.teacher == str(default) and not default.is_file():
            # --teacher auto without the preset's teacher: check the distillation's inputs, then
            # train the teacher (hours on a CPU) before distilling.
            check_batch(config, mmd.data_mesh(num_devices=config.num_devices).devices.size)
            check_inputs(config)
            ensure_teacher(config)
        return train(config)
    except Interrupted as stop:
        _print(
            f"Interrupted at step {stop.step}; checkpoint {stop.checkpoint}. "
            f"Resume: {resume_command(argv)}"
        )
        raise


if __name__ == "__main__":
    try:
        main()
    except Interrupted:
        sys.exit(130)
    except KeyboardInterrupt:
        print(
            "train.py: aborted; the last checkpoint written is intact (--resume continues)",
            file=sys.stderr,
        )
        sys.exit(130)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        sys.exit(f"train.py: error: {error}")
