"""Mixed-bit dequant-GEMM: y = x @ dequant(W)^T (+ outliers) (+ bias) for packed weights (formats in packing.py).

Contract
- `uniform_matmul`: W from b-bit codes (b in {2, 3, 4, 8}), float16 scales and uint8 zero points per group
  along K (any group size dividing K; per channel is group_size == K), w = (code - zero) * scale. An optional
  `input_perm` (GPTQ act-order) means stored column s meets x[:, input_perm[s]].
- `codebook_matmul`: W from per-column float16 lookup tables, columns in slabs of equal width (1/2/3/4/8
  bits, at most five slabs), stored column s meets x[:, perm[s]]; optional outliers as CSR (rowptr, original
  column, delta) add x[:, col] * delta to y[:, row] (`packing.codebook_outlier_deltas` turns stored outlier
  values into deltas).
- x is (M, K) float16, bfloat16 or float32 (float32 for tests and the CPU); y has x's dtype; bias any float
  dtype. The dequantized weight is rounded to x's dtype before it meets x (as the reference does), products
  accumulate in float32.
- `*_reference` dequantize with packing.py and call `torch.nn.functional.linear`: the CPU path and the oracle.

Kernel (Triton, `calm_kernels/_qgemm_triton.py`, imported only when a launcher runs it)
- One kernel for both formats: a weight is up to five slabs, each walked in BLOCK_K-column tiles. A tile's
  words are loaded as contiguous rows and expanded by broadcast shifts (3-bit: 32 codes from a 3-word group
  through two 64-bit windows); the activation tile follows the expanded order (a contiguous load and a
  register permute, or a gather through the column permutation), so the packing needs no kernel-specific
  layout. Uniform scales/zeros load once per tile when
  the group is a multiple of BLOCK_K, else per column; codebook entries are gathered from the flat float16
  table (L1-resident: a 64-column 4-bit tile's tables are 2 KiB).
- Decode path, M <= 16: M = 1 is a GEMV (broadcast multiply and row sums in fp32, no tensor cores); M in
  2..16 uses one 16-row tensor-core tile. Split-K (autotuned, 1 to 8) adds fp32 partials atomically into a
  zeroed workspace, then one cast to y. Prefill path, M > 16: tensor-core tiles, grouped program order.
  Autotuned per (M bucket, N, slab shape, format); one config under TRITON_INTERPRET=1.
- Outliers: the program with pid_k == 0 walks each of its rows' CSR entries (as many steps as the longest
  row of the tile), gathering x columns; bias is added there too.

Tested: references on the CPU; the kernel under TRITON_INTERPRET=1 only (every width, groups, sym/asym,
permutation, mixed slabs, outliers, both paths, split-K, ragged shapes, poisoned outputs). Not yet run on a
GPU: compilation on real hardware, the autotune lists and every performance figure are unverified.
"""
from __future__ import annotations

import torch

from calm_kernels._dispatch import use_triton
from calm_kernels.packing import (
    CodebookLayout,
    _codebook_values,
    check_bits,
    dequantize_uniform,
    outlier_rows,
    packed_words,
)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_x(x: torch.Tensor, in_features: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (tokens, in_features), got shape {tuple(x.shape)}; flatten leading dims")
    if x.shape[1] != in_features:
        raise ValueError(f"input has {x.shape[1]} features, the packed weight expects {in_features}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")


def _check_out(out: torch.Tensor | None, x: torch.Tensor, n: int) -> None:
    if out is not None and (tuple(out.shape) != (x.shape[0], n) or out.dtype != x.dtype or not out.is_contiguous()
                            or out.device != x.device):
        raise ValueError(f"out must be a contiguous ({x.shape[0]}, {n}) {x.dtype} tensor on {x.device}")


def _check_bias(bias: torch.Tensor | None, n: int) -> None:
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")


def _check_perm(perm: torch.Tensor | None, k: int, name: str) -> None:
    if perm is not None and (perm.dim() != 1 or perm.numel() != k or perm.is_floating_point()):
        raise ValueError(f"{name} must be an integer permutation of length {k}, got {perm.dtype} "
                         f"{tuple(perm.shape)}")


# Uniform -----------------------------------------------------------------------------------------------------
def _check_uniform(x, packed, scales, zeros, bits, group_size, in_features, bias, input_perm) -> None:
    check_bits(bits)
    _check_x(x, in_features)
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
    n = packed.shape[0]
    if packed.dtype != torch.int32 or tuple(packed.shape) != (n, packed_words(in_features, bits)):
        raise ValueError(f"packed weight must be int32 ({n}, {packed_words(in_features, bits)}) for {in_features} "
                         f"{bits}-bit codes, got {packed.dtype} {tuple(packed.shape)}")
    groups = in_features // group_size
    if tuple(scales.shape) != (n, groups) or tuple(zeros.shape) != (n, groups):
        raise ValueError(f"scales and zeros must be ({n}, {groups}), got {tuple(scales.shape)} and "
                         f"{tuple(zeros.shape)}")
    _check_bias(bias, n)
    _check_perm(input_perm, in_features, "input_perm")


def uniform_matmul_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                             bits: int, group_size: int, in_features: int, bias: torch.Tensor | None = None,
                             input_perm: torch.Tensor | None = None) -> torch.Tensor:
    w = dequantize_uniform(packed, scales, zeros, bits, group_size, in_features, dtype=x.dtype)
    if input_perm is not None:
        x = x.index_select(-1, input_perm.to(torch.int64))
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def uniform_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, group_size: int, in_features: int, bias: torch.Tensor | None = None,
                   input_perm: torch.Tensor | None = None, out: torch.Tensor | None = None,
                   config: dict | None = None) -> torch.Tensor:
    """y = x[:, input_perm] @ dequant(W)^T + bias for x (M, K); see the module docstring.

    `config` pins the kernel's meta-parameters instead of autotuning (tests, benchmarks); the reference ignores it.
    """
    _check_uniform(x, packed, scales, zeros, bits, group_size, in_features, bias, input_perm)
    _check_out(out, x, packed.shape[0])
    if not use_triton(x, packed):
        y = uniform_matmul_reference(x, packed, scales, zeros, bits, group_size, in_features, bias, input_perm)
        return y if out is None else out.copy_(y)
    from calm_kernels import _qgemm_triton

    return _qgemm_triton.qgemm(x.contiguous(), packed.contiguous(), scales.contiguous(), zeros.contiguous(),
                               None if input_perm is None else input_perm.contiguous(),
                               [(bits, in_features, 0, 0, 0)], 0, group_size,
                               None if bias is None else bias.contiguous(), None, out, config)


