"""The study (experiments/): the claims table's rows for each budget, the verdicts against the
paper's claims, and resumability (finished rows are cached and skipped, --time-limit stops
between rows); length curves, proxy validation and the speed benchmarks' command line. Training and
evaluation are replaced by recording fakes: their own tests live in test_train.py and test_eval.py.
"""

import dataclasses
import json
import math
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from experiments import __main__ as cli
from experiments import bench, claims, proxy
from experiments import length as length_curves
from experiments.claims import Row


def names(rows):
    return [row.name for row in rows]


def test_small_budget_is_the_headline_rows_first():
    rows = claims.quality_rows("small")
    teachers = {(r.steps, r.guidance, r.gamma) for r in rows if r.variant == "teacher"}
    assert teachers == {(8, 0, 0), (32, 0, 0), (128, 0, 0), (512, 0, 0), (512, 0.1, 0)}
    assert sorted(names(r for r in rows if r.variant != "teacher")) == sorted(
        ["instant-k1-flat", "alternating-k1-flat", "instant-k8-edm", "alternating-k8-edm"]
    )
    assert names(rows[:4]) == [
        "instant-k8-edm",
        "alternating-k8-edm",
        "teacher-512-w0",
        "teacher-8-w0",
    ]
    assert len(set(rows)) == len(rows) == 9


def test_full_budget_tunes_the_teacher_and_two_weightings_per_k():
    rows = claims.quality_rows("full")
    students = [r for r in rows if r.variant != "teacher"]
    for variant in ("instant", "alternating"):
        mine = {(r.steps, r.weighting, r.time_sampling) for r in students if r.variant == variant}
        assert mine == {(k, w, "paper") for k in (8, 4) for w in ("edm", "flat")} | {
            (k, w, "paper") for k in (2, 1) for w in ("flat", "dmd")
        } | {(1, "dmd", "grid")}
        assert f"{variant}-k1-dmd-grid" in names(rows)
    tuned = {(r.steps, r.guidance, r.gamma) for r in rows if r.variant == "teacher"}
    grid = {(s, w, g) for s in (128, 512) for w in (0, 0.1, 0.3) for g in (0, 0.1, 0.3)}
    assert tuned == grid | {(8, 0, 0), (32, 0, 0)}
    assert len(rows) == len(set(rows)) == 16 + 22
    assert "teacher-512-w0.3-gamma0.1" in names(rows)


def record(fid, n=100, fd=2.5):
    return {
        "fid": fid,
        "precision": 0.5,
        "recall": 0.5,
        "num_samples": n,
        "timings_s": {"sampling": 1.0},
        "train_seconds": None,
        "distill_steps": 10,
        "distill_batch_size": 8,
        "step": 10,  # eval.py's: the checkpoint's training step
        "machine": {"devices": "cpu x1", "cpu_count": 2, "jax_version": "0"},
        "feature_protocol": "p",
        "gamma": 0.0,
        "config": {"lr": 1e-4},
        "fd_mnist": fd,
        "label_accuracy": 0.9,
    }


def status(results, metric="fid"):
    return {v["claim"]: v["status"] for v in claims.verdicts(results, metric=metric)}


K8_ALT = "alternating, k = 8: fid <= 1 x the teacher's best"
K8_INST = "instant, k = 8: fid <= 1 x the teacher's best"
K4_ALT = "alternating, k = 4: fid <= 1.25 x the teacher's best"
K4_ORDER = "k = 4: alternating's fid <= instant's"
K2 = "the better variant, k = 2: fid <= 2 x the teacher's best"
K1 = "the better variant, k = 1: fid <= 3 x the teacher's best"


def test_verdicts_hold_against_the_best_tuned_teacher():
    # The best teacher is the guided, noisy 128-step row (4.0), not the 512-step one (5.0); the
    # 8-step teacher (20.0) is not a many-step setting and does not count.
    results = {
        Row("teacher", 512): record(5.0),
        Row("teacher", 128, 0.3, 0.1): record(4.0),
        Row("teacher", 8): record(1.0),
        Row("alternating", 8, weighting="edm"): record(4.5),
        Row("alternating", 8, weighting="flat"): record(3.9),  # the better weighting counts
        Row("instant", 8, weighting="flat"): record(4.0),  # equal is enough
        Row("alternating", 4, weighting="edm"): record(4.9),  # <= 1.25 x 4.0 = 5.0
        Row("instant", 4, weighting="edm"): record(6.0),
        Row("instant", 2, weighting="flat"): record(7.9),  # <= 8.0, alternating's is worse
        Row("alternating", 2, weighting="flat"): record(30.0),
        Row("alternating", 1, weighting="dmd"): record(11.9),  # <= 12.0
    }
    assert set(status(results).values()) == {"holds"}
    assert len(status(results)) == 6
    details = {v["claim"]: v["detail"] for v in claims.verdicts(results)}
    assert details[K8_ALT] == (
        "alternating-k8-flat 3.90 against 1 x teacher-128-w0.3-gamma0.1 4.00 = 4.00 (the best of "
        "2 tuned teacher rows)"
    )


