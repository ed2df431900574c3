"""Which implementation a launcher runs: Triton on CUDA tensors or under TRITON_INTERPRET=1, the reference otherwise.

`CALM_FORCE_REFERENCE=1` forces the PyTorch reference everywhere (debugging, A/B checks).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run for these input tensors."""
    if os.environ.get("CALM_FORCE_REFERENCE", "0") == "1" or not triton_available():
        return False
    if interpreter_enabled():
        return True
    return all(t.is_cuda for t in tensors)
