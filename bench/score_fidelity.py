"""How well does each block score predict what a candidate does to the model's perplexity?

For each listed decoder block of the default model (FP inputs: every block before it stays float), every
candidate quantizes the block on the calibration windows and is scored on them by several block scores:

- `cka`         linear CKA of the raw block outputs (the residual stream);
- `cka-normed`  linear CKA after the RMS normalization the next consumer applies (the next block's input norm,
                the final norm after the last block), with that norm's weight;
- `cka-rms`     the same without the norm's weight;
- `mse`         mean squared error of the raw outputs (lower is better; reported as its negative);
- `cka-final`, `mse-final`  the same at the model's last normalized hidden state (what the LM head reads)
                with the float blocks after the candidate;
- `nll`         the model's next-token NLL on the scoring windows with the candidate and the float blocks after
                it (lower is better; reported as its negative).

With --score-windows N each score is also computed on N other calibration windows (`<score>@other`): the
candidates were fitted on the calibration windows, so scores there favour the algorithms that fit them most
closely (GPTQ) whether or not that carries over to other text.

The ground truth is the held-out mean NLL of the model with that one block replaced by the candidate (all
other blocks float). Per score, the script reports how often its pick is the ground-truth best, and the summed
NLL excess of its picks over the best pick: the score with the smallest excess is the one to search with.

    python bench/score_fidelity.py --scheme W3A16G64 --blocks 0 1 2 3 5 8 11 12 16 20 24 28 29 rtn gptq awq
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm import algorithms  # noqa: E402
from calm.config import CandidateSpec, DataConfig, QuantSpec  # noqa: E402
from calm.data import calibration_windows, load_corpus, load_split, tokenize  # noqa: E402
from calm.io import atomic_write_json  # noqa: E402
from calm.model import (  # noqa: E402
    BlockInputs,
    capture_block_inputs,
    consumer_norm,
    decoder_blocks,
    final_hidden,
    load_model,
    run_block,
)
from calm.search import block_scores, next_token_nll  # noqa: E402

BLOCK_SCORES = ("cka", "cka-normed", "cka-rms", "mse", "cka-final", "mse-final", "nll")


def tail_nll(model: nn.Module, start: int, first_block: nn.Module, inputs: BlockInputs,
             targets: torch.Tensor) -> float:
    """Mean next-token NLL when `first_block` replaces block `start` and the float blocks after it follow."""
    return next_token_nll(model, final_hidden(model, start, run_block(first_block, inputs), inputs), targets)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("candidates", nargs="+")
    p.add_argument("--blocks", type=int, nargs="+", default=None, help="block indices (default: all)")
    p.add_argument("--scheme", default="W3A16G64")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--score-windows", type=int, default=0,
                   help="also score on this many other calibration windows (drawn with seed+1), not the fitted ones")
    p.add_argument("--json", type=Path, default=None, help="write the per-block table here")
    args = p.parse_args()
    spec = QuantSpec.from_scheme(args.scheme)
    candidates = [CandidateSpec.parse(c) for c in args.candidates]
    for cand in candidates:
        algorithms.validate_candidate(cand, spec)
    model, tokenizer = load_model(None)
    corpus = load_corpus(tokenizer, DataConfig(calib_windows=args.calib_windows, eval_tokens=args.eval_tokens))
    blocks = list(decoder_blocks(model))
    wanted = set(range(len(blocks)) if args.blocks is None else args.blocks)
    contexts = {c.name: algorithms.prepare(c, blocks, spec) for c in candidates}
    calib = capture_block_inputs(model, corpus.calibration, 8)
    held_out = capture_block_inputs(model, corpus.evaluation, 8)
    sets = {"": calib}
    tokens = {"": corpus.calibration}
    if args.score_windows:
        ids = tokenize(tokenizer, load_split(None).calibration)
        tokens["@other"] = calibration_windows(ids, args.score_windows, 512, 1)
        sets["@other"] = capture_block_inputs(model, tokens["@other"], 8)
    scores_names = [s + suffix for suffix in sets for s in BLOCK_SCORES]
    fp_nll = tail_nll(model, 0, blocks[0], held_out, corpus.evaluation)
    print(f"{args.scheme}, calibration {tuple(corpus.calibration.shape)}, held-out {tuple(corpus.evaluation.shape)}, "
          f"FP NLL {fp_nll:.5f}", flush=True)
    rows = []
    for index, block in enumerate(blocks):
        if index in wanted:
            t0 = time.perf_counter()
            references = {k: run_block(block, v) for k, v in sets.items()}
            finals = {k: final_hidden(model, index, references[k], v) for k, v in sets.items()}
            norm = consumer_norm(model, index)
            row = {"block": index, "candidates": {}}
            for cand in candidates:
                qblock = algorithms.quantize_block(cand, copy.deepcopy(block), calib, spec, contexts[cand.name])
                scores = {}
                for suffix, inputs in sets.items():
                    outs = run_block(qblock, inputs)
                    for s in ("cka", "cka-normed", "cka-rms"):
                        scores[s + suffix] = block_scores(references[suffix], outs, s, norm)[0]
                    scores["mse" + suffix] = -block_scores(references[suffix], outs, "cka", norm)[1]
                    cka, mse, _ = block_scores(finals[suffix], final_hidden(model, index, outs, inputs))
                    scores["cka-final" + suffix], scores["mse-final" + suffix] = cka, -mse
                    scores["nll" + suffix] = -tail_nll(model, index, qblock, inputs, tokens[suffix])
                scores["nll_excess"] = tail_nll(model, index, qblock, held_out, corpus.evaluation) - fp_nll
                row["candidates"][cand.name] = scores
            truth = min(row["candidates"], key=lambda n: row["candidates"][n]["nll_excess"])
            row["best"] = truth
            row["picks"] = {s: max(row["candidates"], key=lambda n: row["candidates"][n][s]) for s in scores_names}
            rows.append(row)
            cells = "  ".join(f"{n}: nll+{v['nll_excess']:.4f} cka {v['cka']:.6f} normed {v['cka-normed']:.6f}"
                              + (f" normed@other {v['cka-normed@other']:.6f}" if "@other" in sets else "")
                              for n, v in row["candidates"].items())
            print(f"block {index:2d} best {truth:<6} picks {row['picks']}  {cells}  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
        calib = calib.with_hidden(run_block(block, calib))
        sets = {k: (calib if k == "" else v.with_hidden(run_block(block, v))) for k, v in sets.items()}
        held_out = held_out.with_hidden(run_block(block, held_out))
    print("\nscore        right  NLL excess of its picks over the best picks (summed over blocks)")
    summary = {}
    for s in scores_names:
        right = sum(r["picks"][s] == r["best"] for r in rows)
        excess = sum(r["candidates"][r["picks"][s]]["nll_excess"] - r["candidates"][r["best"]]["nll_excess"]
                     for r in rows)
        summary[s] = {"right": right, "blocks": len(rows), "excess_nll": excess}
        print(f"{s:<12} {right:>2}/{len(rows)}  {excess:.5f}")
    if args.json is not None:
        atomic_write_json(args.json, {"scheme": args.scheme, "candidates": [c.name for c in candidates],
                                      "calib_windows": args.calib_windows, "eval_tokens": args.eval_tokens,
                                      "fp_nll": fp_nll, "summary": summary, "blocks": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
