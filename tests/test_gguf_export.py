"""python -m calm.export --format gguf: exact layers reload through transformers' `gguf_file=` with calm's weights
bit for bit, inexact ones are refused or re-quantized on --requantize with the added error reported, and what
GGUF cannot hold is refused with one line."""
from __future__ import annotations

import json

import pytest
import torch

from calm.config import CalmUsageError, QuantSpec, parse_pool
from calm.export import check_run_exportable, main, parse_export_formats
from calm.gguf_export import GGUF_FILE, REPORT_FILE, export_gguf
from calm.io import load_quantized, save_quantized
from calm.nn import CodebookQuantLinear, KVQuantLinear, UniformQuantLinear

pytest.importorskip("gguf")


def quantize_linears(model, choose):
    """Replace every decoder linear by `choose(block, name, linear)` (a calm.nn module)."""
    for i, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, choose(i, name, child))
    return model


def reload(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE, dtype=torch.float32).eval()


def assert_same_weights(ours, theirs, exact=True):
    params = dict(theirs.named_parameters())
    checked = 0
    for name, module in ours.named_modules():
        if isinstance(module, (UniformQuantLinear, CodebookQuantLinear)):
            mine = module.dequantized_weight(torch.float32)
            if exact:
                assert torch.equal(params[f"{name}.weight"], mine), name
            checked += 1
    return checked


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


def test_symmetric_4_and_8_bit_hybrid_reloads_with_calms_weights_and_logits(tmp_path):
    """Two algorithms (RTN, GPTQ) at 4 bits plus 8-bit layers: Q4_0 and Q8_0, q/k rows permuted as llama.cpp does."""
    from conftest import tiny_llama
    from test_export import hybrid

    model, chosen = hybrid(tiny_llama(), "W4A16G32", symmetric=True)
    layer = model.model.layers[1].mlp
    layer.down_proj = UniformQuantLinear.from_float(torch.nn.Linear(128, 64, bias=False), 8, 64, symmetric=True)
    save_quantized(model, None, tmp_path / "calm", extra={"chosen": chosen})
    report = export_gguf(tmp_path / "calm", tmp_path / "gguf")
    assert report["types"] == {"Q4_0": 13, "Q8_0": 1} and not report["requantized"]
    ours, _ = load_quantized(tmp_path / "calm")
    theirs = reload(tmp_path / "gguf")
    assert assert_same_weights(ours, theirs) == 14
    assert torch.equal(logits(theirs, IDS), logits(ours, IDS))
    assert json.loads((tmp_path / "gguf" / REPORT_FILE).read_text())["types"] == report["types"]


def test_qwen2_with_biases_reloads_exactly(tmp_path):
    from test_arch import tiny

    model = quantize_linears(tiny("qwen2"), lambda i, n, c: UniformQuantLinear.from_float(c, 4, 32, symmetric=True))
    save_quantized(model, None, tmp_path / "calm")
    export_gguf(tmp_path / "calm", tmp_path / "gguf")
    ours, _ = load_quantized(tmp_path / "calm")
    theirs = reload(tmp_path / "gguf")
    assert assert_same_weights(ours, theirs) == 7 * 3
    assert torch.equal(theirs.model.layers[0].self_attn.q_proj.bias, ours.model.layers[0].self_attn.q_proj.bias)
    ours.set_attn_implementation("eager")
    theirs.set_attn_implementation("eager")
    torch.testing.assert_close(logits(theirs, IDS), logits(ours, IDS), rtol=0, atol=1e-6)


