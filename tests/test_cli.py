"""python -m calm.run: bad input gets one clear line and exit code 2, and nothing half-written."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from calm.config import RunConfig
from calm.data import load_corpus
from calm.evaluate import perplexity
from calm.io import QUANT_CONFIG, load_quantized
from calm.run import main

WORDS = ("the quick brown fox jumps over the lazy dog while seven wizards quietly hex "
         "a bright jumbo vortex of liquid gold ").split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    paragraphs = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(60)) for i in range(60)]
    path.write_text("\n\n".join(paragraphs))
    return path


def args(model_dir, text, out, *extra):
    return ["--model", str(model_dir), "--text", str(text), "--output", str(out), "--scheme", "W3A16G32",
            "--calib-windows", "4", "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-tokens", "256",
            "--batch-windows", "2", *extra]


def refused(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("calm: error:") and match in err[0], err
    return err[0]


def test_missing_model_path(capsys, tmp_path, text_file):
    refused(capsys, args(tmp_path / "nope", text_file, tmp_path / "out"), "does not exist")
    assert not (tmp_path / "out").exists()


def test_unknown_algorithm_and_scheme(capsys, tmp_path, tiny_model_dir, text_file):
    refused(capsys, args(tiny_model_dir, text_file, tmp_path / "out", "--pool", "rtn,magic"), "unknown algorithm")
    refused(capsys, args(tiny_model_dir, text_file, tmp_path / "out", "--scheme", "W5X9"), "unknown scheme")
    refused(capsys, args(tiny_model_dir, text_file, tmp_path / "out", "--pool", "gptq:speed=3"), "has no option")
    assert not (tmp_path / "out").exists()


def test_group_size_that_does_not_divide(capsys, tmp_path, tiny_model_dir, text_file):
    refused(capsys, args(tiny_model_dir, text_file, tmp_path / "out", "--scheme", "W3A16G48"), "does not divide")
    # a candidate's own group is checked before the folder is written, or the folder would hold a run that cannot
    # resume with the pool fixed
    refused(capsys, args(tiny_model_dir, text_file, tmp_path / "out", "--pool", "rtn;gptq@3g48"),
            "candidate gptq@3g48: group size 48 does not divide")
    assert not (tmp_path / "out").exists()


def test_calibration_text_too_short(capsys, tmp_path, tiny_model_dir, text_file):
    refused(capsys, args(tiny_model_dir, text_file, tmp_path / "out", "--calib-windows", "100000"),
            "calibration text has")
    assert not (tmp_path / "out").exists()


def test_missing_text_file(capsys, tmp_path, tiny_model_dir):
    refused(capsys, args(tiny_model_dir, tmp_path / "none.txt", tmp_path / "out"), "does not exist")


def test_full_run_then_resume_then_refuse_another_run(capsys, tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "out"
    assert main(args(tiny_model_dir, text_file, out)) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("model", "scheme", "pool", "propagation", "seed", "calibration", "evaluation", "perplexity",
                "effective_bits", "blocks", "versions", "seconds"):
        assert key in results
    assert set(results["perplexity"]) == {"fp", "rtn", "gptq", "calm"}
    assert results["evaluation"]["seqlen"] == 32 and results["evaluation"]["tokens"] == 256
    assert [b["chosen"] for b in results["blocks"]] == json.loads(
        (out / "model" / "quantization_config.json").read_text())["chosen"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    refused(capsys, args(tiny_model_dir, text_file, out, "--scheme", "W2A16G32"), "holds another run")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    capsys.readouterr()
    assert main(args(tiny_model_dir, text_file, out)) == 0
    assert "(resumed)" in capsys.readouterr().out


def test_resume_under_another_score_is_accepted_and_scores_again(capsys, tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "rescore"
    assert main(args(tiny_model_dir, text_file, out, "--score-windows", "2")) == 0
    (out / "state" / "block_000.json").write_text(json.dumps(  # as calm before the scoring record wrote it
        {k: v for k, v in json.loads((out / "state" / "block_000.json").read_text()).items() if k != "scored_by"}))
    capsys.readouterr()
    assert main(args(tiny_model_dir, text_file, out, "--score-windows", "2", "--score", "nll")) == 0
    log = capsys.readouterr().out
    assert "score changed (cka -> nll)" in log and "(scored again)" in log
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["search"]["score"] == "nll"
    assert all(s["nll"] is not None for b in results["blocks"] for s in b["scores"].values())
    # Other search settings still make another run.
    assert main(args(tiny_model_dir, text_file, out, "--score-windows", "2", "--propagation", "independent")) == 2
    assert "settings differ in: search" in capsys.readouterr().err
    # A pool may grow (only the added candidate is quantized), never shrink.
    assert main(args(tiny_model_dir, text_file, out, "--score-windows", "2", "--score", "nll",
                     "--pool", "rtn,gptq,gptq@4")) == 0
    log = capsys.readouterr().out
    assert "only the added candidates are quantized" in log and "(completed)" in log
    assert set(json.loads((out / "results.json").read_text())["blocks"][0]["scores"]) == {"rtn", "gptq", "gptq@4"}
    assert main(args(tiny_model_dir, text_file, out, "--score-windows", "2", "--score", "nll",
                     "--pool", "rtn,gptq@4")) == 2
    assert "a resumed run may add candidates, not drop" in capsys.readouterr().err


def test_nll_score_on_separate_windows(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "nll"
    assert main(args(tiny_model_dir, text_file, out, "--score", "nll", "--score-windows", "2",
                     "--exact-baselines", "--final-check")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["calibration"]["score_windows"] == 2 and results["config"]["search"]["score"] == "nll"
    for b in results["blocks"]:
        nll = {n: s["nll"] for n, s in b["scores"].items()}
        assert b["chosen"] == min(nll, key=nll.get) and b["nll_margin"] >= 0
    assert "| CKA margin | NLL rtn | NLL gptq | NLL margin |" in (out / "tables.md").read_text()
    check = results["final_check"]
    assert check["done"] and check["windows"] == 2 and set(check["nll"]) == {"calm", "rtn", "gptq"}
    assert check["kept"] == min(check["nll"], key=check["nll"].get)
    assert all(len(w) == 2 for w in check["window_nll"].values())
    assert set(results["window_nll"]) == set(results["perplexity"])
    for name, w in results["window_nll"].items():
        assert math.exp(sum(w) / len(w)) == pytest.approx(results["perplexity"][name], rel=1e-9)
    assert "NLL - CALM's, mean ± SE over 8 windows |" in (out / "tables.md").read_text()


def test_final_check_saves_the_uniform_member_with_the_lower_scoring_nll(monkeypatch, tmp_path, tiny_model_dir,
                                                                          text_file):
    import calm.run

    def favour_rtn(source, models, windows, batch_windows):
        assert set(models) == {"calm", "rtn", "gptq"} and windows.shape[0] == 2
        return {"calm": torch.tensor([2.0, 2.2]), "rtn": torch.tensor([1.5, 1.7]), "gptq": torch.tensor([3.0, 3.0])}

    monkeypatch.setattr(calm.run, "check_models", favour_rtn)
    out = tmp_path / "checked"
    assert main(args(tiny_model_dir, text_file, out, "--score-windows", "2", "--final-check")) == 0
    results = json.loads((out / "results.json").read_text())
    ppl = results["perplexity"]
    assert results["final_check"]["kept"] == "rtn" and ppl["calm"] == ppl["rtn"] != ppl["calm-hybrid"]
    assert json.loads((out / "model" / QUANT_CONFIG).read_text())["chosen"] == ["rtn", "rtn"]
    reloaded, tokenizer = load_quantized(out / "model")
    corpus = load_corpus(tokenizer, RunConfig.from_dict(results["config"]).data)
    assert perplexity(reloaded, corpus.evaluation) == pytest.approx(ppl["rtn"], rel=1e-5)
    assert "| CALM: rtn kept by the final check |" in (out / "tables.md").read_text()

    # Without scoring windows there is nothing held out to check on, and the check is opt-in: the hybrid is saved.
    for name, extra in (("plain", ("--final-check",)), ("default", ("--score-windows", "2"))):
        assert main(args(tiny_model_dir, text_file, tmp_path / name, *extra)) == 0
        assert json.loads((tmp_path / name / "results.json").read_text())["final_check"] == {"done": False}


def test_module_entry_point_exit_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "calm.run", "--scheme", "X9", "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("calm: error: unknown scheme")


def test_exact_baselines_are_each_members_own_sequential_pass(tmp_path, tiny_model_dir, text_file):
    shared, exact, solo = tmp_path / "shared", tmp_path / "exact", tmp_path / "solo"
    # Independent propagation: the hybrid is no member's own sequential pass, so every exact baseline is run.
    assert main(args(tiny_model_dir, text_file, shared, "--propagation", "independent")) == 0
    assert main(args(tiny_model_dir, text_file, exact, "--propagation", "independent", "--exact-baselines")) == 0
    assert main(args(tiny_model_dir, text_file, solo, "--pool", "gptq", "--no-baselines")) == 0
    ppl = {name: json.loads((p / "results.json").read_text())["perplexity"]
           for name, p in (("shared", shared), ("exact", exact), ("solo", solo))}
    # GPTQ applied to every block, each calibrated on GPTQ's own outputs: what a GPTQ-only search builds.
    assert ppl["exact"]["gptq"] == pytest.approx(ppl["solo"]["calm"], rel=1e-6)
    assert ppl["exact"]["rtn"] == pytest.approx(ppl["shared"]["rtn"], rel=1e-6)  # RTN needs no calibration
    assert ppl["exact"]["calm"] == pytest.approx(ppl["shared"]["calm"], rel=1e-6)
    assert len(list((exact / "state" / "uniform-gptq").glob("block_*.json"))) == 2


def test_resume_from_an_older_folder_and_with_other_baselines(capsys, tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "out"
    assert main(args(tiny_model_dir, text_file, out, "--no-baselines")) == 0
    assert set(json.loads((out / "results.json").read_text())["perplexity"]) == {"fp", "calm"}
    saved = json.loads((out / "run_config.json").read_text())
    del saved["exact_baselines"]  # a folder written before the setting existed
    (out / "run_config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(args(tiny_model_dir, text_file, out, "--exact-baselines")) == 0
    assert "(resumed)" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["perplexity"]) == {"fp", "rtn", "gptq", "calm"}
    assert json.loads((out / "run_config.json").read_text())["exact_baselines"] is True
    if all(b["chosen"] == "gptq" for b in results["blocks"]):  # greedy hybrid == GPTQ's own pass: not redone
        assert results["perplexity"]["gptq"] == results["perplexity"]["calm"]
        assert not (out / "state" / "uniform-gptq").exists()


def test_residual_rotation_run(capsys, tmp_path, tiny_model_dir, text_file):
    plain, rotated = tmp_path / "plain", tmp_path / "rotated"
    assert main(args(tiny_model_dir, text_file, plain, "--pool", "rtn", "--scheme", "W4A8", "--no-baselines")) == 0
    assert main(args(tiny_model_dir, text_file, rotated, "--pool", "rtn", "--scheme", "W4A8", "--no-baselines",
                     "--residual-rotation", "hadamard")) == 0
    r_plain, r_rot = (json.loads((p / "results.json").read_text()) for p in (plain, rotated))
    assert r_rot["residual_rotation"] == "hadamard"
    assert r_rot["perplexity"]["fp"] == pytest.approx(r_plain["perplexity"]["fp"], rel=1e-5)  # same function
    assert r_rot["perplexity"]["calm"] != pytest.approx(r_plain["perplexity"]["calm"], rel=1e-4)  # other basis
    reloaded, tokenizer = load_quantized(rotated / "model")
    corpus = load_corpus(tokenizer, RunConfig.from_dict(r_rot["config"]).data)
    assert perplexity(reloaded, corpus.evaluation) == pytest.approx(r_rot["perplexity"]["calm"], rel=1e-5)
    # Blocks quantized in one rotated basis must not be resumed in another.
    (rotated / "state" / "residual_rotation.json").write_text('{"sha256": "0123"}')
    refused(capsys, args(tiny_model_dir, text_file, rotated, "--pool", "rtn", "--scheme", "W4A8", "--no-baselines",
                         "--residual-rotation", "hadamard"), "another residual basis")
