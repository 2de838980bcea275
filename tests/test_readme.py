"""The README's ```python blocks run as tests, so the quick reference cannot go stale.

Blocks fenced as ```py are outlines and are not run.
"""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_runnable_examples():
    assert _python_blocks(), "README.md lost its ```python examples"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "seed-cnn.optimized.onnx").is_file()
