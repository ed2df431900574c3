"""Typed algorithm options: parsing, validation before any work, help text; the shared GPTQ column loop."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from calm import algorithms
from calm.algorithms.gptq_core import column_loop, inverse_cholesky, prepare_problem
from calm.algorithms.options import AlgorithmOptions
from calm.config import CalmUsageError, CandidateSpec, QuantSpec, parse_pool


@pytest.mark.parametrize("name", algorithms.available())
def test_every_algorithm_has_typed_options_that_round_trip(name):
    algorithm = algorithms.get(name)
    assert issubclass(algorithm.options, AlgorithmOptions)
    defaults = algorithm.options()
    assert type(defaults).parse(defaults.to_dict()) == defaults
    for f in dataclasses.fields(defaults):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


@pytest.mark.parametrize("text, message", [
    ("gptq:damp=0", "gptq option damp must be > 0"),
    ("gptq:act_order=sideways", "gptq option act_order must be one of none, static, full"),
    ("gptq:block_size=1.5", "gptq option block_size must be int"),
    ("gptq:true_sequential=1", "gptq option true_sequential must be bool"),
    ("gptq:dmap=0.1", "algorithm 'gptq' has no option dmap"),
    ("affine:steps=-1", "affine option steps must be >= 0"),
    ("affine:clip_init=always", "affine option clip_init must be one of auto"),
    ("rotation:clip_ratio=1.5", "rotation option clip_ratio must be in (0.0, 1.0]"),
    ("claq:bits_target=5", "claq option bits_target must be in [2.0, 4.0]"),
    ("awq:max_shrink=1", "awq option max_shrink must be in [0.0, 1.0)"),
    ("kurtosis:scope=layer", "kurtosis option scope must be one of model, block"),
    ("smoothquant:alpha=true", "smoothquant option alpha must be float"),
])
def test_bad_option_values_are_refused_with_the_option_named(text, message):
    (candidate,) = parse_pool(text)
    with pytest.raises(CalmUsageError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        algorithms.parse_options(candidate)


def test_values_keep_their_types_and_ints_widen_to_floats():
    opts = algorithms.parse_options(CandidateSpec.parse("affine:steps=5,lr=1,clip_init=0.9"))
    assert (opts.steps, opts.lr, opts.clip_init) == (5, 1.0, 0.9)
    assert isinstance(opts.lr, float)
    assert algorithms.parse_options(CandidateSpec.parse("claq")).bits_target is None
    assert algorithms.parse_options(CandidateSpec.parse("claq:bits_target=3")).bits_target == 3.0


def test_private_context_names_are_not_options():
    with pytest.raises(CalmUsageError, match="has no option _population"):
        algorithms.validate_candidate(CandidateSpec("kurtosis", {"_population": {}}), QuantSpec.from_scheme("W4A4"))


def test_options_of_fills_defaults_as_saved_beside_each_block():
    saved = algorithms.options_of(CandidateSpec.parse("gptq:damp=0.02"))
    assert saved == {"act_order": "static", "damp": 0.02, "block_size": 128, "true_sequential": True,
                     "clip_ratio": 1.0}


def test_list_algorithms_text_names_every_algorithm_and_option():
    text = algorithms.describe()
    for name in algorithms.available():
        assert f"\n{name}: " in "\n" + text
        for f in dataclasses.fields(algorithms.get(name).options):
            assert f"    {f.name} (" in text


def test_bad_option_fails_before_the_model_is_loaded(tmp_path, capsys):
    from calm.run import main

    missing_model = tmp_path / "no-such-model"
    code = main(["--model", str(missing_model), "--pool", "rtn;gptq:damp=-1", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "gptq option damp must be > 0" in err
    assert "no-such-model" not in err
    assert not (tmp_path / "out").exists()


def _gptq_by_hand(w: torch.Tensor, hinv: torch.Tensor, step: float) -> torch.Tensor:
    """Unbatched GPTQ onto a grid of `step`: quantize a column, spread its error over all later columns at once."""
    w = w.clone()
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = torch.round(w[:, j] / step) * step
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j:] -= err.unsqueeze(1) * hinv[j, j:].unsqueeze(0)
    return q


@pytest.mark.parametrize("block_size", [1, 5, 16, 40])
def test_lazy_batched_column_loop_equals_the_unbatched_update(block_size):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400, 40, generator=gen, dtype=torch.float64)
    w, h = prepare_problem(torch.randn(12, 40, generator=gen), 2 * x.T @ x / 400)
    w, hinv = w.double(), inverse_cholesky(h, 0.01).double()
    step = 0.25
    expected = _gptq_by_hand(w, hinv, step)
    got = torch.zeros_like(w)

    def on_grid(col, i, w_block):
        got[:, col] = torch.round(w_block[:, i] / step) * step
        return got[:, col]

    column_loop(w, hinv, block_size, on_grid)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_list_algorithms_flag_prints_the_generated_help(capsys):
    from calm.run import main

    assert main(["--list-algorithms"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == algorithms.describe().strip()
    assert "gptq: GPTQ" in out and "    damp (float, default 0.01, > 0.0)" in out
