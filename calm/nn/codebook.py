"""CodebookQuantLinear: one small lookup table per input column, with mixed widths and sparse outliers (CLAQ).

What it stores (format in calm_kernels/packing.py), per (out_features N, in_features K) weight:
- `qweight` (N, total_words) int32: the codes, columns sorted by width into slabs (1, 2, 3, 4 or 8 bits per
  column), each slab padded to 32 columns so it starts on a word boundary;
- `codebooks` float16: 2^b_j centroids for every column j (per-column K-means / CLAQ centroids);
- `perm` (K,) int32: which original column each stored column is (the slab sort is not the input order);
- `outlier_rowptr` (N + 1,) int32, `outlier_cols` (nnz,) int16/int32 and `outlier_vals` (nnz,) float16,
  only with outliers: weights kept exactly in float16, as CSR over output rows;
- `bias` (N,) float, optional, not counted in `effective_bits` (see calm.nn.base).

Every one of these is counted by `effective_bits` (codebooks and permutation amortize over N rows).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from calm.nn.base import QuantizedLinear, dense_forward, register
from calm_kernels import packing
from calm_kernels._dispatch import use_triton as _use_triton
from calm_kernels.kmeans import kmeans_columns
from calm_kernels.qgemm import matmul_prepared, prepare_codebook


@register
class CodebookQuantLinear(QuantizedLinear):
    """y = x @ W^T + b with W[n, j] = codebook_j[code[n, j]]: one float16 lookup table per input column, widths
    per column in {1, 2, 3, 4, 8}, columns permuted into slabs of equal width, optional sparse float16 outliers
    (format in calm_kernels.packing; buffers in the module docstring).
    """

    kind = "codebook"
    _CACHES = ("_dense_cache", "_delta_cache", "_kernel_cache")

    def __init__(self, in_features: int, out_features: int, slabs, outliers: int | None = None,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        layout = packing.CodebookLayout(tuple((int(b), int(c)) for b, c in slabs))
        if layout.in_features != in_features:
            raise ValueError(f"slabs {list(layout.slabs)} hold {layout.in_features} columns, not in_features "
                             f"{in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.layout = layout
        self.register_buffer("qweight", torch.zeros(out_features, layout.total_words, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("codebooks", torch.zeros(layout.codebook_length, dtype=torch.float16, device=device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device))
        has_outliers = outliers is not None
        nnz = int(outliers or 0)
        self.register_buffer("outlier_rowptr", torch.zeros(out_features + 1, dtype=torch.int32, device=device)
                             if has_outliers else None)
        self.register_buffer("outlier_cols", torch.zeros(nnz, dtype=packing.outlier_col_dtype(in_features),
                                                         device=device) if has_outliers else None)
        self.register_buffer("outlier_vals", torch.zeros(nnz, dtype=torch.float16, device=device)
                             if has_outliers else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._dense_cache: torch.Tensor | None = None
        self._delta_cache: torch.Tensor | None = None
        self._kernel_cache = None  # calm_kernels.qgemm.KernelWeight: the kernel-ready copy, made on first use

    # Construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, codes: torch.Tensor, centroids: torch.Tensor, column_bits: torch.Tensor,
                   outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   bias: torch.Tensor | None = None) -> CodebookQuantLinear:
        """From codes (out, in) where codes[:, j] index centroids[j, :2**column_bits[j]].

        Args:
            codes: (out_features, in_features) integer codes.
            centroids: (in_features, >= 2**max(column_bits)) float; stored as float16.
            column_bits: (in_features,) widths in {1, 2, 3, 4, 8}.
            outliers: optional (rows, cols, values): the weight at each position is the value (float16),
                whatever its code says.
            bias: optional (out_features,).
        """
        packed = packing.pack_codebook(codes, centroids, column_bits, outliers)
        out_features, in_features = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        nnz = None if packed.outlier_cols is None else packed.outlier_cols.numel()
        m = cls(in_features, out_features, packed.layout.slabs, nnz, bias=bias is not None, dtype=dtype,
                device=codes.device)
        m.qweight.copy_(packed.qweight)
        m.codebooks.copy_(packed.codebooks)
        m.perm.copy_(packed.perm)
        if nnz is not None:
            m.outlier_rowptr.copy_(packed.outlier_rowptr)
            m.outlier_cols.copy_(packed.outlier_cols)
            m.outlier_vals.copy_(packed.outlier_vals)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int | torch.Tensor = 4, iters: int = 25) -> CodebookQuantLinear:
        """Per-column K-means (calm_kernels.kmeans, no calibration data) of a float Linear; `bits` an int or a
        width per column, 1-4 (8-bit codebooks come through `from_parts`)."""
        w = linear.weight.detach().to(torch.float32)
        k = w.shape[1]
        column_bits = (bits.to(torch.int64).cpu() if isinstance(bits, torch.Tensor)
                       else torch.full((k,), int(bits), dtype=torch.int64, device="cpu"))
        max_bits = int(column_bits.max())
        codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
        centroids = torch.zeros(k, 1 << max_bits, device=w.device)
        for b in column_bits.unique().tolist():
            cols = (column_bits == b).nonzero().flatten().to(w.device)
            c, cent = kmeans_columns(w[:, cols], b, iters=iters)
            codes[:, cols] = c
            centroids[cols, :1 << b] = cent
        return cls.from_parts(codes, centroids, column_bits, None, linear.bias)

    # Inference ---------------------------------------------------------------------------------------------
    def packed(self) -> packing.PackedCodebook:
        return packing.PackedCodebook(self.layout, self.qweight, self.codebooks, self.perm, self.outlier_rowptr,
                                      self.outlier_cols, self.outlier_vals)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense (out, in) weight in the original column order, outliers applied."""
        return packing.dequantize_codebook(self.packed(), dtype)

    def column_bits(self) -> torch.Tensor:
        """Width of every original input column (in_features,)."""
        bits = torch.empty(self.in_features, dtype=torch.int64, device="cpu")
        bits[self.perm.to(torch.int64).cpu()] = self.layout.column_bits()
        return bits

    def _outliers(self):
        if self.outlier_rowptr is None or self.outlier_cols.numel() == 0:
            return None
        if self._delta_cache is None:
            self._delta_cache = packing.codebook_outlier_deltas(self.qweight, self.codebooks, self.perm,
                                                                self.layout, self.outlier_rowptr,
                                                                self.outlier_cols, self.outlier_vals)
        return self.outlier_rowptr, self.outlier_cols, self._delta_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_triton(x, self.qweight):
            if self._kernel_cache is None:
                self._kernel_cache = prepare_codebook(self.qweight, self.codebooks, self.perm, self.layout,
                                                      self._outliers())
            shape = x.shape
            y = matmul_prepared(x.reshape(-1, shape[-1]), self._kernel_cache, self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        return dense_forward(self, x)

    # Description -------------------------------------------------------------------------------------------
    @property
    def num_outliers(self) -> int:
        return 0 if self.outlier_cols is None else self.outlier_cols.numel()

    @property
    def bits(self) -> float:
        """Mean code width per column."""
        return sum(b * c for b, c in self.layout.slabs) / self.in_features

    def quant_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "slabs": [list(s) for s in self.layout.slabs],
                "outliers": None if self.outlier_rowptr is None else self.num_outliers,
                "bias": self.bias is not None}

    @classmethod
    def from_quant_config(cls, cfg: dict[str, Any]) -> CodebookQuantLinear:
        return cls(cfg["in_features"], cfg["out_features"], [tuple(s) for s in cfg["slabs"]], cfg["outliers"],
                   bias=cfg["bias"])

    def extra_repr(self) -> str:
        slabs = ", ".join(f"{c}x{b}b" for b, c in self.layout.slabs)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits:.3f}, "
                f"slabs=[{slabs}], outliers={self.num_outliers}, effective_bits={self.effective_bits:.3f}")
