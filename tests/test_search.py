"""The search loop on a tiny random LLaMA: decisions, tie-breaking, failed candidates, state on disk, resume,
progress."""
import copy
import dataclasses
import json
import math

import pytest
import torch

import calm.search.candidates
import calm.search.loop
from calm.algorithms import gptq_core
from calm.config import SCORES, CalmUsageError, NumericalError, QuantSpec, SearchConfig, parse_pool
from calm.evaluate import perplexity
from calm.model import decoder_blocks
from calm.search import (
    SCORERS,
    AllCandidatesFailed,
    BlockDecision,
    CandidateScore,
    calm_search,
    check_models,
    choose,
    install_blocks,
    numerical_failure,
)


def score(cka, mse):
    return CandidateScore(cka=cka, mse=mse, rel_err=0.0, seconds=0.0, score_seconds=0.0)


def test_choose_highest_cka_then_lowest_mse_on_ties():
    assert choose({"a": score(0.99, 1.0), "b": score(0.98, 0.1)}, 1e-7) == "a"
    assert choose({"a": score(0.99, 1.0), "b": score(0.99 - 1e-9, 0.1)}, 1e-7) == "b"


def test_choose_by_nll_takes_the_lowest_loss_whatever_the_cka():
    a = CandidateScore(cka=0.999, mse=1.0, rel_err=0.0, seconds=0.0, score_seconds=0.0, nll=3.10)
    b = CandidateScore(cka=0.990, mse=2.0, rel_err=0.0, seconds=0.0, score_seconds=0.0, nll=3.05)
    assert choose({"a": a, "b": b}, 1e-7, by="nll") == "b"
    assert choose({"a": a, "b": b}, 1e-7) == "a"
    assert choose({"a": a, "b": b}, 0.1, by="nll") == "a"  # a tie within the tolerance goes to the lower MSE


@pytest.mark.parametrize("propagation", ["greedy", "independent"])
def test_search_scores_every_candidate_and_resumes(tiny_model, tmp_path, propagation):
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = SearchConfig(pool=parse_pool("rtn,gptq"), propagation=propagation, batch_windows=2)
    spec = QuantSpec.from_scheme("W2A16G32")
    lines = []
    first = calm_search(tiny_model, windows, spec, cfg, state_dir=tmp_path, log=lines.append)
    assert len(first.decisions) == 2
    for d in first.decisions:
        assert set(d.scores) == {"rtn", "gptq"}
        assert d.scores[d.chosen].cka == max(s.cka for s in d.scores.values())
        assert all(0 < s.cka <= 1 + 1e-9 and s.mse > 0 for s in d.scores.values())
        saved = json.loads((tmp_path / f"block_{d.index:03d}.json").read_text())
        assert saved["chosen"] == d.chosen
    # The float model is untouched by the search.
    assert not any("Quant" in type(m).__name__ for m in tiny_model.modules())

    # Resume: a second search over the same state reuses every decision and block.
    lines.clear()
    second = calm_search(tiny_model, windows, spec, cfg, state_dir=tmp_path, log=lines.append)
    assert sum("(resumed)" in line for line in lines) == 2
    assert [d.to_dict() for d in second.decisions] == [d.to_dict() for d in first.decisions]
    for a, b in zip(first.chosen_blocks, second.chosen_blocks):
        for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb and torch.equal(ta, tb)


def record_quantized(monkeypatch) -> list[str]:
    """The names of the candidates the search quantizes from now on, in order."""
    quantized = []
    real_quantize = calm.search.candidates.quantize
    monkeypatch.setattr(calm.search.candidates, "quantize",
                        lambda cand, *a, **kw: quantized.append(cand.name) or real_quantize(cand, *a, **kw))
    return quantized


def stale_blocks(propagation: str, saved: list[str], now: list[str]) -> int:
    """Blocks whose saved candidates were fitted on inputs that changed: with greedy propagation, those after
    the first block whose choice changed."""
    changed = [i for i, (a, b) in enumerate(zip(saved, now)) if a != b]
    return 0 if propagation == "independent" or not changed else len(now) - changed[0] - 1


