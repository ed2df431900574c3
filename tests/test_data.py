"""Text loading: deterministic article split, no overlap between calibration and evaluation, seeded windows."""
import pytest
import torch

from calm.config import CalmUsageError, DataConfig
from calm.data import (
    calibration_windows,
    clean_wikitext,
    disjoint_starts,
    evaluation_windows,
    fitting_and_scoring_windows,
    load_corpus,
    load_text_file_split,
    load_wikipedia_split,
)


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
    with pytest.raises(CalmUsageError, match="fewer than one window"):
        evaluation_windows(ids, 2000, 0)


def _old_draw(ids, n, seqlen, seed):
    """The draw load_corpus made before scoring windows were kept disjoint (one randint over both sets)."""
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_fitting_windows_are_the_old_draw_whatever_the_scoring_windows(seed):
    ids = torch.arange(5000)
    old = _old_draw(ids, 8, 64, seed)
    assert torch.equal(calibration_windows(ids, 8, 64, seed), old)
    for k in (0, 1, 4, 20):
        fit, scoring = fitting_and_scoring_windows(ids, 8, k, 64, seed)
        assert torch.equal(fit, old)
        assert scoring is None if k == 0 else scoring.shape == (k, 64)


@pytest.mark.parametrize("seed", [0, 3])
def test_scoring_windows_share_no_token_with_the_fitting_windows_or_each_other(seed):
    ids = torch.arange(6000)  # token id == position
    fit, scoring = fitting_and_scoring_windows(ids, 16, 12, 100, seed)
    assert torch.equal(scoring[:, 1:] - scoring[:, :-1], torch.ones(12, 99, dtype=torch.long))  # contiguous text
    fitted = set(fit.flatten().tolist())
    assert not fitted & set(scoring.flatten().tolist())
    assert len(set(scoring.flatten().tolist())) == scoring.numel()  # pairwise disjoint
    again = fitting_and_scoring_windows(ids, 16, 12, 100, seed)
    assert torch.equal(again[0], fit) and torch.equal(again[1], scoring)  # reproducible
    assert not torch.equal(fitting_and_scoring_windows(ids, 16, 12, 100, seed + 1)[1], scoring)


def test_disjoint_starts_fill_the_only_room_left():
    gen = torch.Generator().manual_seed(0)
    # Windows of 10 tokens in 40; the fitting window [15, 25) leaves starts 0-5 and 25-30: room for two more
    # (one on each side), never three.
    starts = disjoint_starts(40, torch.tensor([15]), 2, 10, gen)
    assert min(starts.tolist()) <= 5 and max(starts.tolist()) >= 25
    spans = [set(range(s, s + 10)) for s in starts.tolist()] + [set(range(15, 25))]
    assert all(not a & b for i, a in enumerate(spans) for b in spans[i + 1:])
    with pytest.raises(CalmUsageError, match="--score-windows, --calib-windows or --calib-seqlen"):
        disjoint_starts(40, torch.tensor([15]), 3, 10, torch.Generator().manual_seed(0))


def test_too_little_text_for_disjoint_scoring_windows_names_the_flags():
    ids = torch.arange(700)
    with pytest.raises(CalmUsageError, match="too few for 8 scoring windows.*lower --score-windows"):
        fitting_and_scoring_windows(ids, 4, 8, 64, seed=0)
    with pytest.raises(CalmUsageError, match="fewer than"):  # the fitting windows alone do not fit
        fitting_and_scoring_windows(ids, 20, 1, 64, seed=0)


def test_load_corpus_scores_on_windows_disjoint_from_the_fitting_ones(tmp_path):
    class Chars:  # one token per character, its position in the text as the id
        def __call__(self, text, **_):
            return {"input_ids": list(range(len(text)))}

    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(("word " * 200).strip() for _ in range(4)))
    plain = load_corpus(Chars(), DataConfig(text=str(path), calib_windows=4, calib_seqlen=64, eval_seqlen=64,
                                            eval_tokens=0, seed=5))
    held = load_corpus(Chars(), DataConfig(text=str(path), calib_windows=4, calib_seqlen=64, eval_seqlen=64,
                                           eval_tokens=0, seed=5, score_windows=3))
    assert plain.scoring is None and torch.equal(plain.calibration, held.calibration)
    assert held.scoring.shape == (3, 64)
    assert not set(held.calibration.flatten().tolist()) & set(held.scoring.flatten().tolist())
