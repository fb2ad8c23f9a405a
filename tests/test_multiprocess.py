"""A real two-process run on this machine against a one-process run on the same total device count.

Each process is a fresh Python (`python tests/test_multiprocess.py ...`): it sets its own CPU device
count and, in the two-process run, joins a localhost coordinator with gloo CPU collectives
(`jax.distributed.initialize`). Then, in each process:
1. mmd's step programs: teacher steps, then instant steps from that teacher, on batches that
   `data.batches` slices per process and `jax.make_array_from_process_local_data` assembles (as
   train.py does);
2. train.py's own loop (`train.main`, a 2-step `tiny` teacher run), each process given its own
   workdir, so that what each one writes can be told apart.
Losses and parameters must equal those of one process holding all the devices, and only process 0
may write files. Nothing here uses `psum_scatter` (gloo returns wrong values for chunks near 4 MiB).
"""

import os
import pathlib
import socket
import subprocess
import sys

import equinox as eqx
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import checkpoint
import data
import mmd
import train
from uvit import MLPDenoiser

# Importing these modules must not start JAX's backend: each process sets its device count first.
ROOT = pathlib.Path(__file__).resolve().parent.parent
DEVICES = 4  # in all: 2 processes x 2 devices, or 1 process x 4 devices
BATCH = 16
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(process_id: int, num_processes: int, port: int, root: pathlib.Path) -> subprocess.Popen:
    # XLA_FLAGS emptied: not the pytest process's 8 fake devices.
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    )
    argv = [sys.executable, __file__, str(process_id), str(num_processes), str(port), str(root)]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _leaves(path: pathlib.Path) -> list[np.ndarray]:
    return list(checkpoint.read_leaves(path, "params").values())


def test_two_processes_equal_one_process(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "tiny.npz",
        x=rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8),
        y=np.arange(64) % 10,
    )
    port = _free_port()
    procs = [_start(i, 2, port, tmp_path) for i in range(2)] + [_start(0, 1, 0, tmp_path)]
    for proc in procs:
        try:
            # Generous: on 2 loaded cores the three processes took 187 s (240 s timed out).
            output, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, output[-3000:]

    one = np.load(tmp_path / "one_0.npz")
    assert one["process_count"] == 1 and one["device_count"] == DEVICES
    for i in range(2):
        two = np.load(tmp_path / f"two_{i}.npz")
        assert (two["process_index"], two["process_count"], two["device_count"]) == (i, 2, DEVICES)
        assert sorted(two.files) == sorted(one.files)
        for name in one.files:
            if name.startswith(("loss", "param", "grad_norm")):
                np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # The steps did something: the instant losses are not all equal.
    assert len(set(np.round(one["loss_instant"], 8))) > 1

    # train.py's loop: process 0 wrote the whole run, process 1 nothing; numbers as one process's.
    written, single = tmp_path / "two_0_run", tmp_path / "one_0_run"
    assert not (tmp_path / "two_1_run").exists()
    names = {
        "checkpoints/ckpt_00000002.eqx",
        "config.json",
        "metrics.jsonl",
        "teacher.eqx",
        "samples/step_00000002.png",
        "loss.png",
    }
    assert names <= {str(p.relative_to(written)) for p in written.rglob("*")}
    for a, b in zip(_leaves(written / "teacher.eqx"), _leaves(single / "teacher.eqx"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    losses = [(d / "metrics.jsonl").read_text().count('"loss"') for d in (written, single)]
    assert losses == [2, 2]


def _steps(tag: str, root: pathlib.Path) -> None:
    """Teacher steps, then instant steps from that teacher, with mmd's programs on 2-D data."""
    dataset = data.load("gmm:n=512,seed=0")  # 2-D points, 8 classes
    batches = data.batches(dataset, batch_size=BATCH, seed=0)  # this process's slice of each batch
    mesh = mmd.data_mesh()
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    key = jax.random.key(0)
    model = MLPDenoiser(dim=2, width=32, depth=2, num_classes=8, key=key)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    results: dict[str, list] = {}

    def run(programs, state, frozen, name):
        for i in range(STEPS):
            x, labels = (jax.make_array_from_process_local_data(sharded, a) for a in next(batches))
            step = programs[i % len(programs)]
            state, metrics = step(state, frozen, x, labels, jax.random.fold_in(key, i))
            for metric in ("loss", "grad_norm"):
                results.setdefault(f"{metric}_{name}", []).append(_host(metrics[metric]))
        return state

    opt = mmd.teacher_optimizer(peak_lr=1e-2, warmup_steps=1)
    programs = mmd.train_steps(
        "teacher",
        static=static,
        mesh=mesh,
        optimizer=opt,
        teacher_cfg=mmd.TeacherConfig(null_label=8, ema_decay=0.5),
    )
    state = jax.device_put(mmd.init_train_state(params=params, optimizer=opt, ema=True), replicated)
    teacher_state = run(programs, state, mmd.Frozen(), "teacher")
    teacher = teacher_state.params
    precond = mmd.preconditioner_from_adam(teacher_state.opt_state, b2=0.99)
    opt = mmd.distill_optimizer(peak_lr=1e-2, total_steps=10, warmup_steps=1)
    cfg = mmd.DistillConfig(num_steps=2, weighting="flat", null_label=8)
    programs = mmd.train_steps("instant", static=static, mesh=mesh, optimizer=opt, distill_cfg=cfg)
    state = jax.device_put(mmd.init_train_state(params=teacher, optimizer=opt), replicated)
    state = run(programs, state, mmd.Frozen(teacher=teacher, precond=precond), "instant")
    leaves = {f"param_teacher_{i}": _host(v) for i, v in enumerate(jax.tree.leaves(teacher))}
    student = jax.tree.leaves(state.params)
    leaves.update({f"param_student_{i}": _host(v) for i, v in enumerate(student)})
    np.savez(
        root / f"{tag}_{jax.process_index()}.npz",
        **leaves,
        **{k: np.stack(v) for k, v in results.items()},
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        device_count=jax.device_count(),
    )


def _host(x) -> np.ndarray:
    """A replicated global array's value, read from this process's first shard."""
    return np.asarray(x.addressable_shards[0].data)


def _worker(process_id: int, num_processes: int, port: int, root: pathlib.Path) -> None:
    """One process of the run: `num_processes` of them share `DEVICES` CPU devices."""
    jax.config.update("jax_num_cpu_devices", DEVICES // num_processes)
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
        )
    tag = "two" if num_processes > 1 else "one"
    _steps(tag, root)
    train.main(
        [
            "--variant",
            "teacher",
            "--preset",
            "tiny",
            "--data",
            f"npz:{root / 'tiny.npz'}",
            "--workdir",
            str(root / f"{tag}_{process_id}_run"),
            "--steps",
            "2",
            "--batch-size",
            str(BATCH),
            "--grid-size",
            "10",
        ]
    )


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