@pytest.mark.parametrize("propagation", ["greedy", "independent"])
def test_resume_under_another_score_scores_the_saved_blocks_again(tiny_model, tmp_path, monkeypatch, propagation):
    """A resumed search under another score gives what a fresh search under that score gives, quantizing only the
    blocks whose inputs changed (greedy propagation, after the first block whose choice changed)."""
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec.from_scheme("W2A16G32")
    cka = SearchConfig(pool=parse_pool("rtn,gptq"), propagation=propagation, batch_windows=2)
    nll = dataclasses.replace(cka, score="nll")
    first = calm_search(tiny_model, windows, spec, cka, state_dir=tmp_path / "a", log=lambda _: None)
    fresh = calm_search(tiny_model, windows, spec, nll, state_dir=tmp_path / "b", log=lambda _: None)

    quantized = record_quantized(monkeypatch)
    lines = []
    again = calm_search(tiny_model, windows, spec, nll, state_dir=tmp_path / "a", log=lines.append)
    stale = stale_blocks(propagation, [d.chosen for d in first.decisions], [d.chosen for d in fresh.decisions])
    assert len(quantized) == 2 * stale
    assert sum("(scored again)" in line for line in lines) == len(first.decisions) - stale
    for a, b in zip(again.decisions, fresh.decisions):
        assert a.chosen == b.chosen
        for name in ("rtn", "gptq"):
            assert a.scores[name].nll == pytest.approx(b.scores[name].nll, rel=1e-6)
            assert a.scores[name].stored_bits == b.scores[name].stored_bits
    for i in range(len(first.decisions)):
        saved = json.loads((tmp_path / "a" / f"block_{i:03d}.json").read_text())
        assert saved["scored_by"] == "nll" and saved["chosen"] == again.decisions[i].chosen
    # Once scored again, the state resumes as it is.
    lines.clear()
    calm_search(tiny_model, windows, spec, nll, state_dir=tmp_path / "a", log=lines.append)
    assert sum("(resumed)" in line for line in lines) == len(first.decisions)


@pytest.mark.parametrize("propagation", ["greedy", "independent"])
def test_resume_with_added_candidates_quantizes_only_those(tiny_model, tmp_path, monkeypatch, propagation):
    """A pool grown since the state was saved gives what a fresh search with the whole pool gives; the saved
    candidates are not quantized again (greedy: up to the first block whose choice changed)."""
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec.from_scheme("W2A16G32")
    small = SearchConfig(pool=parse_pool("gptq"), propagation=propagation, batch_windows=2)
    grown = dataclasses.replace(small, pool=parse_pool("rtn,gptq"))
    calm_search(tiny_model, windows, spec, small, state_dir=tmp_path / "a", log=lambda _: None)
    fresh = calm_search(tiny_model, windows, spec, grown, state_dir=tmp_path / "b", log=lambda _: None)

    quantized = record_quantized(monkeypatch)
    lines = []
    again = calm_search(tiny_model, windows, spec, grown, state_dir=tmp_path / "a", log=lines.append)
    stale = stale_blocks(propagation, ["gptq"] * len(fresh.decisions), [d.chosen for d in fresh.decisions])
    n = len(fresh.decisions)
    assert quantized.count("rtn") == n and quantized.count("gptq") == stale
    assert sum("(completed)" in line for line in lines) == n - stale
    for a, b in zip(again.decisions, fresh.decisions):
        assert a.chosen == b.chosen and list(a.scores) == ["rtn", "gptq"]
        for name in ("rtn", "gptq"):
            assert a.scores[name].cka == pytest.approx(b.scores[name].cka, rel=1e-9)


def test_stamp_scoring_records_the_scoring_of_decisions_saved_before_it_was_recorded(tiny_model, tmp_path):
    from calm.search.state import stamp_scoring

    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2, score="cka-normed")
    calm_search(tiny_model, windows, QuantSpec.from_scheme("W2A16G32"), cfg, state_dir=tmp_path, log=lambda _: None)
    for path in tmp_path.glob("block_*.json"):  # as calm before the record wrote them
        saved = json.loads(path.read_text())
        assert saved.pop("scored_by") == "cka-normed"
        path.write_text(json.dumps(saved))
    assert stamp_scoring(tmp_path, "cka-normed") == 2
    assert stamp_scoring(tmp_path, "cka") == 0  # a recorded scoring is never overwritten
    lines = []
    calm_search(tiny_model, windows, QuantSpec.from_scheme("W2A16G32"), cfg, state_dir=tmp_path, log=lines.append)
    assert sum("(resumed)" in line for line in lines) == 2


