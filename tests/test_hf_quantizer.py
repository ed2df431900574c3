"""transformers loads calm checkpoints of every module kind through calm's registered quantizer
(calm.hf_quantizer), with calm.load's logits; without calm, transformers only warns (documented behaviour)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from calm.io import load_quantized, save_quantized
from calm.nn import (
    ActQuantLinear,
    CodebookQuantLinear,
    KVQuantLinear,
    RotatedQuantLinear,
    UniformQuantLinear,
)


def every_kind_model():
    """A 2-block LLaMA with attention biases whose linears are every calm.nn kind: asymmetric uniform with an
    act-order permutation, a KV wrapper around a symmetric grid, codebooks with outliers, rotated Hadamard and
    learned (affine) Kronecker layers, and a W8A8 activation wrapper."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, attention_bias=True,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    a, m = model.model.layers[0].self_attn, model.model.layers[0].mlp
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1)).to(torch.int16)
    q = UniformQuantLinear.from_float(a.q_proj, 4, 32, symmetric=False)
    a.q_proj = UniformQuantLinear.from_codes(*_codes(q), 4, 32, False, a.q_proj.bias, input_perm=perm)
    a.k_proj = KVQuantLinear(UniformQuantLinear.from_float(a.k_proj, 3, 16, symmetric=True), 4, 16)
    a.v_proj = KVQuantLinear(RotatedQuantLinear.from_float(a.v_proj, 4, 8), 2, 16, 8)
    a.o_proj = ActQuantLinear(UniformQuantLinear.from_float(a.o_proj, 8, 64, symmetric=True), 8)
    m.gate_proj = _codebook_with_outliers(m.gate_proj)
    m.up_proj = CodebookQuantLinear.from_float(m.up_proj, 2, iters=2)
    a1, m1 = model.model.layers[1].self_attn, model.model.layers[1].mlp
    g = torch.Generator().manual_seed(2)
    factors = (torch.eye(8) + 0.1 * torch.randn(8, 8, generator=g), torch.eye(8) + 0.1 * torch.randn(8, 8, generator=g))
    a1.q_proj = RotatedQuantLinear.from_float(a1.q_proj, 4, 4, transform=factors)
    a1.o_proj = RotatedQuantLinear.from_float(a1.o_proj, 3, 3, transform="none")
    m1.down_proj = UniformQuantLinear.from_float(m1.down_proj, 2, 64, symmetric=False)
    return model


def _codes(m: UniformQuantLinear):
    from calm_kernels.packing import unpack_codes

    return unpack_codes(m.qweight, m.bits, m.in_features), m.scales, m.zeros


def _codebook_with_outliers(linear):
    w = linear.weight.detach()
    n, k = w.shape
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 4, (n, k), generator=g)
    centroids = torch.randn(k, 16, generator=g) * w.std()
    bits = torch.tensor([2] * (k - 8) + [4] * 8)
    rows, cols = torch.tensor([0, 5, 9]), torch.tensor([1, 7, 60])
    return CodebookQuantLinear.from_parts(codes, centroids, bits, (rows, cols, torch.tensor([0.5, -0.25, 1.0])))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("calm-every-kind")
    save_quantized(every_kind_model(), None, path)
    return path


IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


def test_config_json_names_the_calm_quantizer_and_its_modules(saved):
    qc = json.loads((saved / "config.json").read_text())["quantization_config"]
    manifest = json.loads((saved / "quantization_config.json").read_text())
    assert qc["quant_method"] == "calm" and qc["format"] == manifest["format"]
    assert qc["modules"] == manifest["modules"] and qc["tied"] == manifest["tied"]


def test_from_pretrained_gives_calm_load_logits_for_every_module_kind(saved):
    from transformers import AutoModelForCausalLM

    ours, _ = load_quantized(saved)
    theirs = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32, device_map="cpu")
    kinds = {type(m).__name__ for m in theirs.modules()}
    assert {"UniformQuantLinear", "CodebookQuantLinear", "RotatedQuantLinear", "KVQuantLinear",
            "ActQuantLinear"} <= kinds
    # The buffers calm does not save (symmetric zeros, Hadamard factors) are rebuilt, not left uninitialised.
    for name, buf in ours.named_buffers():
        assert torch.equal(theirs.get_buffer(name), buf), name
    assert torch.equal(logits(theirs, IDS), logits(ours, IDS))
    assert theirs.hf_quantizer.quantization_config.quant_method == "calm"


def test_from_pretrained_in_bfloat16_runs_close_to_float32(saved):
    from transformers import AutoModelForCausalLM

    ours, _ = load_quantized(saved)
    theirs = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.bfloat16)
    assert theirs.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    a, b = logits(ours, IDS), logits(theirs, IDS).float()
    assert torch.isfinite(b).all() and torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.99


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_calm_first_then_transformers_loads_the_folder(saved):
    """The import hook registers calm when transformers' quantizers load, whatever the import order."""
    for order in ("import calm\nfrom transformers import AutoModelForCausalLM",
                  "from transformers import AutoModelForCausalLM\nimport calm"):
        code = (f"{order}\nimport sys\nm = AutoModelForCausalLM.from_pretrained({str(saved)!r})\n"
                "print(type(m.model.layers[0].mlp.gate_proj).__name__)")
        out = _run(code)
        assert out.returncode == 0 and out.stdout.strip() == "CodebookQuantLinear", out.stderr[-2000:]


def test_without_calm_transformers_refuses_the_folder(saved):
    """transformers 5 only warns about an unknown quant_method; the empty guard tensor calm saves under one
    quantized linear's float weight name makes it stop on a size mismatch instead of returning random weights.
    If this starts failing, transformers changed its behaviour; update calm.io.load_guard and the README."""
    code = ("from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(saved)!r})\n"
            "print(type(m.model.layers[0].mlp.gate_proj).__name__)")
    out = _run(code)
    assert out.returncode != 0 and "Unknown quantization type, got calm" in out.stderr
    assert "ignore_mismatched_sizes" in out.stderr and "torch.Size([0])" in out.stderr
    assert "model.layers.0.self_attn.q_proj.weight" in out.stderr


@pytest.mark.parametrize("family", ["qwen3_moe", "gemma2"])
def test_from_pretrained_loads_other_families_with_calm_load_logits(family, tmp_path):
    """MoE experts (calm unfuses them; transformers 5 fuses them) and a family with post-norms and softcapping."""
    from transformers import AutoModelForCausalLM

    from calm.search import install_blocks
    from test_arch import logits as family_logits
    from test_arch import search, tiny, windows

    model = tiny(family)
    outcome = search(model, "rtn", "W4A16G16")
    install_blocks(model, [outcome.block("rtn", i) for i in range(len(model.model.layers))])
    save_quantized(model, None, tmp_path)
    ours, _ = load_quantized(tmp_path)
    ours.set_attn_implementation("eager")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, attn_implementation="eager")
    ids = windows(2, 20, seed=9)
    assert torch.equal(family_logits(theirs, ids), family_logits(ours, ids))
