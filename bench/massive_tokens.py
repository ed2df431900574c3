"""Why folding the RMS norm weights (the residual rotation's pre-step) hurts activation quantization on the
default model: for the token with the largest residual activation at a block's input, the share of its
normalized vector's energy in that one channel, without the norm's weight (what the quantizer sees once the
weight is folded into the linears) and with it.

    python bench/massive_tokens.py --blocks 4 10 20       # the figures in README / bench/QUALITY.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calm.config import DataConfig  # noqa: E402
from calm.data import load_corpus  # noqa: E402
from calm.model import decoder_blocks, load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 10, 20])
    p.add_argument("--tokens", type=int, default=128, help="tokens of the first calibration window")
    args = p.parse_args(argv)
    model, tokenizer = load_model(None)
    ids = load_corpus(tokenizer, DataConfig(calib_windows=1)).calibration[:1, :args.tokens]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    print("| block | token | channel | value | norm weight there (median) | share unweighted | share weighted |")
    print("|---|---|---|---|---|---|---|")
    for index in args.blocks:
        h = hidden[index][0]  # the input of block `index`
        token = int(h.abs().amax(1).argmax())
        channel = int(h[token].abs().argmax())
        n = h[token] / h[token].pow(2).mean().sqrt()
        g = decoder_blocks(model)[index].input_layernorm.weight.detach()
        share = float(n[channel] ** 2 / n.pow(2).sum())
        weighted = float((n[channel] * g[channel]) ** 2 / (n * g).pow(2).sum())
        print(f"| {index} | {token} | {channel} | {float(h[token, channel]):.0f} | {float(g[channel]):.4f} "
              f"({float(g.abs().median()):.3f}) | {share:.3f} | {weighted:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