def test_verdicts_fail_and_name_missing_rows():
    results = {
        Row("teacher", 512, 0.1): record(4.0),
        Row("alternating", 8, weighting="flat"): record(4.01),
        Row("alternating", 4, weighting="flat"): record(5.01),
        Row("instant", 4, weighting="flat"): record(5.0),
        Row("alternating", 1, weighting="flat"): record(12.5),
        Row("instant", 1, weighting="dmd"): record(12.1),
    }
    assert status(results) == {
        K8_ALT: "fails",
        K8_INST: "missing",
        K4_ALT: "fails",
        K4_ORDER: "fails",
        K2: "missing",
        K1: "fails",
    }
    # Without a many-step teacher row only the k = 4 order can be judged; fd_mnist likewise.
    students = {r: v for r, v in results.items() if r.variant != "teacher"}
    assert {c: s for c, s in status(students).items() if s != "missing"} == {K4_ORDER: "fails"}
    fd = {
        Row("teacher", 128): record(None, fd=2.0),
        Row("instant", 8, weighting="flat"): record(None, fd=1.0),
    }
    assert status(fd, "fd_mnist")["instant, k = 8: fd_mnist <= 1 x the teacher's best"] == "holds"


def test_verdicts_skip_a_diverged_student_unless_it_is_the_only_one():
    # A NaN row listed first must not hide the finite row that holds; alone, it fails.
    nan = float("nan")
    results = {
        Row("teacher", 128): record(4.0),
        Row("instant", 2, weighting="flat"): record(nan),
        Row("alternating", 2, weighting="dmd"): record(7.9),
        Row("alternating", 1, weighting="dmd"): record(nan),
    }
    assert status(results)[K2] == "holds"
    assert status(results)[K1] == "fails"
    assert claims.best_teacher({Row("teacher", 512): record(nan), **results}, "fid")[1] == 4.0


def test_sample_panels_pick_the_best_rows_with_a_grid(tmp_path):
    def grid(name, value):
        path = tmp_path / f"{name}.png"
        Image.fromarray(np.full((20, 30), value, np.uint8)).save(path)
        return {**record(None, fd=float(value)), "sample_grid": str(path)}

    results = {
        Row("teacher", 512): grid("t512", 5),
        Row("teacher", 128, 0.1): grid("t128", 4),
        Row("teacher", 8): grid("t8", 1),  # not a tuned setting
        Row("instant", 8, weighting="edm"): grid("i8", 7),
        Row("alternating", 8, weighting="flat"): grid("a8", 6),
        Row("instant", 2, weighting="dmd"): grid("i2", 30),
        Row("alternating", 2, weighting="flat"): {**grid("a2", 20), "sample_grid": "gone.png"},
        Row("alternating", 1, weighting="flat"): {**record(None, fd=40.0), "sample_grid": None},
    }
    panels = claims.sample_panels(results, "fd_mnist")
    # The best teacher, then k = 8, 4, 2, 1: k = 4 has no row, k = 2's best lost its grid (the
    # next-best is not substituted: the panel would mislabel the best), k = 1 has no grid.
    assert [p.name for _, p in panels] == ["t128.png", "a8.png"]
    assert panels[1][0] == "best k = 8: alternating-k8-flat\nfd_mnist 6.00"
    out = tmp_path / "samples.png"
    claims.plot_samples(panels, out)
    assert Image.open(out).size[0] > Image.open(out).size[1] > 0
    # A results folder copied from elsewhere: the recorded absolute path is gone, the grid sits
    # in out/eval/<its folder>/; without `out`, the panel is skipped.
    moved = tmp_path / "copy" / "eval" / "a2-run" / "grid.png"
    moved.parent.mkdir(parents=True)
    Image.fromarray(np.full((20, 30), 3, np.uint8)).save(moved)
    results[Row("alternating", 2, weighting="flat")]["sample_grid"] = "/elsewhere/a2-run/grid.png"
    assert [p for _, p in claims.sample_panels(results, "fd_mnist", out=tmp_path / "copy")][-1] == (
        moved
    )
    assert len(claims.sample_panels(results, "fd_mnist")) == 2


