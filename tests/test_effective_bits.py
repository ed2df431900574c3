"""effective_bits counts every byte a quantized module saves (bias aside), checked against the saved file."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from calm.algorithms import quantize_block
from calm.config import CandidateSpec, QuantSpec
from calm.grid import quantize_groups
from calm.io import (
    QUANT_CONFIG,
    WEIGHTS,
    load_block_state,
    load_quantized,
    save_block_state,
    save_quantized,
)
from calm.model import block_linears, capture_block_inputs, decoder_blocks
from calm.nn import (
    ActQuantLinear,
    CodebookQuantLinear,
    KVQuantLinear,
    RotatedQuantLinear,
    UniformQuantLinear,
    is_quantized_linear,
    model_effective_bits,
)
from calm_kernels import packing
from calm_kernels.rotated import kronecker_transform
from conftest import tiny_llama


def _set(block: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, module)


def _every_kind(model) -> dict[str, str]:
    """Put every quantized module kind into the tiny LLaMA's two blocks (some linears stay float)."""
    torch.manual_seed(0)
    b0, b1 = decoder_blocks(model)
    lin = block_linears(b0)
    kinds = {}

    def put(block, i, name, module, kind):
        _set(block, name, module)
        kinds[f"model.layers.{i}.{name}"] = kind

    put(b0, 0, "self_attn.q_proj", UniformQuantLinear.from_float(lin["self_attn.q_proj"], 3, 32), "uniform asym")
    k = lin["self_attn.k_proj"]
    put(b0, 0, "self_attn.k_proj", KVQuantLinear(UniformQuantLinear.from_float(k, 4, 16, symmetric=True), 2, 16),
        "kv(uniform sym)")
    v = lin["self_attn.v_proj"]
    codes, scales, zeros = quantize_groups(v.weight.detach(), 3, 32, False)
    put(b0, 0, "self_attn.v_proj", UniformQuantLinear.from_codes(codes, scales, zeros, 3, 32, False,
                                                                 input_perm=torch.randperm(64)), "uniform perm")
    put(b0, 0, "self_attn.o_proj", CodebookQuantLinear.from_float(lin["self_attn.o_proj"], 3, iters=3),
        "codebook")
    g = lin["mlp.gate_proj"]
    n, kk = g.weight.shape
    codes = torch.randint(0, 8, (n, kk))
    centroids = torch.sort(torch.randn(kk, 16), dim=1).values
    column_bits = torch.where(torch.arange(kk) % 4 == 0, 4, 3)
    rows, cols = torch.randint(0, n, (30,)), torch.randint(0, kk, (30,))
    keep = torch.unique(rows * kk + cols)
    outliers = (keep // kk, keep % kk, torch.randn(keep.numel()))
    put(b0, 0, "mlp.gate_proj", CodebookQuantLinear.from_parts(codes, centroids, column_bits, outliers),
        "codebook outliers")
    put(b0, 0, "mlp.up_proj", RotatedQuantLinear.from_float(lin["mlp.up_proj"], 3, 4, "hadamard"), "rotated had")
    learned = kronecker_transform(torch.randn(8, 16) @ torch.randn(16, 8) + 4 * torch.eye(8),
                                  torch.randn(16, 16) + 4 * torch.eye(16))
    assert not learned.orthogonal
    put(b0, 0, "mlp.down_proj", RotatedQuantLinear.from_float(lin["mlp.down_proj"], 4, 4, learned),
        "rotated learned")
    lin = block_linears(b1)
    put(b1, 1, "self_attn.q_proj", RotatedQuantLinear.from_float(lin["self_attn.q_proj"], 4, 8, "none"),
        "rotated none")
    put(b1, 1, "self_attn.k_proj", ActQuantLinear(UniformQuantLinear.from_float(lin["self_attn.k_proj"], 8, 64,
                                                                                symmetric=True), 8), "act")
    biased = nn.Linear(64, 32, bias=True)
    put(b1, 1, "self_attn.v_proj", UniformQuantLinear.from_float(biased, 2, 64, symmetric=True), "uniform bias")
    return kinds


def _file_bits(path) -> dict[str, int]:
    """Stored bits of every tensor in a safetensors file, by name, read from the file itself."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has keys(), no iteration)
            t = f.get_tensor(key)
            out[key] = t.numel() * t.element_size() * 8
    return out


def test_effective_bits_equal_the_saved_file(tmp_path):
    model = tiny_llama()
    kinds = _every_kind(model)
    save_quantized(model, None, tmp_path / "m")
    stored = _file_bits(tmp_path / "m" / WEIGHTS)
    modules = dict(model.named_modules())
    total_bits = total_weights = 0
    for i, block in enumerate(decoder_blocks(model)):
        for name, m in block_linears(block).items():
            full = f"model.layers.{i}.{name}"
            weights = m.in_features * m.out_features
            if not is_quantized_linear(m):
                total_bits += 16 * weights  # float linears count at 16 bits, whatever they are saved in
                total_weights += weights
                continue
            mine = {k: b for k, b in stored.items() if k.startswith(full + ".") and not k.endswith(".bias")}
            assert mine, full
            bits = sum(mine.values())
            assert m.stored_bits() == bits, (full, kinds[full])
            assert m.effective_bits == pytest.approx(bits / weights, rel=1e-12), (full, kinds[full])
            total_bits += bits
            total_weights += weights
    assert set(kinds) <= {n for n, m in modules.items() if is_quantized_linear(m)}
    assert model_effective_bits(decoder_blocks(model)) == pytest.approx(total_bits / total_weights, rel=1e-12)
    # What is not information is not in the file; what is, is.
    assert "model.layers.0.self_attn.k_proj.linear.zeros" not in stored  # symmetric
    assert "model.layers.0.self_attn.q_proj.zeros" in stored
    assert not any(k.startswith("model.layers.0.mlp.up_proj.transform") for k in stored)
    assert {"model.layers.0.mlp.down_proj.transform_factor0", "model.layers.0.mlp.down_proj.transform_factor1",
            "model.layers.0.mlp.down_proj.transform_norm"} <= set(stored)
    assert not any(k.startswith("model.layers.1.self_attn.q_proj.transform") for k in stored)
    with safe_open(str(tmp_path / "m" / WEIGHTS), framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.v_proj.input_perm").dtype == torch.int16
    # The reloaded model computes the same and accounts the same.
    reloaded, _ = load_quantized(tmp_path / "m")
    windows = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(windows).logits, reloaded(windows).logits)
    assert model_effective_bits(decoder_blocks(reloaded)) == model_effective_bits(decoder_blocks(model))


def test_exact_values_per_kind():
    torch.manual_seed(1)
    lin = nn.Linear(256, 48)
    assert UniformQuantLinear.from_float(lin, 3, 64).effective_bits == 3.375  # the default W3A16G64
    assert UniformQuantLinear.from_float(lin, 3, 64, symmetric=True).effective_bits == 3 + 16 / 64
    codes, scales, zeros = quantize_groups(lin.weight.detach(), 3, 64, False)
    perm = UniformQuantLinear.from_codes(codes, scales, zeros, 3, 64, False, input_perm=torch.randperm(256))
    assert perm.effective_bits == pytest.approx(3.375 + 16 / 48)
    for m in (perm, UniformQuantLinear.from_float(lin, 4, 32, symmetric=True)):
        assert m.effective_bits == pytest.approx(packing.uniform_effective_bits(
            m.bits, m.group_size, m.symmetric, m.in_features, m.out_features, m.input_perm is not None))
    cb = CodebookQuantLinear.from_float(lin, 3, iters=2)
    assert cb.effective_bits == pytest.approx(packing.codebook_effective_bits(cb.layout, 48))
    # K = 240 pads each code row to 256 columns; a learned transform stores its factors and norm.
    lin = nn.Linear(240, 33)
    had = RotatedQuantLinear.from_float(lin, 3, 4, "hadamard")
    assert had.hadamard and had.effective_bits == pytest.approx((3 * 256 + 32) / 240)
    none = RotatedQuantLinear.from_float(lin, 3, 4, "none")
    assert none.effective_bits == had.effective_bits
    learned = RotatedQuantLinear.from_float(lin, 3, 4, (torch.randn(12, 12), torch.randn(20, 20)))
    assert not learned.hadamard
    assert learned.effective_bits == pytest.approx((3 * 256 + 32) / 240 + ((144 + 400) * 32 + 32) / (240 * 33))
    assert KVQuantLinear(UniformQuantLinear.from_float(nn.Linear(64, 32), 4, 32), 4, 16).effective_bits == 4.75
    assert ActQuantLinear(UniformQuantLinear.from_float(nn.Linear(64, 32), 8, 64, True), 8).effective_bits == 8.25


def test_symmetric_uniform_neither_saves_nor_counts_zeros():
    lin = nn.Linear(64, 24, bias=True)
    q = UniformQuantLinear.from_float(lin, 4, 32, symmetric=True)
    assert "zeros" not in q.state_dict()
    assert torch.equal(q.zeros, torch.full((24, 2), 8, dtype=torch.uint8))  # still there for the kernels
    assert q.effective_bits == 4 + 16 / 32
    fresh = UniformQuantLinear.from_quant_config(q.quant_config())
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), q(x)) and torch.equal(fresh.zeros, q.zeros)
    codes, scales, zeros = quantize_groups(lin.weight.detach(), 4, 32, False)
    with pytest.raises(ValueError, match="symmetric=False"):
        UniformQuantLinear.from_codes(codes, scales, zeros, 4, 32, True)


def test_checkpoints_of_the_previous_format_load(tmp_path):
    """Saved before: symmetric zeros, int64 input_perm, Hadamard factors (no 'hadamard' flag), an unused norm."""
    model = tiny_llama()
    _every_kind(model)
    save_quantized(model, None, tmp_path / "m")
    state = load_file(str(tmp_path / "m" / WEIGHTS))
    manifest = json.loads((tmp_path / "m" / QUANT_CONFIG).read_text())
    for name, m in model.named_modules():
        if isinstance(m, UniformQuantLinear):
            if m.symmetric:
                state[f"{name}.zeros"] = m.zeros.clone()
            if m.input_perm is not None:
                state[f"{name}.input_perm"] = m.input_perm.to(torch.int64)
        if isinstance(m, RotatedQuantLinear):
            manifest["modules"][name].pop("hadamard")
            state[f"{name}.transform_norm"] = m.transform_norm.clone()
            for i in range(len(m.transform_orders)):
                state[f"{name}.transform_factor{i}"] = getattr(m, f"transform_factor{i}").clone()
    assert any(k.endswith("linear.zeros") for k in state)
    save_file(state, str(tmp_path / "m" / WEIGHTS), metadata={"format": manifest["format"]})
    (tmp_path / "m" / QUANT_CONFIG).write_text(json.dumps(manifest))
    reloaded, _ = load_quantized(tmp_path / "m")
    windows = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(windows).logits, reloaded(windows).logits)
    up = reloaded.get_submodule("model.layers.0.mlp.up_proj")
    assert not up.hadamard and "transform_factor0" in up.state_dict()  # stored then, so still counted
    assert reloaded.get_submodule("model.layers.0.self_attn.v_proj").input_perm.dtype == torch.int16
    # A symmetric module's saved zeros must be the constant it derives.
    bad = dict(state)
    key = next(k for k in bad if k.endswith("linear.zeros"))
    bad[key] = bad[key] + 1
    save_file(bad, str(tmp_path / "m" / WEIGHTS), metadata={"format": manifest["format"]})
    with pytest.raises(ValueError, match="differs"):
        load_quantized(tmp_path / "m")


def test_block_state_round_trip_keeps_the_accounting(tmp_path):
    model = tiny_llama()
    _every_kind(model)
    block = decoder_blocks(model)[0]
    save_block_state(tmp_path / "b.safetensors", block)
    back = load_block_state(tmp_path / "b.safetensors", decoder_blocks(tiny_llama())[0])
    stored = _file_bits(tmp_path / "b.safetensors")
    for name, m in block_linears(back).items():
        assert m.stored_bits() == sum(b for k, b in stored.items()
                                      if k.startswith(name + ".") and not k.endswith(".bias"))
    assert model_effective_bits([back]) == model_effective_bits([block])


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_default_scheme_stores_3_375_bits(algorithm):
    model = tiny_llama()
    windows = torch.randint(0, 256, (2, 16))
    inputs = capture_block_inputs(model, windows, batch_windows=2)
    q = quantize_block(CandidateSpec(algorithm), decoder_blocks(model)[0], inputs,
                       QuantSpec.from_scheme("W3A16G64"))
    assert all(is_quantized_linear(m) for m in block_linears(q).values())
    assert model_effective_bits([q]) == 3.375
