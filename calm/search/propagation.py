"""What the next block is fitted and scored on, once a block is decided."""
from __future__ import annotations

import torch
from torch import nn

from calm.model import BlockInputs, run_block
from calm.nn import release_caches


def propagate(propagation: str, inputs: BlockInputs, score_inputs: BlockInputs, *, chosen: nn.Module,
              chosen_outputs: list[torch.Tensor] | None, float_block: nn.Module,
              reference: list[torch.Tensor]) -> tuple[BlockInputs, BlockInputs]:
    """The next block's (fitting inputs, scoring inputs).

    greedy: the chosen quantized block's outputs (`chosen_outputs`, its outputs on the scoring inputs when the
    block was just scored, else recomputed); independent: the float block's (`reference`, its outputs on the
    scoring inputs). Without separate scoring windows `score_inputs` is `inputs`, and so is the result's."""
    separate = score_inputs is not inputs
    if propagation == "greedy":
        scored_out = chosen_outputs or run_block(chosen, score_inputs)
        fitted_out = run_block(chosen, inputs) if separate else scored_out
        release_caches(chosen)
    else:
        scored_out = reference
        fitted_out = run_block(float_block, inputs) if separate else reference
    inputs = inputs.with_hidden(fitted_out)
    return inputs, (score_inputs.with_hidden(scored_out) if separate else inputs)
