"""bench.py quality: the rows each budget runs, the verdicts against the paper's claims, and
resumability (finished rows are cached and skipped, --time-limit stops between rows). Training and
evaluation are replaced by recording fakes: their own tests live in test_train.py and
test_eval.py."""

import json

import pytest

import bench
from bench import Row


def names(rows):
    return [row.name for row in rows]


def test_small_budget_is_the_issue_rows_headline_first():
    rows = bench.quality_rows("small")
    teachers = {(r.steps, r.guidance) for r in rows if r.variant == "teacher"}
    assert teachers == {(s, w) for s in (8, 32, 128, 512) for w in (0.0, 0.1)}
    assert sorted(names(r for r in rows if r.variant != "teacher")) == sorted(
        ["instant-k1-flat", "alternating-k1-flat", "instant-k8-edm", "alternating-k8-edm"]
    )
    assert names(rows[:6]) == [
        "instant-k8-edm",
        "alternating-k8-edm",
        "teacher-512-w0",
        "teacher-512-w0.1",
        "teacher-8-w0",
        "teacher-8-w0.1",
    ]
    assert len(set(rows)) == len(rows) == 12


def test_full_budget_weighting_flat_up_to_two_steps_and_flat_k8_comparison():
    students = [r for r in bench.quality_rows("full") if r.variant != "teacher"]
    assert len(students) == len(set(students)) == 10
    for variant in ("instant", "alternating"):
        mine = {(r.steps, r.weighting) for r in students if r.variant == variant}
        assert mine == {(1, "flat"), (2, "flat"), (4, "edm"), (8, "edm"), (8, "flat")}


def record(fid, n=100):
    return {
        "fid": fid,
        "precision": 0.5,
        "recall": 0.5,
        "num_samples": n,
        "timings_s": {"sampling": 1.0},
        "train_seconds": None,
        "distill_steps": 10,
        "distill_batch_size": 8,
        "machine": {"devices": "cpu x1", "cpu_count": 2, "jax_version": "0"},
        "feature_protocol": "p",
        "gamma": 0.0,
        "config": {"lr": 1e-4},
        "fd_mnist": 2.5,
        "label_accuracy": 0.9,
    }


def test_verdicts_compare_with_the_best_guided_512_step_teacher():
    results = {
        Row("teacher", 512, 0.0): record(3.0),
        Row("teacher", 512, 0.1): record(2.0),
        Row("instant", 8, weighting="edm"): record(1.5),
        Row("alternating", 8, weighting="edm"): record(2.5),
        Row("instant", 1, weighting="flat"): record(9.0),
        Row("alternating", 1, weighting="flat"): record(7.0),
        Row("teacher", 8, 0.0): record(4.0),
    }
    lines = bench.verdicts(results)
    assert (
        "instant, k = 8 (edm): FID 1.50 against the undistilled teacher's 4.00 with the same 8 "
        "steps." in lines
    )
    assert (
        "instant, k = 8 (edm): FID 1.50 beats the 512-step teacher's best FID 2.00 (guidance 0.1)."
        in lines
    )
    assert (
        "alternating, k = 8 (edm): FID 2.50 is 0.50 worse than the 512-step teacher's best FID "
        "2.00 (guidance 0.1)." in lines
    )
    assert "k = 1: alternating 7.00, instant 9.00 (alternating better)." in lines
    table = bench.quality_table(results).splitlines()
    assert len(table) == 2 + len(results) and table[2].startswith("| teacher | 8 |")
    assert bench.verdicts({}) == [
        "The 512-step teacher rows are not finished: no comparison with them yet."
    ]


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    """bench_quality with a fake teacher, trainer and evaluator that record their calls."""
    calls = []
    teacher = tmp_path / "teacher.eqx"
    monkeypatch.setattr(bench.train, "ensure_teacher", lambda config: teacher)
    monkeypatch.setattr(bench.train, "read_meta", lambda path: {"step": 7})

    def train_student(row, *, teacher, out, steps, batch_size, seed):
        calls.append(("train", row.name, steps, batch_size))
        return out / f"{row.name}.eqx", 12.0

    def evaluate_row(row, checkpoint, *, out, num_samples, batch_size, seed):
        calls.append(("eval", row.name, checkpoint.name, num_samples))
        return record(
            float(row.steps) if row.variant != "teacher" else 100.0 / row.steps, num_samples
        )

    monkeypatch.setattr(bench, "train_student", train_student)
    monkeypatch.setattr(bench, "evaluate_row", evaluate_row)

    def run(**overrides):
        options = dict(
            budget="small",
            out=tmp_path / "q",
            teacher="auto",
            distill_steps=10,
            distill_batch_size=8,
            eval_batch_size=4,
            time_limit=None,
            seed=0,
        )
        return bench.bench_quality(**{**options, **overrides})

    return calls, run, tmp_path / "q"


