"""Bits as a search dimension: candidates with their own weight bits (`gptq@2`), exact per-block bit accounting,
the bit-budget allocation (calm.search.budget) and its refusals."""
import itertools
import json
import random
from types import SimpleNamespace

import pytest
import torch

import calm.search.budget
import calm.search.candidates
from calm.algorithms import validate_candidate
from calm.config import CalmUsageError, CandidateSpec, QuantSpec, RunConfig, SearchConfig, parse_pool
from calm.io import load_quantized
from calm.model import decoder_blocks
from calm.nn import block_stored_bits, model_effective_bits
from calm.run import main
from calm.search import calm_search
from calm.search.budget import BudgetInfeasible, RatePoint, allocate, bit_limit, budget_search, check_budget
from conftest import tiny_llama


def test_candidates_carry_their_bits_and_the_scheme_applies_without():
    pool = parse_pool("gptq@2,gptq@4,awq@3,rtn")
    assert [c.name for c in pool] == ["gptq@2", "gptq@4", "awq@3", "rtn"]
    spec = QuantSpec.from_scheme("W3A16G64")
    assert [c.spec_for(spec).w_bits for c in pool] == [2, 4, 3, 3]
    assert all(c.spec_for(spec).group_size == 64 for c in pool)
    with_options = parse_pool("gptq@4:act_order=static,damp=0.02;claq@2")
    assert with_options[0] == CandidateSpec("gptq", {"act_order": "static", "damp": 0.02}, bits=4)
    assert with_options[0].name == "gptq@4[act_order=static,damp=0.02]"
    assert with_options[1].name == "claq@2"
    cfg = RunConfig(search=SearchConfig(pool=pool))
    assert RunConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("text,words", [("gptq@5", "must be one of 2, 3, 4, 8"), ("gptq@", "as a number"),
                                        ("gptq@three", "as a number"), ("gptq@3,gptq@3", "twice")])
def test_bad_bits_are_refused_with_one_line(text, words):
    with pytest.raises(CalmUsageError, match=words) as err:
        parse_pool(text)
    assert "\n" not in str(err.value)


def test_a_candidates_bits_are_checked_against_its_algorithm():
    validate_candidate(CandidateSpec("claq", bits=2), QuantSpec.from_scheme("W3A16"))
    with pytest.raises(CalmUsageError, match="claq codebooks hold 2 to 4 bits"):
        validate_candidate(CandidateSpec("claq", bits=8), QuantSpec.from_scheme("W3A16"))


def test_search_records_each_candidates_exact_bits(tiny_model):
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    cfg = SearchConfig(pool=parse_pool("rtn@2,rtn@4,gptq@3"), batch_windows=2)
    outcome = calm_search(tiny_model, windows, QuantSpec.from_scheme("W3A16G32"), cfg)
    for d in outcome.decisions:
        for name, s in d.scores.items():
            block = outcome.block(name, d.index)
            assert (s.stored_bits, s.weights) == block_stored_bits(block)
            assert s.effective_bits == pytest.approx(model_effective_bits([block]))
        # 2-bit codes + float16 scale + packed zero per group of 32 < 3-bit < 4-bit
        assert d.scores["rtn@2"].stored_bits < d.scores["gptq@3"].stored_bits < d.scores["rtn@4"].stored_bits
        assert d.scores["rtn@4"].effective_bits > 4


# -- allocation ---------------------------------------------------------------------------------------------------

def points_of(table):
    """[{name: (bits, loss)}] per block -> rate points."""
    return [{n: RatePoint(n, b, loss) for n, (b, loss) in block.items()} for block in table]


def brute_force(points, limit):
    best = None
    for choice in itertools.product(*[list(b) for b in points]):
        bits = sum(b[n].stored_bits for b, n in zip(points, choice))
        loss = sum(b[n].loss for b, n in zip(points, choice))
        if bits <= limit and (best is None or loss < best):
            best = loss
    return best


