"""calm: CKA-guided per-block choice among post-training quantization algorithms for causal LMs.

`calm.quantize(model, tokenizer, ...)` quantizes a model in memory (calm.api); `calm.load(path)` reads a model
that calm saved. Importing calm loads neither torch nor any kernel: both functions import on first call.
Importing calm also teaches transformers to load calm checkpoints (`AutoModelForCausalLM.from_pretrained`,
calm.hf_quantizer), through an import hook that registers calm when transformers' quantizers are imported.
"""
from __future__ import annotations

from calm import _transformers_hook

__version__ = "0.1.0"

_transformers_hook.install()


def quantize(model, tokenizer=None, **options):
    """Quantize `model` in place with the CALM search; returns (model, report). See calm.api.quantize."""
    from calm.api import quantize as _quantize

    return _quantize(model, tokenizer, **options)


def load(path, device: str = "cpu"):
    """Load a model saved by `python -m calm.run` (or `calm.io.save_quantized`) as a working quantized model."""
    from calm.io import load_quantized

    return load_quantized(path, device=device)