def test_quality_table_and_undistilled_comparison():
    results = {
        Row("teacher", 8): record(24.0),
        Row("teacher", 512, 0.1, 0.3): record(8.0),
        Row("instant", 8, weighting="flat"): record(12.0),
        Row("alternating", 1, weighting="dmd", time_sampling="grid"): record(30.0),
    }
    assert claims.against_undistilled(results) == [
        "instant-k8-flat: fid 12.00 against the undistilled teacher's 24.00 with the same 8 steps."
    ]
    table = claims.quality_table(results).splitlines()
    assert len(table) == 2 + len(results)
    assert table[3].startswith("| teacher | 512 | — | 0.1 | 0.3 | — | — | 8.00 |")
    assert table[4].startswith("| alternating | 1 | dmd, t grid | 0 | 0 | 0.0001 | 10 @ 8 | 30.00")
    assert table[5].startswith("| instant | 8 | flat | 0 | 0 | 0.0001 | 10 @ 8 | 12.00 |")


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    """bench_quality with a fake teacher, trainer and evaluator that record their calls."""
    calls = []
    teacher = tmp_path / "teacher.eqx"
    monkeypatch.setattr(claims.train, "ensure_teacher", lambda config: teacher)
    monkeypatch.setattr(claims, "read_meta", lambda path: {"step": 7})

    def train_student(row, *, config, teacher):
        calls.append(("train", row.name, config.distill_steps, config.distill_batch_size))
        return tmp_path / f"{row.name}.eqx", 12.0

    def evaluate_row(row, checkpoint, *, config):
        calls.append(("eval", row.name, checkpoint.name, config.num_samples))
        fid = float(row.steps) if row.variant != "teacher" else 100.0 / row.steps
        return record(fid, config.num_samples)

    monkeypatch.setattr(claims, "train_student", train_student)
    monkeypatch.setattr(claims, "evaluate_row", evaluate_row)

    def run(**overrides):
        options = dict(out=str(tmp_path / "q"), distill_steps=10, distill_batch_size=8)
        return claims.bench_quality(claims.QualityBench(**{**options, **overrides}))

    return calls, run, tmp_path / "q"


def test_quality_caches_rows_and_a_rerun_skips_them(fakes):
    calls, run, out = fakes
    report = run(rows=("instant-k8-edm", "teacher-512-w0"))
    assert calls == [
        ("train", "instant-k8-edm", 10, 8),
        ("eval", "instant-k8-edm", "instant-k8-edm.eqx", 1000),
        ("eval", "teacher-512-w0", "teacher.eqx", 1000),
    ]
    assert (
        "**fails**: instant, k = 8: fid <= 1 x the teacher's best: instant-k8-edm 8.00 "
        "against 1 x teacher-512-w0 0.20 = 0.20" in report
    )
    assert "**missing**: alternating, k = 8: fid <= 1 x the teacher's best" in report
    assert (out / "fid_vs_steps.png").stat().st_size > 0
    saved = json.loads(
        (out / "rows" / "instant-k8-edm-lr0.0001-10x8-seed0_n1000_seed0.json").read_text()
    )
    assert saved["train_seconds"] == 12.0 and saved["distill_steps"] == 10
    calls.clear()
    report = run()
    assert [c[1] for c in calls if c[0] == "eval"] == [
        n
        for n in names(claims.quality_rows("small"))
        if n not in ("instant-k8-edm", "teacher-512-w0")
    ]
    assert "All rows finished." in report and "(9 rows)" in report
    calls.clear()
    run()
    assert calls == []
    # another sample count is another cache; time limit 0 starts nothing
    empty = run(num_samples=50, time_limit=0.0)
    assert empty.endswith("teacher.eqx (step 7).\n")  # no rows: no "Rows computed on"
    run(lr=3e-4, time_limit=0.0)  # so is another learning rate
    assert calls == []
    run(lr=3e-4, rows=("instant-k8-edm", "teacher-8-w0"))  # the teacher row is shared
    assert calls == [
        ("train", "instant-k8-edm", 10, 8),
        ("eval", "instant-k8-edm", "instant-k8-edm.eqx", 1000),
    ]


BEST_ROWS = ("instant-k8-edm", "alternating-k8-edm", "teacher-512-w0")
BEST_SETTINGS = dict(checkpoint="best", select_samples=50, reference_count=20)


