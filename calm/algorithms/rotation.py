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

import dataclasses
from typing import Callable

import torch
from torch import nn

from calm.algorithms import actquant, register, replace_module
from calm.algorithms.gptq_core import (
    ACT_ORDERS,
    gptq_linear,
    gptq_quantize_weight,
    quantize_sequentially,
)
from calm.algorithms.options import AlgorithmOptions, option
from calm.config import QuantSpec
from calm.model import BlockInputs, block_linears
from calm.nn import UniformQuantLinear

WEIGHT_METHODS = ("rtn", "gptq")

# name, linear -> the online transform of that linear's input (None: no transform)
TransformChoice = Callable[[str, nn.Module], object]


def _transformed_gptq_linear(name: str, linear: nn.Module, hessian: torch.Tensor, spec: QuantSpec,
                             transform, clip_ratio: float, act_order: str, damp: float,
                             block_size: int) -> nn.Module:
    """GPTQ on W P^-T with the Hessian of x P (per-channel symmetric) into a RotatedQuantLinear."""
    w = transform.fold_into_weight(linear.weight.detach()) if transform is not None else linear.weight.detach()
    codes, scales, zeros, _ = gptq_quantize_weight(w, actquant.rotated_hessian(hessian, transform), spec.w_bits,
                                                   linear.in_features, True, act_order, damp, block_size)
    signed, row_scales = actquant.signed_symmetric_codes(codes, scales, zeros)
    return actquant.activation_linear(linear, spec, transform, clip_ratio, signed, row_scales)


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
            if spec.a_bits == 16:
                q = UniformQuantLinear.from_float(linear, spec.w_bits, spec.group_for(linear.in_features),
                                                  spec.symmetric)
            else:
                q = actquant.activation_linear(linear, spec, choose(name, linear), clip_of(name),
                                               weight_clip_ratio=weight_clip_ratio)
            replace_module(block, name, actquant.with_kv_quantization(block, name, q, spec))
        return block

    def quantize_linear(name: str, linear: nn.Module, hessian: torch.Tensor) -> nn.Module:
        if spec.a_bits == 16:
            q = gptq_linear(linear, hessian, spec, act_order, damp, block_size)
        else:
            q = _transformed_gptq_linear(name, linear, hessian, spec, choose(name, linear), clip_of(name),
                                         act_order, damp, block_size)
        return actquant.with_kv_quantization(block, name, q, spec)

    return quantize_sequentially(block, inputs, true_sequential, quantize_linear)


@dataclasses.dataclass(frozen=True)
class RotationOptions(AlgorithmOptions):
    weights: str = option("gptq", "how the rotated weights are quantized", choices=WEIGHT_METHODS)
    clip_ratio: float | str = option("auto", "activation clip ratio in (0, 1], or auto (by activation bits: "
                                     "0.9 at A4, 0.8 at A3, none at A8)", choices=("auto",), low=0.0, high=1.0,
                                     low_open=True)
    weight_clip_ratio: float = option(1.0, "RTN weight clip ratio (weights=rtn)", low=0.0, high=1.0, low_open=True)
    act_order: str = option("none", "GPTQ column order (weights=gptq)", choices=ACT_ORDERS)
    damp: float = option(0.01, "GPTQ damping, as a fraction of mean(diag H)", low=0.0, low_open=True)
    true_sequential: bool = option(True, "quantize q/k/v, o, gate/up, down in turn, each calibrated on the "
                                   "quantized ones before")


@register("rotation", RotationOptions,
          check_spec=actquant.transform_spec_check("rotation", "quantizes activations through an online Hadamard"))
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, options: RotationOptions,
                   context: dict) -> nn.Module:
    return quantize_linears(block, inputs, spec, lambda name, linear: actquant.transform_for(
        linear.in_features, True, "rotation"), weights=options.weights,
        clip_ratio=actquant.resolve_clip(options.clip_ratio, spec.a_bits),
        weight_clip_ratio=options.weight_clip_ratio, act_order=options.act_order, damp=options.damp,
        true_sequential=options.true_sequential)
