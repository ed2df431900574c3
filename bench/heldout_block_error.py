"""Held-out block-output error of candidates on chosen decoder blocks of the default model.

Each listed block is quantized by every candidate on the calibration windows (FP inputs, propagated through
the float blocks before it) and judged on held-out windows: the relative Frobenius error of the block output,
over all tokens and without each window's first token (where the massive activations sit). This is how the
default act-order of GPTQ was chosen (README, "Why static act-order by default").

    python bench/heldout_block_error.py --blocks 3 29 --scheme W3A16G64 rtn "gptq:act_order=none" gptq
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm import algorithms  # noqa: E402
from calm.config import CandidateSpec, DataConfig, QuantSpec  # noqa: E402
from calm.data import load_corpus  # noqa: E402
from calm.model import capture_block_inputs, decoder_blocks, load_model, run_block  # noqa: E402


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).square().sum() / ref.square().sum()) ** 0.5


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("candidates", nargs="+")
    p.add_argument("--blocks", type=int, nargs="+", default=[3, 29])
    p.add_argument("--scheme", default="W3A16G64")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--eval-tokens", type=int, default=4096)
    args = p.parse_args()
    spec = QuantSpec.from_scheme(args.scheme)
    candidates = [CandidateSpec.parse(c) for c in args.candidates]
    for cand in candidates:
        algorithms.validate_candidate(cand, spec)
    model, tokenizer = load_model(None)
    corpus = load_corpus(tokenizer, DataConfig(calib_windows=args.calib_windows, eval_tokens=args.eval_tokens))
    calib = capture_block_inputs(model, corpus.calibration, 8)
    held_out = capture_block_inputs(model, corpus.evaluation, 8)
    print(f"{args.scheme}, calibration {tuple(corpus.calibration.shape)}, held-out {tuple(corpus.evaluation.shape)}")
    for index, block in enumerate(decoder_blocks(model)[:max(args.blocks) + 1]):
        if index in args.blocks:
            ref = torch.cat(run_block(block, held_out))
            cells = []
            for cand in candidates:
                out = torch.cat(run_block(algorithms.quantize_block(cand, copy.deepcopy(block), calib, spec), held_out))
                rest = relative_error(out[:, 1:], ref[:, 1:])
                cells.append(f"{cand.name} {relative_error(out, ref):.4f} / {rest:.4f}")
            print(f"block {index:2d} (all / without first token): " + "  ".join(cells), flush=True)
        calib = calib.with_hidden(run_block(block, calib))
        held_out = held_out.with_hidden(run_block(block, held_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