@pytest.fixture
def best_fakes(fakes, monkeypatch):
    """`fakes` with students that keep checkpoints 4, 8 and 10 and a fake selection evaluator:
    instant's selection scores are NaN, 4, 6 (step 8 wins), alternating's 9, 8, 7 (the last wins);
    the table's scores are 0.1 at step 8 and 8.0 at step 10."""
    calls, run, out = fakes
    selection = {"instant": [float("nan"), 4.0, 6.0], "alternating": [9.0, 8.0, 7.0]}
    final_fid = {"ckpt_00000008.eqx": 0.1, "ckpt_00000010.eqx": 8.0}

    def train_student(row, *, config, teacher):
        calls.append(("train", row.name))
        checkpoints = claims.student_workdir(row, config) / "checkpoints"
        checkpoints.mkdir(parents=True)
        for step in (4, 8, 10):
            (checkpoints / f"ckpt_{step:08d}.eqx").touch()
        return checkpoints / "ckpt_00000010.eqx", 12.0

    def evaluate_row(row, checkpoint, *, config):
        calls.append(("eval", row.name, checkpoint.name))
        if row.variant == "teacher":
            return record(100.0 / row.steps, config.num_samples)
        return {**record(final_fid[checkpoint.name]), "step": int(checkpoint.stem.split("_")[1])}

    def evaluate(eval_config):  # the selection's evaluations, through checkpoint_scores
        path = pathlib.Path(eval_config.checkpoint)
        step = int(path.stem.split("_")[1])
        calls.append(("select", path.parents[1].name.split("-")[0], step, eval_config.seed))
        assert (eval_config.num_samples, eval_config.reference_count) == (50, 20)
        fid = selection[path.parents[1].name.split("-")[0]][(4, 8, 10).index(step)]
        return {"step": step, "fid": fid}

    monkeypatch.setattr(claims, "train_student", train_student)
    monkeypatch.setattr(claims, "evaluate_row", evaluate_row)
    monkeypatch.setattr(length_curves.evaluation, "evaluate", evaluate)
    for module in (claims, length_curves):
        monkeypatch.setattr(module, "read_meta", lambda path: {"step": 7, "config": {"k": 8}})
    return calls, run, out


def test_best_checkpoint_rows_select_on_a_held_out_seed(best_fakes):
    """--checkpoint best scores every kept checkpoint on seed + 1 (--select-samples samples, the
    reference count passed on) and scores the lowest finite one again on the table's seed, or
    reuses the last row's record when the last checkpoint wins."""
    calls, run, out = best_fakes
    run(rows=BEST_ROWS, **BEST_SETTINGS)
    assert calls == [
        ("train", "instant-k8-edm"),
        ("eval", "instant-k8-edm", "ckpt_00000010.eqx"),
        *[("select", "instant", step, 1) for step in (4, 8, 10)],
        ("eval", "instant-k8-edm-best", "ckpt_00000008.eqx"),
        ("train", "alternating-k8-edm"),
        ("eval", "alternating-k8-edm", "ckpt_00000010.eqx"),
        *[("select", "alternating", step, 1) for step in (4, 8, 10)],  # the last wins: reused
        ("eval", "teacher-512-w0", "teacher.eqx"),
    ]
    rows = {
        (r["sampler"], r["checkpoint"]): r for r in json.loads((out / "quality.json").read_text())
    }
    assert rows["instant", "best"]["checkpoint_step"] == 8 and rows["instant", "best"]["fid"] == 0.1
    assert (
        rows["instant", "last"]["checkpoint_step"] == 10 and rows["instant", "last"]["fid"] == 8.0
    )
    assert rows["alternating", "best"]["checkpoint_step"] == 10
    assert rows["alternating", "best"]["fid"] == rows["alternating", "last"]["fid"] == 8.0
    assert (
        rows["instant", "best"]["selected_from"] == 3
        and rows["instant", "last"]["selected_from"] is None
    )
    saved = json.loads(next((out / "rows").glob("instant-k8-edm-best-*_select50.json")).read_text())
    scores = saved["selection"].pop("scores")
    assert saved["selection"] == {"metric": "fid", "num_samples": 50, "seed": 1, "step": 8}
    assert math.isnan(scores.pop("4")) and scores == {"8": 4.0, "10": 6.0}


def test_best_checkpoint_report_gives_verdicts_at_both(best_fakes):
    _, run, _ = best_fakes
    report = run(rows=BEST_ROWS, **BEST_SETTINGS)
    last, best = report.split("Students at their best checkpoint:")
    assert "**fails**: instant, k = 8: fid <= 1 x the teacher's best: instant-k8-edm 8.00" in last
    assert (
        "**holds**: instant, k = 8: fid <= 1 x the teacher's best: instant-k8-edm-best 0.10" in best
    )
    assert "| instant | 8 | edm | 0 | 0 | 0.0001 | best 8 of 10 @ 8, 3 kept | 0.10 |" in report
    plain = run(rows=("instant-k8-edm",), time_limit=0.0)  # --checkpoint last: no best rows
    assert "-best" not in plain and "Students at their" not in plain


