"""Perplexity with the GPTQ protocol: non-overlapping windows of T tokens, mean token NLL over all windows, exp."""
from __future__ import annotations

import math
import time
from typing import Callable, ContextManager

import torch
from torch import nn

from calm import distributed
from calm.model import capture_block_inputs, run_block
from calm.progress import progress as progress_bar
from calm.streaming import ModelSource


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """NLL of every next-token prediction, (n, T-1) float64: `logits` (n, T, vocab) predict `ids[:, 1:]`."""
    vocab = logits.shape[-1]
    # Rows of (token, vocab): cross_entropy over a transposed (n, vocab, T) view loses fp32 accuracy as the
    # vocabulary grows (up to 2.5e-4 per token, 1.3e-4 on average, at SmolLM2's 49152 on real text).
    nll = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab),
                                      ids[:, 1:].reshape(-1).to(logits.device), reduction="none")
    return nll.to(torch.float64).reshape(ids.shape[0], -1)


def window_nll(model: nn.Module, windows: torch.Tensor, batch_windows: int = 4,
               progress: Callable[[str], None] | None = None) -> torch.Tensor:
    """Mean next-token NLL of each window (n,), float64 (T-1 predictions per window).

    A progress bar over the windows shows on a terminal (`calm.progress`); `progress`, when given, also
    receives a line after every batch."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"evaluation windows must be (n, T>=2), got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    nll = []
    start = time.perf_counter()
    with torch.no_grad(), progress_bar(total=windows.shape[0], desc="perplexity", unit="window") as bar:
        for i in range(0, windows.shape[0], batch_windows):
            batch = windows[i:i + batch_windows].to(device)
            nll.append(token_nll(model(batch, use_cache=False).logits, batch).mean(1).cpu())
            bar.update(batch.shape[0])
            if progress is not None:
                done = min(i + batch_windows, windows.shape[0])
                progress(f"{done}/{windows.shape[0]} windows, {time.perf_counter() - start:.0f}s, "
                         f"running ppl {math.exp(float(torch.cat(nll).mean())):.3f}")
    return torch.cat(nll)


BlockFor = Callable[[int], ContextManager[nn.Module]]


def streamed_window_nll(source: ModelSource, windows: torch.Tensor, block_for: BlockFor | None = None,
                        batch_windows: int = 4) -> torch.Tensor:
    """Mean next-token NLL of each window (n,), float64, streaming: every window passes block by block, block i
    being what `block_for(i)` yields on the device (default: the source's float block), so a model larger
    than the device is evaluated holding one block at a time (plus the windows' activations)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"evaluation windows must be (n, T>=2), got {tuple(windows.shape)}")
    world = distributed.current()
    if world.data:  # each process evaluates its shard of the windows; the per-window NLLs are gathered
        return world.unshard(_streamed_window_nll(source, world.shard(windows), block_for, batch_windows))
    return _streamed_window_nll(source, windows, block_for, batch_windows)


def _streamed_window_nll(source: ModelSource, windows: torch.Tensor, block_for: BlockFor | None,
                         batch_windows: int) -> torch.Tensor:
    block_for = block_for or source.block
    with source.embedding_stage() as model:
        state = capture_block_inputs(model, windows, batch_windows)
    for i in progress_bar(range(source.num_blocks), desc="perplexity", unit="block"):
        with block_for(i) as block:
            state = state.at_layer(i)
            state = state.with_hidden(run_block(block, state))
    return source.window_nll(state.hidden, state, windows)


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
