"""Shared fixtures: a tiny random LLaMA for fast tests; the real default model for slow ones.

Every test starts from torch, numpy and `random` seeded from its own node id (`test_seed`), so a test that
forgets its generator is still reproducible. Tests outside tests/kernels never launch Triton: the launchers
run the PyTorch reference on CPU tensors unless TRITON_INTERPRET=1, which only the kernel tests' own pytest
process sets (`make test`); a process that has it set and collects other tests is refused.
"""
from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

KERNEL_TESTS = Path(__file__).resolve().parent / "kernels"


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # the rule of calm_kernels._dispatch.interpreter_enabled


def _is_kernel_test(item: pytest.Item) -> bool:
    return KERNEL_TESTS in Path(item.path).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _interpreter_on():
        return
    outside = [item.nodeid for item in items if not _is_kernel_test(item)]
    if outside:
        raise pytest.UsageError(
            f"TRITON_INTERPRET=1 is set, but {len(outside)} tests outside tests/kernels were collected "
            f"(first: {outside[0]}); under the interpreter they would run Triton kernels on CPU tensors. Run them "
            "in a process without TRITON_INTERPRET and tests/kernels in its own (make test does both).")


@pytest.fixture
def test_seed(request: pytest.FixtureRequest) -> int:
    """A fixed seed per test: the CRC32 of its node id (stable across runs, orders and -k selections)."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _seeded_rngs(test_seed: int) -> None:
    """Safety net: the global RNGs start from the test's own seed (tests should still pass a generator)."""
    random.seed(test_seed)
    np.random.seed(test_seed)
    torch.manual_seed(test_seed)  # also seeds every CUDA device


@pytest.fixture(autouse=True)
def _no_interpreter_outside_kernels(request: pytest.FixtureRequest) -> None:
    """Also catches TRITON_INTERPRET set after collection (by a fixture or an earlier test that leaked it)."""
    if _interpreter_on() and not _is_kernel_test(request.node):
        pytest.fail(f"TRITON_INTERPRET=1 in {request.node.nodeid}: only tests/kernels may run under the interpreter")


def tiny_llama(hidden: int = 64, layers: int = 2, intermediate: int = 128, vocab: int = 256, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny LLaMA saved as a Hugging Face folder with a real (character-level) tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama()
    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["<unk>"] = 95
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def default_model():
    """The real embedded SmolLM2-135M (float32, CPU)."""
    from calm.model import load_model

    return load_model(None)


class RecordingBar:
    """Stands in for calm.progress.progress: records the total and every update."""

    def __init__(self, bars, iterable=None, total=None, desc="", unit="it"):
        self.iterable, self.total, self.desc, self.unit, self.done = iterable, total, desc, unit, 0
        bars.append(self)

    def __iter__(self):
        for item in self.iterable:
            self.done += 1
            yield item

    def update(self, n=1):
        self.done += n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def recorded_bars(monkeypatch):
    """Replace the progress bar of the given modules by a recorder; returns (install, bars)."""
    bars: list[RecordingBar] = []

    def install(module, attribute="progress"):
        monkeypatch.setattr(module, attribute, lambda *args, **kw: RecordingBar(bars, *args, **kw))

    return install, bars