def test_inexact_layers_are_refused_then_requantized_with_the_added_error_reported(tmp_path, capsys):
    """Asymmetric 4-bit (its float16 minimum is rounded) and 3-bit layers have no exact GGUF type."""
    from conftest import tiny_llama

    def choose(i, name, linear):
        return UniformQuantLinear.from_float(linear, 4 if i == 0 else 3, 32, symmetric=False)

    save_quantized(quantize_linears(tiny_llama(), choose), None, tmp_path / "calm")
    assert main([str(tmp_path / "calm"), str(tmp_path / "gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "asymmetric 4-bit" in err[0] and "asymmetric 3-bit" in err[0]
    assert "--requantize" in err[0] and not (tmp_path / "gguf").exists()

    report = export_gguf(tmp_path / "calm", tmp_path / "gguf", requantize="Q4_1")
    assert report["types"] == {"Q4_1": 14} and len(report["requantized"]) == 14
    ours, _ = load_quantized(tmp_path / "calm")
    theirs = reload(tmp_path / "gguf")
    params = {k: v.detach() for k, v in theirs.named_parameters()}
    for name, entry in report["requantized"].items():
        mine = ours.get_submodule(name).dequantized_weight(torch.float32)
        diff = params[f"{name}.weight"] - mine
        assert entry["relative_error"] == pytest.approx(float(diff.norm() / mine.norm()), rel=1e-5)
        assert entry["max_abs_error"] == pytest.approx(float(diff.abs().max()), rel=1e-5)
        # 4-bit layers keep their codes (only the minimum is rounded); 3-bit ones are re-quantized from floats.
        assert entry["relative_error"] < (1e-3 if ".layers.0." in name else 0.2)


def test_codebooks_export_only_requantized(tmp_path):
    from conftest import tiny_llama

    model = quantize_linears(tiny_llama(), lambda i, n, c: CodebookQuantLinear.from_float(c, 3, iters=2))
    save_quantized(model, None, tmp_path / "calm")
    with pytest.raises(CalmUsageError, match=r"CLAQ codebooks \(per-column lookup tables\): 14 layers"):
        export_gguf(tmp_path / "calm", tmp_path / "gguf")
    report = export_gguf(tmp_path / "calm", tmp_path / "gguf", requantize="Q8_0")
    assert report["types"] == {"Q8_0": 14}
    assert max(e["relative_error"] for e in report["requantized"].values()) < 0.01


def test_what_gguf_cannot_hold_is_refused_with_one_line(tmp_path):
    from conftest import tiny_llama
    from test_arch import tiny

    def kv(i, name, linear):
        inner = UniformQuantLinear.from_float(linear, 4, 32, symmetric=True)
        return KVQuantLinear(inner, 4, 16) if name in ("k_proj", "v_proj") and i == 1 else inner

    save_quantized(quantize_linears(tiny_llama(), kv), None, tmp_path / "kv", extra={"chosen": ["rtn", "gptq"]})
    with pytest.raises(CalmUsageError, match=r"KV-cache quantization in blocks \[1\] \(candidates gptq\)"):
        export_gguf(tmp_path / "kv", tmp_path / "out")
    gemma = quantize_linears(tiny("gemma2"), lambda i, n, c: UniformQuantLinear.from_float(c, 4, 32, True))
    save_quantized(gemma, None, tmp_path / "gemma")
    with pytest.raises(CalmUsageError, match="'gemma2'"):
        export_gguf(tmp_path / "gemma", tmp_path / "out")
    with pytest.raises(CalmUsageError, match="--requantize 'Q3_K'"):
        export_gguf(tmp_path / "kv", tmp_path / "out", requantize="Q3_K")
    assert not (tmp_path / "out").exists()


def test_run_export_is_checked_before_the_search():
    assert parse_export_formats("compressed-tensors, gguf") == ["compressed-tensors", "gguf"]
    with pytest.raises(CalmUsageError, match="choose one or more"):
        parse_export_formats("onnx")
    check_run_exportable("gguf", QuantSpec.from_scheme("W4A16G32", symmetric=True), parse_pool("rtn,gptq,awq"))
    with pytest.raises(CalmUsageError, match="asymmetric") as info:
        check_run_exportable("gguf", QuantSpec.from_scheme("W3A16G64"), parse_pool("rtn,claq"))
    assert "[3] bits" in str(info.value) and "candidates claq" in str(info.value)
    assert "\n" not in str(info.value)


def test_run_exports_gguf_and_its_model_folder_loads_in_transformers(tmp_path, tiny_model_dir):
    """`calm.run --export gguf` on the tiny model (a streamed save): the GGUF reloads with calm's weights, and the
    model folder's config.json names every module, so transformers loads it through calm's quantizer."""
    from transformers import AutoModelForCausalLM

    from calm.run import main as run_main
    from test_cli import WORDS

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(60)) for i in range(40)))
    out = tmp_path / "run"
    assert run_main(["--model", str(tiny_model_dir), "--text", str(text), "--output", str(out), "--scheme",
                     "W4A16G32", "--symmetric", "--pool", "rtn,gptq", "--calib-windows", "4", "--calib-seqlen", "32",
                     "--eval-seqlen", "32", "--eval-tokens", "256", "--no-baselines", "--export", "gguf", "-q"]) == 0
    manifest = json.loads((out / "model" / "quantization_config.json").read_text())
    assert json.loads((out / "model" / "config.json").read_text())["quantization_config"]["modules"] == \
        manifest["modules"] and len(manifest["modules"]) == 14
    ours, _ = load_quantized(out / "model")
    assert assert_same_weights(ours, reload(out / "export-gguf")) == 14
    theirs = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32)
    assert torch.equal(logits(theirs, IDS % 96), logits(ours, IDS % 96))
