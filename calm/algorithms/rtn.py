"""Round-to-nearest: each weight group on its own min/max grid. Data-free; the baseline every method must beat."""
from __future__ import annotations

from torch import nn

from calm.algorithms import calibration_free, register, replace_module, weight_only
from calm.config import QuantSpec
from calm.model import BlockInputs, block_linears
from calm.nn import UniformQuantLinear


@register("rtn")
@weight_only
@calibration_free
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec) -> nn.Module:
    for name, linear in block_linears(block).items():
        group = spec.group_for(linear.in_features)
        replace_module(block, name, UniformQuantLinear.from_float(linear, spec.w_bits, group, spec.symmetric))
    return block
