"""SmoothQuant (Xiao et al., arXiv 2211.10438): migrate activation outliers into the weights, then quantize
weights and activations (W4A8 and the like) with per-token dynamic activation quantization.

Per block: for the linears behind each RMSNorm (q/k/v after input_layernorm, gate/up after
post_attention_layernorm), s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) over the calibration tokens and over
the rows of all the group's weights (both clamped at 1e-5); X <- X / s is folded into the norm's weight and
W <- W diag(s). o_proj and down_proj are quantized unsmoothed (no norm precedes them), as in the paper's
LLaMA recipe. Every linear then becomes a calm.nn.RotatedQuantLinear with transform 'none': weights
round-to-nearest, per output channel, symmetric (what its integer GEMM takes, whatever --symmetric says),
activations quantized per token, symmetric, at the scheme's A bits, at run time.

Meant for 8-bit activations; the paper reports that it collapses at A4 (allowed here so that it can be
measured). Weight bits 2, 3 or 4 run on the integer GEMM; at W8 (W8A8) every linear becomes a
calm.nn.ActQuantLinear: per-channel symmetric 8-bit UniformQuantLinear weights behind the same per-token
activation quantizer.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from calm import distributed
from calm.algorithms import register, replace_module
from calm.algorithms.options import AlgorithmOptions, option
from calm.algorithms.scaling import capture, fold_scales, scale_groups
from calm.arch import Layout
from calm.config import CalmUsageError, QuantSpec
from calm.model import BlockInputs, block_linears
from calm.nn import ActQuantLinear, RotatedQuantLinear, UniformQuantLinear
from calm_kernels.rotated import ACTIVATION_BITS, WEIGHT_BITS


def smooth_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    return x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)


@torch.no_grad()
def smooth_block(block: nn.Module, inputs: BlockInputs, alpha: float) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant's scales into the block's norms and linears in place; returns them by group."""
    groups = scale_groups(block, norms_only=True)
    if not groups:
        raise CalmUsageError(f"smoothquant folds its scales into the norms in front of the linears, and "
                             f"{type(block).__name__} has none (it normalizes after attention and MLP); use "
                             f"rotation or affine for activation quantization")
    modules = dict(block.named_modules())
    got = capture(block, inputs, tuple(g.loss_module for g in groups))
    scales = {}
    for g in groups:
        x_max = torch.stack([x.reshape(-1, x.shape[-1]).abs().amax(dim=0) for x in got[g.loss_module].x]).amax(dim=0)
        x_max = distributed.current().max_data_(x_max)  # over every process's shard
        w_max = torch.cat([modules[n].weight.detach().abs() for n in g.linears]).amax(dim=0)
        scales[g.name] = smooth_scale(x_max.to(torch.float32), w_max.to(torch.float32), alpha)
    for g in groups:
        fold_scales(block, g, scales[g.name])
    return scales


def _check_spec(spec: QuantSpec) -> None:
    if spec.a_bits == 16:
        raise CalmUsageError(f"smoothquant quantizes activations; scheme {spec.scheme} keeps them in float: use "
                             f"W{spec.w_bits}A8 (per token, 8 bits) or a weight-only algorithm")
    if spec.a_bits not in ACTIVATION_BITS or (spec.w_bits not in WEIGHT_BITS and spec.w_bits != 8):
        raise CalmUsageError(f"smoothquant takes weight bits {WEIGHT_BITS + (8,)} and activation bits "
                             f"{ACTIVATION_BITS}; scheme {spec.scheme} is outside")
    if spec.group_size:
        raise CalmUsageError(f"smoothquant quantizes weights per output channel (the integer GEMM has no groups); "
                             f"drop G{spec.group_size} from the scheme, e.g. W{spec.w_bits}A{spec.a_bits}")
    if spec.k_bits != 16 or spec.v_bits != 16:
        raise CalmUsageError("smoothquant does not quantize the KV cache; drop K/V from the scheme")


@dataclasses.dataclass(frozen=True)
class SmoothQuantOptions(AlgorithmOptions):
    alpha: float = option(0.5, "migration strength: s = max|X|^alpha / max|W|^(1 - alpha)", low=0.0, high=1.0)
    clip_ratio: float = option(1.0, "activation clip ratio", low=0.0, high=1.0, low_open=True)


def _check_layout(layout: Layout) -> None:
    if not layout.norm_sites:
        raise CalmUsageError(f"smoothquant folds its scales into the norms in front of q/k/v and gate/up, and "
                             f"{layout.families[0]} has none (it normalizes after attention and MLP); use rotation "
                             f"or affine for activation quantization")


@register("smoothquant", SmoothQuantOptions, check_spec=_check_spec, check_layout=_check_layout)
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, options: SmoothQuantOptions,
                   context: dict) -> nn.Module:
    alpha, clip_ratio = options.alpha, options.clip_ratio
    smooth_block(block, inputs, alpha)
    for name, lin in block_linears(block).items():
        if spec.w_bits == 8:
            # 8-bit weights are outside the integer GEMM's formats: per-channel symmetric 8-bit weights in the
            # dequant-GEMM module, behind the same per-token activation quantizer.
            q = ActQuantLinear(UniformQuantLinear.from_float(lin, 8, lin.in_features, symmetric=True),
                               spec.a_bits, clip_ratio)
        else:
            q = RotatedQuantLinear.from_float(lin, spec.w_bits, spec.a_bits, transform="none", clip_ratio=clip_ratio)
        replace_module(block, name, q)
    return block

