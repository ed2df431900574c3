"""The Python API: quantize a model you hold in memory with the CALM search, in one call.

    import calm
    model, report = calm.quantize(model, tokenizer, scheme="W4A16G64", pool="rtn,gptq",
                                  calibration=["some text", "more text"])

Like llm-compressor's `oneshot` or torchao's `quantize_`, it changes the model in place: every decoder block
is replaced by the chosen candidate's quantized block (calm.nn modules), and it returns the model with a report
of every block's decision. `python -m calm.run` is the command line around the same search, with evaluation,
resume and saving on top; `calm.io.save_quantized(model, tokenizer, path)` saves what this returns.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calm.config import CalmUsageError, QuantSpec, SearchConfig, parse_pool
from calm.data import fitting_and_scoring_windows, load_split, tokenize
from calm.model import decoder_blocks
from calm.nn import model_effective_bits
from calm.search import BlockDecision, calm_search, install_blocks
from calm.search.candidates import validate
from calm.streaming import MemorySource

Calibration = torch.Tensor | Sequence[str] | str | os.PathLike | None


@dataclasses.dataclass
class QuantizationReport:
    """What `quantize` did: the scheme, the pool, every block's decision (scores of every candidate) and the
    effective bits per weight of the decoder linears (every stored byte counted)."""
    scheme: str
    pool: list[str]
    decisions: list[BlockDecision]
    effective_bits: float
    seconds: float

    @property
    def chosen(self) -> list[str]:
        return [d.chosen for d in self.decisions]

    def to_dict(self) -> dict[str, Any]:
        """The `blocks` list of results.json beside the scheme, pool, bits and time."""
        return {"scheme": self.scheme, "pool": self.pool, "effective_bits": self.effective_bits,
                "seconds": self.seconds, "blocks": [d.to_dict() for d in self.decisions]}


def calibration_windows(calibration: Calibration, tokenizer, windows: int, seqlen: int, seed: int,
                        score_windows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fitting windows (n, T), scoring windows or None) from what the user gives: token ids (n, T) used as they
    are, texts (a list of strings or a text file's path) tokenized and cut into windows drawn with `seed`, or None
    for the calibration half of the embedded Wikipedia text."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int32, torch.int64):
            raise CalmUsageError(f"calibration token ids must be an integer tensor (windows, tokens), got "
                                 f"{calibration.dtype} of shape {tuple(calibration.shape)}")
        if score_windows:
            raise CalmUsageError("score_windows needs calibration text to draw them from; with token ids, pass "
                                 "score_windows=0")
        return calibration.long(), None
    if tokenizer is None:
        raise CalmUsageError("calibration text needs the model's tokenizer: quantize(model, tokenizer, ...)")
    if calibration is None:
        text = load_split(None).calibration
    elif isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        if not path.is_file():
            raise CalmUsageError(f"calibration file {path} does not exist (pass token ids, a list of strings or a "
                                 f"text file)")
        text = path.read_text(encoding="utf-8")
    else:
        text = "\n\n".join(calibration)
    return fitting_and_scoring_windows(tokenize(tokenizer, text), windows, score_windows, seqlen, seed)


def quantize(model: nn.Module, tokenizer=None, *, scheme: str = "W3A16G64", pool: str = "rtn,gptq",
             calibration: Calibration = None, calib_windows: int = 16, calib_seqlen: int = 512, seed: int = 0,
             score_windows: int = 0, propagation: str = "greedy", score: str = "cka", symmetric: bool = False,
             kv_group_size: int = 0, batch_windows: int = 8, device: str | torch.device | None = None,
             state_dir: str | os.PathLike | None = None) -> tuple[nn.Module, QuantizationReport]:
    """Quantize `model` (a Hugging Face causal LM in memory) with the CALM search; returns (model, report).

    Args:
        model, tokenizer: the float model (changed in place) and its tokenizer (needed to tokenize text).
        scheme: `W{bits}A{bits}[K{bits}V{bits}][G{group}]`, e.g. W4A16G64, W3A16, W4A4.
        pool: the candidates, as `--pool` takes them: "rtn,gptq", "rtn;gptq:act_order=none;awq".
        calibration: token ids (windows, tokens), a list of strings, a text file's path, or None for the
            embedded Wikipedia text; `calib_windows` windows of `calib_seqlen` tokens are drawn with `seed`.
        score_windows: score candidates on this many other windows of the calibration text (0: the fitting ones).
        propagation, score: the search's `greedy`/`independent` propagation and its score (`cka`, ..., `nll`).
        symmetric, kv_group_size: the weight grid's symmetry; the KV groups of schemes with K/V bits.
        batch_windows: windows per forward pass.
        device: where each block is quantized (default: where the model is); blocks move there one at a time.
        state_dir: a folder for per-block state, so an interrupted call resumes there.
    """
    spec = QuantSpec.from_scheme(scheme, symmetric=symmetric, kv_group_size=kv_group_size)
    config = SearchConfig(pool=parse_pool(pool), propagation=propagation, score=score, batch_windows=batch_windows)
    for candidate in config.pool:
        validate(candidate, spec)
    ref = next(model.parameters())
    source = MemorySource(model, tokenizer, device or ref.device, ref.dtype)
    fitting, scoring = calibration_windows(calibration, tokenizer, calib_windows, calib_seqlen, seed, score_windows)
    start = time.perf_counter()
    outcome = calm_search(source, fitting, spec, config, state_dir=None if state_dir is None else Path(state_dir),
                          score_windows=scoring)
    install_blocks(model, [block.to(source.home) for block in outcome.chosen_blocks])
    return model, QuantizationReport(spec.scheme, [c.name for c in config.pool], outcome.decisions,
                                     model_effective_bits(list(decoder_blocks(model))), time.perf_counter() - start)
