"""The real embedded model (SmolLM2-135M) and real text through search, evaluation, save and reload."""
import json

import pytest
import torch

import calm
from calm.data import load_corpus
from calm.evaluate import perplexity
from calm.run import build_parser, config_from_args, run

pytestmark = pytest.mark.slow


def test_search_evaluate_save_reload_on_default_model(tmp_path, capsys):
    out = tmp_path / "run"
    args = build_parser().parse_args(["--output", str(out), "--scheme", "W3A16G64", "--pool", "rtn,gptq",
                                      "--calib-windows", "8", "--calib-seqlen", "256", "--eval-seqlen", "256",
                                      "--eval-tokens", "1024"])
    cfg = config_from_args(args)
    run(cfg)
    printed = capsys.readouterr().out
    assert "| block | chosen | CKA rtn | CKA gptq |" in printed and "CALM hybrid" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["blocks"]) == 30
    ppl = results["perplexity"]
    assert set(ppl) == {"fp", "rtn", "gptq", "calm"}
    # 3-bit weights cost perplexity on real text; every quantized model is worse than float but still a model.
    for name in ("rtn", "gptq", "calm"):
        assert ppl["fp"] < ppl[name] < 10 * ppl["fp"], ppl
    assert 3.0 < results["effective_bits"]["calm"] < 3.5

    # The saved model is the hybrid that was evaluated: the same perplexity on the same windows.
    reloaded, tokenizer = calm.load(out / "model")
    corpus = load_corpus(tokenizer, cfg.data)
    assert perplexity(reloaded, corpus.evaluation, batch_windows=4) == pytest.approx(ppl["calm"], rel=1e-5)
    ids = torch.tensor([tokenizer("The history of the city begins in the Roman era, when")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(reloaded(ids).logits).all()
