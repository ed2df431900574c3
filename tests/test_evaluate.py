"""The GPTQ perplexity protocol: per-window NLLs, their mean, and paired differences between models."""
import math

import pytest
import torch

from calm.evaluate import paired_difference, perplexity, token_nll, window_nll
from tests.conftest import tiny_llama


def test_window_nll_is_each_windows_mean_token_loss_whatever_the_batching():
    model = tiny_llama()
    windows = torch.randint(0, 256, (5, 17), generator=torch.Generator().manual_seed(0))
    expected = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None], use_cache=False).logits[0].double()
            expected.append(float(-logits[:-1].log_softmax(-1).gather(1, w[1:, None]).mean()))
    for batch in (1, 2, 5):
        assert window_nll(model, windows, batch).tolist() == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, windows, 2) == pytest.approx(math.exp(sum(expected) / 5), rel=1e-5)


def test_paired_difference():
    mean, se = paired_difference([1.5, 2.5, 3.5], [0.5, 0.5, 0.5])
    assert mean == pytest.approx(2.0) and se == pytest.approx(1 / math.sqrt(3))
    assert paired_difference([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0)


def test_token_nll_keeps_fp32_accuracy_with_a_large_vocabulary():
    g = torch.Generator().manual_seed(0)
    vocab = 32768
    logits = torch.randn(2, 48, vocab, generator=g) * 5 + 3
    ids = torch.randint(0, vocab, (2, 48), generator=g)
    oracle = -logits.double()[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None])[..., 0]
    # (token, vocab) rows: 5.7e-6 here; a transposed (n, vocab, T) cross_entropy: 5.8e-5.
    assert float((token_nll(logits, ids) - oracle).abs().max()) < 2e-5


def test_window_nll_shows_a_bar_over_the_windows(recorded_bars):
    import calm.evaluate

    install, bars = recorded_bars
    install(calm.evaluate, "progress_bar")
    lines = []
    windows = torch.randint(0, 256, (5, 9), generator=torch.Generator().manual_seed(0))
    window_nll(tiny_llama(), windows, 2, progress=lines.append)
    assert [(b.total, b.done, b.unit) for b in bars] == [(5, 5, "window")]
    assert [line.split(",")[0] for line in lines] == ["2/5 windows", "4/5 windows", "5/5 windows"]


def test_progress_bars_stay_off_when_stderr_is_not_a_terminal():
    from calm.progress import progress

    with progress(total=3) as bar:  # pytest captures stderr: no terminal
        assert bar.disable
