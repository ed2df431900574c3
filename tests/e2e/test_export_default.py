"""The real default model (SmolLM2-135M) quantized and exported in one command (`--export
compressed-tensors,gguf`); transformers loads both exports (compressed-tensors, and GGUF through `gguf_file=`)
with calm.load's logits, and calm's own folder through calm's quantizer."""
import pytest
import torch

from calm.run import main

pytestmark = pytest.mark.slow


def test_default_model_exports_to_compressed_tensors_and_gguf(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import calm

    out = tmp_path / "run"
    assert main(["--scheme", "W4A16G64", "--symmetric", "--pool", "rtn,gptq", "--calib-windows", "2",
                 "--calib-seqlen", "128", "--eval-seqlen", "128", "--eval-tokens", "512", "--no-baselines",
                 "--export", "compressed-tensors,gguf", "--output", str(out), "-q"]) == 0
    ours, tokenizer = calm.load(out / "model")
    text = "The history of the city begins in the Roman era, when"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected = ours(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(str(out / "export-compressed-tensors"), dtype=torch.float32)
        torch.testing.assert_close(theirs.eval()(ids).logits, expected, rtol=1e-4, atol=1e-4)
        del theirs
        # GGUF: Q4_0 blocks holding calm's codes and scales, the tokenizer in the file.
        gguf_dir = out / "export-gguf"
        theirs = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file="model.gguf", dtype=torch.float32)
        gguf_tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file="model.gguf")
        assert gguf_tokenizer(text)["input_ids"] == ids[0].tolist()
        q = theirs.model.layers[3].self_attn.q_proj.weight
        assert torch.equal(q, ours.model.layers[3].self_attn.q_proj.dequantized_weight(torch.float32))
        torch.testing.assert_close(theirs.eval()(ids).logits, expected, rtol=1e-4, atol=1e-4)
        del theirs
        # calm's own folder, through calm's registered transformers quantizer.
        theirs = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32)
        assert torch.equal(theirs.eval()(ids).logits, expected)


def test_export_is_refused_before_the_search_when_the_pool_cannot_export(tmp_path, capsys):
    assert main(["--pool", "rtn,claq", "--export", "compressed-tensors", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "candidates claq" in err[0] and not (tmp_path / "x").exists()
