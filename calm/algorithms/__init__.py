"""The registry of PTQ algorithms. Each one turns a float decoder block into a quantized copy.

An algorithm is registered by name with its typed options class (`calm.algorithms.options`):

    @register("gptq", GPTQOptions, check_spec=...)
    def quantize_block(block, inputs, spec, options, context) -> nn.Module: ...

It receives a private deep copy of the float block (it may modify it in place and return it), the block's
calibration inputs (`calm.model.BlockInputs`), the `QuantSpec`, its validated options and the model-wide
context its `prepare` hook computed (empty for most); its Linear layers come back as `calm.nn` modules holding
packed weights. A candidate of the search pool (`CandidateSpec`) names an algorithm, optionally its own weight
bits and group size (`gptq@2`: the scheme with 2-bit weights; `gptq@3g128`) and raw option values;
`parse_options` turns them into the typed options, so every bad value fails before the model loads.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from torch import nn

from calm.algorithms.options import AlgorithmOptions
from calm.arch import Layout
from calm.config import CalmUsageError, CandidateSpec, QuantSpec
from calm.model import BlockInputs

QuantizeBlock = Callable[[nn.Module, BlockInputs, QuantSpec, Any, dict], nn.Module]
SpecCheck = Callable[[QuantSpec], None]
LayoutCheck = Callable[[Layout], None]
# (float blocks of the whole model, spec, options) -> context handed to every quantize_block call
Prepare = Callable[[list[nn.Module], QuantSpec, Any], dict]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A registered algorithm.

    Args:
        name: the name `--pool` uses.
        quantize: quantize_block(block, inputs, spec, options, context) -> the quantized block.
        options: its options dataclass (a subclass of AlgorithmOptions).
        check_spec: refuses schemes the algorithm cannot produce, naming the fix (None: any scheme).
        prepare: model-wide statistics computed once before the search (None: no context).
        calibration_free: the result does not depend on the calibration inputs (e.g. RTN): its blocks from a
            search are already its uniform baseline.
        check_layout: refuses model families (calm.arch.Layout) the algorithm cannot quantize exactly, naming
            the fix (None: every family).
        grouped: its weights take the scheme's group size (False: e.g. CLAQ's per-column codebooks), so a
            candidate may name its own (`gptq@3g128`).
    """
    name: str
    quantize: QuantizeBlock
    options: type[AlgorithmOptions]
    check_spec: SpecCheck | None = None
    prepare: Prepare | None = None
    calibration_free: bool = False
    check_layout: LayoutCheck | None = None
    grouped: bool = True

    @property
    def summary(self) -> str:
        doc = (importlib.import_module(self.quantize.__module__).__doc__ or "").strip()
        return doc.split("\n\n", 1)[0].replace("\n", " ")


_REGISTRY: dict[str, Algorithm] = {}
_MODULES = ("rtn", "gptq", "awq", "smoothquant", "claq", "rotation", "affine", "kurtosis")


