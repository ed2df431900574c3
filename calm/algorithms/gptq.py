"""GPTQ (Frantar et al., arXiv 2210.17323): column-by-column quantization with second-order error compensation.

Per linear: H = 2/n sum x x^T over calibration tokens; dead inputs get H_ii = 1 and a zero weight column;
damping adds `damp` x mean(diag H); the upper Cholesky factor of H^-1 drives the error spread. Columns are
processed in lazy blocks; with groups, the scale and zero of a group are fitted when its first column comes
up, on the already-updated weights. Inside a decoder block, linears are quantized true-sequentially
(q/k/v, then o, then gate/up, then down), each group calibrated on the outputs of the quantized ones before.
The engine (and the act_order variants) lives in calm.algorithms.gptq_core; this module registers the
algorithm. At schemes that quantize activations or the KV cache, GPTQ weights go into RotatedQuantLinear
without a transform (the "no rotation" baseline), through calm.algorithms.rotation's engine.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from calm.algorithms import actquant, register, rotation
from calm.algorithms.gptq_core import (
    ACT_ORDERS,
    HessianAccumulator,
    gptq_linear,
    gptq_quantize_weight,
    inverse_cholesky,
    quantize_sequentially,
    single_thread,
)
from calm.algorithms.options import AlgorithmOptions, option
from calm.config import QuantSpec
from calm.model import BlockInputs

__all__ = ["GPTQOptions", "HessianAccumulator", "gptq_linear", "gptq_quantize_weight", "inverse_cholesky",
           "single_thread"]


@dataclasses.dataclass(frozen=True)
class GPTQOptions(AlgorithmOptions):
    act_order: str = option("static", "column order: static (by diag H, groups keep their columns and a "
                            "grid fitted beforehand), none (left to right), full (groups follow the order; the "
                            "module reorders its input)", choices=ACT_ORDERS)
    damp: float = option(0.01, "damping, as a fraction of mean(diag H)", low=0.0, low_open=True)
    block_size: int = option(128, "columns per lazy batch", low=1)
    true_sequential: bool = option(True, "q/k/v, then o, then gate/up, then down, each calibrated on the "
                                   "quantized ones before")
    clip_ratio: float = option(1.0, "activation clip ratio at schemes that quantize activations", low=0.0,
                               high=1.0, low_open=True)


def _check_spec(spec: QuantSpec) -> None:
    actquant.check_activation_spec(spec, "gptq")


@register("gptq", GPTQOptions, check_spec=_check_spec)
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, options: GPTQOptions,
                   context: dict) -> nn.Module:
    if spec.a_bits != 16 or spec.k_bits != 16 or spec.v_bits != 16:
        return rotation.quantize_linears(block, inputs, spec, lambda name, linear: None, weights="gptq",
                                         clip_ratio=options.clip_ratio, act_order=options.act_order,
                                         damp=options.damp, block_size=options.block_size,
                                         true_sequential=options.true_sequential)
    return quantize_sequentially(block, inputs, options.true_sequential, lambda name, linear, h: gptq_linear(
        linear, h, spec, options.act_order, options.damp, options.block_size))
