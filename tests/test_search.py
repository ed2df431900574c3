"""The search loop on a tiny random LLaMA: decisions, tie-breaking, state on disk, resume."""
import json

import pytest
import torch

from calm.config import QuantSpec, SearchConfig, parse_pool
from calm.search import CandidateScore, calm_search, choose


def score(cka, mse):
    return CandidateScore(cka=cka, mse=mse, rel_err=0.0, seconds=0.0, score_seconds=0.0)


def test_choose_highest_cka_then_lowest_mse_on_ties():
    assert choose({"a": score(0.99, 1.0), "b": score(0.98, 0.1)}, 1e-7) == "a"
    assert choose({"a": score(0.99, 1.0), "b": score(0.99 - 1e-9, 0.1)}, 1e-7) == "b"


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
    x = torch.randint(0, 256, (1, 8))
    for a, b in zip(first.chosen_blocks, second.chosen_blocks):
        for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb and torch.equal(ta, tb)
