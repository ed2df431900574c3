"""Mixed-bit dequant-GEMM: y = x @ dequant(W)^T (+ bias) for packed uniform weights (format in packing.py).

The reference dequantizes, then multiplies; it is the CPU path and the test oracle. The Triton kernel
(decode and prefill paths) plugs in behind `uniform_matmul`.
"""
from __future__ import annotations

import torch

from calm_kernels.packing import CodebookLayout, _codebook_values, dequantize_uniform, outlier_rows


def uniform_matmul_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                             bits: int, group_size: int, in_features: int,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    w = dequantize_uniform(packed, scales, zeros, bits, group_size, in_features, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def uniform_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, group_size: int, in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the packed weight expects {in_features}")
    return uniform_matmul_reference(x, packed, scales, zeros, bits, group_size, in_features, bias)


def codebook_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, codebooks: torch.Tensor, perm: torch.Tensor,
                              layout: CodebookLayout, bias: torch.Tensor | None = None,
                              outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                              ) -> torch.Tensor:
    stored = _codebook_values(qweight, codebooks, layout)
    w = torch.empty_like(stored)
    w[:, perm.to(torch.int64)] = stored
    if outliers is not None:
        rowptr, cols, deltas = outliers
        w[outlier_rows(rowptr), cols.to(torch.int64)] += deltas.to(torch.float32)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


def codebook_matmul(x: torch.Tensor, qweight: torch.Tensor, codebooks: torch.Tensor, perm: torch.Tensor,
                    layout: CodebookLayout, bias: torch.Tensor | None = None,
                    outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    if x.shape[-1] != layout.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the codebook weight expects {layout.in_features}")
    return codebook_matmul_reference(x, qweight, codebooks, perm, layout, bias, outliers)
