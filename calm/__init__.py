"""calm: CKA-guided per-block choice among post-training quantization algorithms for causal LMs."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """Load a model saved by `python -m calm.run` (or `calm.io.save`) as a working quantized model."""
    from calm.io import load_quantized

    return load_quantized(path, device=device)
