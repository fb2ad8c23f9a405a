"""A real two-process run on this machine against a one-process run on the same total device count.

Each process is a fresh Python (`python tests/test_multiprocess.py ...`): it sets its own CPU device
count, joins a localhost coordinator with gloo CPU collectives (`jax.distributed.initialize`), reads
its own slice of every global batch through `data.batches`, assembles the global batch with
`jax.make_array_from_process_local_data` (as train.py does) and runs teacher steps, then instant
steps from that teacher, with mmd's step programs. The losses and the parameters must equal those
of one process holding all the devices. Nothing here uses `psum_scatter` (gloo returns wrong values
for chunks near 4 MiB).
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEVICES = 4  # in all: 2 processes x 2 devices, or 1 process x 4 devices
BATCH = 16
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(process_id: int, num_processes: int, port: int, out: pathlib.Path) -> subprocess.Popen:
    # XLA_FLAGS emptied: not the pytest process's 8 fake devices.
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    )
    argv = [sys.executable, __file__, str(process_id), str(num_processes), str(port), str(out)]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_two_processes_equal_one_process(tmp_path):
    port = _free_port()
    runs = {
        "two": [_start(i, 2, port, tmp_path / f"two_{i}.npz") for i in range(2)],
        "one": [_start(0, 1, 0, tmp_path / "one_0.npz")],
    }
    for procs in runs.values():
        for proc in procs:
            try:
                output, _ = proc.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                for p in (p for ps in runs.values() for p in ps):
                    p.kill()
                raise
            assert proc.returncode == 0, output[-3000:]
    one = np.load(tmp_path / "one_0.npz")
    assert one["process_count"] == 1 and one["device_count"] == DEVICES
    for i in range(2):
        two = np.load(tmp_path / f"two_{i}.npz")
        assert (
            two["process_index"] == i
            and two["process_count"] == 2
            and two["device_count"] == DEVICES
        )
        # train.py writes checkpoints, metrics, grids and config.json only where this is true.
        assert bool(two["writes_files"]) == (i == 0)
        assert sorted(two.files) == sorted(one.files)
        for name in one.files:
            if name.startswith(("loss", "param", "grad_norm")):
                np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # The steps did something: the instant losses are not all equal, the parameters moved.
    assert len(set(np.round(one["loss_instant"], 8))) > 1


def _worker(process_id: int, num_processes: int, port: int, out: str) -> None:
    """One process of the run: `num_processes` of them share `DEVICES` CPU devices."""
    import equinox as eqx
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_num_cpu_devices", DEVICES // num_processes)
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
        )
    import data
    import mmd
    from toy import MLPDenoiser

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
            state, metrics = programs[i % len(programs)](
                state, frozen, x, labels, jax.random.fold_in(key, i)
            )
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
    state = run(programs, state, mmd.Frozen(), "teacher")
    teacher = state.params
    frozen = mmd.Frozen(
        teacher=teacher, precond=mmd.preconditioner_from_adam(state.opt_state, b2=0.99)
    )
    opt = mmd.distill_optimizer(peak_lr=1e-2, total_steps=10, warmup_steps=1)
    programs = mmd.train_steps(
        "instant",
        static=static,
        mesh=mesh,
        optimizer=opt,
        distill_cfg=mmd.DistillConfig(num_steps=2, weighting="flat", null_label=8),
    )
    state = run(
        programs,
        jax.device_put(mmd.init_train_state(params=teacher, optimizer=opt), replicated),
        frozen,
        "instant",
    )
    leaves = {f"param_teacher_{i}": _host(v) for i, v in enumerate(jax.tree.leaves(teacher))}
    leaves.update(
        {f"param_student_{i}": _host(v) for i, v in enumerate(jax.tree.leaves(state.params))}
    )
    np.savez(
        out,
        **{k: np.stack(v) for k, v in results.items()},
        **leaves,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        writes_files=jax.process_index() == 0,
    )


def _host(x) -> np.ndarray:
    """A replicated global array's value, read from this process's first shard."""
    return np.asarray(x.addressable_shards[0].data)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
