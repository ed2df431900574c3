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
  dtype. Products accumulate in float32. The tensor-core paths (M > 4) and the dense path round the float32
  weight to x's dtype before it meets x, as the reference does; the GEMV path (M <= 4) multiplies the float32
  weight itself (no rounding: at least as accurate as the reference).
- `*_reference` dequantize with packing.py and call `torch.nn.functional.linear`: the CPU path and the oracle.

Kernel-ready weights (`prepare_uniform`, `prepare_codebook` -> `KernelWeight`): built once from the stored
tensors (the calm.nn modules cache it; `uniform_matmul` / `codebook_matmul` build it on every call, so a caller
that repeats calls should prepare once and call `matmul_prepared`). The stored format does not change: a 3-bit
slab is repacked into a 2-bit plane and a 1-bit plane (same word count), the codebook tables are widened to
float32, the codebook outlier columns are mapped to stored order, and the permutation is kept as int64 for one
gather of x per call (act-order and codebook slabs: the kernel then reads x contiguously). Memory: a 3-bit
weight's codes are held twice while the copy lives (the stored stream and the planes); other widths share
the stored words.

Paths (`path="auto"` picks by M; tests and benchmarks may force one)
- `gemv`, M <= 4: CUDA cores; partial sums stay 4-D in registers, reduced once per slab after the K loop.
- `small`, M in 5..16: one 16-row tensor-core tile.
- both decode paths may split K (autotuned): programs add fp32 partials atomically into a per-shape workspace
  and the last program of a tile writes y and leaves the workspace zero (no zero-fill or copy launches; the
  workspace is allocated, zeroed, once per (device, M, N), and assumes one stream at a time per shape).
- `prefill`, 16 < M < DENSE_MIN_M: tensor-core tiles, grouped program order.
- `dense`, M >= DENSE_MIN_M: one dequantization kernel writes the (N, K) weight in x's dtype, then cuBLAS
  (torch.addmm); codebook outliers are written into that weight. DENSE_MIN_M = 1024 is a guess to be measured
  on the GPU (bench/bench_qgemm.py times both paths at every M).
Launch parameters: autotuned once per (path, M power-of-two bucket, N, K, format, bits, group, outliers, dtypes),
never per CLAQ slab widths, then cached: after the first call of a shape the forward does no host sync and no
data-dependent allocation, so it can be captured in a CUDA graph (first call outside the capture).

