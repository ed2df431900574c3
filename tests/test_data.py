"""Text loading: deterministic article split, no overlap between calibration and evaluation, seeded windows."""
import pytest
import torch

from calm.config import CalmUsageError
from calm.data import (calibration_windows, clean_wikitext, evaluation_windows, load_text_file_split,
                       load_wikipedia_split)


def test_wikipedia_split_is_deterministic_and_disjoint():
    a = load_wikipedia_split()
    b = load_wikipedia_split()
    assert a.sha256 == b.sha256
    calib = set(a.calibration.split("\n\n"))
    held = set(a.evaluation.split("\n\n"))
    long_overlap = [p for p in calib & held if len(p) > 200]
    assert not long_overlap
    assert len(a.calibration) > 1_000_000 and len(a.evaluation) > 1_000_000
    assert "[[" not in a.evaluation and "{{" not in a.evaluation and "<ref" not in a.evaluation


def test_clean_wikitext_strips_markup():
    text = clean_wikitext("'''Paris''' is the [[capital city|capital]] of [[France]].{{cite web|url=x}}"
                          "<ref>note</ref>\n\n[[Category:Cities]]")
    assert text == "Paris is the capital of France."


def test_text_file_alternates_paragraphs(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one\n\ntwo\n\n\nthree\n\nfour")
    split = load_text_file_split(path)
    assert split.calibration == "one\n\nthree" and split.evaluation == "two\n\nfour"
    (tmp_path / "single.txt").write_text("only one paragraph")
    with pytest.raises(CalmUsageError, match="two paragraphs"):
        load_text_file_split(tmp_path / "single.txt")


def test_windows_are_seeded_and_checked():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 8, 64, seed=0)
    assert torch.equal(a, calibration_windows(ids, 8, 64, seed=0))
    assert not torch.equal(a, calibration_windows(ids, 8, 64, seed=1))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))  # contiguous text
    with pytest.raises(CalmUsageError, match="fewer than"):
        calibration_windows(ids, 100, 64, seed=0)
    ev = evaluation_windows(ids, 300, 0)
    assert ev.shape == (3, 300) and torch.equal(ev.flatten(), ids[:900])
    assert evaluation_windows(ids, 100, 250).shape == (2, 100)
    with pytest.raises(CalmUsageError):
        evaluation_windows(ids, 2000, 0)


def test_scoring_windows_follow_the_fitting_windows():
    """Adding scoring windows leaves the fitting windows as they were (one seeded draw, split)."""
    ids = torch.arange(5000)
    fit = calibration_windows(ids, 8, 64, seed=0)
    both = calibration_windows(ids, 8 + 4, 64, seed=0)
    assert torch.equal(both[:8], fit)
