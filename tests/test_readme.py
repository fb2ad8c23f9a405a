"""README.md's Python examples run as written, from a scratch directory beside the shipped
checkpoints, and do what the README says they do."""

import pathlib
import re

import numpy as np
from PIL import Image

import eval as evaluation

ROOT = pathlib.Path(__file__).resolve().parent.parent


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_python_blocks_are_found_in_markdown():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 2\nc = 3\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = 2\nc = 3\n"]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 2, "README.md should hold the sampling and the distillation example"
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), {"__name__": "readme"})

    # Sampling: ten 32x32 digits side by side, and the MNIST classifier reads each as the digit
    # asked for (the teacher's 2-step samples score 0.996 on 500 samples).
    digits = np.asarray(Image.open("digits.png"))
    assert digits.shape == (32, 320)
    tiles = digits.reshape(32, 10, 32).transpose(1, 0, 2)[..., None]
    assert evaluation.label_accuracy(tiles, np.arange(10)) >= 0.9

    # Distillation: a teacher export and the student's last checkpoint, where the README says.
    assert (tmp_path / "runs/py-teacher/teacher.eqx").is_file()
    assert (tmp_path / "runs/py-student/checkpoints/ckpt_00000100.eqx").is_file()
    assert (tmp_path / "runs/py-student/points.png").is_file()