# Codebook ----------------------------------------------------------------------------------------------------
def _check_codebook(x, qweight, codebooks, perm, layout, bias, outliers) -> None:
    if len(layout.slabs) > 5:
        raise ValueError(f"at most 5 slabs (one per width), got {len(layout.slabs)}")
    _check_x(x, layout.in_features)
    n = qweight.shape[0]
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n, layout.total_words):
        raise ValueError(f"codebook codes must be int32 ({n}, {layout.total_words}) for slabs "
                         f"{list(layout.slabs)}, got {qweight.dtype} {tuple(qweight.shape)}")
    if codebooks.dim() != 1 or codebooks.numel() != layout.codebook_length:
        raise ValueError(f"codebooks must be a flat vector of {layout.codebook_length} entries, got "
                         f"{tuple(codebooks.shape)}")
    _check_perm(perm, layout.in_features, "perm")
    _check_bias(bias, n)
    if outliers is not None:
        rowptr, cols, deltas = outliers
        if rowptr.numel() != n + 1 or cols.numel() != deltas.numel() or cols.is_floating_point():
            raise ValueError(f"outliers must be (rowptr ({n + 1},), cols (nnz,) integer, deltas (nnz,)), got "
                             f"{tuple(rowptr.shape)}, {tuple(cols.shape)}, {tuple(deltas.shape)}")


def codebook_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, codebooks: torch.Tensor, perm: torch.Tensor,
                              layout: CodebookLayout, bias: torch.Tensor | None = None,
                              outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                              ) -> torch.Tensor:
    stored = _codebook_values(qweight, codebooks, layout)
    w = torch.empty_like(stored)
    w[:, perm.to(torch.int64)] = stored
    if outliers is not None and outliers[1].numel():
        rowptr, cols, deltas = outliers
        w[outlier_rows(rowptr), cols.to(torch.int64)] += deltas.to(torch.float32)
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def codebook_matmul(x: torch.Tensor, qweight: torch.Tensor, codebooks: torch.Tensor, perm: torch.Tensor,
                    layout: CodebookLayout, bias: torch.Tensor | None = None,
                    outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y = x @ W^T (+ outliers) + bias for a codebook weight (format in packing.py); see the module docstring.

    `config` pins the kernel's meta-parameters instead of autotuning (tests, benchmarks); the reference ignores it.
    """
    _check_codebook(x, qweight, codebooks, perm, layout, bias, outliers)
    _check_out(out, x, qweight.shape[0])
    if not use_triton(x, qweight):
        y = codebook_matmul_reference(x, qweight, codebooks, perm, layout, bias, outliers)
        return y if out is None else out.copy_(y)
    from calm_kernels import _qgemm_triton

    slabs = [(b, c, cs, ws, cb) for (b, c), cs, ws, cb in
             zip(layout.slabs, layout.col_starts, layout.word_offsets, layout.codebook_offsets)]
    if outliers is not None:
        rowptr, cols, deltas = outliers
        outliers = (rowptr.contiguous(), cols.contiguous(), deltas.to(torch.float32).contiguous())
    return _qgemm_triton.qgemm(x.contiguous(), qweight.contiguous(), codebooks.contiguous(), None,
                               perm.contiguous(), slabs, 1, 1, None if bias is None else bias.contiguous(),
                               outliers, out, config)
