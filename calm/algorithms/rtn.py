"""Round-to-nearest: each weight group on its own min/max grid. Data-free; the baseline every method must beat.

Weight-only schemes (A16) give UniformQuantLinear modules. Schemes that quantize activations (W4A4, W3A3,
...) give RotatedQuantLinear with transform 'none' (per-channel symmetric RTN weights, per-token activation
quantization at `clip_ratio`): the "no rotation" baseline. K/V bits wrap k_proj/v_proj (calm.algorithms.actquant).
"""
from __future__ import annotations

import dataclasses

from torch import nn

from calm.algorithms import actquant, register, replace_module
from calm.algorithms.options import AlgorithmOptions, option
from calm.config import QuantSpec
from calm.model import BlockInputs, block_linears
from calm.nn import UniformQuantLinear


@dataclasses.dataclass(frozen=True)
class RTNOptions(AlgorithmOptions):
    clip_ratio: float = option(1.0, "activation clip ratio at schemes that quantize activations", low=0.0,
                               high=1.0, low_open=True)


def _check_spec(spec: QuantSpec) -> None:
    actquant.check_activation_spec(spec, "rtn")


@register("rtn", RTNOptions, check_spec=_check_spec, calibration_free=True)
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, options: RTNOptions,
                   context: dict) -> nn.Module:
    for name, linear in block_linears(block).items():
        if spec.a_bits == 16:
            group = spec.group_for(linear.in_features)
            q = UniformQuantLinear.from_float(linear, spec.w_bits, group, spec.symmetric)
        else:
            q = actquant.activation_linear(linear, spec, None, options.clip_ratio)
        replace_module(block, name, actquant.with_kv_quantization(block, name, q, spec))
    return block
