"""Shared fixtures: a tiny random LLaMA for fast tests; the real default model for slow ones."""
from __future__ import annotations

import os

import pytest
import torch

# Tests never launch Triton outside tests/kernels (which runs in its own process under the interpreter).
os.environ.setdefault("CALM_FORCE_REFERENCE", "0")


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