def test_quality_caches_rows_and_a_rerun_skips_them(fakes):
    calls, run, out = fakes
    report = run(only=["instant-k8-edm", "teacher-512-w0"])
    assert calls == [
        ("train", "instant-k8-edm", 10, 8),
        ("eval", "instant-k8-edm", "instant-k8-edm.eqx", 1000),
        ("eval", "teacher-512-w0", "teacher.eqx", 1000),
    ]
    assert "instant, k = 8 (edm): FID 8.00 is 7.80 worse than" in report
    assert "alternating, k = 8: not finished." in report
    assert (out / "fid_vs_steps.png").stat().st_size > 0
    saved = json.loads((out / "rows" / "instant-k8-edm_n1000.json").read_text())
    assert (
        saved["train_seconds"] == 12.0
        and saved["distill_steps"] == 10
        and saved["machine"]["cpu_count"]
    )
    calls.clear()
    report = run()
    assert [c[1] for c in calls if c[0] == "eval"] == [
        n
        for n in names(bench.quality_rows("small"))
        if n not in ("instant-k8-edm", "teacher-512-w0")
    ]
    assert "All rows finished." in report and "(12 rows)" in report
    calls.clear()
    run()
    assert calls == []
    run(
        num_samples=50, time_limit=0.0
    )  # another sample count is another cache; limit 0 starts nothing
    assert calls == []


def test_quality_rejects_unknown_rows(fakes):
    _, run, _ = fakes
    with pytest.raises(ValueError, match="unknown --rows instant-k3-edm"):
        run(only=["instant-k3-edm"])


def test_spearman_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6], [2.0, 7.0, 1.0, 8.0, 0.5, 3.0]
    assert bench.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)
    assert bench.spearman(a, a) == pytest.approx(1.0)


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
    report = bench.proxy_report(rows, floor, num_samples=50, out=tmp_path)
    assert "| teacher, 2 steps | 50.00 | 5.000 | 0.5000 | 1 | 2 |" in report
    assert (
        "fd_mnist 1.00, label accuracy 1.00" in report
        and "| real: train vs test digits | 1.00 |" in report
    )
    assert (tmp_path / "eval-proxy.md").read_text() == report + "\n"


def test_quality_json_rows_follow_the_schema(fakes):
    _, run, out = fakes
    run(only=["instant-k8-edm", "teacher-512-w0"])
    rows = json.loads((out / "quality.json").read_text())
    assert [(r["sampler"], r["k"]) for r in rows] == [("teacher", 512), ("instant", 8)]
    teacher, student = rows
    assert (
        teacher["lr"] is None and teacher["distill_steps"] is None and teacher["weighting"] is None
    )
    assert student == {
        "sampler": "instant",
        "k": 8,
        "weighting": "edm",
        "guidance": 0.0,
        "gamma": 0.0,
        "lr": 1e-4,
        "distill_steps": 10,
        "batch_size": 8,
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
        {**student, "sampler": "student"},
        {**student, "k": True},
        {k: v for k, v in student.items() if k != "fd_mnist"},
        {**student, "extra": 1},
    ):
        with pytest.raises(ValueError, match="quality row"):
            bench.validate_quality_row(broken)


def test_each_subcommand_parses_into_its_dataclass():
    """Defaults and one override per subcommand land in the settings dataclass; counts < 1 fail."""
    defaults = {
        "model": (bench.ModelBench(preset="mnist", batch_size=128, repeats=10, seed=0), []),
        "speed": (bench.SpeedBench(batch_size=64, repeats=5, sample_batch=16), []),
        "inception": (bench.InceptionBench(batch_size=32, repeats=3, out=None), []),
        "sampling": (bench.SamplingBench(num_steps=8, batch_sizes=(50, 200, 500)), []),
        "proxy": (bench.ProxyBench(num_steps=(2, 4, 8, 16, 64), out="runs/eval-proxy"), []),
        "quality": (bench.QualityBench(budget="small", out=None, time_limit=None), []),
    }
    for name, (expected, argv) in defaults.items():
        assert bench.parse_args([name, *argv]) == (name, expected)
    overrides = {
        "model": (["--preset", "imagenet64"], {"preset": "imagenet64"}),
        "speed": (["--sample-batch", "4"], {"sample_batch": 4}),
        "inception": (["--batch-size", "16"], {"batch_size": 16}),
        "sampling": (["--batch-sizes", "8", "16"], {"batch_sizes": (8, 16)}),
        "proxy": (["--k", "1", "2"], {"num_steps": (1, 2)}),
        "quality": (
            ["--budget", "full", "--rows", "teacher-8-w0", "--time-limit", "1.5"],
            {"budget": "full", "rows": ("teacher-8-w0",), "time_limit": 1.5},
        ),
    }
    for name, (argv, fields) in overrides.items():
        cls = bench.COMMANDS[name][0]
        assert bench.parse_args([name, *argv]) == (name, cls(**fields))
    with pytest.raises(ValueError, match="--k must be >= 1"):
        bench.parse_args(["sampling", "--k", "0"])
