"""The pictures a run writes next to results.json (calm.plots) and `python -m calm.report RUNS...`: every model
of several runs against its effective bits, the Pareto fronts, the markdown tables."""
from __future__ import annotations

import json

from calm.plots import CHOICES_PNG, SCORES_PNG, choice_strips, write_run_plots
from calm.report import main as report_main
from calm.report import mark_fronts, model_points

PNG = b"\x89PNG\r\n\x1a\n"


def block(index, chosen, scores, margin=1e-3, nll=False):
    b = {"index": index, "chosen": chosen, "cka_margin": margin, "scores": scores}
    if nll:
        b["nll_margin"] = margin / 10
    return b


def score(cka, bits=None, nll=None):
    s = {"cka": cka, "mse": 0.1, "rel_err": 0.1, "seconds": 1.0, "score_seconds": 0.1}
    if bits is not None:
        s.update(stored_bits=bits * 1000, weights=1000)
    if nll is not None:
        s["nll"] = nll
    return s


def run_results(scheme="W3A16G64", ppl=None, bits=None, zero_shot=None, budget=None, nll=False):
    blocks = [block(0, "gptq@3", {"gptq@3": score(0.99, 3.25, 2.0 if nll else None),
                                   "rtn@4": score(0.98, 4.25, 2.1 if nll else None)}, nll=nll),
              block(1, "rtn@4", {"gptq@3": score(0.97, 3.25, 2.2 if nll else None),
                                 "rtn@4": score(0.995, 4.25, 2.0 if nll else None)}, nll=nll),
              block(2, "gptq@3", {"gptq@3": score(0.999, 3.25, 1.9 if nll else None),
                                  "rtn@4": score(float("nan"), None, None)}, nll=nll)]
    blocks[2]["scores"]["rtn@4"]["failed"] = "NaN"
    return {"scheme": scheme, "pool": ["gptq@3", "rtn@4"], "blocks": blocks, "budget": budget,
            "perplexity": ppl or {"fp": 20.0, "gptq@3": 40.0, "rtn@4": 30.0, "calm": 32.0},
            "effective_bits": bits or {"fp": 16.0, "gptq@3": 3.25, "rtn@4": 4.25, "calm": 3.58},
            "zero_shot": zero_shot or {}, "evaluation": {"seqlen": 512, "tokens": 16384}}


def test_run_pictures_are_written_next_to_results(tmp_path):
    budget = {"bits_budget": 3.6, "loss": "cka", "models": {
        "calm": {"effective_bits": 3.58, "blocks": [
            {"chosen": "gptq@3", "effective_bits": 3.25, "repaired": False},
            {"chosen": "rtn@4", "effective_bits": 4.25, "repaired": True},
            {"chosen": "gptq@3", "effective_bits": 3.25, "repaired": False}]}}}
    results = run_results(budget=budget, nll=True)
    strips = choice_strips(results)
    assert [s[0] for s in strips] == ["search (NLL margin)", "calm (3.580 bits)"]
    assert strips[0][1] == ["gptq@3", "rtn@4", "gptq@3"]
    assert strips[0][2][1] == "1.0e-04\n4.25b"  # the NLL margin, then the chosen candidate's bits
    assert strips[1][2] == ["3.25b", "4.25b R", "3.25b"]
    paths = write_run_plots(results, tmp_path)
    assert [p.name for p in paths] == [CHOICES_PNG, SCORES_PNG]
    for p in paths:
        assert p.read_bytes().startswith(PNG) and p.stat().st_size > 5000
    # Without recorded bits or NLL scores, the strip holds the CKA margin only.
    plain = run_results()
    for b in plain["blocks"]:
        for s in b["scores"].values():
            s.pop("stored_bits", None)
    assert choice_strips(plain)[0][2][0] == "1.0e-03"
    assert write_run_plots({"blocks": []}, tmp_path / "empty") == []


def test_pareto_fronts():
    runs = [("w3", run_results()),
            ("w4", run_results("W4A16G64", ppl={"fp": 20.0, "calm": 25.0, "gptq@3": 26.0},
                               bits={"fp": 16.0, "calm": 4.3, "gptq@3": 4.25}))]
    points = {(p.run, p.model): p for p in model_points(runs)}
    assert ("w4", "fp") not in points  # the float model once
    front = {k for k, p in points.items() if p.front}
    # w3:gptq@3 is the smallest; w4:gptq@3 (4.25 bits, 26) beats w3:rtn@4 (4.25, 30) and w3:calm (3.58, 32)
    # is beaten by nothing smaller; w4:calm (4.3, 25) and fp.
    assert front == {("w3", "gptq@3"), ("w3", "calm"), ("w4", "gptq@3"), ("w4", "calm"), ("w3", "fp")}
    # Zero-shot: higher is better; w3:calm (3.58 bits, 0.5) dominates w3:rtn@4 (4.25 bits, 0.45).
    for key, acc in ((("w3", "gptq@3")), 0.4), (("w3", "calm"), 0.5), (("w3", "rtn@4"), 0.45):
        points[key].zero_shot = acc
    mark_fronts(list(points.values()))
    assert {k for k, p in points.items() if p.zero_shot_front} == {("w3", "gptq@3"), ("w3", "calm")}


def test_report_command_over_runs_and_an_evaluate_record(tmp_path, capsys):
    zs = {"fp": {"piqa": {"acc": 0.6, "acc_stderr": 0.02, "samples": 100}, "average": {"acc": 0.6, "acc_stderr": 0.02}},
          "calm": {"piqa": {"acc": 0.55, "acc_stderr": 0.02, "acc_norm": 0.56, "acc_norm_stderr": 0.02,
                            "samples": 100}, "average": {"acc": 0.55, "acc_stderr": 0.02}}}
    results = run_results(zero_shot=zs)
    results["zero_shot_setup"] = {"tasks": ["piqa"], "limit": 100, "source": "offline", "num_fewshot": 0,
                                  "data": "offline", "average": "mean of acc", "lm_eval": "0.4.13"}
    (tmp_path / "w3").mkdir()
    (tmp_path / "w3" / "results.json").write_text(json.dumps(results))
    evaluated = {"effective_bits": {"model": 2.5}, "perplexity": {"model": 90.0}, "zero_shot": {}}
    (tmp_path / "other.json").write_text(json.dumps(evaluated))
    out = tmp_path / "report"
    assert report_main([str(tmp_path / "w3"), str(tmp_path / "other.json"), "--output", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| other | model |  | 2.500 | 90.000 |  | PPL |" in text
    assert "| w3 | calm | W3A16G64 | 3.580 | 32.000 | 0.5500 ± 0.0200 | PPL, zero-shot |" in text
    assert "## w3" in text and "0.5500 ± 0.0200 (norm 0.5600 ± 0.0200)" in text
    assert (out / "pareto.png").read_bytes().startswith(PNG)
    assert report_main([str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert "neither a run folder" in capsys.readouterr().err
