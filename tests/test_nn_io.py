"""Packed modules and saved models: round trips are exact."""
import torch
from torch import nn

from calm.algorithms import quantize_block
from calm.config import CandidateSpec, QuantSpec
from calm.io import load_block_state, load_quantized, save_block_state, save_quantized
from calm.model import block_linears, capture_block_inputs, decoder_blocks
from calm.nn import UniformQuantLinear, is_quantized_linear


def test_uniform_linear_forward_equals_dequantized_matmul():
    lin = nn.Linear(96, 40, bias=True)
    q = UniformQuantLinear.from_float(lin, bits=3, group_size=32)
    x = torch.randn(5, 7, 96)
    expect = x @ q.dequantized_weight().T + lin.bias
    assert torch.allclose(q(x), expect, rtol=1e-5, atol=1e-6)
    assert "effective_bits=3.750" in repr(q)  # 3 + (16 + 8) / 32


def test_uniform_linear_state_dict_round_trip():
    lin = nn.Linear(64, 24)
    q = UniformQuantLinear.from_float(lin, bits=4, group_size=64, symmetric=True)
    fresh = UniformQuantLinear.from_quant_config(q.quant_config())
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), q(x))


def test_saved_model_reloads_with_identical_logits(tiny_model, tmp_path):
    model = tiny_model
    windows = torch.randint(0, 256, (2, 16))
    inputs = capture_block_inputs(model, windows, batch_windows=2)
    spec = QuantSpec.from_scheme("W3A16G32")
    for i, block in enumerate(decoder_blocks(model)):
        decoder_blocks(model)[i] = quantize_block(CandidateSpec("gptq" if i else "rtn"), block, inputs, spec)
    assert all(is_quantized_linear(m) for b in decoder_blocks(model) for m in block_linears(b).values())
    save_quantized(model, None, tmp_path / "m")
    reloaded, _ = load_quantized(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(windows).logits, reloaded(windows).logits)


def test_block_state_round_trip(tiny_model, tmp_path):
    block = decoder_blocks(tiny_model)[0]
    windows = torch.randint(0, 256, (2, 16))
    inputs = capture_block_inputs(tiny_model, windows, batch_windows=1)
    import copy
    q = quantize_block(CandidateSpec("gptq"), copy.deepcopy(block), inputs, QuantSpec.from_scheme("W2A16G32"))
    save_block_state(tmp_path / "b.safetensors", q)
    back = load_block_state(tmp_path / "b.safetensors", block)
    h, kw = inputs.hidden[0], inputs.kwargs[0]
    with torch.no_grad():
        out_a = q(h, **kw)
        out_b = back(h, **kw)
    out_a = out_a[0] if isinstance(out_a, tuple) else out_a
    out_b = out_b[0] if isinstance(out_b, tuple) else out_b
    assert torch.equal(out_a, out_b)
