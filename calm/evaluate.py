"""Perplexity with the GPTQ protocol: non-overlapping windows of T tokens, mean token NLL over all windows, exp."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn


def perplexity(model: nn.Module, windows: torch.Tensor, batch_windows: int = 4,
               progress: Callable[[str], None] | None = None) -> float:
    """exp(mean NLL) of next-token prediction over every window (T-1 predictions per window)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"evaluation windows must be (n, T>=2), got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_windows):
            batch = windows[i:i + batch_windows].to(device)
            logits = model(batch, use_cache=False).logits.float()
            nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                              batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
            if progress is not None:
                done = min(i + batch_windows, windows.shape[0])
                progress(f"{done}/{windows.shape[0]} windows, {time.perf_counter() - start:.0f}s, "
                         f"running ppl {math.exp(total_nll / total_tokens):.3f}")
    return math.exp(total_nll / total_tokens)
