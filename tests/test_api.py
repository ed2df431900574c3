"""calm.quantize: the CALM search on a model held in memory, in one call."""
from __future__ import annotations

import pytest
import torch

import calm
from calm.config import CalmUsageError, QuantSpec, SearchConfig, parse_pool
from calm.nn import is_quantized_linear
from calm.search import calm_search
from conftest import tiny_llama

WORDS = "the cat sat on a mat while two dogs ran far away from the old red barn".split()


def _ids(n: int = 4, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(0))


def test_quantize_returns_the_hybrid_and_its_report():
    model = tiny_llama()
    reference = calm_search(tiny_llama(), _ids(), QuantSpec.from_scheme("W3A16G32"),
                            SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2))
    quantized, report = calm.quantize(model, scheme="W3A16G32", pool="rtn,gptq", calibration=_ids(),
                                      batch_windows=2)
    assert quantized is model
    linears = [m for n, m in model.model.layers.named_modules() if n.endswith("_proj")]
    assert linears and all(is_quantized_linear(m) for m in linears)
    assert report.chosen == [d.chosen for d in reference.decisions]
    assert all(set(d.scores) == {"rtn", "gptq"} for d in report.decisions)
    assert report.effective_bits == pytest.approx(3 + 16 / 32 + 8 / 32)
    assert report.to_dict()["blocks"][0]["chosen"] == report.chosen[0]
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()


def test_calibration_as_text_a_file_or_token_ids(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) for i in range(30)]
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(texts))
    chosen = []
    for calibration in (texts, path, str(path)):
        _, report = calm.quantize(tiny_llama(), tokenizer, scheme="W4A16G32", pool="rtn", calibration=calibration,
                                  calib_windows=2, calib_seqlen=64, batch_windows=2)
        chosen.append(report.chosen)
    assert chosen[0] == chosen[1] == chosen[2] == ["rtn", "rtn"]


def test_bad_calibration_and_options_are_refused_before_any_work():
    with pytest.raises(CalmUsageError, match="gptq option damp must be > 0"):
        calm.quantize(tiny_llama(), pool="gptq:damp=0", calibration=_ids())
    with pytest.raises(CalmUsageError, match="needs the model's tokenizer"):
        calm.quantize(tiny_llama(), calibration=["some text"])
    with pytest.raises(CalmUsageError, match="integer tensor"):
        calm.quantize(tiny_llama(), calibration=torch.zeros(2, 8))
    with pytest.raises(CalmUsageError, match="does not exist"):
        calm.quantize(tiny_llama(), object(), calibration="/no/such/file.txt")


def test_quantize_resumes_from_its_state_folder(tmp_path):
    first = calm.quantize(tiny_llama(), scheme="W3A16G32", calibration=_ids(), batch_windows=2,
                          state_dir=tmp_path)[1]
    assert sorted(p.name for p in tmp_path.glob("block_*.json")) == ["block_000.json", "block_001.json"]
    model, second = calm.quantize(tiny_llama(), scheme="W3A16G32", calibration=_ids(), batch_windows=2,
                                  state_dir=tmp_path)
    assert [d.to_dict() for d in second.decisions] == [d.to_dict() for d in first.decisions]


def test_import_calm_loads_neither_torch_nor_a_kernel():
    import subprocess
    import sys

    code = "import sys, calm; print(sorted(m for m in ('torch', 'triton', 'calm_kernels') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
