"""The reproduction study of Moment Matching Distillation built on the library (train.py, eval.py,
mmd.py): the claims table, length curves, proxy validation, speed benchmarks and the GPU scripts.
Run from the repository root: `python -m experiments --help`. experiments/README.md indexes it."""