def test_best_checkpoint_rows_are_cached_until_the_student_is_trained_again(
    best_fakes, monkeypatch
):
    calls, run, out = best_fakes
    run(rows=BEST_ROWS, **BEST_SETTINGS)
    calls.clear()
    run(rows=BEST_ROWS, **BEST_SETTINGS)
    assert calls == []  # every row cached
    # the alternating student trained again since its last row: that row is not reused
    config = claims.resolve_quality(
        claims.QualityBench(out=str(out), distill_steps=10, distill_batch_size=8)
    )
    final = (
        claims.student_workdir(Row("alternating", 8, weighting="edm"), config)
        / "checkpoints"
        / "ckpt_00000010.eqx"
    )
    later = next((out / "rows").glob("alternating-k8-edm-lr*.json")).stat().st_mtime + 10
    os.utime(final, (later, later))
    next((out / "rows").glob("alternating-k8-edm-best-*.json")).unlink()
    monkeypatch.setattr(claims, "train_student", lambda row, **_: (final, 12.0))
    run(rows=("alternating-k8-edm",), **BEST_SETTINGS)
    assert calls[-1] == ("eval", "alternating-k8-edm-best", "ckpt_00000010.eqx")


def test_quality_rejects_unknown_rows(fakes):
    _, run, _ = fakes
    with pytest.raises(ValueError, match="unknown --rows instant-k3-edm"):
        run(rows=("instant-k3-edm",))
    with pytest.raises(ValueError, match="comes with its student's name and --checkpoint best"):
        run(rows=("instant-k8-edm-best",))


def test_workers_claim_each_row_once(tmp_path):
    path = tmp_path / "row.json"
    assert (
        claims.claim_row(path)
        and not claims.claim_row(path)
        and path.with_suffix(".claim").exists()
    )


def test_worker_command_line_reproduces_the_settings():
    config = claims.QualityBench(
        budget="full",
        fid=False,
        rows=("teacher-8-w0", "instant-k1-dmd"),
        lr=3e-4,
        jobs=4,
        worker=True,
        time_limit=2.5,
        reference_count=100,
    )
    assert cli.parse_args(["quality", *claims.settings_argv(config)]) == ("quality", config)


def test_spearman_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6], [2.0, 7.0, 1.0, 8.0, 0.5, 3.0]
    assert proxy.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)
    assert proxy.spearman(a, a) == pytest.approx(1.0)


def test_proxy_report_ranks_and_floor(tmp_path):
    rows = {
        k: {
            "fid": 100.0 / k,
            "fd_mnist": 10.0 / k,
            "label_accuracy": 1 - 1 / k,
            "sampling_s": 1.0,
            "scoring_s": 2.0,
        }
        for k in (2, 4, 8)
    }
    floor = {"fid": 1.0, "fd_mnist": 0.1, "label_accuracy": 0.99}
    report = proxy.proxy_report(rows, floor, num_samples=50, out=tmp_path)
    assert "| teacher, 2 steps | 50.00 | 5.000 | 0.5000 | 1 | 2 |" in report
    assert (
        "fd_mnist 1.00, label accuracy 1.00" in report
        and "| real: train vs test digits | 1.00 |" in report
    )
    assert (tmp_path / "eval-proxy.md").read_text() == report + "\n"
    one = proxy.proxy_report({2: rows[2]}, floor, num_samples=50, out=tmp_path)
    assert "needs two or more rows" in one and "Spearman" not in one


def test_quality_json_rows_follow_the_schema(fakes):
    _, run, out = fakes
    run(rows=("instant-k8-edm", "teacher-512-w0"))
    rows = json.loads((out / "quality.json").read_text())
    assert [(r["sampler"], r["k"]) for r in rows] == [("teacher", 512), ("instant", 8)]
    teacher, student = rows
    assert (
        teacher["lr"] is None and teacher["distill_steps"] is None and teacher["weighting"] is None
    )
    assert teacher["time_sampling"] is None
    assert student == {
        "sampler": "instant",
        "k": 8,
        "weighting": "edm",
        "time_sampling": "paper",
        "guidance": 0.0,
        "gamma": 0.0,
        "lr": 1e-4,
        "distill_steps": 10,
        "batch_size": 8,
        "checkpoint": "last",
        "checkpoint_step": 10,
        "selected_from": None,
        "fid": 8.0,
        "precision": 0.5,
        "recall": 0.5,
        "fd_mnist": 2.5,
        "label_accuracy": 0.9,
        "num_samples": 1000,
        "device": student["device"],
        "inception_protocol": "p",
    }
    for broken in (
        {**student, "fid": "8"},
        {**student, "fid": None, "fd_mnist": None},
        {**student, "sampler": "student"},
        {**student, "checkpoint": "middle"},
        {**student, "k": True},
        {k: v for k, v in student.items() if k != "fd_mnist"},
        {**student, "extra": 1},
    ):
        with pytest.raises(ValueError, match="quality row"):
            claims.validate_quality_row(broken)