def register(name: str, options: type[AlgorithmOptions], *, check_spec: SpecCheck | None = None,
             prepare: Prepare | None = None, calibration_free: bool = False, check_layout: LayoutCheck | None = None,
             grouped: bool = True):
    """Register `quantize_block` under `name` with its options class (which learns the name for its errors)."""
    def wrap(fn: QuantizeBlock) -> QuantizeBlock:
        if name in _REGISTRY:
            raise ValueError(f"algorithm {name!r} registered twice")
        options.algorithm = name
        _REGISTRY[name] = Algorithm(name, fn, options, check_spec, prepare, calibration_free, check_layout,
                                    grouped)
        return fn
    return wrap


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(f"calm.algorithms.{mod}")


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Algorithm:
    _load_all()
    if name not in _REGISTRY:
        raise CalmUsageError(f"unknown algorithm {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def parse_options(candidate: CandidateSpec) -> AlgorithmOptions:
    """The candidate's typed options (its values over the algorithm's defaults); raises on any bad value."""
    return get(candidate.algorithm).options.parse(candidate.options)


def validate_candidate(candidate: CandidateSpec, spec: QuantSpec) -> AlgorithmOptions:
    """Fail before any work if the candidate's name, options or scheme (with its own bits) are wrong; returns its
    options."""
    options = parse_options(candidate)
    algorithm = get(candidate.algorithm)
    if candidate.group_size is not None and not algorithm.grouped:
        bits = candidate.spec_for(spec).w_bits
        raise CalmUsageError(f"candidate {candidate.name}: {candidate.algorithm} has no weight groups; drop the "
                             f"'g{candidate.group_size}' (e.g. {candidate.algorithm}@{bits})")
    if algorithm.check_spec is not None:
        algorithm.check_spec(candidate.spec_for(spec))
    return options


def validate_family(candidate: CandidateSpec, layout: Layout, spec: QuantSpec) -> None:
    """Fail before any work if the candidate cannot quantize this model family exactly (e.g. no norm to fold
    SmoothQuant's scales into, KV-cache quantization of a fused q/k/v projection)."""
    if (spec.k_bits != 16 or spec.v_bits != 16) and (layout.k_proj is None or layout.v_proj is None):
        raise CalmUsageError(f"{candidate.name}: {layout.families[0]} computes K and V inside one fused projection "
                             f"and calm's KV-cache quantization needs separate k/v projections; drop K/V from the "
                             f"scheme")
    algorithm = get(candidate.algorithm)
    if algorithm.check_layout is not None:
        algorithm.check_layout(layout)


def options_of(candidate: CandidateSpec) -> dict[str, Any]:
    """Every option of the candidate with the algorithm's defaults filled in, as JSON values (saved beside
    each block, so that a resumed search refuses blocks made with other settings)."""
    return parse_options(candidate).to_dict()


def prepare(candidate: CandidateSpec, float_blocks: list[nn.Module], spec: QuantSpec) -> dict[str, Any]:
    """Model-wide context an algorithm needs before it sees blocks one at a time (the kurtosis rule's
    statistics over every linear of the model)."""
    algorithm = get(candidate.algorithm)
    return ({} if algorithm.prepare is None
            else algorithm.prepare(float_blocks, candidate.spec_for(spec), parse_options(candidate)))


def quantize_block(candidate: CandidateSpec, block: nn.Module, inputs: BlockInputs, spec: QuantSpec,
                   context: dict[str, Any] | None = None) -> nn.Module:
    """The candidate's quantized block, at its own weight bits (`CandidateSpec.bits`) when it names some."""
    algorithm = get(candidate.algorithm)
    return algorithm.quantize(block, inputs, candidate.spec_for(spec), parse_options(candidate), context or {})


def uses_calibration(candidate: CandidateSpec) -> bool:
    return not get(candidate.algorithm).calibration_free


def weight_only_spec(name: str) -> SpecCheck:
    """A check_spec refusing schemes that quantize activations or the KV cache."""
    def check_spec(spec: QuantSpec) -> None:
        if spec.a_bits != 16 or spec.k_bits != 16 or spec.v_bits != 16:
            raise CalmUsageError(f"{name} is weight-only; scheme {spec.scheme} also quantizes activations/KV: use "
                                 f"an A16 scheme such as W{spec.w_bits}A16")
    return check_spec


def describe() -> str:
    """Every algorithm with its one-line summary and its options: the text of `--list-algorithms`."""
    parts = []
    for name in available():
        algorithm = _REGISTRY[name]
        parts.append(f"{name}: {algorithm.summary}\n{algorithm.options.help_text() or '    (no options)'}")
    example = "--pool \"rtn;gptq:act_order=none,damp=0.02\""
    return "\n\n".join(parts) + (f"\n\nPass options as name:key=value,key=value, e.g. {example}; weight bits other "
                                 f"than the scheme's as name@bits, e.g. --pool \"gptq@2;gptq@4;awq@3\"")


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
