"""Drop-in quantized Linear modules holding packed integer weights (formats in calm_kernels/packing.py).

Plain buffers only (no tensor subclasses), so `state_dict` / safetensors carry everything. Each module
describes itself with `quant_config()` (a JSON-able dict) and is rebuilt empty from it by
`build_quantized_linear(config)` before its state is loaded: that is how `calm.load` restores a model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from calm.grid import quantize_groups
from calm_kernels import packing
from calm_kernels.qgemm import uniform_matmul


class UniformQuantLinear(nn.Module):
    """y = x @ dequant(W)^T + b with W stored as packed b-bit codes, float16 scales and uint8 zero points per group.

    `input_perm` (optional) reorders the input features first: GPTQ's full act-order quantizes columns in
    that order and groups follow it.
    """

    kind = "uniform"

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
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_perm", torch.arange(in_features, device=device) if has_input_perm else None)
        self._dense_cache: torch.Tensor | None = None

    # Construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, symmetric: bool, bias: torch.Tensor | None = None,
                   input_perm: torch.Tensor | None = None) -> "UniformQuantLinear":
        """From codes (out, in) on the grid, scales and zeros (out, in/group) — what RTN/GPTQ/AWQ produce."""
        out_features, in_features = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(in_features, out_features, bits, group_size, symmetric, bias=bias is not None,
                has_input_perm=input_perm is not None, dtype=dtype, device=codes.device)
        m.qweight.copy_(packing.pack_codes(codes.to(torch.uint8), bits))
        m.scales.copy_(scales.to(torch.float16))
        m.zeros.copy_(zeros.round().to(torch.uint8))
        if bias is not None:
            m.bias.copy_(bias.detach())
        if input_perm is not None:
            m.input_perm.copy_(input_perm)
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool = False
                   ) -> "UniformQuantLinear":
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
            w = w[:, torch.argsort(self.input_perm)]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            if self.input_perm is not None:
                x = x.index_select(-1, self.input_perm)
            shape = x.shape
            y = uniform_matmul(x.reshape(-1, shape[-1]), self.qweight, self.scales, self.zeros, self.bits,
                               self.group_size, self.in_features, self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        # CPU: the reference path. Dequantizing once and keeping the dense copy makes repeated forwards
        # (search, evaluation) cost a plain matmul; the packed buffers stay the source of truth.
        if self._dense_cache is None or self._dense_cache.dtype != x.dtype:
            self._dense_cache = self.dequantized_weight(x.dtype)
        return nn.functional.linear(x, self._dense_cache, self.bias)

    def _apply(self, fn, recurse=True):
        self._dense_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    # Description -------------------------------------------------------------------------------------------
    @property
    def effective_bits(self) -> float:
        return packing.uniform_effective_bits(self.bits, self.group_size, self.symmetric)

    def quant_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "bias": self.bias is not None, "input_perm": self.input_perm is not None}

    @classmethod
    def from_quant_config(cls, cfg: dict[str, Any]) -> "UniformQuantLinear":
        return cls(cfg["in_features"], cfg["out_features"], cfg["bits"], cfg["group_size"], cfg["symmetric"],
                   bias=cfg["bias"], has_input_perm=cfg["input_perm"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, "
                f"effective_bits={self.effective_bits:.3f}")


QUANTIZED_LINEARS: dict[str, type[nn.Module]] = {UniformQuantLinear.kind: UniformQuantLinear}


def is_quantized_linear(module: nn.Module) -> bool:
    return isinstance(module, tuple(QUANTIZED_LINEARS.values()))


def build_quantized_linear(cfg: dict[str, Any]) -> nn.Module:
    """An empty module of the kind `cfg` describes, ready for `load_state_dict`."""
    kind = cfg.get("kind")
    if kind not in QUANTIZED_LINEARS:
        raise ValueError(f"unknown quantized module kind {kind!r}; known: {sorted(QUANTIZED_LINEARS)}")
    return QUANTIZED_LINEARS[kind].from_quant_config(cfg)


def weight_bits(module: nn.Module) -> tuple[float, int]:
    """(stored bits, weights) of a linear: quantized modules by their effective bits, float ones at 16."""
    if is_quantized_linear(module):
        n = module.in_features * module.out_features
        return module.effective_bits * n, n
    n = module.weight.numel()
    return 16.0 * n, n


def release_caches(module: nn.Module) -> None:
    """Drop the dense weights that CPU forwards keep, so idle quantized blocks take their packed size only."""
    for m in module.modules():
        if hasattr(m, "_dense_cache"):
            m._dense_cache = None


def model_effective_bits(blocks: list[nn.Module]) -> float:
    """Bits per weight over every linear of the given decoder blocks (embeddings and head are not counted)."""
    bits = weights = 0.0
    for block in blocks:
        for m in block.modules():
            if isinstance(m, nn.Linear) or is_quantized_linear(m):
                b, n = weight_bits(m)
                bits += b
                weights += n
    return bits / weights if weights else 16.0
