"""README result tables are the ones bench/readme_figures.py renders from bench/results/."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "bench" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_readme_tables_are_up_to_date():
    figures = _module()
    text = figures.README.read_text(encoding="utf-8")
    assert figures.render(text) == text, "README.md is out of date: run python bench/readme_figures.py"
    quality = figures.QUALITY.read_text(encoding="utf-8")
    assert figures.render(quality, every=False) == quality, ("bench/QUALITY.md is out of date: run python "
                                                             "bench/readme_figures.py")


def test_default_scheme_table_renders_every_field(tmp_path, monkeypatch):
    figures = _module()
    rows = [{"scheme": "W3A16G64", "perplexity": {"fp": 22.8177, "rtn": 66.91, "gptq": 45.2044, "calm": 45.2044},
             "effective_bits": {"calm": 3.375}, "chosen": ["gptq"] * 28 + ["rtn"] * 2},
            {"scheme": "W2A16G64", "perplexity": {"fp": 22.8, "rtn": 749562.9, "gptq": 7855.25, "calm": 7855.25},
             "effective_bits": {"calm": 2.375}, "chosen": ["gptq"]}]
    (tmp_path / "quality.json").write_text(json.dumps(rows))
    monkeypatch.setattr(figures, "RESULTS", tmp_path)
    table = figures.default_schemes().splitlines()
    assert table[2] == "| W3A16G64 | 22.82 | 66.91 | 45.20 | 45.20 | gptq 28, rtn 2 | 3.375 |"
    assert table[3] == "| W2A16G64 | 22.80 | 749563 | 7855.25 | 7855.25 | gptq 1 | 2.375 |"


def test_paired_difference_is_the_mean_and_standard_error_over_windows():
    assert _module().paired([2.0, 3.0, 4.0], [1.0, 1.0, 1.0]) == "+2.000 ± 0.577"