def test_each_subcommand_parses_into_its_dataclass():
    """Defaults and one override per subcommand land in the settings dataclass; counts < 1 fail."""
    defaults = {
        "model": (bench.ModelBench(preset="mnist", batch_size=128, repeats=10, seed=0), []),
        "speed": (bench.SpeedBench(batch_size=64, repeats=5, sample_batch=16), []),
        "inception": (bench.InceptionBench(batch_size=32, repeats=3, out=None), []),
        "sampling": (bench.SamplingBench(k=8, batch_sizes=(50, 200, 500)), []),
        "proxy": (proxy.ProxyBench(k=(2, 4, 8, 16, 64), out="runs/eval-proxy"), []),
        "quality": (claims.QualityBench(budget="small", out=None, time_limit=None), []),
    }
    for name, (expected, argv) in defaults.items():
        assert cli.parse_args([name, *argv]) == (name, expected)
    overrides = {
        "model": (["--preset", "imagenet64"], {"preset": "imagenet64"}),
        "speed": (["--sample-batch", "4"], {"sample_batch": 4}),
        "inception": (["--batch-size", "16"], {"batch_size": 16}),
        "sampling": (["--batch-sizes", "8", "16"], {"batch_sizes": (8, 16)}),
        "proxy": (["--k", "1", "2"], {"k": (1, 2)}),
        "quality": (
            ["--budget", "full", "--rows", "teacher-8-w0", "--time-limit", "1.5"],
            {"budget": "full", "rows": ("teacher-8-w0",), "time_limit": 1.5},
        ),
    }
    for name, (argv, fields) in overrides.items():
        cls = cli.COMMANDS[name][0]
        assert cli.parse_args([name, *argv]) == (name, cls(**fields))
    with pytest.raises(ValueError, match="--k must be >= 1"):
        cli.parse_args(["sampling", "--k", "0"])


def test_length_scores_every_checkpoint_once_and_reports_best_and_last(monkeypatch, tmp_path):
    run = tmp_path / "instant-flat"
    (run / "checkpoints").mkdir(parents=True)
    (run / "eval").mkdir()
    for step in (200, 400, 600):
        (run / "checkpoints" / f"ckpt_{step:08d}.eqx").touch()
    cached = {"step": 400, "fd_mnist": 5.0, "label_accuracy": 0.98, "num_samples": 50}
    name = "ckpt_00000400_steps8_w0_gamma0_n50_seed1.json"
    (run / "eval" / name).write_text(json.dumps(cached))
    computed = []

    def evaluate(config):
        computed.append((pathlib.Path(config.checkpoint).name, config.seed, config.num_samples))
        step = int(pathlib.Path(config.checkpoint).stem.split("_")[1])
        return {"step": step, "fd_mnist": 9.0 - step / 100, "num_samples": 50}

    monkeypatch.setattr(length_curves.evaluation, "evaluate", evaluate)
    monkeypatch.setattr(length_curves, "read_meta", lambda path: {"config": {"k": 8}})
    records = length_curves.checkpoint_scores(run, num_samples=50, seed=1, fid=False, batch_size=10)
    assert computed == [("ckpt_00000200.eqx", 1, 50), ("ckpt_00000600.eqx", 1, 50)]
    assert [r["fd_mnist"] for r in records] == [7.0, 5.0, 3.0]
    records[-1]["fd_mnist"] = 6.0  # the best is then the middle checkpoint, the last is worse
    report = length_curves.length_report({"instant-flat": records}, metric="fd_mnist", out=tmp_path)
    assert "- instant-flat: best fd_mnist 5.00 at step 400, last 6.00 at step 600." in report
    assert "| instant-flat | 400 | 5.00 | 0.980 | 50 |" in report
    assert (tmp_path / "fd_mnist_vs_distill_steps.png").stat().st_size > 0
    only = length_curves.checkpoint_scores(
        run, num_samples=50, seed=1, fid=False, batch_size=10, steps=[400]
    )
    assert [r["step"] for r in only] == [400] and len(computed) == 2  # read from its eval file
    later = (run / "eval" / name).stat().st_mtime + 10  # step 400 trained again since its score
    os.utime(run / "checkpoints" / "ckpt_00000400.eqx", (later, later))
    length_curves.checkpoint_scores(
        run, num_samples=50, seed=1, fid=False, batch_size=10, steps=[400]
    )
    assert computed[-1] == ("ckpt_00000400.eqx", 1, 50)
    with pytest.raises(FileNotFoundError, match=r"it has \[200, 400, 600\]: pass other --steps"):
        length_curves.checkpoint_scores(
            run, num_samples=50, seed=1, fid=False, batch_size=10, steps=[300]
        )
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        length_curves.checkpoint_scores(tmp_path, num_samples=50, seed=1, fid=False, batch_size=10)


