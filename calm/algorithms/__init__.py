"""The registry of PTQ algorithms. Each one turns a float decoder block into a quantized copy.

An algorithm is a function `quantize_block(block, inputs, spec, **options) -> nn.Module` registered by name.
It receives a private deep copy of the float block (it may modify it in place and return it), the block's
calibration inputs (`calm.model.BlockInputs`) and the `QuantSpec`; its Linear layers come back as
`calm.nn` modules holding packed weights. Options are keyword arguments with defaults; unknown options are
an error.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from torch import nn

from calm.config import CalmUsageError, CandidateSpec, QuantSpec
from calm.model import BlockInputs

QuantizeBlock = Callable[..., nn.Module]

_REGISTRY: dict[str, QuantizeBlock] = {}
_MODULES = ("rtn", "gptq", "awq", "smoothquant", "claq", "rotation", "affine", "kurtosis")


def register(name: str):
    def wrap(fn: QuantizeBlock) -> QuantizeBlock:
        if name in _REGISTRY:
            raise ValueError(f"algorithm {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn
    return wrap


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(f"calm.algorithms.{mod}")


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> QuantizeBlock:
    _load_all()
    if name not in _REGISTRY:
        raise CalmUsageError(f"unknown algorithm {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def validate_candidate(candidate: CandidateSpec, spec: QuantSpec) -> None:
    """Fail before any work if the candidate's name or options are wrong."""
    fn = get(candidate.algorithm)
    params = inspect.signature(fn).parameters
    known = [p for p in params if params[p].kind == inspect.Parameter.KEYWORD_ONLY and not p.startswith("_")]
    unknown = [k for k in candidate.options if k not in known]
    if unknown:
        raise CalmUsageError(f"algorithm {candidate.algorithm!r} has no option {unknown}; its options: {known}")
    check = getattr(fn, "check_spec", None)
    if check is not None:
        check(spec)


def prepare(candidate: CandidateSpec, float_blocks: list[nn.Module], spec: QuantSpec) -> dict[str, Any]:
    """Model-wide context an algorithm needs before it sees blocks one at a time (the kurtosis rule's
    statistics over every linear of the model). An algorithm opts in with a `prepare(float_blocks, spec,
    **options)` attribute returning keyword arguments whose names start with '_' (not user options)."""
    fn = get(candidate.algorithm)
    hook = getattr(fn, "prepare", None)
    return {} if hook is None else hook(float_blocks, spec, **candidate.options)


def quantize_block(candidate: CandidateSpec, block: nn.Module, inputs: BlockInputs, spec: QuantSpec,
                   context: dict[str, Any] | None = None) -> nn.Module:
    return get(candidate.algorithm)(block, inputs, spec, **candidate.options, **(context or {}))


def weight_only(fn: QuantizeBlock) -> QuantizeBlock:
    """Mark an algorithm as weight-only: it refuses schemes that quantize activations or the KV cache."""
    def check_spec(spec: QuantSpec) -> None:
        if spec.a_bits != 16 or spec.k_bits != 16 or spec.v_bits != 16:
            raise CalmUsageError(f"{fn.__module__.rsplit('.', 1)[-1]} is weight-only; scheme {spec.scheme} also "
                                 f"quantizes activations/KV: use an A16 scheme such as W{spec.w_bits}A16")
    fn.check_spec = check_spec
    return fn


def calibration_free(fn: QuantizeBlock) -> QuantizeBlock:
    """Mark an algorithm whose result does not depend on the calibration inputs (e.g. RTN): its blocks from a
    search are already its uniform baseline."""
    fn.calibration_free = True
    return fn


def uses_calibration(candidate: CandidateSpec) -> bool:
    return not getattr(get(candidate.algorithm), "calibration_free", False)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def options_of(fn: QuantizeBlock) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: p.default for k, p in params.items()
            if p.kind == inspect.Parameter.KEYWORD_ONLY and not k.startswith("_")}
