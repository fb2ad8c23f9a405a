"""The checkpoint file format of train.py, read by train.py (resume, teachers) and eval.py.

A checkpoint is one zip file, written to a temporary name and renamed: `meta.json` (format, step,
the run's configuration as config.json holds it, PRNG key, data-iterator state, a manifest of every
leaf's path, shape and dtype) and one `<group>.eqx` member per pytree (`params`, `opt_state`,
`aux_params`, `aux_opt_state`, `ema`; teacher exports: `params`, `nu`) written with
`eqx.tree_serialise_leaves`. Every member is read whole, so zip's CRC-32 catches a damaged byte: a
damaged or incompatible file is one error line naming it. `load_network(path)` rebuilds the trained
network from the file alone.
"""

import io
import json
import os
import pathlib
import zipfile
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

import data
import mmd
import options
import uvit

CHECKPOINT_FORMAT = "mmd-jax-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not fit the configured model."""


def _manifest(tree: PyTree) -> list[list]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [[jax.tree_util.keystr(p), list(x.shape), str(np.dtype(x.dtype))] for p, x in leaves]


def _to_host(tree: PyTree) -> PyTree:
    """numpy copies of (replicated) device arrays; reads this process's first shard, so works
    multi-host."""
    return jax.tree.map(
        lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a),
        tree,
    )


def save(path: str | os.PathLike, *, meta: dict, groups: dict[str, PyTree]) -> None:
    """Write `meta` and the pytrees `groups` into one zip file, atomically."""
    path = pathlib.Path(path)
    groups = {name: _to_host(tree) for name, tree in groups.items() if tree is not None}
    meta = {
        **meta,
        "format": CHECKPOINT_FORMAT,
        "groups": {name: _manifest(t) for name, t in groups.items()},
    }
    with data.atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.writestr("meta.json", json.dumps(meta, indent=1))
            for name, tree in groups.items():
                with archive.open(f"{name}.eqx", "w", force_zip64=True) as member:
                    eqx.tree_serialise_leaves(member, tree)


# What reading a damaged zip can raise: a bad CRC, header or size (BadZipFile, EOFError, OSError), a
# flipped compression-method or flag bit (NotImplementedError, RuntimeError), garbage in a member.
_DAMAGE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    KeyError,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    UnicodeDecodeError,
)


def _member_bytes(path: pathlib.Path, member: str) -> bytes:
    """One member of a checkpoint, read whole so that zip checks its CRC-32 (a flipped byte)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(member)
    except _DAMAGE as e:
        raise CheckpointError(
            f"{path}: {member} cannot be read ({type(e).__name__}: {e}): damaged, or not a "
            "checkpoint written by train.py (teacher.eqx, ckpt_*.eqx): pass one that is"
        ) from e


def read_meta(path: str | os.PathLike) -> dict:
    """A checkpoint's `meta.json` (step, configuration, manifest, ...)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        meta = json.loads(_member_bytes(path, "meta.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(
            f"{path} has format {found!r}, expected {CHECKPOINT_FORMAT!r}: not a "
            "checkpoint of this version of train.py"
        )
    return meta


def load_group(path: str | os.PathLike, name: str, like: PyTree) -> PyTree:
    """Read the pytree `name` of a checkpoint into the structure of `like` (arrays or
    ShapeDtypeStructs), after checking every leaf's path, shape and dtype; a mismatch lists the
    differing leaves."""
    check_manifest(path, read_meta(path), name, like)
    return _read_member(path, name, like)


def check_manifest(path: str | os.PathLike, meta: dict, name: str, like: PyTree) -> None:
    """Refuse a group whose leaves' paths, shapes or dtypes differ from `like`'s, listing them."""
    if name not in meta["groups"]:
        raise CheckpointError(f"{path} holds {sorted(meta['groups'])}, not {name!r}")
    saved, expected = meta["groups"][name], _manifest(like)
    if saved != expected:
        saved_d, expected_d = ({p: f"{d}{s}" for p, s, d in m} for m in (saved, expected))
        lines = [
            f"  {p}: checkpoint {saved_d.get(p, 'absent')}, "
            f"configured {expected_d.get(p, 'absent')}"
            for p in list(expected_d) + [p for p in saved_d if p not in expected_d]
            if saved_d.get(p) != expected_d.get(p)
        ]
        shown = lines[:20] + ([f"  ... and {len(lines) - 20} more"] if len(lines) > 20 else [])
        raise CheckpointError(
            f"{path}: {name!r} does not match the configured model ({len(lines)} leaves differ):\n"
            + "\n".join(shown)
            + "\nConfigure the architecture the checkpoint was trained with (see its meta.json "
            "'config.model')."
        )


def _read_member(path: str | os.PathLike, name: str, like: PyTree) -> PyTree:
    """The group `name` (CRC-checked) deserialised into the structure of `like`."""
    path = pathlib.Path(path)
    content = _member_bytes(path, f"{name}.eqx")
    try:
        return eqx.tree_deserialise_leaves(io.BytesIO(content), like)
    except _DAMAGE as e:
        raise CheckpointError(
            f"{path}: {name}.eqx does not hold the leaves its manifest lists "
            f"({e}); the file is damaged: use another checkpoint"
        ) from e