@pytest.mark.parametrize("max_states", [200_000, 1])
def test_allocation_never_exceeds_the_limit_and_is_optimal(max_states):
    """The Pareto dynamic program is exact; the Lagrangian + greedy fill (its fallback, forced by max_states=1)
    never exceeds the limit either and is exact on most instances."""
    gen = random.Random(0)
    gaps = []
    for _ in range(300):
        n_blocks, n_cands = gen.randint(1, 5), gen.randint(1, 4)
        table = [{f"c{j}": (gen.randint(10, 100), gen.random()) for j in range(n_cands)} for _ in range(n_blocks)]
        points = points_of(table)
        cheapest = sum(min(p.stored_bits for p in b.values()) for b in points)
        most = sum(max(p.stored_bits for p in b.values()) for b in points)
        limit = gen.randint(cheapest, most)
        a = allocate(points, limit, max_states=max_states)
        assert a.stored_bits == sum(b[n].stored_bits for b, n in zip(points, a.choice)) <= limit
        assert a.loss == pytest.approx(sum(b[n].loss for b, n in zip(points, a.choice)))
        optimum = brute_force(points, limit)
        assert a.loss >= optimum - 1e-12
        gaps.append(a.loss - optimum)
    exact = sum(g < 1e-12 for g in gaps)
    if max_states > 1:
        assert exact == len(gaps)
    else:
        assert exact >= 0.9 * len(gaps)


def test_allocation_trades_loss_for_bits_where_it_is_cheapest():
    # Block 0 suffers much more from 2 bits than block 1: at a budget for one 4-bit block, block 0 gets it.
    points = points_of([{"a@2": (200, 1.0), "a@4": (400, 0.0)}, {"a@2": (200, 0.1), "a@4": (400, 0.0)}])
    a = allocate(points, 600)
    assert a.choice == ["a@4", "a@2"] and a.stored_bits == 600 and a.method == "pareto"
    assert allocate(points, 600, max_states=1).choice == ["a@4", "a@2"]
    assert allocate(points, 800).choice == ["a@4", "a@4"]
    assert allocate(points, 400).choice == ["a@2", "a@2"]
    with pytest.raises(BudgetInfeasible, match="raise --bits-budget"):
        allocate(points, 399)


def test_bit_limit_is_exact():
    assert bit_limit(3.25, 1000) == 3250
    assert bit_limit(0.1, 30) == 3  # 0.1 * 30 is 3.0000000000000004 in floats, 3 exactly here
    assert bit_limit(3.3, 10) == 33


# -- the budget search on the tiny model ----------------------------------------------------------------------------

BUDGET_POOL = "rtn@2,rtn@4,gptq@2,gptq@3,gptq@4"


def budget_config(budget, **kw):
    return SearchConfig(pool=parse_pool(BUDGET_POOL), batch_windows=2, bits_budget=budget, **kw)


def exact_effective_bits(blocks):
    totals = [block_stored_bits(b) for b in blocks]
    return sum(b for b, _ in totals), sum(w for _, w in totals)


@pytest.mark.parametrize("budget", [2.8, 3.2, 3.6, 4.4])
def test_budget_search_stays_within_the_budget_by_exact_bits(tiny_model, tmp_path, budget):
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec.from_scheme("W3A16G32")
    outcome = budget_search(tiny_model, windows, spec, budget_config(budget), state_dir=tmp_path)
    assert set(outcome.mixes) == {"calm", "gptq-mp", "gptq-mp-score"}
    for name, mix in outcome.mixes.items():
        blocks = [b.load(decoder_blocks(tiny_model)[i], torch.device("cpu")) for i, b in enumerate(mix.blocks)]
        bits, weights = exact_effective_bits(blocks)
        assert bits == mix.stored_bits and weights == mix.weights
        assert bits <= bit_limit(budget, weights) and bits / weights <= budget
        assert mix.effective_bits == pytest.approx(model_effective_bits(blocks))
        if name != "calm":
            assert all(r["algorithm"] == "gptq" for r in mix.records)
    assert [d.chosen for d in outcome.decisions] == outcome.mixes["calm"].chosen
    record = outcome.record()
    assert record["bits_budget"] == budget and record["loss"] == "cka decrease"
    assert all("sensitivity" in b for b in record["models"]["gptq-mp"]["blocks"])
    json.dumps(record)


def test_budget_search_uses_a_larger_budget_for_lower_loss(tiny_model):
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec.from_scheme("W3A16G32")
    low = budget_search(tiny_model, windows, spec, budget_config(2.8), baselines=False)
    high = budget_search(tiny_model, windows, spec, budget_config(4.5), baselines=False)
    assert set(low.mixes) == {"calm"}
    assert low.mixes["calm"].stored_bits < high.mixes["calm"].stored_bits
    assert sum(r["loss"] for r in high.mixes["calm"].records) <= sum(r["loss"] for r in low.mixes["calm"].records)


