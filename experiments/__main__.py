"""The study's command line: `python -m experiments COMMAND [options]` from the repository root.

Speed (experiments/bench.py): model, speed, inception, sampling. Evaluation protocol
(experiments/proxy.py): proxy. The claims table (experiments/claims.py): quality. Length curves
(experiments/length.py): length. `python -m experiments COMMAND --help` lists a command's options.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import options
from experiments import bench, claims, length, proxy
from experiments.bench import print_table, write_json

# name: (settings, runner, one-line help)
COMMANDS: dict[str, tuple[type, Callable[[Any], dict | str], str]] = {
    "model": (
        bench.ModelBench,
        bench.run_model,
        "U-ViT forward / forward+backward speed and FLOP efficiency",
    ),
    "speed": (
        bench.SpeedBench,
        bench.run_speed,
        "teacher / alternating / instant step time and sampling speed-up",
    ),
    "inception": (
        bench.InceptionBench,
        bench.run_inception,
        "Inception-v3 images/s and FLOP efficiency",
    ),
    "sampling": (
        bench.SamplingBench,
        bench.run_sampling,
        "images/s of the sampler (eval.generate) by batch size",
    ),
    "proxy": (
        proxy.ProxyBench,
        proxy.run_proxy,
        "fd_mnist and label accuracy against FID (teacher)",
    ),
    "quality": (
        claims.QualityBench,
        claims.run_quality,
        "the MNIST teacher and distilled students scored (FID, fd_mnist, ...) and judged against "
        "the paper's claims; writes quality.md, quality.json and figures to --out",
    ),
    "length": (
        length.LengthBench,
        length.run_length,
        "a student's score at every checkpoint against the step: fd_mnist or FID (images), "
        "w1_radius (2-D runs)",
    ),
}


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, Any]:
    """(subcommand, its settings dataclass: defaults plus the options given) of `argv`; a count
    below 1 raises ValueError."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in COMMANDS.items():
        options.add_options(
            commands.add_parser(name, help=help_text, description=help_text), cls, cls()
        )
    overrides = vars(parser.parse_args(argv))
    name = overrides.pop("command")
    return name, options.apply(COMMANDS[name][0](), overrides)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run one benchmark."""
    name, config = parse_args(argv)
    result = COMMANDS[name][1](config)
    if isinstance(result, str):
        print(result)
        return
    print_table(result)
    if config.out:
        write_json(config.out, result)
    if name == "inception":
        print(
            f"inception: {result['images_per_s']:.2f} images/s, "
            f"{result['fraction_of_matmul']:.2f} of the matmul rate"
        )


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        sys.exit(f"python -m experiments: error: {error}")