def test_normed_scores_weigh_tokens_as_the_next_norm_does():
    """A massive token dominates raw CKA; after the RMS norm every token counts as it does downstream."""
    from calm.search import block_scores

    gen = torch.Generator().manual_seed(1)
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.rand(16, generator=gen) + 0.5)
    norm.variance_epsilon = 1e-6
    y = torch.randn(2, 64, 16, generator=gen, dtype=torch.float64)
    y[:, 0, 3] = 1e4  # a massive activation on each window's first token
    noisy = y + 0.3 * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    noisy[:, 0] = y[:, 0]  # the massive token itself is exact
    raw = block_scores(list(y), list(noisy), "cka")[0]
    normed = block_scores(list(y), list(noisy), "cka-normed", norm)[0]
    rms = block_scores(list(y), list(noisy), "cka-rms", norm)[0]
    assert raw > 0.9999 and normed < 0.99 and rms < 0.99
    # Exact outputs score 1 under every variant; MSE and relative error are of the raw outputs.
    for s in ("cka", "cka-normed", "cka-rms"):
        cka, mse, rel = block_scores(list(y), list(y), s, norm)
        assert cka == pytest.approx(1.0, abs=1e-9) and mse == 0 and rel == 0
    _, mse, _ = block_scores(list(y), list(noisy), "cka-rms", norm)
    assert mse == pytest.approx(float((noisy - y).square().mean()), rel=1e-9)
    with pytest.raises(ValueError, match="norm"):
        block_scores(list(y), list(noisy), "cka-normed", None)


@pytest.mark.parametrize("propagation,score", [("greedy", "cka-normed"), ("independent", "cka-normed"),
                                              ("greedy", "cka-final"), ("greedy", "nll")])
def test_separate_scoring_windows_change_scores_not_fits(tiny_model, tmp_path, propagation, score):
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 256, (4, 32), generator=gen)
    scoring = torch.randint(0, 256, (3, 32), generator=gen)
    spec = QuantSpec.from_scheme("W2A16G32")
    cfg = SearchConfig(pool=parse_pool("rtn,gptq"), propagation=propagation, batch_windows=2, score=score)
    plain = calm_search(tiny_model, windows, spec, cfg, log=lambda _: None)
    lines = []
    held = calm_search(tiny_model, windows, spec, cfg, state_dir=tmp_path, log=lines.append, score_windows=scoring)
    assert "scoring on 96 other tokens" in lines[0]
    assert [d.scores["gptq"].cka for d in held.decisions] != [d.scores["gptq"].cka for d in plain.decisions]
    # Block 0's candidates are fitted on the same inputs either way: identical weights.
    for name in ("rtn", "gptq"):
        a, b = plain.block(name, 0).state_dict(), held.block(name, 0).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    again = calm_search(tiny_model, windows, spec, cfg, state_dir=tmp_path, log=lines.append, score_windows=scoring)
    assert [d.to_dict() for d in again.decisions] == [d.to_dict() for d in held.decisions]
    assert all(0 < s.cka <= 1 + 1e-9 for d in held.decisions for s in d.scores.values())
    if score == "nll":
        for d in held.decisions:
            assert d.scores[d.chosen].nll == min(s.nll for s in d.scores.values()) and d.nll_margin >= 0
            assert all(0 < s.nll < 20 for s in d.scores.values())


def test_final_score_sees_the_model_output(tiny_model):
    """What cka-final compares for the last block is its output through the final norm; for an earlier block,
    the float blocks after it run first."""
    from calm.model import BlockInputs, capture_block_inputs, decoder_blocks, run_block
    from calm.search.loop import as_source

    source = as_source(tiny_model)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    inputs: BlockInputs = capture_block_inputs(tiny_model, windows, 2)
    blocks = decoder_blocks(tiny_model)
    first = run_block(blocks[0], inputs)
    out = run_block(blocks[-1], inputs.with_hidden(first))
    last = len(blocks) - 1
    assert torch.allclose(source.final_states(source.run_tail(last, out, inputs), inputs)[0],
                          tiny_model.model.norm(out[0]))
    assert torch.allclose(source.final_states(source.run_tail(0, first, inputs), inputs)[0],
                          tiny_model.model.norm(out[0]))


