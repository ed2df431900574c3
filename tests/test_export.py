"""python -m calm.export --format compressed-tensors: transformers loads the export with the same logits as
calm.load, compressed-tensors' own decompressor gives calm's weights, and what the format cannot hold is refused
with one line."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from calm.config import QuantSpec, SearchConfig, parse_pool
from calm.export import export_compressed_tensors, main, module_tensors
from calm.io import QUANT_CONFIG, load_quantized, save_quantized
from calm.nn import UniformQuantLinear
from calm.search import calm_search, install_blocks

pytest.importorskip("compressed_tensors")


def hybrid(model, scheme: str, symmetric: bool, pool: str = "rtn;gptq", order=("rtn", "gptq")):
    """`model` with blocks of two algorithms alternating (whatever the scores chose), and its block names."""
    spec = QuantSpec.from_scheme(scheme, symmetric=symmetric)
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    outcome = calm_search(copy.deepcopy(model), ids, spec, SearchConfig(pool=parse_pool(pool)), log=lambda s: None)
    names = [order[i % len(order)] for i in range(len(model.model.layers))]
    install_blocks(model, [outcome.block(n, i) for i, n in enumerate(names)])
    return model, names


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("scheme", ["W4A16G16", "W3A16G16"])
def test_transformers_loads_a_symmetric_hybrid_with_calms_logits(tiny_model, tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    model, chosen = hybrid(tiny_model, scheme, symmetric=True)
    save_quantized(model, None, tmp_path / "calm", extra={"chosen": chosen})
    export_compressed_tensors(tmp_path / "calm", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    ours, _ = load_quantized(tmp_path / "calm")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)


def test_asymmetric_export_decompresses_to_calms_weights(tiny_model, tmp_path):
    """Asymmetric grids: compressed-tensors' own config model validates the config and its own decompressor
    gives back calm's dequantized weights exactly. (transformers 5.25 with compressed-tensors 0.20 cannot load
    asymmetric pack-quantized checkpoints at all: it allocates the zero points unpacked; vLLM reads them.)"""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    model, chosen = hybrid(tiny_model, "W4A16G16", symmetric=False)
    save_quantized(model, None, tmp_path / "calm", extra={"chosen": chosen})
    report = export_compressed_tensors(tmp_path / "calm", tmp_path / "ct")
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())
                                           ["quantization_config"])
    scheme = next(iter(qc.config_groups.values()))
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    ours, _ = load_quantized(tmp_path / "calm")
    checked = 0
    for name, module in ours.named_modules():
        if isinstance(module, UniformQuantLinear):
            local = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".weight")}
            weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            # In the scales' float16: (q - zp) * scale rounds once either way.
            assert torch.equal(weight, module.dequantized_weight(torch.float32).to(weight.dtype))
            checked += 1
    assert checked == 7 * len(ours.model.layers) and report["warnings"]  # K = 64, 96 is not a Marlin shape: warned


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_pack_bit_for_bit_as_compressed_tensors_unpacks_them(bits, symmetric):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from calm_kernels.packing import unpack_codes

    torch.manual_seed(bits)
    m = UniformQuantLinear.from_float(torch.nn.Linear(96, 40), bits, 32, symmetric)
    cfg = m.quant_config()
    tensors = module_tensors("m", cfg, {f"m.{k}": v for k, v in m.state_dict().items()})
    offset = 1 << (bits - 1)
    codes = unpack_from_int32(tensors["m.weight_packed"], bits, torch.Size([40, 96])).to(torch.int16) + offset
    assert torch.equal(codes, unpack_codes(m.qweight, bits, 96).to(torch.int16))
    if not symmetric:
        zp = unpack_from_int32(tensors["m.weight_zero_point"], bits, torch.Size([40, 3]), packed_dim=0)
        assert torch.equal(zp.to(torch.int16) + offset, m.zeros.to(torch.int16))
    assert torch.equal(tensors["m.weight_scale"], m.scales)


def test_refusals_name_the_blocks_candidates_and_the_fix(tiny_model, tmp_path, capsys):
    model, chosen = hybrid(tiny_model, "W3A16G16", symmetric=False, pool="rtn;claq:fit_columns=64,kmeans_iters=3",
                           order=("rtn", "claq[fit_columns=64,kmeans_iters=3]"))
    save_quantized(model, None, tmp_path / "calm", extra={"chosen": chosen})
    assert main([str(tmp_path / "calm"), str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "codebook linears in blocks [1]" in err[0] and "candidates claq" in err[0]
    assert "rtn, gptq and awq" in err[0] and not (tmp_path / "ct").exists()

    assert main([str(tmp_path), str(tmp_path / "ct")]) == 2
    assert f"holds no {QUANT_CONFIG}" in capsys.readouterr().err


@pytest.mark.parametrize("scheme, pool", [("W8A8", "smoothquant;smoothquant:alpha=0.8"), ("W4A8", "rtn;smoothquant")])
def test_activation_quantized_hybrids_export_with_dynamic_per_token_activations(tiny_model, tmp_path, scheme, pool):
    """SmoothQuant (and RTN at A8): calm's integer weights exactly, `input_activations` dynamic per token;
    transformers runs compressed-tensors' activation quantizer, whose scale divides max|x| by (2^a - 1) / 2
    where calm's (and vLLM's) divides by 2^(a-1) - 1, so its logits agree with calm.load's to that rounding."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    names = [c.name for c in parse_pool(pool)]
    model, chosen = hybrid(tiny_model, scheme, symmetric=False, pool=pool, order=names)
    save_quantized(model, None, tmp_path / "calm", extra={"chosen": chosen})
    export_compressed_tensors(tmp_path / "calm", tmp_path / "ct")
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())
                                           ["quantization_config"])
    (group,) = qc.config_groups.values()
    assert group.format == ("int-quantized" if scheme == "W8A8" else "pack-quantized")
    assert group.weights.strategy == "channel" and group.weights.symmetric
    act = group.input_activations
    assert (act.num_bits, act.strategy, act.dynamic, act.symmetric) == (8, "token", True, True)
    ours, _ = load_quantized(tmp_path / "calm")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    compressor = {"int-quantized": IntQuantizationCompressor,
                  "pack-quantized": PackedQuantizationCompressor}[group.format]
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    checked = 0
    for name, module in ours.named_modules():
        if hasattr(module, "dequantized_weight") and not name.endswith(".linear"):
            local = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".weight")}
            weight = compressor.decompress(local, group)["weight"]  # in the scales' dtype: one rounding either way
            assert torch.equal(weight, module.dequantized_weight(torch.float32).to(weight.dtype))
            checked += 1
    assert checked == 7 * len(ours.model.layers)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    a, b = logits(ours, ids), logits(theirs, ids)
    assert float((a - b).norm() / a.norm()) < 2e-2 and torch.equal(a.argmax(-1), b.argmax(-1))


