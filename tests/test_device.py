"""Device correctness without a GPU: with torch's default device set to `meta` while the block and its inputs live
on the CPU, any tensor an algorithm creates without its inputs' device lands on `meta` and the run fails."""
from __future__ import annotations

import copy

import pytest
import torch

from calm import algorithms
from calm.config import CandidateSpec, QuantSpec
from calm.model import capture_block_inputs, decoder_blocks
from conftest import tiny_llama

CASES = [("W3A16G32", text) for text in ("rtn", "gptq", "gptq:act_order=none", "gptq:act_order=full", "awq",
                                        "claq:bits_target=3.12,outliers=true")]
CASES += [("W4A4", text) for text in ("rtn", "gptq", "rotation", "rotation:weights=rtn", "affine:steps=1",
                                      "kurtosis:steps=1")]
CASES += [("W4A4K4V4", "affine:steps=1"), ("W4A8", "smoothquant"), ("W8A8", "smoothquant")]


@pytest.mark.parametrize("scheme, text", CASES)
def test_every_candidate_creates_its_tensors_on_its_inputs_device(scheme, text):
    model = tiny_llama()
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, windows, 2)
    spec = QuantSpec.from_scheme(scheme)
    candidate = CandidateSpec.parse(text)
    context = algorithms.prepare(candidate, list(decoder_blocks(model)), spec)
    block = copy.deepcopy(decoder_blocks(model)[0])
    torch.set_default_device("meta")
    try:
        quantized = algorithms.quantize_block(candidate, block, inputs, spec, context)
        out = quantized(inputs.hidden[0], **inputs.kwargs[0])
    finally:
        torch.set_default_device(None)
    out = out[0] if isinstance(out, tuple) else out
    assert out.device.type == "cpu" and torch.isfinite(out).all()
