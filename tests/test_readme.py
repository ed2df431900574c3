"""The README's Python examples run as written (each block marked `<!-- readme-test -->`)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- readme-test -->\s*```python\n(.*?)```", re.S)


def examples() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_the_readme_has_examples():
    assert len(examples()) >= 2


@pytest.mark.parametrize("index", range(len(examples())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write under outputs/
    exec(compile(examples()[index], f"README.md example {index + 1}", "exec"), {"__name__": "__readme__"})