def test_activation_export_refusals(tiny_model, tmp_path, capsys):
    from calm.export import check_run_exportable

    spec = QuantSpec.from_scheme("W4A4")
    with pytest.raises(Exception, match="candidates rotation make blocks compressed-tensors cannot hold"):
        check_run_exportable("compressed-tensors", spec, parse_pool("rtn;rotation"))
    with pytest.raises(Exception, match="clipped activations"):
        check_run_exportable("compressed-tensors", QuantSpec.from_scheme("W8A8"),
                             parse_pool("smoothquant:clip_ratio=0.9"))
    with pytest.raises(Exception, match="W8A8 quantizes activations"):
        check_run_exportable("gguf", QuantSpec.from_scheme("W8A8"), parse_pool("smoothquant"))
    check_run_exportable("compressed-tensors", QuantSpec.from_scheme("W4A8"), parse_pool("rtn;gptq;smoothquant"))
    model, chosen = hybrid(tiny_model, "W4A4", symmetric=False, pool="rtn;rotation", order=("rtn", "rotation"))
    save_quantized(model, None, tmp_path / "calm", extra={"chosen": chosen})
    assert main([str(tmp_path / "calm"), str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rotated (online transform) linears in blocks [1] (candidates rotation)" in err[0]


def test_residual_rotation_is_folded_into_the_weights_and_exports_as_a_plain_model(tmp_path, tiny_model_dir):
    """QuaRot's model-wide rotation lives in the saved weights alone (no online transform), so a weight-only
    model made with --residual-rotation exports as plain pack-quantized and transformers gives calm's logits."""
    from transformers import AutoModelForCausalLM

    from calm.run import main as run_main

    text = tmp_path / "corpus.txt"
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a bright jumbo".split()
    text.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) for i in range(40)))
    out = tmp_path / "out"
    assert run_main(["--model", str(tiny_model_dir), "--text", str(text), "--output", str(out), "--scheme",
                     "W4A16G16", "--symmetric", "--pool", "rtn,gptq", "--residual-rotation", "hadamard",
                     "--calib-windows", "4", "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-tokens", "256",
                     "--export", "compressed-tensors", "-q"]) == 0
    ours, _ = load_quantized(out / "model")
    theirs = AutoModelForCausalLM.from_pretrained(str(out / "export-compressed-tensors"), dtype=torch.float32).eval()
    ids = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-4, atol=1e-4)
