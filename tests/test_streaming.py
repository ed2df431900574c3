"""Block streaming: a checkpoint read piece by piece gives what the model in memory gives, and never is whole."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import calm.io
from calm.config import CalmUsageError, QuantSpec, SearchConfig, parse_pool
from calm.evaluate import streamed_window_nll, window_nll
from calm.io import WEIGHTS_INDEX, load_quantized
from calm.residual_rotation import RotationOnLoad, rotate_residual
from calm.search import calm_search, install_blocks
from calm.search.loop import save_streamed
from calm.streaming import CheckpointSource


@pytest.fixture
def windows():
    return torch.randint(0, 95, (4, 32), generator=torch.Generator().manual_seed(5))


def _memory_model(folder):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.config.use_cache = False
    return model


def _all_meta(source) -> bool:
    return all(p.device.type == "meta" for p in source.model.parameters())


def test_streamed_evaluation_equals_the_whole_model(tiny_model_dir, windows):
    source = CheckpointSource(tiny_model_dir, None, "cpu", torch.float32)
    got = streamed_window_nll(source, windows, batch_windows=3)
    assert torch.equal(got, window_nll(_memory_model(tiny_model_dir), windows, batch_windows=3))
    assert _all_meta(source)


@pytest.mark.parametrize("score", ["cka", "cka-normed", "nll"])
def test_streamed_search_equals_the_search_in_memory(tiny_model_dir, windows, tmp_path, score):
    spec = QuantSpec.from_scheme("W3A16G32")
    cfg = SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2, score=score)
    source = CheckpointSource(tiny_model_dir, None, "cpu", torch.float32)
    streamed = calm_search(source, windows, spec, cfg, state_dir=tmp_path / "s")
    memory = calm_search(_memory_model(tiny_model_dir), windows, spec, cfg)
    assert [d.to_dict() | {"scores": None} for d in streamed.decisions] == \
           [d.to_dict() | {"scores": None} for d in memory.decisions]
    for a, b in zip(streamed.decisions, memory.decisions):
        for name in a.scores:
            assert (a.scores[name].cka, a.scores[name].mse, a.scores[name].nll) == \
                   (b.scores[name].cka, b.scores[name].mse, b.scores[name].nll)
    assert _all_meta(source)
    # No quantized block is held: they are read back from the state folder when asked for.
    assert all(s.module is None and s.path.is_file() for blocks in streamed.candidate_blocks.values() for s in blocks)
    a, b = streamed.block("gptq", 1).state_dict(), memory.block("gptq", 1).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_activation_budget_does_not_change_the_search(tiny_model_dir, windows):
    spec = QuantSpec.from_scheme("W3A16G32")
    cfg = SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2)
    results = []
    for budget in (None, 0):
        source = CheckpointSource(tiny_model_dir, None, "cpu", torch.float32)
        source.activation_budget = budget
        outcome = calm_search(source, windows, spec, cfg)
        results.append(([d.to_dict() for d in outcome.decisions],
                        streamed_window_nll(source, windows, outcome.block_for_hybrid())))
    for k in ("seconds", "score_seconds"):
        for decisions, _ in results:
            for d in decisions:
                for s in d["scores"].values():
                    s.pop(k)
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_streamed_save_loads_to_the_same_logits(tiny_model_dir, windows, tmp_path, monkeypatch, shard_bytes):
    if shard_bytes is not None:
        monkeypatch.setattr(calm.io, "MAX_SHARD_BYTES", shard_bytes)
    spec = QuantSpec.from_scheme("W3A16G32")
    source = CheckpointSource(tiny_model_dir, None, "cpu", torch.float32)
    outcome = calm_search(source, windows, spec, SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2),
                          state_dir=tmp_path / "state")
    save_streamed(source, outcome.hybrid(), tmp_path / "model")
    reloaded, _ = load_quantized(tmp_path / "model")
    memory = _memory_model(tiny_model_dir)
    install_blocks(memory, outcome.chosen_blocks)
    assert torch.equal(reloaded(windows).logits, memory(windows).logits)
    index = tmp_path / "model" / WEIGHTS_INDEX
    assert index.is_file() == (shard_bytes is not None)
    if shard_bytes is not None:
        files = set(json.loads(index.read_text())["weight_map"].values())
        assert len(files) > 2 and all((tmp_path / "model" / f).is_file() for f in files)


def test_rotation_applied_on_load_equals_the_rotated_model(tiny_model_dir, windows):
    source = CheckpointSource(tiny_model_dir, None, "cpu", torch.float32)
    source.load_hooks.append(RotationOnLoad(source.model, "hadamard", seed=3))
    rotated = _memory_model(tiny_model_dir)
    rotate_residual(rotated, "hadamard", seed=3)
    got = streamed_window_nll(source, windows, batch_windows=2)
    assert torch.allclose(got, window_nll(rotated, windows, batch_windows=2), rtol=0, atol=1e-5)
    assert torch.allclose(got, window_nll(_memory_model(tiny_model_dir), windows, batch_windows=2), rtol=0,
                          atol=1e-4)


def test_a_device_without_room_for_one_block_is_refused(tiny_model_dir):
    source = CheckpointSource(tiny_model_dir, None, "cpu", torch.float32)
    block = source.block_bytes()
    assert block == sum(p.numel() for p in source.model.model.layers[0].parameters()) * 4
    source.device = torch.device("cuda")  # the check only reads sizes: no CUDA needed to test it
    source.check_device_room(free_bytes=10 * block)
    with pytest.raises(CalmUsageError, match="GiB free, and one decoder block"):
        source.check_device_room(free_bytes=block)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_whole_search_on_cuda_matches_the_cpu(tiny_model_dir, windows, tmp_path):
    spec = QuantSpec.from_scheme("W3A16G32")
    cfg = SearchConfig(pool=parse_pool("rtn,gptq"), batch_windows=2)
    runs = {}
    for device in ("cpu", "cuda"):
        source = CheckpointSource(tiny_model_dir, None, device, torch.float32)
        outcome = calm_search(source, windows, spec, cfg, state_dir=tmp_path / device)
        runs[device] = (outcome, streamed_window_nll(source, windows, outcome.block_for_hybrid()))
    assert [d.chosen for d in runs["cpu"][0].decisions] == [d.chosen for d in runs["cuda"][0].decisions]
    assert torch.allclose(runs["cpu"][1], runs["cuda"][1], rtol=1e-3)