def test_score_is_validated():
    with pytest.raises(CalmUsageError, match="score must be one of"):
        SearchConfig(score="mse")
    assert SearchConfig(score="cka-final").score == "cka-final"


def test_resume_refuses_blocks_saved_with_other_algorithm_settings(tiny_model, tmp_path):
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec.from_scheme("W2A16G32")
    calm_search(tiny_model, windows, spec, SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2),
                state_dir=tmp_path, log=lambda _: None)
    saved = json.loads((tmp_path / "block_000.json").read_text())
    assert saved["candidate_options"]["gptq"]["act_order"] == "static"  # defaults are recorded
    saved["candidate_options"]["gptq"]["act_order"] = "none"  # as an older calm with another default wrote it
    (tmp_path / "block_000.json").write_text(json.dumps(saved))
    with pytest.raises(CalmUsageError, match="other settings for gptq.*new --output"):
        calm_search(tiny_model, windows, spec, SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2),
                    state_dir=tmp_path, log=lambda _: None)


def test_check_models_is_the_whole_model_nll_with_each_block_list(tiny_model):
    blocks = list(decoder_blocks(tiny_model))
    damaged = copy.deepcopy(blocks)
    for b in damaged:
        b.mlp.down_proj.weight.data *= 40
    windows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    expected = {}
    for name, bl in (("float", blocks), ("damaged", damaged)):
        install_blocks(tiny_model, bl)
        expected[name] = math.log(perplexity(tiny_model, windows))
    assert abs(expected["damaged"] - expected["float"]) > 1e-3  # far beyond the tolerance below
    nll = check_models(tiny_model, {"float": blocks, "damaged": damaged}, windows, batch_windows=2)
    assert {n: float(w.mean()) for n, w in nll.items()} == pytest.approx(expected, rel=1e-6)
    assert all(w.shape == (3,) for w in nll.values())


def test_every_score_has_one_scorer():
    assert set(SCORERS) == set(SCORES)
    assert {n for n, cls in SCORERS.items() if cls.by == "nll"} == {"nll"}


def test_choose_skips_failed_and_non_finite_candidates():
    nan, inf = float("nan"), float("inf")
    scores = {"a": score(nan, 0.1), "b": score(-inf, inf), "c": score(0.5, 2.0), "d": score(0.9, 1.0)}
    assert choose(scores, 1e-7) == "d"
    scores["d"] = dataclasses.replace(scores["d"], failed="RuntimeError: not positive definite")
    assert choose(scores, 1e-7) == "c"
    by_nll = {"a": CandidateScore(0.9, 1.0, 0.0, 0.0, 0.0, nll=nan),
              "b": CandidateScore(0.8, 1.0, 0.0, 0.0, 0.0, nll=4.0)}
    assert choose(by_nll, 1e-7, by="nll") == "b"
    decision = BlockDecision(0, "c", scores)
    assert decision.margin == 0.0  # every other candidate failed: nothing to compare with
    assert decision.failed == {"d": "RuntimeError: not positive definite"}
    assert decision.to_dict()["scores"]["d"]["failed"] == "RuntimeError: not positive definite"
    assert "failed" not in decision.to_dict()["scores"]["c"]


def test_choose_when_every_candidate_failed_names_each_reason():
    scores = {"rtn": score(float("nan"), float("nan")),
              "gptq": dataclasses.replace(score(float("-inf"), float("inf")), failed="RuntimeError: raise\ndamp")}
    with pytest.raises(AllCandidatesFailed) as caught:
        choose(scores, 1e-7)
    assert caught.value.reasons == {"rtn": "non-finite cka (nan)", "gptq": "RuntimeError: raise\ndamp"}
    assert isinstance(caught.value, CalmUsageError) and "\n" not in str(caught.value)
    assert "rtn: non-finite cka (nan); gptq: RuntimeError: raise damp" in str(caught.value)
    with pytest.raises(AllCandidatesFailed, match="every candidate failed"):
        choose({"a": CandidateScore(0.9, 1.0, 0.0, 0.0, 0.0, nll=float("inf"))}, 1e-7, by="nll")