Kernel (Triton, `calm_kernels/_qgemm_triton.py`, imported only when a launcher runs it): uniform weights are
dequantized without int-to-float conversion (the code under the exponent of 1.0 in a float32 mantissa, then one
exact FMA with a per-group scale and offset; bit-identical to the reference's float32 weights).

Tested: references on the CPU; the kernel under TRITON_INTERPRET=1 only, and compiled for sm90 without a GPU
(tests/kernels/test_qgemm.py). Not yet run on a GPU: every performance figure and the autotune lists are
unverified, and so is the split-K ticket protocol's memory ordering on real hardware.
"""
from __future__ import annotations

import dataclasses

import torch

from calm_kernels._dispatch import use_triton
from calm_kernels.packing import (
    CodebookLayout,
    _codebook_values,
    check_bits,
    codebook_outlier_deltas,
    dequantize_uniform,
    outlier_rows,
    packed_words,
    split_3bit_planes,
)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PATHS = ("auto", "gemv", "small", "prefill", "dense")
GEMV_MAX_M = 4
SMALL_MAX_M = 16
# From this M on, dequantize once + cuBLAS. A guess: measure on the GPU (bench_qgemm.py times both paths).
DENSE_MIN_M = 1024


def choose_path(m: int, path: str = "auto") -> str:
    if path not in PATHS:
        raise ValueError(f"unknown qgemm path {path!r}: use one of {PATHS}")
    if path != "auto":
        return path
    if m <= GEMV_MAX_M:
        return "gemv"
    if m <= SMALL_MAX_M:
        return "small"
    return "prefill" if m < DENSE_MIN_M else "dense"


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


# Kernel-ready weights ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class KernelWeight:
    """A packed weight in the form the kernels read (see the module docstring); built by `prepare_*`."""

    mode: int                      # 0 uniform, 1 codebook
    n: int
    k: int
    words: torch.Tensor            # (N, words) int32: the stored codes, 3-bit slabs as 2-bit + 1-bit planes
    meta0: torch.Tensor            # uniform: scales (N, groups) float16; codebook: float32 tables (flat)
    meta1: torch.Tensor | None     # uniform: zeros (N, groups) uint8
    perm: torch.Tensor | None      # (K,) int64: stored column s meets x[:, perm[s]]
    slabs: tuple[tuple[int, int, int, int, int], ...]  # (bits, cols, col_start, word_start, table_start)
    group: int
    tune_bits: int                 # the autotune key's width: uniform bits, a codebook's rounded mean width
    outlier_rowptr: torch.Tensor | None = None   # (N + 1,) int32
    outlier_scols: torch.Tensor | None = None    # (nnz,) int32 stored columns
    outlier_deltas: torch.Tensor | None = None   # (nnz,) float32: value - codebook value
    outlier_index: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, stored cols) int64, dense path
    outlier_values: torch.Tensor | None = None   # (nnz,) float32 outlier weights, dense path

    @property
    def device(self) -> torch.device:
        return self.words.device


def _check_uniform_weight(packed, scales, zeros, bits, group_size, in_features, input_perm) -> None:
    check_bits(bits)
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
    _check_perm(input_perm, in_features, "input_perm")


def _kernel_words(words: torch.Tensor, slabs) -> torch.Tensor:
    """The stored words with every 3-bit slab split into its 2-bit and 1-bit planes (same word count)."""
    if not any(b == 3 for b, *_ in slabs):
        return words.contiguous()
    out = words.clone()
    for bits, cols, _, w0, _ in slabs:
        if bits == 3:
            w1 = w0 + packed_words(cols, 3)
            out[:, w0:w1] = split_3bit_planes(words[:, w0:w1], cols)
    return out.contiguous()


def prepare_uniform(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                    in_features: int, input_perm: torch.Tensor | None = None) -> KernelWeight:
    """The kernel-ready form of a uniform weight (checked here once; see the module docstring)."""
    _check_uniform_weight(packed, scales, zeros, bits, group_size, in_features, input_perm)
    slabs = ((bits, in_features, 0, 0, 0),)
    return KernelWeight(0, packed.shape[0], in_features, _kernel_words(packed, slabs), scales.contiguous(),
                        zeros.contiguous(), None if input_perm is None else input_perm.to(torch.int64).contiguous(),
                        slabs, group_size, bits)


def _check_codebook_weight(qweight, codebooks, perm, layout, outliers) -> None:
    if len(layout.slabs) > 5:
        raise ValueError(f"at most 5 slabs (one per width), got {len(layout.slabs)}")
    n = qweight.shape[0]
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n, layout.total_words):
        raise ValueError(f"codebook codes must be int32 ({n}, {layout.total_words}) for slabs "
                         f"{list(layout.slabs)}, got {qweight.dtype} {tuple(qweight.shape)}")
    if codebooks.dim() != 1 or codebooks.numel() != layout.codebook_length:
        raise ValueError(f"codebooks must be a flat vector of {layout.codebook_length} entries, got "
                         f"{tuple(codebooks.shape)}")
    _check_perm(perm, layout.in_features, "perm")
    if outliers is not None:
        rowptr, cols, deltas = outliers
        if rowptr.numel() != n + 1 or cols.numel() != deltas.numel() or cols.is_floating_point():
            raise ValueError(f"outliers must be (rowptr ({n + 1},), cols (nnz,) integer, deltas (nnz,)), got "
                             f"{tuple(rowptr.shape)}, {tuple(cols.shape)}, {tuple(deltas.shape)}")


def prepare_codebook(qweight: torch.Tensor, codebooks: torch.Tensor, perm: torch.Tensor, layout: CodebookLayout,
                     outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> KernelWeight:
    """The kernel-ready form of a codebook weight; outliers as (rowptr, original cols, deltas)."""
    _check_codebook_weight(qweight, codebooks, perm, layout, outliers)
    slabs = tuple((b, c, cs, ws, cb) for (b, c), cs, ws, cb in
                  zip(layout.slabs, layout.col_starts, layout.word_offsets, layout.codebook_offsets))
    perm64 = perm.to(torch.int64).contiguous()
    extra = {}
    if outliers is not None and outliers[1].numel():
        rowptr, cols, deltas = outliers
        inverse = torch.empty_like(perm64)
        inverse[perm64] = torch.arange(perm64.numel(), device=perm64.device)
        scols = inverse[cols.to(torch.int64)]
        # The dense path writes the outlier weight itself: codebook value + delta (the stored value).
        current = -codebook_outlier_deltas(qweight, codebooks, perm, layout, rowptr, cols,
                                           torch.zeros_like(deltas, dtype=torch.float32))
        extra = dict(outlier_rowptr=rowptr.to(torch.int32).contiguous(), outlier_scols=scols.to(torch.int32),
                     outlier_deltas=deltas.to(torch.float32).contiguous(),
                     outlier_index=(outlier_rows(rowptr), scols), outlier_values=current + deltas.to(torch.float32))
    mean_bits = sum(b * c for b, c in layout.slabs) / layout.in_features
    return KernelWeight(1, qweight.shape[0], layout.in_features, _kernel_words(qweight, slabs),
                        codebooks.to(torch.float32).contiguous(), None, perm64, slabs, 1, round(mean_bits), **extra)


def matmul_prepared(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, path: str = "auto", config: dict | None = None) -> torch.Tensor:
    """y = x @ W^T (+ outliers) + bias through the Triton kernels for a prepared weight (x on its device, or any
    tensor under TRITON_INTERPRET=1). `config` pins the kernel's meta-parameters instead of autotuning."""
    _check_x(x, weight.k)
    _check_out(out, x, weight.n)
    _check_bias(bias, weight.n)
    m = x.shape[0]
    path = choose_path(m, path)
    y = out if out is not None else torch.empty(m, weight.n, dtype=x.dtype, device=x.device)
    if m == 0 or weight.n == 0:
        return y
    from calm_kernels import _qgemm_triton

    # One gather puts x in stored column order (act-order, codebook slabs); the kernels read it contiguously.
    xs = x.index_select(1, weight.perm) if weight.perm is not None else x.contiguous()
    bias = None if bias is None else bias.contiguous()
    if path == "dense":
        w = _qgemm_triton.dequantize(weight, x.dtype)
        if weight.outlier_index is not None:
            w.index_put_(weight.outlier_index, weight.outlier_values.to(x.dtype))
        if bias is None:
            return torch.mm(xs, w.t(), out=y)
        return torch.addmm(bias.to(x.dtype), xs, w.t(), out=y)
    return _qgemm_triton.qgemm(xs, weight, bias, y, path, config)


# Uniform -----------------------------------------------------------------------------------------------------
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
                   config: dict | None = None, path: str = "auto") -> torch.Tensor:
    """y = x[:, input_perm] @ dequant(W)^T + bias for x (M, K); see the module docstring.

    Prepares the kernel-ready weight on every call (`prepare_uniform` + `matmul_prepared` to do it once).
    `config` pins the kernel's meta-parameters and `path` the kernel path; the reference ignores both.
    """
    _check_uniform_weight(packed, scales, zeros, bits, group_size, in_features, input_perm)
    _check_x(x, in_features)
    _check_out(out, x, packed.shape[0])
    _check_bias(bias, packed.shape[0])
    if not use_triton(x, packed):
        y = uniform_matmul_reference(x, packed, scales, zeros, bits, group_size, in_features, bias, input_perm)
        return y if out is None else out.copy_(y)
    weight = prepare_uniform(packed, scales, zeros, bits, group_size, in_features, input_perm)
    return matmul_prepared(x, weight, bias, out, path, config)


# Codebook ----------------------------------------------------------------------------------------------------
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
                    out: torch.Tensor | None = None, config: dict | None = None, path: str = "auto") -> torch.Tensor:
    """y = x @ W^T (+ outliers) + bias for a codebook weight (format in packing.py); see the module docstring.

    Prepares the kernel-ready weight on every call (`prepare_codebook` + `matmul_prepared` to do it once).
    `config` pins the kernel's meta-parameters and `path` the kernel path; the reference ignores both.
    """
    _check_codebook_weight(qweight, codebooks, perm, layout, outliers)
    _check_x(x, layout.in_features)
    _check_out(out, x, qweight.shape[0])
    _check_bias(bias, qweight.shape[0])
    if not use_triton(x, qweight):
        y = codebook_matmul_reference(x, qweight, codebooks, perm, layout, bias, outliers)
        return y if out is None else out.copy_(y)
    weight = prepare_codebook(qweight, codebooks, perm, layout, outliers)
    return matmul_prepared(x, weight, bias, out, path, config)
