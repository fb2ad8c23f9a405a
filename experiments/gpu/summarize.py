"""The learning-rate study's table from its results folder, and the archive a device call returns.

python experiments/gpu/summarize.py runs/gpu-lr                 # Markdown table on stdout
python experiments/gpu/summarize.py runs/gpu-lr --pack R.tar.gz # + configs, metrics, scores,
                                                                #   logs, 2,000 samples per run
"""

import argparse
import io
import json
import pathlib
import tarfile

import numpy as np


def fmt(value, spec=".2f") -> str:
    return "—" if value is None else format(value, spec)


def run_row(name: str, summary: dict, config: dict, metrics: list[dict]) -> str:
    """One Markdown row: settings, steps done, examples/s, the curve and the FIDs."""
    last, best = summary.get("last", {}), summary.get("best", summary.get("last", {}))
    rates = [m["images_per_s"] for m in metrics if m.get("images_per_s")]
    curve = " ".join(fmt(r["fd_mnist"]) for r in summary.get("curve", []))
    texture = " / ".join(fmt(t["fid"]) for t in summary.get("texture", []))
    step = last.get("step")
    return (
        f"| {name} | {config.get('variant')} | {config.get('weighting')} | {config.get('lr'):g} | "
        f"{config.get('batch_size')} | {step}/{config.get('steps')} | "
        f"{fmt(np.median(rates) if rates else None, '.0f')} | {curve} | "
        f"{fmt(last.get('fid'))} ({fmt(last.get('precision'), '.3f')}, "
        f"{fmt(last.get('recall'), '.3f')}, {fmt(last.get('fd_mnist'))}) | "
        f"{best.get('step')}: {fmt(best.get('fid'))} | {texture} |"
    )


def table(dest: pathlib.Path) -> str:
    """The study's Markdown table (runs, then the teacher's control row)."""
    lines = [
        "| run | variant | weighting | lr | batch | steps done | images/s (median) | "
        "fd_mnist curve (2,000 samples) | last: FID (precision, recall, fd_mnist), 10,000 samples"
        " | best by curve: step: FID | FID after one teacher re-denoising at u = 1/32 / 1/8 |",
        "|" + "---|" * 11,
    ]
    for workdir in sorted(d for d in dest.iterdir() if (d / "config.json").exists()):
        summary_path = workdir / "scores" / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        config = json.loads((workdir / "config.json").read_text())
        log = workdir / "metrics.jsonl"
        metrics = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        lines.append(run_row(workdir.name, summary, config, metrics))
    for rec_path in sorted((dest / "teacher" / "full").glob("*.json")):
        rec = json.loads(rec_path.read_text())
        control = dest / "teacher" / "scores" / "summary.json"
        summary = json.loads(control.read_text()) if control.exists() else {}
        texture = " / ".join(fmt(t["fid"]) for t in summary.get("texture", []))
        lines.append(
            f"| teacher | {rec.get('steps')} steps, guidance {rec.get('guidance')} | | | | | "
            f"| | {fmt(rec.get('fid'))} ({fmt(rec.get('precision'), '.3f')}, "
            f"{fmt(rec.get('recall'), '.3f')}, {fmt(rec.get('fd_mnist'))}) | | {texture} |"
        )
    return "\n".join(lines)


def pack(dest: pathlib.Path, archive: pathlib.Path, *, samples: int = 2000) -> None:
    """configs, metrics, scores, logs and the first `samples` samples of each saved npz."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(dest.rglob("*")):
            if path.suffix in (".json", ".jsonl", ".log", ".md") or path.name == "loss.png":
                tar.add(path, arcname=str(path.relative_to(dest.parent)))
            elif path.name.endswith("_samples.npz"):
                with np.load(path) as f:
                    buf = io.BytesIO()
                    np.savez_compressed(
                        buf, images=f["images"][:samples], labels=f["labels"][:samples]
                    )
                info = tarfile.TarInfo(str(path.relative_to(dest.parent)))
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)


def best_run(dest: pathlib.Path) -> str:
    """The name of the run whose last checkpoint scored the lowest FID ("" if none was scored)."""
    scored = {}
    for path in dest.glob("*/scores/summary.json"):
        fid = json.loads(path.read_text()).get("last", {}).get("fid")
        if fid is not None and np.isfinite(fid):
            scored[path.parent.parent.name] = fid
    return min(scored, key=scored.get) if scored else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dest")
    p.add_argument("--pack", help="also write this .tar.gz")
    p.add_argument("--best", action="store_true", help="print the run of the lowest last FID")
    args = p.parse_args()
    dest = pathlib.Path(args.dest)
    if args.best:
        print(best_run(dest))
    elif args.pack:
        pack(dest, pathlib.Path(args.pack))
    else:
        print(table(dest))


if __name__ == "__main__":
    main()
