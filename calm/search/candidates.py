"""The search's only door to the algorithm registry (calm.algorithms): check, prepare and run a candidate, and
its options as recorded beside each saved block."""
from __future__ import annotations

import json
from typing import Any

from torch import nn

from calm import algorithms
from calm.arch import Layout
from calm.config import CandidateSpec, QuantSpec, SearchConfig
from calm.model import BlockInputs


def validate(candidate: CandidateSpec, spec: QuantSpec) -> None:
    algorithms.validate_candidate(candidate, spec)


def validate_family(candidate: CandidateSpec, layout: Layout, spec: QuantSpec) -> None:
    algorithms.validate_family(candidate, layout, spec)


def prepare(candidate: CandidateSpec, float_blocks: list[nn.Module], spec: QuantSpec) -> dict[str, Any]:
    return algorithms.prepare(candidate, float_blocks, spec)


def quantize(candidate: CandidateSpec, block: nn.Module, inputs: BlockInputs, spec: QuantSpec,
             context: dict[str, Any]) -> nn.Module:
    """The candidate's quantized version of `block` (a private copy the algorithm may modify)."""
    return algorithms.quantize_block(candidate, block, inputs, spec, context)


def candidate_options(config: SearchConfig) -> dict[str, dict]:
    """Every candidate's options with the algorithm's defaults filled in, as saved beside each block."""
    return {c.name: json.loads(json.dumps(algorithms.options_of(c))) for c in config.pool}
