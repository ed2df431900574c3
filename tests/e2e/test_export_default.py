"""The real default model (SmolLM2-135M) quantized and exported in one command (`--export compressed-tensors`);
transformers loads the export with calm.load's logits."""
import pytest
import torch

from calm.run import main

pytestmark = pytest.mark.slow


def test_default_model_exports_to_compressed_tensors(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    import calm

    out = tmp_path / "run"
    assert main(["--scheme", "W4A16G64", "--symmetric", "--pool", "rtn,gptq", "--calib-windows", "2",
                 "--calib-seqlen", "128", "--eval-seqlen", "128", "--eval-tokens", "512", "--no-baselines",
                 "--export", "compressed-tensors", "--output", str(out), "-q"]) == 0
    ours, tokenizer = calm.load(out / "model")
    theirs = AutoModelForCausalLM.from_pretrained(str(out / "export-compressed-tensors"), dtype=torch.float32)
    ids = torch.tensor([tokenizer("The history of the city begins in the Roman era, when")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_export_is_refused_before_the_search_when_the_pool_cannot_export(tmp_path, capsys):
    assert main(["--pool", "rtn,claq", "--export", "compressed-tensors", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "candidates claq" in err[0] and not (tmp_path / "x").exists()