def test_numerical_failures_are_told_from_other_errors():
    try:
        try:
            torch.linalg.cholesky(-torch.eye(2))
        except torch.linalg.LinAlgError as exc:
            raise RuntimeError("GPTQ: the damped Hessian is not positive definite (damp=0.01); raise damp") from exc
    except RuntimeError as exc:
        assert numerical_failure(exc) == ("RuntimeError: GPTQ: the damped Hessian is not positive definite "
                                          "(damp=0.01); raise damp")
    assert numerical_failure(NumericalError("overflow")) == "NumericalError: overflow"
    assert numerical_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert numerical_failure(TypeError("bad argument")) is None
    assert numerical_failure(CalmUsageError("bad option")) is None


def failing_quantize(monkeypatch, fail: dict[tuple[str, int], BaseException]):
    """Make candidates.quantize raise `fail[(name, block index)]`; other calls quantize as usual."""
    real = calm.search.candidates.quantize
    calls = {}

    def quantize(candidate, block, inputs, spec, context):
        index = calls[candidate.name] = calls.get(candidate.name, -1) + 1
        if (candidate.name, index) in fail:
            raise fail[(candidate.name, index)]
        return real(candidate, block, inputs, spec, context)

    monkeypatch.setattr(calm.search.candidates, "quantize", quantize)


def not_positive_definite() -> RuntimeError:
    try:
        torch.linalg.cholesky(-torch.eye(2))
    except torch.linalg.LinAlgError as exc:
        err = RuntimeError("the damped Hessian is not positive definite; raise damp")
        err.__cause__ = exc
        return err


def test_a_candidate_that_fails_numerically_is_recorded_and_the_others_compete(tiny_model, tmp_path, monkeypatch,
                                                                                caplog):
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2)
    spec = QuantSpec.from_scheme("W2A16G32")
    failing_quantize(monkeypatch, {("gptq", 1): not_positive_definite()})
    with caplog.at_level("WARNING", logger="calm.search"):
        outcome = calm_search(tiny_model, windows, spec, cfg, state_dir=tmp_path, log=lambda _: None)
    first, second = outcome.decisions
    assert first.failed == {} and second.chosen == "rtn"
    assert second.failed == {"gptq": "RuntimeError: the damped Hessian is not positive definite; raise damp"}
    assert second.to_dict()["cka_margin"] == 0.0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [("block 2/2: gptq failed (RuntimeError: the damped Hessian is not positive definite; "
                         "raise damp); chose rtn among the others")]
    assert outcome.candidate_blocks["gptq"][1] is None and outcome.candidate_blocks["gptq"][0] is not None
    assert set(outcome.complete_candidates) == {"rtn"}
    with pytest.raises(ValueError, match="no block for layers"):
        install_blocks(tiny_model, [outcome.block("gptq", i) for i in range(2)])
    assert not (tmp_path / "block_001-gptq.safetensors").exists()
    saved = json.loads((tmp_path / "block_001.json").read_text())
    assert saved["scores"]["gptq"]["failed"].startswith("RuntimeError")

    # Resume: the failure is part of the decision; nothing is quantized again.
    failing_quantize(monkeypatch, {(c, i): AssertionError("quantized again") for c in ("rtn", "gptq") for i in (0, 1)})
    lines = []
    again = calm_search(tiny_model, windows, spec, cfg, state_dir=tmp_path, log=lines.append)
    assert sum("(resumed)" in line for line in lines) == 2
    assert [d.to_dict() for d in again.decisions] == [d.to_dict() for d in outcome.decisions]
    assert again.candidate_blocks["gptq"][1] is None


