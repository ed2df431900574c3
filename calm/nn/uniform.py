"""UniformQuantLinear: weights on a uniform grid per group of input columns (RTN, GPTQ, AWQ, rotation's weights).

What it stores (format in calm_kernels/packing.py), per (out_features N, in_features K) weight:
- `qweight` (N, K_pad * b / 32) int32: the b-bit codes, b in {2, 3, 4, 8}, each row padded to 32 columns;
- `scales` (N, K / group_size) float16: one step per group;
- `zeros` (N, K / group_size) uint8: one integer zero point per group, saved only for an asymmetric grid. A
  symmetric grid's zero point is the constant 2^(b-1): the buffer is still there for the kernels but is not
  persistent, so it is neither saved nor counted (checkpoints that still carry it load; it is checked);
- `input_perm` (K,) int16 (int32 above 32767 columns), optional: GPTQ's act-order quantizes columns in that
  order and groups follow it, so stored column s meets input feature input_perm[s];
- `bias` (N,) float, optional, not counted in `effective_bits` (see calm.nn.base).

The default W3A16G64 (asymmetric, groups of 64) therefore stores 3 + 16/64 + 8/64 = 3.375 bits per weight
when K is a multiple of 32, plus 16 / N bits with an act-order permutation.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from calm.grid import quantize_groups
from calm.nn.base import QuantizedLinear, dense_forward, register
from calm_kernels import packing
from calm_kernels._dispatch import use_triton as _use_triton
from calm_kernels.qgemm import matmul_prepared, prepare_uniform


@register
class UniformQuantLinear(QuantizedLinear):
    """y = x @ dequant(W)^T + b with W stored as packed b-bit codes, float16 scales and (asymmetric grids) uint8
    zero points per group; `input_perm` (optional) reorders the input features first (see the module docstring).
    """

    kind = "uniform"
    _CACHES = ("_dense_cache", "_kernel_cache")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool = False, has_input_perm: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        packing.check_bits(bits)
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, packing.packed_words(in_features, bits),
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        zero = self.symmetric_zero if symmetric else 0
        self.register_buffer("zeros", torch.full((out_features, groups), zero, dtype=torch.uint8, device=device),
                             persistent=not symmetric)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_perm", torch.arange(in_features, dtype=packing.index_dtype(in_features),
                                                        device=device) if has_input_perm else None)
        self._dense_cache: torch.Tensor | None = None
        self._kernel_cache = None  # calm_kernels.qgemm.KernelWeight: the kernel-ready copy, made on first use

    @property
    def symmetric_zero(self) -> int:
        """The zero point of a symmetric grid (calm.grid): 2^(bits-1)."""
        return 1 << (self.bits - 1)

    # Construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, symmetric: bool, bias: torch.Tensor | None = None,
                   input_perm: torch.Tensor | None = None) -> UniformQuantLinear:
        """From codes (out, in) on the grid, scales and zeros (out, in/group) — what RTN/GPTQ/AWQ produce.
        With `symmetric` every zero must be 2^(bits-1) (it is not stored)."""
        out_features, in_features = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(in_features, out_features, bits, group_size, symmetric, bias=bias is not None,
                has_input_perm=input_perm is not None, dtype=dtype, device=codes.device)
        m.qweight.copy_(packing.pack_codes(codes.to(torch.uint8), bits))
        m.scales.copy_(scales.to(torch.float16))
        z = zeros.round().to(torch.uint8)
        if symmetric and not bool((z == m.symmetric_zero).all()):
            raise ValueError(f"a symmetric {bits}-bit grid has every zero point at {m.symmetric_zero}; got "
                             f"{sorted(set(z.unique().tolist()))[:8]}: pass symmetric=False")
        m.zeros.copy_(z)
        if bias is not None:
            m.bias.copy_(bias.detach())
        if input_perm is not None:
            m.input_perm.copy_(input_perm)
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool = False
                   ) -> UniformQuantLinear:
        """Round-to-nearest quantization of a float Linear."""
        w = linear.weight.detach()
        codes, scales, zeros = quantize_groups(w, bits, group_size or w.shape[1], symmetric)
        return cls.from_codes(codes, scales, zeros, bits, group_size or w.shape[1], symmetric, linear.bias)

    # Inference ---------------------------------------------------------------------------------------------
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense (out, in) weight in the module's input order (the inverse of `input_perm` applied)."""
        w = packing.dequantize_uniform(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                       self.in_features, dtype=dtype)
        if self.input_perm is not None:
            w = w[:, torch.argsort(self.input_perm.to(torch.int64))]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_triton(x, self.qweight):
            if self._kernel_cache is None:
                self._kernel_cache = prepare_uniform(self.qweight, self.scales, self.zeros, self.bits,
                                                     self.group_size, self.in_features, self.input_perm)
            shape = x.shape
            y = matmul_prepared(x.reshape(-1, shape[-1]), self._kernel_cache, self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        return dense_forward(self, x)

    def _derived_entries(self) -> dict[str, torch.Tensor]:
        return {"zeros": self.zeros} if self.symmetric else {}

    # Description -------------------------------------------------------------------------------------------
    def quant_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "bias": self.bias is not None, "input_perm": self.input_perm is not None}

    @classmethod
    def from_quant_config(cls, cfg: dict[str, Any]) -> UniformQuantLinear:
        return cls(cfg["in_features"], cfg["out_features"], cfg["bits"], cfg["group_size"], cfg["symmetric"],
                   bias=cfg["bias"], has_input_perm=cfg["input_perm"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, "
                f"effective_bits={self.effective_bits:.3f}")
