"""Round-to-nearest: each weight group on its own min/max grid. Data-free; the baseline every method must beat.

Weight-only schemes (A16) give UniformQuantLinear modules. Schemes that quantize activations (W4A4, W3A3,
...) give RotatedQuantLinear with transform 'none' (per-channel symmetric RTN weights, per-token activation
quantization at `clip_ratio`): the "no rotation" baseline. K/V bits wrap k_proj/v_proj (calm.algorithms.actquant).
"""
from __future__ import annotations

from torch import nn

from calm.algorithms import actquant, calibration_free, register, replace_module
from calm.config import QuantSpec
from calm.model import BlockInputs, block_linears
from calm.nn import UniformQuantLinear


@register("rtn")
@calibration_free
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, *, clip_ratio: float = 1.0
                   ) -> nn.Module:
    clip_ratio = actquant.check_clip(clip_ratio, "rtn clip_ratio")
    for name, linear in block_linears(block).items():
        if spec.a_bits == 16:
            group = spec.group_for(linear.in_features)
            q = UniformQuantLinear.from_float(linear, spec.w_bits, group, spec.symmetric)
        else:
            q = actquant.activation_linear(linear, spec, None, clip_ratio)
        replace_module(block, name, actquant.with_kv_quantization(block, name, q, spec))
    return block


quantize_block.check_spec = lambda spec: actquant.check_activation_spec(spec, "rtn")