def test_a_student_keeps_every_checkpoint_for_the_length_report(monkeypatch, tmp_path):
    seen = []

    def fake_train(settings):  # records the settings; writes what train_student reads back
        seen.append(settings)
        pathlib.Path(settings.workdir).mkdir(parents=True)
        (pathlib.Path(settings.workdir) / "metrics.jsonl").write_text('{"step": 1, "time": 3.5}\n')
        return pathlib.Path(settings.workdir) / "checkpoints" / "last.eqx"

    monkeypatch.setattr(claims.train, "train", fake_train)
    (row,) = [r for r in claims.quality_rows("full") if r.name == "instant-k8-edm"]
    for steps in (1, 7, 15, 99, 1000, 1001):
        config = claims.resolve_quality(  # a batch unlike the preset's default (32)
            claims.QualityBench(
                out=str(tmp_path / str(steps)), distill_steps=steps, distill_batch_size=64
            )
        )
        _, seconds = claims.train_student(row, config=config, teacher=tmp_path / "t.eqx")
        every, keep = seen[-1].checkpoint_every, seen[-1].keep_checkpoints
        written = len(set(range(every, steps + 1, every)) | {steps})  # train.py also saves the end
        assert seconds == 3.5 and seen[-1].steps == steps and written <= keep
        # config.json states one length and batch: the run's and the distillation defaults agree
        assert seen[-1].distill_steps == steps
        assert seen[-1].batch_size == seen[-1].distill_batch_size == config.distill_batch_size
    (grid,) = [r for r in claims.quality_rows("full") if r.name == "alternating-k1-dmd-grid"]
    claims.train_student(grid, config=config, teacher=tmp_path / "t.eqx")
    assert (seen[-1].variant, seen[-1].k, seen[-1].weighting) == ("alternating", 1, "dmd")
    assert seen[-1].time_sampling == "grid" and "k1-dmd-grid-lr" in seen[-1].workdir


def test_workers_claim_each_row_once_in_a_fresh_folder(tmp_path):
    row = tmp_path / "fresh" / "rows" / "instant-k8-edm.json"  # no folder yet: a new --out
    assert claims.claim_row(row) and not claims.claim_row(row)
    claims.clear_claims(tmp_path / "fresh")
    assert claims.claim_row(row)


@pytest.mark.parametrize("name", ["quality.json", "quality-gpu.json"])
def test_the_shipped_quality_tables_follow_the_schema(name):
    shipped = pathlib.Path(claims.__file__).with_name("results") / name
    rows = json.loads(shipped.read_text())
    assert rows and all(claims.validate_quality_row(row) == row for row in rows)


