"""Held-out perplexity of pool candidates with only the first N decoder blocks quantized (the rest float).

A cheaper stand-in for `python -m calm.run` when a CPU cannot afford every candidate on every block: each
candidate quantizes blocks 0..N-1 on the float model's block inputs (independent propagation, so all
candidates see the same inputs, computed once), then the model with those N blocks replaced is evaluated
with the GPTQ perplexity protocol (calm.evaluate). Same calibration and evaluation text as calm.run.
Prints a table (PPL, effective bits of the quantized blocks, quantize seconds per block) and writes JSON.

    python bench/pool_partial.py --scheme W3A16 --blocks 8 --eval-tokens 8192 \
        --pool "gptq;claq;claq:bits_target=3.12;claq:bits_target=2.1;claq:bits_target=2.1,outliers=true"
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calm import algorithms  # noqa: E402
from calm.config import DataConfig, QuantSpec, parse_pool  # noqa: E402
from calm.data import load_corpus  # noqa: E402
from calm.evaluate import perplexity  # noqa: E402
from calm.model import capture_block_inputs, decoder_blocks, load_model, run_block  # noqa: E402
from calm.nn import model_effective_bits, release_caches  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default="W3A16")
    p.add_argument("--pool", required=True)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--calib-windows", type=int, default=DataConfig().calib_windows)
    p.add_argument("--output", default=None, help="JSON file for the results")
    args = p.parse_args()
    spec = QuantSpec.from_scheme(args.scheme)
    pool = parse_pool(args.pool)
    for cand in pool:
        algorithms.validate_candidate(cand, spec)

    model, tokenizer = load_model(None)
    data = DataConfig(eval_tokens=args.eval_tokens, calib_windows=args.calib_windows)
    corpus = load_corpus(tokenizer, data)
    layers = decoder_blocks(model)
    fp_blocks = list(layers)
    n = min(args.blocks, len(fp_blocks))
    t = time.perf_counter()
    ppl = {"fp": perplexity(model, corpus.evaluation, batch_windows=4)}
    print(f"fp: {ppl['fp']:.3f} ({time.perf_counter() - t:.0f}s)", flush=True)

    inputs = capture_block_inputs(model, corpus.calibration, 8)
    quantized = {c.name: [] for c in pool}
    seconds = {c.name: [] for c in pool}
    for i in range(n):
        for cand in pool:
            t = time.perf_counter()
            qb = algorithms.quantize_block(cand, copy.deepcopy(fp_blocks[i]), inputs, spec)
            seconds[cand.name].append(time.perf_counter() - t)
            release_caches(qb)
            quantized[cand.name].append(qb)
        inputs = inputs.with_hidden(run_block(fp_blocks[i], inputs))
        print(f"block {i + 1}/{n}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in seconds.items()), flush=True)

    bits = {}
    for cand in pool:
        for i in range(n):
            layers[i] = quantized[cand.name][i]
        t = time.perf_counter()
        ppl[cand.name] = perplexity(model, corpus.evaluation, batch_windows=4)
        bits[cand.name] = model_effective_bits(quantized[cand.name])
        for i in range(n):
            release_caches(layers[i])
            layers[i] = fp_blocks[i]
        print(f"{cand.name}: {ppl[cand.name]:.3f} ({time.perf_counter() - t:.0f}s)", flush=True)

    ev = corpus.evaluation
    lines = [f"Scheme {spec.scheme}, blocks 0..{n - 1} of {len(fp_blocks)} quantized (rest float), independent "
             f"propagation, calibration {tuple(corpus.calibration.shape)}, held-out PPL at T={ev.shape[1]} on "
             f"{ev.numel()} tokens", "",
             "| candidate | PPL | effective bits (quantized blocks) | quantize s/block |", "|---|---|---|---|",
             f"| fp | {ppl['fp']:.3f} | 16 | |"]
    for cand in pool:
        s = seconds[cand.name]
        lines.append(f"| {cand.name} | {ppl[cand.name]:.3f} | {bits[cand.name]:.3f} | {sum(s) / len(s):.1f} |")
    print("\n" + "\n".join(lines))
    if args.output:
        Path(args.output).write_text(json.dumps({"scheme": spec.scheme, "blocks": n, "perplexity": ppl,
                                                 "effective_bits": bits, "quantize_seconds": seconds,
                                                 "eval_tokens": int(ev.numel()), "seqlen": int(ev.shape[1]),
                                                 "calibration": list(corpus.calibration.shape)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
