"""Wrappers that quantize around a packed linear: its output (KVQuantLinear, the KV cache) or its input
(ActQuantLinear, W8A8's per-token activations).

A wrapper stores nothing of its own: its state dict is its inner linear's (`linear.*`), so its
`effective_bits` are the inner linear's stored bits per weight (calm.nn.base), and KV / activation
quantization happens at run time, at no storage cost.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from calm.nn.base import QuantizedLinear, build_quantized_linear, register

# calm_kernels.rotated imports torch only; triton loads inside its launchers.
from calm_kernels import rotated as _rotated


def fake_quantize_kv(y: torch.Tensor, bits: int, head_dim: int, group_size: int) -> torch.Tensor:
    """Quantize-dequantize (..., heads * head_dim) per token, per head, in groups of `group_size` channels of
    the head: asymmetric min/max grid with 2^bits levels (scale = (max - min) / (2^bits - 1), integer zero
    point, round half to even), computed in float32 and returned in y's dtype. A constant group is exact."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"KV bits must be 2, 3, 4 or 8, got {bits}")
    if y.shape[-1] % head_dim or head_dim % group_size:
        raise ValueError(f"KV group size {group_size} must divide head_dim {head_dim}, which must divide the "
                         f"projection size {y.shape[-1]}")
    maxq = (1 << bits) - 1
    z = y.to(torch.float32).reshape(*y.shape[:-1], y.shape[-1] // group_size, group_size)
    lo = z.amin(dim=-1, keepdim=True)
    hi = z.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / maxq
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / safe)
    q = torch.clamp(torch.round(z / safe) + zero, 0, maxq)
    deq = torch.where(scale > 0, (q - zero) * safe, z)
    return deq.reshape(y.shape).to(y.dtype)


class _WrappedQuantLinear(QuantizedLinear):
    """A quantized linear `self.linear` with something done around it: shape, stored bits and weight are its."""

    linear: nn.Module

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.linear.dequantized_weight(dtype)


@register
class KVQuantLinear(_WrappedQuantLinear):
    """A quantized k_proj or v_proj whose output is quantized as the KV cache stores it.

    What is quantized where: `linear` (any calm.nn quantized linear) computes K or V from the block input;
    its output (tokens, kv_heads * head_dim) is quantized per token and per head, asymmetric, in groups of
    `group_size` channels (`fake_quantize_kv`). For V this is exactly the cached tensor. For K it is the
    pre-RoPE key: the cache holds K before the rotary embedding and RoPE is applied when it is read
    (transformers' LlamaAttention/Qwen2Attention apply RoPE after k_proj, which is where this sits). Queries,
    attention scores and probabilities stay in floating point. The CPU forward dequantizes; there is no
    fused KV kernel.
    """

    kind = "kv"

    def __init__(self, linear: nn.Module, bits: int, head_dim: int, group_size: int = 0) -> None:
        super().__init__()
        group_size = group_size or head_dim
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"KV bits must be 2, 3, 4 or 8, got {bits}")
        if linear.out_features % head_dim or head_dim % group_size:
            raise ValueError(f"KV group size {group_size} must divide head_dim {head_dim}, which must divide "
                             f"out_features {linear.out_features}")
        self.linear = linear
        self.bits = bits
        self.head_dim = head_dim
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_kv(self.linear(x), self.bits, self.head_dim, self.group_size)

    def quant_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "bits": self.bits, "head_dim": self.head_dim, "group_size": self.group_size,
                "linear": self.linear.quant_config()}

    @classmethod
    def from_quant_config(cls, cfg: dict[str, Any]) -> KVQuantLinear:
        return cls(build_quantized_linear(cfg["linear"]), cfg["bits"], cfg["head_dim"], cfg["group_size"])

    def extra_repr(self) -> str:
        return f"kv_bits={self.bits}, head_dim={self.head_dim}, group_size={self.group_size}"



@register
class ActQuantLinear(_WrappedQuantLinear):
    """A quantized linear whose input is quantized per token first: the W8A8 path, where weights have 8 bits and
    the rotated integer GEMM (2-4-bit weights) does not apply. `linear` (any calm.nn quantized linear, here a
    per-channel 8-bit UniformQuantLinear) runs on the input quantized per token, symmetric, at `a_bits` with
    `clip_ratio` (calm_kernels.rotated.fake_quantize_activations, the rotated path's own quantizer). The
    forward dequantizes the activations; there is no fused int8 x int8 kernel behind it."""

    kind = "act"

    def __init__(self, linear: nn.Module, a_bits: int, clip_ratio: float = 1.0) -> None:
        super().__init__()
        if a_bits not in _rotated.ACTIVATION_BITS:
            raise ValueError(f"activation bits must be one of {_rotated.ACTIVATION_BITS}, got {a_bits}")
        _rotated._check_clip(clip_ratio)
        self.linear = linear
        self.a_bits = a_bits
        self.clip_ratio = float(clip_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(_rotated.fake_quantize_activations(x, self.a_bits, self.clip_ratio))

    def quant_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "a_bits": self.a_bits, "clip_ratio": self.clip_ratio,
                "linear": self.linear.quant_config()}

    @classmethod
    def from_quant_config(cls, cfg: dict[str, Any]) -> ActQuantLinear:
        return cls(build_quantized_linear(cfg["linear"]), cfg["a_bits"], cfg["clip_ratio"])

    def extra_repr(self) -> str:
        return f"a_bits={self.a_bits}, clip_ratio={self.clip_ratio}"

