"""Layer-local rotation (QuaRot/SpinQuant's online Hadamard, applied per linear): y = (x R)(W R)^T.

Every linear of the block gets a normalized Hadamard R of its input size (calm_kernels.rotated): R is folded
into the weight offline (W R, R orthogonal) and applied online to the activations, which are then quantized
per token (symmetric, `clip_ratio`; "auto" = actquant.AUTO_CLIP by activation bits). R spreads outlier
channels over all channels, so both x R and W R quantize with less error. Weights are per-output-channel
symmetric at w_bits:
- `weights=rtn`: round to nearest on W R (`weight_clip_ratio` shrinks each row's max first);
- `weights=gptq`: GPTQ (calm.algorithms.gptq.gptq_quantize_weight) on W R with the Hessian of the rotated
  inputs, R^T H R, true-sequentially inside the block as plain GPTQ does.
The result is a block of RotatedQuantLinear modules (the rotated W3A3 kernel's format). Only the linears'
inputs are rotated: the residual stream stays in its own basis (no model-wide QuaRot rotation), so this is a
per-block choice the CALM search can mix with unrotated candidates.

`quantize_linears` is the shared engine: plain GPTQ at A<16 or K/V<16 schemes (no rotation) and the
kurtosis rule (rotation per linear) run through it too.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from calm.algorithms import actquant, register, replace_module
from calm.algorithms.gptq import ACT_ORDERS, gptq_quantize_weight
from calm.config import CalmUsageError, QuantSpec
from calm.model import SEQUENTIAL_GROUPS, BlockInputs, block_linears, linear_inputs
from calm.nn import UniformQuantLinear

WEIGHT_METHODS = ("rtn", "gptq")

# name, linear -> the online transform of that linear's input (None: no transform)
TransformChoice = Callable[[str, nn.Module], object]


class _Hessian:
    """2/n sum x x^T of a linear's inputs (float64 sum)."""

    def __init__(self, k: int) -> None:
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.h += (x.T @ x).to(torch.float64)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration tokens reached this linear")
        return self.h * (2.0 / self.n)


def sequential_groups(block: nn.Module, true_sequential: bool) -> list[tuple[str, ...]]:
    names = list(block_linears(block))
    groups = [tuple(n for n in g if n in names) for g in SEQUENTIAL_GROUPS]
    groups = [g for g in groups if g]
    if not true_sequential or {n for g in groups for n in g} != set(names):
        return [tuple(names)]
    return groups


def check_options(algorithm: str, weights: str, clip_ratio: float | str, weight_clip_ratio: float, act_order: str,
                  damp: float, a_bits: int | None = None) -> tuple[float, float]:
    if weights not in WEIGHT_METHODS:
        raise CalmUsageError(f"{algorithm} weights must be one of {WEIGHT_METHODS}, got {weights!r}")
    if act_order not in ACT_ORDERS:
        raise CalmUsageError(f"{algorithm} act_order must be one of {ACT_ORDERS}, got {act_order!r}")
    if not isinstance(damp, (int, float)) or damp <= 0:
        raise CalmUsageError(f"{algorithm} damp must be a positive number, got {damp!r}")
    return (actquant.check_clip(clip_ratio, f"{algorithm} clip_ratio", a_bits),
            actquant.check_clip(weight_clip_ratio, f"{algorithm} weight_clip_ratio"))


def quantize_linears(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, choose: TransformChoice, *,
                     weights: str = "gptq", clip_ratio: float | Callable[[str], float] = 1.0,
                     weight_clip_ratio: float = 1.0,
                     act_order: str = "none", damp: float = 0.01, block_size: int = 128,
                     true_sequential: bool = True) -> nn.Module:
    """Quantize every linear of `block` in place: transform from `choose`, weights by RTN or GPTQ, activations
    at spec.a_bits (RotatedQuantLinear) or, at A16, grouped weight-only modules; K/V wrapped per spec.
    `clip_ratio`: the activation clip ratio, or a function of the linear's name giving it."""
    clip_of = clip_ratio if callable(clip_ratio) else (lambda name: clip_ratio)
    if weights == "rtn":
        for name, linear in block_linears(block).items():
            t = choose(name, linear) if spec.a_bits != 16 else None
            if spec.a_bits == 16:
                q = UniformQuantLinear.from_float(linear, spec.w_bits, spec.group_for(linear.in_features),
                                                  spec.symmetric)
            else:
                q = actquant.activation_linear(linear, spec, t, clip_of(name), weight_clip_ratio=weight_clip_ratio)
            replace_module(block, name, actquant.with_kv_quantization(block, name, q, spec))
        return block

    for group in sequential_groups(block, true_sequential):
        linears = block_linears(block)
        accs = {n: _Hessian(linears[n].in_features) for n in group}
        linear_inputs(block, inputs, group, lambda name, x: accs[name].add(x))
        for name in group:
            linear = linears[name]
            h = accs[name].value()
            if spec.a_bits == 16:
                g = spec.group_for(linear.in_features)
                codes, scales, zeros, perm = gptq_quantize_weight(linear.weight, h, spec.w_bits, g, spec.symmetric,
                                                                  act_order, damp, block_size)
                q = UniformQuantLinear.from_codes(codes, scales, zeros, spec.w_bits, g, spec.symmetric,
                                                  linear.bias, perm)
            else:
                t = choose(name, linear)
                w = t.fold_into_weight(linear.weight.detach()) if t is not None else linear.weight.detach()
                k = linear.in_features
                codes, scales, zeros, _ = gptq_quantize_weight(w, actquant.rotated_hessian(h, t), spec.w_bits, k,
                                                               True, act_order, damp, block_size)
                signed, row_scales = actquant.signed_symmetric_codes(codes, scales, zeros)
                q = actquant.activation_linear(linear, spec, t, clip_of(name), signed, row_scales)
            replace_module(block, name, actquant.with_kv_quantization(block, name, q, spec))
    return block


def _check_rotation_spec(spec: QuantSpec) -> None:
    if spec.a_bits == 16:
        raise CalmUsageError(f"rotation quantizes activations through an online Hadamard; scheme {spec.scheme} "
                             f"keeps them in floating point: use e.g. W{spec.w_bits}A4 or W{spec.w_bits}A8")
    actquant.check_activation_spec(spec, "rotation")


@register("rotation")
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, *, weights: str = "gptq",
                   clip_ratio: float | str = "auto", weight_clip_ratio: float = 1.0, act_order: str = "none",
                   damp: float = 0.01, true_sequential: bool = True) -> nn.Module:
    clip_ratio, weight_clip_ratio = check_options("rotation", weights, clip_ratio, weight_clip_ratio, act_order, damp,
                                                  spec.a_bits)
    return quantize_linears(block, inputs, spec, lambda name, linear: actquant.transform_for(
        linear.in_features, True, "rotation"), weights=weights, clip_ratio=clip_ratio,
        weight_clip_ratio=weight_clip_ratio, act_order=act_order, damp=damp, true_sequential=true_sequential)


quantize_block.check_spec = _check_rotation_spec