def read_leaves(path: str | os.PathLike, name: str) -> dict[str, np.ndarray]:
    """A checkpoint group's leaves by path (e.g. `[1][0].nu.net.stem.weight`), without building the
    model."""
    manifest = read_meta(path)["groups"][name]
    like = [jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype)) for _, shape, dtype in manifest]
    return {p: np.asarray(x) for (p, _, _), x in zip(manifest, _read_member(path, name, like))}


def _is_param(x: Any) -> bool:
    return eqx.is_inexact_array(x) or (
        isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact)
    )


def model_skeleton(model: uvit.UViTConfig | uvit.MLPConfig) -> tuple[PyTree, PyTree]:
    """`(params as ShapeDtypeStructs, static)` of a model (U-ViT or MLP), without allocating it."""
    shapes = eqx.filter_eval_shape(uvit.make_model, model, key=jax.random.key(0))
    return eqx.partition(shapes, _is_param)


def network_kind(meta: dict) -> str:
    """What `load_network` returns for a checkpoint with this metadata: "parameter average" (kept
    by its run, or exported from one) or "parameters"."""
    average = network_group(meta) == "ema" or meta.get("ema")
    return "parameter average" if average else "parameters"


def network_group(meta: dict) -> str:
    """The checkpoint group holding the network to use: the parameter average (a teacher's, or a
    student's with `--student-ema`) when the run kept one."""
    return "ema" if "ema" in meta["groups"] else "params"


# Configuration fields renamed since checkpoints were first written (the shipped teacher's config
# has `teacher_sample_steps`; train.py's `num_samples` was the sample grid's size).
RENAMED = {"teacher_sample_steps": "teacher_k", "num_samples": "grid_size"}


def stored_config(path: str | os.PathLike, meta: dict) -> dict[str, Any]:
    """The run's configuration a checkpoint stores (as config.json holds it), the names of earlier
    versions renamed (`RENAMED`)."""
    values = meta.get("config")
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} stores no configuration: not a checkpoint of train.py")
    return {RENAMED.get(name, name): value for name, value in values.items()}


def model_config(values: dict[str, Any]) -> uvit.UViTConfig | uvit.MLPConfig:
    """The network's configuration (U-ViT or MLP) from its stored dict."""
    cls = options.dataclass_of(uvit.UViTConfig | uvit.MLPConfig, set(values))
    return options.from_dict(cls, values)


def load_network(
    path: str | os.PathLike,
) -> tuple[uvit.Denoiser | uvit.MLPDenoiser, dict[str, Any], dict]:
    """`(model, configuration, meta)` of any checkpoint of train.py: the trained network (teacher or
    student; its parameter average when the run kept one), the stored configuration
    (`stored_config`) and the metadata (step, ...)."""
    meta = read_meta(path)
    config = stored_config(path, meta)
    try:
        model = model_config(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: its model configuration does not fit this version of uvit.py ({e}); use the "
            "version that wrote it"
        ) from e
    params_like, static = model_skeleton(model)
    return eqx.combine(load_group(path, network_group(meta), params_like), static), config, meta


def teacher_adam(
    path: str | os.PathLike, meta: dict, params_like: PyTree
) -> tuple[PyTree, int, float] | None:
    """`(nu, count, b2)` of a teacher's Adam state, in float32: an export's `nu` (bfloat16) or a
    teacher training checkpoint's `opt_state`; None when the file holds neither."""
    if "nu" in meta["groups"]:
        bf16_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params_like)
        nu = jax.tree.map(lambda v: v.astype(jnp.float32), load_group(path, "nu", bf16_like))
        return nu, meta["adam"]["count"], meta["adam"]["b2"]
    config = stored_config(path, meta)
    if "opt_state" not in meta["groups"] or config.get("variant") != "teacher":
        return None
    b1, b2 = config["teacher_b1"], config["teacher_b2"]
    optimizer = mmd.teacher_optimizer(peak_lr=1.0, b1=b1, b2=b2)
    opt_state = load_group(path, "opt_state", jax.eval_shape(optimizer.init, params_like))
    adam = mmd.adam_state(opt_state)
    return adam.nu, int(adam.count), b2


def export_teacher(checkpoint: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write what distillation needs from a teacher training checkpoint: its parameters (their
    moving average when the run kept one), Adam's `nu` (in bfloat16: Lambda = 1/sqrt(nu) to 0.2%,
    far below the noise of an EMA estimate) and update count, and the configuration: half a full
    checkpoint's size."""
    meta = read_meta(checkpoint)
    params_like, _ = model_skeleton(model_config(stored_config(checkpoint, meta)["model"]))
    nu, count, b2 = teacher_adam(checkpoint, meta, params_like)
    group = network_group(meta)
    save(
        out,
        meta={
            "kind": "teacher",
            "step": meta["step"],
            "config": meta["config"],
            "ema": group == "ema",
            "adam": {"count": count, "b2": b2},
        },
        groups={
            "params": load_group(checkpoint, group, params_like),
            "nu": jax.tree.map(lambda v: v.astype(jnp.bfloat16), nu),
        },
    )
