"""Shared pieces for candidates at schemes that quantize activations (W4A4, W3A3, W4A8) or the KV cache.

Not an algorithm itself. At a_bits < 16 every linear becomes a `calm.nn.RotatedQuantLinear`: an online
transform of its input (Hadamard, learned Kronecker factors, or none), per-token symmetric activation
quantization with a clip ratio, and per-output-channel symmetric weights (the integer GEMM of
calm_kernels.rotated). Weight groups are not part of that format, so such schemes must be per-channel (no
G). With k_bits/v_bits < 16, k_proj and v_proj are wrapped in `calm.nn.KVQuantLinear` (per head,
asymmetric, groups of `spec.kv_group_size`) as soon as they are quantized, so that later linears of the
block are calibrated on the quantized cache.
"""
from __future__ import annotations

import torch
from torch import nn

from calm import arch
from calm.config import CalmUsageError, QuantSpec
from calm.nn import KVQuantLinear, RotatedQuantLinear
from calm_kernels import rotated


def kv_field(block: nn.Module, name: str) -> str | None:
    """"k_bits" / "v_bits" when `name` is the block's K / V projection (calm.arch), else None."""
    layout = arch.layout_of(block)
    return "k_bits" if name == layout.k_proj else "v_bits" if name == layout.v_proj else None


def check_kv_layout(block: nn.Module, spec: QuantSpec) -> None:
    layout = arch.layout_of(block)
    if (spec.k_bits != 16 or spec.v_bits != 16) and (layout.k_proj is None or layout.v_proj is None):
        raise CalmUsageError(f"{layout.families[0]} computes K and V inside a fused projection; calm's KV-cache "
                             f"quantization needs separate k/v projections: drop K/V from the scheme")


def check_activation_spec(spec: QuantSpec, algorithm: str) -> None:
    """Refuse what the activation-quantized format cannot hold, naming the fix."""
    if spec.a_bits == 16:
        return
    if spec.a_bits not in rotated.ACTIVATION_BITS:
        raise CalmUsageError(f"{algorithm}: activations at {spec.a_bits} bits are not supported; use A3, A4 or A8 "
                             f"(or A16 for weight-only)")
    if spec.w_bits not in rotated.WEIGHT_BITS:
        raise CalmUsageError(f"{algorithm}: with quantized activations weights must be 2, 3 or 4 bits (the integer "
                             f"GEMM's formats), got W{spec.w_bits}")
    if spec.group_size:
        raise CalmUsageError(f"{algorithm}: scheme {spec.scheme} quantizes activations, whose integer GEMM takes "
                             f"per-channel symmetric weights: drop the G (e.g. W{spec.w_bits}A{spec.a_bits})")


def transform_spec_check(algorithm: str, what: str):
    """A check_spec for a candidate that transforms activations (`what` says how): it refuses weight-only
    schemes, then what the activation-quantized format cannot hold."""
    def check_spec(spec: QuantSpec) -> None:
        if spec.a_bits == 16:
            raise CalmUsageError(f"{algorithm} {what}; scheme {spec.scheme} keeps activations in floating point: "
                                 f"use e.g. W{spec.w_bits}A4 or W{spec.w_bits}A8")
        check_activation_spec(spec, algorithm)
    return check_spec


# Activation clip ratios of the transform candidates (rotation, affine's learned-clip start, the kurtosis
# rule) when left at "auto", by activation bits. Measured on the default model (bench/QUALITY.md, "Activation
# clipping"): W3A3 rotation 10663 -> 1182 and affine 2693 -> 874 with 0.8; W4A4 rotation 37.5 -> 34.3 and
# affine 33.7 -> 32.2 with 0.9.
AUTO_CLIP = {3: 0.8, 4: 0.9}


def resolve_clip(value: float | str, a_bits: int) -> float:
    """A validated clip ratio option as a number: "auto" is AUTO_CLIP's value for `a_bits` (1.0, no clipping,
    where none was measured)."""
    return AUTO_CLIP.get(a_bits, 1.0) if value == "auto" else float(value)


def transform_for(in_features: int, rotate: bool, algorithm: str):
    """The online Hadamard of a linear's input (None when not rotating); refuses sizes with no Hadamard."""
    if not rotate:
        return None
    if not rotated.supported_hadamard_size(in_features):
        raise CalmUsageError(f"{algorithm}: no online Hadamard of size {in_features} (see "
                             f"calm_kernels.rotated.hadamard_transform); this layer cannot be rotated")
    return rotated.hadamard_transform(in_features)


def rotated_hessian(hessian: torch.Tensor, transform) -> torch.Tensor:
    """R^T H R: the Hessian of the transformed inputs x R, from the Hessian of x."""
    if transform is None:
        return hessian
    h = transform.apply(hessian.to(torch.float32))
    return transform.apply(h.T.contiguous()).to(hessian.dtype)


def signed_symmetric_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """calm.grid's symmetric per-channel codes (offset by the zero point 2^(b-1)) -> signed codes and the
    per-row scale vector that RotatedQuantLinear takes."""
    if scales.shape[1] != 1:
        raise ValueError("expected one scale per output row (per-channel quantization)")
    return (codes - zeros).to(torch.int8), scales[:, 0].to(torch.float32)


def activation_linear(linear: nn.Linear, spec: QuantSpec, transform, clip_ratio: float,
                      weight_codes: torch.Tensor | None = None, weight_scales: torch.Tensor | None = None,
                      weight_clip_ratio: float = 1.0) -> RotatedQuantLinear:
    """RotatedQuantLinear for `linear` at spec's W/A bits (RTN weights unless codes are given)."""
    return RotatedQuantLinear.from_float(linear, spec.w_bits, spec.a_bits,
                                         transform=transform if transform is not None else "none",
                                         clip_ratio=clip_ratio, weight_clip_ratio=weight_clip_ratio,
                                         weight_codes=weight_codes, weight_scales=weight_scales)


def head_dim_of(block: nn.Module) -> int:
    return arch.head_dim_of(block)


def with_kv_quantization(block: nn.Module, name: str, module: nn.Module, spec: QuantSpec) -> nn.Module:
    """`module` wrapped in a KVQuantLinear when `name` is k_proj/v_proj and the scheme quantizes K/V."""
    check_kv_layout(block, spec)
    field = kv_field(block, name)
    if field is None or getattr(spec, field) == 16:
        return module
    head_dim = head_dim_of(block)
    group = spec.kv_group_size or head_dim
    if head_dim % group:
        raise CalmUsageError(f"KV group size {group} does not divide head_dim {head_dim}; use a divisor of it "
                             f"or 0 (one group per head)")
    return KVQuantLinear(module, getattr(spec, field), head_dim, group)
