"""Drop-in quantized Linear modules holding packed integer weights (formats in calm_kernels/packing.py).

- `base`: the registry (`QUANTIZED_LINEARS`, `register`, `build_quantized_linear`, `is_quantized_linear`), the
  exact bit accounting (`stored_bits`, `effective_bits`, `weight_bits`, `block_stored_bits`,
  `model_effective_bits`), the CPU
  dense-cache forward, `top_level_linears` and `release_caches`;
- `uniform`: `UniformQuantLinear`, b-bit codes on a per-group grid (RTN, GPTQ, AWQ);
- `codebook`: `CodebookQuantLinear`, per-column lookup tables of mixed widths with outliers (CLAQ);
- `rotated`: `RotatedQuantLinear`, weights and activations quantized behind an online transform (W4A4, W3A3);
- `wrappers`: `KVQuantLinear` (KV-cache quantization) and `ActQuantLinear` (W8A8 activations) around any of them.

Importing this package registers every kind, so `build_quantized_linear` can rebuild any saved module.
"""
from __future__ import annotations

from calm.nn.base import (
    QUANTIZED_LINEARS,
    QuantizedLinear,
    block_stored_bits,
    build_quantized_linear,
    is_quantized_linear,
    model_effective_bits,
    register,
    release_caches,
    stored_bits,
    top_level_linears,
    weight_bits,
)
from calm.nn.codebook import CodebookQuantLinear
from calm.nn.rotated import RotatedQuantLinear
from calm.nn.uniform import UniformQuantLinear
from calm.nn.wrappers import ActQuantLinear, KVQuantLinear, fake_quantize_kv

__all__ = [
    "QUANTIZED_LINEARS",
    "ActQuantLinear",
    "CodebookQuantLinear",
    "KVQuantLinear",
    "QuantizedLinear",
    "RotatedQuantLinear",
    "UniformQuantLinear",
    "block_stored_bits",
    "build_quantized_linear",
    "fake_quantize_kv",
    "is_quantized_linear",
    "model_effective_bits",
    "register",
    "release_caches",
    "stored_bits",
    "top_level_linears",
    "weight_bits",
]