def test_workers_share_the_cores_between_their_blas_pools(monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # set by the user: kept
    env = claims.worker_environment(4, cpu_count=16)
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "4"
    assert env["MKL_NUM_THREADS"] == "3"
    assert claims.worker_environment(8, cpu_count=2)["OPENBLAS_NUM_THREADS"] == "1"


def test_run_workers_start_each_worker_with_its_share(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    started = []

    class FakeProcess:
        def __init__(self, argv, *, env, **kwargs):
            started.append((argv, env))

        def wait(self):
            return 0

    monkeypatch.setattr(claims.subprocess, "Popen", FakeProcess)
    config = claims.resolve_quality(claims.QualityBench(out=str(tmp_path), jobs=2))
    claims.run_workers(config, deadline=None)
    expected = claims.worker_environment(2)["OPENBLAS_NUM_THREADS"]
    assert len(started) == 2 and all("--worker" in argv for argv, _ in started)
    assert all(env["OPENBLAS_NUM_THREADS"] == expected for _, env in started)


def test_the_shipped_gpu_rows_regenerate_the_shipped_gpu_table(tmp_path):
    docs = pathlib.Path(claims.__file__).with_name("results")
    out = tmp_path / "quality-full"
    shutil.copytree(docs / "quality-gpu-out", out)  # as the GPU script's folder is resumed
    report = claims.bench_quality(claims.QualityBench(budget="full", out=str(out), time_limit=0.0))
    shipped = json.loads((docs / "quality-gpu.json").read_text())
    assert json.loads((out / "quality.json").read_text()) == shipped and len(shipped) == 14
    assert "alternating-k8-edm 11.88 against 1 x teacher-128-w0.1 7.88" in report
    assert (out / "samples.png").exists()  # every panel's grid found in the copied folder


def test_length_refuses_workdirs_it_cannot_report_with_one_line_each(monkeypatch, tmp_path):
    """Repeated run names, a teacher run, 2-D runs mixed with image runs, --fid on 2-D runs, a
    missing workdir, and 2-D runs of different teachers (their reference lines would collide)."""
    ring = claims.train.resolve(claims.train.PRESETS["ring2d"])
    configs = {
        "a/ring": ring,
        "b/ring": ring,
        "teacher": dataclasses.replace(ring, variant="teacher"),
        "mnist": claims.train.resolve(claims.train.PRESETS["mnist"]),
        "other": dataclasses.replace(ring, teacher=str(tmp_path / "t2.eqx")),
    }
    for name in configs:
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "ckpt_00000010.eqx").touch()
    meta = {f"{n}/checkpoints/ckpt_00000010.eqx": c for n, c in configs.items()}

    def read_meta(path):
        relative = pathlib.Path(path).relative_to(tmp_path).as_posix()
        return {"config": claims.train.config_to_dict(meta[relative]), "step": 10}

    monkeypatch.setattr(length_curves, "read_meta", read_meta)
    monkeypatch.setattr(
        length_curves, "points_scores", lambda *a, **k: {"w1_radius": 0.5, "step": 10}
    )
    (tmp_path / "t2.eqx").touch()

    def length(*names, **settings):
        workdirs = tuple(str(tmp_path / n) for n in names)
        return length_curves.run_length(
            length_curves.LengthBench(workdirs=workdirs, out=str(tmp_path), **settings)
        )

    cases = [
        (("a/ring", "b/ring"), {}, ValueError, r"repeats a run name"),
        (("teacher",), {}, ValueError, r"teacher is a teacher run: pass distillation"),
        (("a/ring", "mnist"), {}, ValueError, r"mixes 2-D runs \(\['ring'\]\) with image runs"),
        (("a/ring",), {"fid": True}, ValueError, r"scored by w1_radius: drop --fid"),
        (("missing",), {}, FileNotFoundError, r"missing does not exist"),
        (("a/ring", "other"), {}, ValueError, r"different teachers .*t2.eqx"),
    ]
    for names, settings, error, message in cases:
        with pytest.raises(error, match=message):
            length(*names, **settings)


def test_the_documented_dry_run_writes_the_claims_table(tmp_path, monkeypatch, capsys):
    """experiments/claims.py's documented dry run (`python -m experiments quality --preset tiny
    --num-samples 24 --reference-count 200 --distill-steps 10`), cut to two rows and a 2-step
    teacher so that it takes a minute: a student trained and both rows sampled and scored (FID
    against 200 MNIST test digits), then quality.md, quality.json and the figures written."""
    monkeypatch.setattr(claims.train, "CHECKPOINT_DIR", tmp_path / "checkpoints")
    teacher = claims.train.main(
        [
            "--preset",
            "tiny",
            "--variant",
            "teacher",
            "--steps",
            "2",
            "--workdir",
            str(tmp_path / "t"),
        ]
    )
    out = tmp_path / "quality-small"
    argv = ["quality", "--preset", "tiny", "--num-samples", "24", "--reference-count", "200"]
    argv += ["--distill-steps", "2", "--teacher", str(teacher), "--out", str(out)]
    cli.main([*argv, "--rows", "instant-k1-flat", "teacher-8-w0"])
    report = capsys.readouterr().out
    rows = {(r["sampler"], r["k"]): r for r in json.loads((out / "quality.json").read_text())}
    assert set(rows) == {("instant", 1), ("teacher", 8)}
    assert all(claims.validate_quality_row(row) == row for row in rows.values())
    assert all(math.isfinite(row["fid"]) and row["num_samples"] == 24 for row in rows.values())
    assert (out / "quality.md").read_text().strip() in report
    assert "missing" in report  # the rows not run are named, not hidden
    assert (out / "fid_vs_steps.png").exists() and (out / "samples.png").exists()
