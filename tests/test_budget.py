"""Bits as a search dimension: candidates with their own weight bits (`gptq@2`), exact per-block bit accounting,
the bit-budget allocation (calm.search.budget) and its refusals."""
import pytest
import torch

from calm.algorithms import validate_candidate
from calm.config import CalmUsageError, CandidateSpec, QuantSpec, RunConfig, SearchConfig, parse_pool
from calm.nn import block_stored_bits, model_effective_bits
from calm.search import calm_search


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