def test_every_candidate_failing_stops_with_one_error_and_keeps_earlier_blocks(tiny_model, tmp_path, monkeypatch):
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2)
    spec = QuantSpec.from_scheme("W2A16G32")
    failing_quantize(monkeypatch, {("rtn", 1): NumericalError("scale overflow"), ("gptq", 1): not_positive_definite()})
    with pytest.raises(AllCandidatesFailed) as caught:
        calm_search(tiny_model, windows, spec, cfg, state_dir=tmp_path, log=lambda _: None)
    message = str(caught.value)
    assert caught.value.block == 1 and "\n" not in message
    assert message.startswith("every candidate failed on block 2/2 (rtn: NumericalError: scale overflow; "
                              "gptq: RuntimeError: the damped Hessian is not positive definite; raise damp)")
    assert str(tmp_path) in message
    assert (tmp_path / "block_000.json").is_file() and not (tmp_path / "block_001.json").exists()

    # The rerun resumes at the failed block.
    monkeypatch.undo()
    lines = []
    outcome = calm_search(tiny_model, windows, spec, cfg, state_dir=tmp_path, log=lines.append)
    assert ["(resumed)" in line for line in lines[1:]] == [True, False]
    assert all(d.failed == {} for d in outcome.decisions)


@pytest.mark.parametrize("error", [RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                                   CalmUsageError("gptq act_order must be one of ..."), KeyError("q_proj")])
def test_other_errors_of_a_candidate_stop_the_search(tiny_model, monkeypatch, error):
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    failing_quantize(monkeypatch, {("gptq", 0): error})
    with pytest.raises(type(error), match=str(error.args[0])[:20]):
        calm_search(tiny_model, windows, QuantSpec.from_scheme("W2A16G32"),
                    SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2), log=lambda _: None)


def test_a_diverged_candidate_is_failed_by_its_score(tiny_model, monkeypatch):
    """A block that quantizes but outputs NaN scores -inf CKA: recorded as failed, never chosen."""
    real = calm.search.candidates.quantize

    def quantize(candidate, block, inputs, spec, context):
        out = real(candidate, block, inputs, spec, context)
        if candidate.name == "gptq":
            out.input_layernorm.weight.data.fill_(float("nan"))
        return out

    monkeypatch.setattr(calm.search.candidates, "quantize", quantize)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    outcome = calm_search(tiny_model, windows, QuantSpec.from_scheme("W2A16G32"),
                          SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2), log=lambda _: None)
    for d in outcome.decisions:
        assert d.chosen == "rtn" and d.failed == {"gptq": "non-finite cka (-inf)"}


def test_a_real_gptq_breakdown_leaves_rtn(tiny_model, monkeypatch):
    """GPTQ on a Hessian that is not positive definite (negated here): its Cholesky fails inside GPTQ."""
    real_hessian = gptq_core.HessianAccumulator.hessian
    monkeypatch.setattr(gptq_core.HessianAccumulator, "hessian", lambda self: -real_hessian(self))
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    outcome = calm_search(tiny_model, windows, QuantSpec.from_scheme("W2A16G32"),
                          SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2), log=lambda _: None)
    for d in outcome.decisions:
        assert d.chosen == "rtn" and "not positive definite" in d.failed["gptq"]
    with pytest.raises(AllCandidatesFailed, match="block 1/2.*gptq.*raise damp"):
        calm_search(tiny_model, windows, QuantSpec.from_scheme("W2A16G32"),
                    SearchConfig(pool=parse_pool("gptq"), batch_windows=2), log=lambda _: None)


def test_search_progress_bar_counts_blocks_times_candidates_and_logs_by_default(tiny_model, tmp_path, recorded_bars,
                                                                               caplog):
    install, bars = recorded_bars
    install(calm.search.loop)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2)
    with caplog.at_level("INFO", logger="calm.search"):
        calm_search(tiny_model, windows, QuantSpec.from_scheme("W2A16G32"), cfg, state_dir=tmp_path)
        calm_search(tiny_model, windows, QuantSpec.from_scheme("W2A16G32"), cfg, state_dir=tmp_path)
    assert [(b.total, b.done) for b in bars] == [(4, 4), (4, 4)]  # the resumed search counts its blocks too
    messages = [r.getMessage() for r in caplog.records if r.name == "calm.search"]
    assert messages[0].startswith("captured block inputs") and messages[1].startswith("block   1/2: ")
    assert sum("(resumed)" in m for m in messages) == 2