def test_blocks_that_come_back_larger_are_repaired_within_the_budget(monkeypatch):
    """The sequential pass re-fits blocks; when a re-fitted block takes more bits than step 1 predicted, the
    remaining blocks are allocated again, and a block that no longer fits is downgraded (repaired)."""
    quantize = calm.search.candidates.quantize

    def heavier(candidate, block, inputs, spec, context):  # a 3-bit re-fit comes back at 4 bits
        bits = 4 if candidate.spec_for(spec).w_bits == 3 else candidate.bits
        return quantize(CandidateSpec(candidate.algorithm, bits=bits), block, inputs, spec, context)

    # Only the sequential pass re-fits through this name; step 1 (calm_search) quantizes as usual.
    monkeypatch.setattr(calm.search.budget, "candidates",
                        SimpleNamespace(quantize=heavier, prepare=calm.search.candidates.prepare))
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    model = tiny_llama(layers=4)
    spec = QuantSpec.from_scheme("W3A16G32")
    config = SearchConfig(pool=parse_pool("rtn@2,gptq@3"), batch_windows=2, bits_budget=3.75)
    outcome = budget_search(model, windows, spec, config, baselines=False)
    mix = outcome.mixes["calm"]
    assert mix.planned[1:] == ["gptq@3"] * 3  # step 1's plan: 3 bits after block 0
    blocks = [b.load(decoder_blocks(model)[i], torch.device("cpu")) for i, b in enumerate(mix.blocks)]
    bits, weights = exact_effective_bits(blocks)
    assert bits == mix.stored_bits <= bit_limit(3.75, weights)
    assert any(r["refitted"] and r["effective_bits"] > 4 for r in mix.records)  # a re-fit came back larger
    assert any(r["repaired"] for r in mix.records)  # a block that no longer fitted was downgraded


def test_a_budget_below_every_candidate_is_refused_before_any_work():
    spec = QuantSpec.from_scheme("W3A16G64")
    with pytest.raises(CalmUsageError, match="below the cheapest candidate's 2-bit codes"):
        check_budget(budget_config(1.5), spec)
    check_budget(budget_config(2.0), spec)
    for bad in (0, -1, 17, float("nan")):
        with pytest.raises(CalmUsageError, match="bits per weight"):
            budget_config(bad)


def test_budget_search_resumes_without_quantizing_again(tiny_model, tmp_path, monkeypatch):
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec.from_scheme("W3A16G32")
    first = budget_search(tiny_model, windows, spec, budget_config(3.2), state_dir=tmp_path)

    def no_quantizing(*args, **kwargs):
        raise AssertionError("a resumed budget search quantized a block again")

    monkeypatch.setattr(calm.search.candidates, "quantize", no_quantizing)
    lines = []
    second = budget_search(tiny_model, windows, spec, budget_config(3.2), state_dir=tmp_path, log=lines.append)
    assert sum("(resumed)" in line for line in lines) == 2
    for name, mix in first.mixes.items():
        assert second.mixes[name].records == mix.records
        for a, b in zip(first.mixes[name].blocks, second.mixes[name].blocks):
            ta = a.load(decoder_blocks(tiny_model)[0], torch.device("cpu")).state_dict()
            tb = b.load(decoder_blocks(tiny_model)[0], torch.device("cpu")).state_dict()
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# -- python -m calm.run --bits-budget -------------------------------------------------------------------------------

def cli_args(model_dir, text, out, *extra):
    return ["--model", str(model_dir), "--text", str(text), "--output", str(out), "--scheme", "W3A16G32",
            "--calib-windows", "4", "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-tokens", "256",
            "--batch-windows", "2", *extra]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a bright jumbo".split()
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) for i in range(60)))
    return path


