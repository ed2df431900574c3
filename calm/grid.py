"""Uniform integer grids: fit scale and zero point for a group of weights, quantize onto the grid.

One grid for every algorithm (RTN, GPTQ, AWQ, ...), so that a hybrid model has one packed format.
Scales are rounded to float16 before codes are computed: the codes then sit exactly on the grid that the
packed module stores. Rounding is torch.round (half to even) everywhere.
"""
from __future__ import annotations

import torch

FP16_TINY = 2.0 ** -14  # smallest normal float16: a scale below it would flush to zero when stored


def fit_grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (float32 holding float16 values) and integer zero point for rows of `w` (rows, cols).

    Like GPTQ's quantizer, the range always contains 0 so that zero weights stay exactly zero.
    """
    maxq = (1 << bits) - 1
    w = w.to(torch.float32)
    wmin = torch.clamp(w.amin(dim=1), max=0)
    wmax = torch.clamp(w.amax(dim=1), min=0)
    if symmetric:
        wmax = torch.maximum(-wmin, wmax)
        scale = 2 * wmax / maxq
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (wmax - wmin) / maxq
        zero = None
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(min=FP16_TINY).to(torch.float16).to(torch.float32)
    if zero is None:
        zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    return scale, zero


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in [0, 2^bits) for `w` (rows, cols) with per-row `scale`, `zero` (rows,) or broadcastable."""
    maxq = (1 << bits) - 1
    if scale.dim() == 1:
        scale = scale.unsqueeze(1)
        zero = zero.unsqueeze(1)
    return torch.clamp(torch.round(w.to(torch.float32) / scale) + zero, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 1:
        scale = scale.unsqueeze(1)
        zero = zero.unsqueeze(1)
    return (q - zero) * scale


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, symmetric: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of (out, in) weights in groups along the input: codes (out, in), scales and zeros
    (out, in/g)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    groups = w.to(torch.float32).reshape(n * (k // group_size), group_size)
    scale, zero = fit_grid(groups, bits, symmetric)
    codes = quantize_to_codes(groups, scale, zero, bits)
    return codes.reshape(n, k), scale.reshape(n, k // group_size), zero.reshape(n, k // group_size)
