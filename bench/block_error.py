"""Block-level error of candidates on one decoder block of the default model (a cheap probe before full runs).

Propagates the calibration windows through the float blocks 0..k-1, quantizes block k with each candidate
on those inputs, and prints the relative error of what the block adds to the residual stream
(||(out_q - x) - (out_fp - x)|| / ||out_fp - x||) and the seconds each candidate took.

    python bench/block_error.py --block 5 --scheme W4A4 rtn gptq rotation "affine:steps=20,batch_tokens=1024"
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm import algorithms  # noqa: E402
from calm.config import CandidateSpec, DataConfig, QuantSpec  # noqa: E402
from calm.data import load_corpus  # noqa: E402
from calm.model import capture_block_inputs, decoder_blocks, load_model, run_block  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("candidates", nargs="+")
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--scheme", default="W4A4")
    p.add_argument("--calib-windows", type=int, default=4)
    args = p.parse_args()
    model, tokenizer = load_model(None)
    corpus = load_corpus(tokenizer, DataConfig(calib_windows=args.calib_windows, eval_tokens=512))
    inputs = capture_block_inputs(model, corpus.calibration, 8)
    blocks = decoder_blocks(model)
    for i in range(args.block):
        inputs = inputs.with_hidden(run_block(blocks[i], inputs))
    block = blocks[args.block]
    ref = [r - h for r, h in zip(run_block(block, inputs), inputs.hidden)]
    spec = QuantSpec.from_scheme(args.scheme)
    for text in args.candidates:
        cand = CandidateSpec.parse(text)
        algorithms.validate_candidate(cand, spec)
        context = algorithms.prepare(cand, list(blocks), spec)
        t = time.perf_counter()
        q = algorithms.quantize_block(cand, copy.deepcopy(block), inputs, spec, context)
        seconds = time.perf_counter() - t
        out = [o - h for o, h in zip(run_block(q, inputs), inputs.hidden)]
        num = sum(float((o - r).square().sum()) for o, r in zip(out, ref))
        den = sum(float(r.square().sum()) for r in ref)
        print(f"{text:45s} block {args.block} {args.scheme}: rel err {(num / den) ** 0.5:.4f}  {seconds:.1f}s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