@pytest.mark.parametrize("extra,words", [
    (["--pool", "gptq@5"], "weight bits after '@' must be one of 2, 3, 4, 8"),
    (["--pool", "gptq@x,rtn"], "write the weight bits after '@' as a number"),
    (["--pool", "claq@8"], "claq codebooks hold 2 to 4 bits"),
    (["--pool", "gptq@2,gptq@4", "--bits-budget", "1.5"], "below the cheapest candidate's 2-bit codes"),
    (["--bits-budget", "0"], "bits per weight, above 0"),
    (["--bits-budget", "nan"], "bits per weight, above 0"),
])
def test_bad_bits_and_budgets_are_refused_before_the_model_loads(capsys, tmp_path, text_file, extra, words):
    # The model path does not exist: an error about the bits proves nothing was loaded before the check.
    code = main(cli_args(tmp_path / "no-model", text_file, tmp_path / "out", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("calm: error:") and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_budget_run_reports_the_hybrid_and_the_mixed_precision_baselines_and_resumes(capsys, tmp_path,
                                                                                      tiny_model_dir, text_file):
    out = tmp_path / "out"
    argv = cli_args(tiny_model_dir, text_file, out, "--pool", "rtn@2;gptq@2;gptq@3;gptq@4", "--bits-budget", "3.2")
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    budget = results["budget"]
    assert budget["bits_budget"] == 3.2 and set(budget["models"]) == {"calm", "gptq-mp", "gptq-mp-score"}
    # Uniform members (at other sizes than the budget) only with --exact-baselines.
    assert {"fp", "gptq-mp", "gptq-mp-score", "calm"} == set(results["perplexity"])
    for name, mix in budget["models"].items():
        assert mix["stored_bits"] <= mix["limit_bits"] == bit_limit(3.2, mix["weights"])
        # The evaluation counts the saved blocks' bits on its own: the same effective bits.
        assert results["effective_bits"][name] == pytest.approx(mix["effective_bits"], rel=1e-12)
        assert results["effective_bits"][name] <= 3.2
        for b in mix["blocks"]:
            assert b["chosen"] == f"{b['algorithm']}@{b['bits']}"
    assert [b["chosen"] for b in results["blocks"]] == [b["chosen"] for b in budget["models"]["calm"]["blocks"]]
    assert [b["chosen"] for b in results["blocks"]] == json.loads(
        (out / "model" / "quantization_config.json").read_text())["chosen"]
    assert "## Bit budget" in (out / "tables.md").read_text()
    saved, _ = load_quantized(out / "model")
    assert model_effective_bits(list(decoder_blocks(saved))) == pytest.approx(results["effective_bits"]["calm"])

    capsys.readouterr()
    assert main(argv) == 0
    assert "(resumed)" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["budget"] == budget and again["perplexity"] == results["perplexity"]


def test_budget_run_resumed_with_another_budget_and_pool_equals_a_fresh_run(capsys, tmp_path, tiny_model_dir,
                                                                          text_file):
    """Step 1 fits every candidate on float inputs: a budget run's folder takes another budget and another pool
    (dropped and added candidates), quantizes only the added ones, and gives what a fresh run gives."""
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert main(cli_args(tiny_model_dir, text_file, out, "--pool", "rtn@2;gptq@2;gptq@3", "--bits-budget", "3.2")) == 0
    argv = ("--pool", "gptq@2;gptq@3;gptq@4", "--bits-budget", "3.6")
    capsys.readouterr()
    assert main(cli_args(tiny_model_dir, text_file, out, *argv)) == 0
    log = capsys.readouterr().out
    assert "only the added candidates are quantized" in log and "candidates left the pool" in log
    assert "bit budget changed (3.2 -> 3.6)" in log and "(completed)" in log
    assert main(cli_args(tiny_model_dir, text_file, fresh, *argv)) == 0
    again, new = (json.loads((d / "results.json").read_text()) for d in (out, fresh))
    assert again["budget"]["bits_budget"] == 3.6 and set(again["blocks"][0]["scores"]) == {"gptq@2", "gptq@3",
                                                                                            "gptq@4"}
    for name, mix in new["budget"]["models"].items():
        assert [(b["chosen"], b["stored_bits"]) for b in again["budget"]["models"][name]["blocks"]] == \
            [(b["chosen"], b["stored_bits"]) for b in mix["blocks"]]
    assert again["perplexity"] == pytest.approx(new["perplexity"], rel=1e-5)
    # Without a budget it is another run.
    assert main(cli_args(tiny_model_dir, text_file, out, "--pool", "gptq@3;gptq@4")) == 2


def test_budget_resumed_under_another_score_equals_a_fresh_budget_search(tiny_model, tmp_path):
    """Step 1 is scored again from its saved blocks; every sequential pass whose plan changed is fitted again
    from the first changed block on, so the outcome is the fresh search's."""
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec.from_scheme("W3A16G32")
    budget_search(tiny_model, windows, spec, budget_config(3.2), state_dir=tmp_path / "a")
    again = budget_search(tiny_model, windows, spec, budget_config(3.2, score="nll"), state_dir=tmp_path / "a")
    fresh = budget_search(tiny_model, windows, spec, budget_config(3.2, score="nll"), state_dir=tmp_path / "b")
    assert again.record()["loss"] == "nll increase"
    for name, mix in fresh.mixes.items():
        assert [(r["chosen"], r["stored_bits"], r["refitted"]) for r in again.mixes[name].records] == \
            [(r["chosen"], r["stored_bits"], r["refitted"]) for r in mix.records]
        for r, s in zip(again.mixes[name].records, mix.records):
            assert r["loss"] == pytest.approx(s["loss"], rel=1e-6, abs=1e-9)
        for a, b in zip(again.mixes[name].blocks, mix.blocks):
            ta = a.load(decoder_blocks(tiny_model)[0], torch.device("cpu")).state_dict()
            tb = b.load(decoder_blocks(tiny_model)[0], torch.device("cpu")).state_dict()
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_group_sizes_are_a_budget_dimension_too(tiny_model):
    """Candidates that differ only in their group size: exact bits per group size, the limit kept, and GPTQ at
    two group sizes is a mixed-precision baseline."""
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec.from_scheme("W3A16G32")
    config = SearchConfig(pool=parse_pool("gptq@3g16;gptq@3g64;gptq@4g64"), batch_windows=2, bits_budget=3.5)
    outcome = budget_search(tiny_model, windows, spec, config)
    assert set(outcome.mixes) == {"calm", "gptq-mp", "gptq-mp-score"}
    for d in outcome.decisions:
        weights = d.scores["gptq@3g16"].weights
        # per group: a float16 scale and an 8-bit zero point (calm.nn.UniformQuantLinear)
        assert d.scores["gptq@3g16"].stored_bits == weights * 3 + weights // 16 * 24
        assert d.scores["gptq@3g64"].stored_bits == weights * 3 + weights // 64 * 24
        assert d.scores["gptq@4g64"].stored_bits == weights * 4 + weights // 64 * 24
    for mix in outcome.mixes.values():
        assert mix.stored_bits <= bit_limit(3.5, mix.weights)
        for r in mix.records:
            assert r["chosen"] == f"gptq@{r['bits']}g{r['group_size']}"


def test_budget_with_the_nll_score_allocates_nll_increases(tiny_model):
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    score_windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    spec = QuantSpec.from_scheme("W3A16G32")
    outcome = budget_search(tiny_model, windows, spec, budget_config(3.6, score="nll"), score_windows=score_windows)
    assert outcome.record()["loss"] == "nll increase"
    for d, r in zip(outcome.decisions, outcome.mixes["calm"].records):
        nll = {n: s.nll for n, s in d.scores.items()}
        assert r["loss"] == pytest.approx(nll[r["chosen"]] - min(nll.values()))
    mix = outcome.mixes["calm"]
    assert mix.stored_bits <= bit_limit(3.6, mix.weights)


@pytest.mark.slow
def test_budget_on_two_blocks_of_the_default_model():
    """Real shapes (SmolLM2: hidden 576, MLP 1536) and every kind of stored bits (G64 codes, CLAQ codebooks)."""
    from calm.model import load_model

    model, _ = load_model(None)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (4, 128), generator=gen)
    spec = QuantSpec.from_scheme("W3A16G64")
    config = SearchConfig(pool=parse_pool("gptq@2;gptq@3;gptq@4;awq@3;claq@3;rtn@4"), bits_budget=3.25,
                          batch_windows=4)
    outcome = budget_search(model, windows, spec, config)
    scores = outcome.decisions[0].scores
    assert scores["gptq@3"].effective_bits == scores["awq@3"].effective_bits == 3.375
    assert scores["gptq@4"].effective_bits == scores["rtn@4"].effective_bits == 4.375
    assert scores["claq@3"].effective_bits < 3.25
    for name, mix in outcome.mixes.items():
        blocks = [b.load(decoder_blocks(model)[i], torch.device("cpu")) for i, b in enumerate(mix.blocks)]
        bits, weights = exact_effective_bits(blocks)
        assert bits == mix.stored_bits <= bit_limit(3.25, weights), name
