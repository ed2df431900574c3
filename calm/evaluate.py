"""Perplexity with the GPTQ protocol: non-overlapping windows of T tokens, mean token NLL over all windows, exp."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn


def window_nll(model: nn.Module, windows: torch.Tensor, batch_windows: int = 4,
               progress: Callable[[str], None] | None = None) -> torch.Tensor:
    """Mean next-token NLL of each window (n,), float64 (T-1 predictions per window)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"evaluation windows must be (n, T>=2), got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    nll = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_windows):
            batch = windows[i:i + batch_windows].to(device)
            logits = model(batch, use_cache=False).logits.float()
            # (tokens, vocab) rows: cross_entropy over a transposed (N, vocab, T) view is ~10x less accurate in fp32.
            token_nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                    batch[:, 1:].reshape(-1), reduction="none")
            nll.append(token_nll.to(torch.float64).reshape(batch.shape[0], -1).mean(1).cpu())
            if progress is not None:
                done = min(i + batch_windows, windows.shape[0])
                progress(f"{done}/{windows.shape[0]} windows, {time.perf_counter() - start:.0f}s, "
                         f"running ppl {math.exp(float(torch.cat(nll).mean())):.3f}")
    return torch.cat(nll)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_windows: int = 4,
               progress: Callable[[str], None] | None = None) -> float:
    """exp(mean NLL) of next-token prediction over every window (T-1 predictions per window)."""
    return math.exp(float(window_nll(model, windows, batch_windows, progress).mean()))


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over windows and its standard error (windows as the samples): how far apart two models'
    NLLs are on the same text, and how much of that the choice of text could explain."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    if d.numel() < 2:
        return float(d.mean()), float("nan")
    return float(d.mean()), float(d.std() / d.numel() ** 0.5)
