"""Per-layer quantization time of each pool algorithm on one real decoder block of the default model.

The block's calibration inputs are the FP model's (same calibration as `python -m calm.run`: 16 x 512 tokens,
seed 0). Per linear: RTN, GPTQ, CLAQ (batched codebook fits, the default, and one K-means per column as in
CLAQ's reference code), and the K-means alone: calm_kernels.kmeans over all columns at once against
scikit-learn's KMeans one column at a time (timed on 32 columns, scaled); AWQ and SmoothQuant work on the
whole block (their scale groups span several linears), so their block time is reported and divided by the
number of linears. Wall-clock seconds on this machine (CPU, shared: figures are upper bounds of the
algorithms' cost), written to bench/results/pool-layer-times-<device>.json and printed as a table.

    python bench/pool_layer_times.py --block 5            # the measurement in bench/QUALITY.md
    python bench/pool_layer_times.py --smoke              # tiny random model, seconds
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from calm import algorithms  # noqa: E402
from calm.algorithms.claq import claq_quantize_weight  # noqa: E402
from calm.algorithms.gptq import HessianAccumulator, gptq_quantize_weight  # noqa: E402
from calm.config import CandidateSpec, DataConfig, QuantSpec  # noqa: E402
from calm.grid import quantize_groups  # noqa: E402
from calm.model import block_linears, capture_block_inputs, decoder_blocks, linear_inputs, run_block  # noqa: E402
from calm_kernels import kmeans as K  # noqa: E402

SKLEARN_COLUMNS = 32  # columns fitted one by one with scikit-learn; its time is scaled to all columns


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sklearn_column_loop_seconds(w: torch.Tensor, bits: int) -> float | None:
    """scikit-learn KMeans fitted one weight column at a time (CLAQ's reference code), from calm's quantile
    init, 25 Lloyd iterations at most: seconds for SKLEARN_COLUMNS columns, scaled to all of them. None when
    scikit-learn is not installed (`pip install -e .[bench]`)."""
    try:
        from bench_kmeans import sklearn_columns
    except ImportError:
        return None
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return None
    cols = min(SKLEARN_COLUMNS, w.shape[1])
    init = K.quantile_init_reference(w.float(), 1 << bits)
    seconds = timed(lambda: sklearn_columns(w.float(), init, None, 1 << bits, cols))
    return seconds * w.shape[1] / cols


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group", type=int, default=64, help="RTN/GPTQ/AWQ group size (CLAQ has none)")
    p.add_argument("--smoke", action="store_true", help="tiny random LLaMA instead of the default model")
    args = p.parse_args()

    if args.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import tiny_llama

        model = tiny_llama()
        windows = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
        args.block, args.group, label = 0, 32, "tiny random LLaMA (smoke)"
    else:
        from calm.data import load_corpus
        from calm.model import load_model

        model, tokenizer = load_model(None)
        windows = load_corpus(tokenizer, DataConfig()).calibration
        label = "SmolLM2-135M-Instruct"
    inputs = capture_block_inputs(model, windows, 8)
    blocks = decoder_blocks(model)
    for b in blocks[:args.block]:
        inputs = inputs.with_hidden(run_block(b, inputs))
    block = blocks[args.block]
    names = list(block_linears(block))
    accs = {n: HessianAccumulator(block_linears(block)[n].in_features) for n in names}
    linear_inputs(block, inputs, tuple(names), lambda n, x: accs[n].add(x))

    rows = []
    for name in names:
        w = block_linears(block)[name].weight.detach()
        h = accs[name].hessian()
        row = {"linear": name, "shape": list(w.shape)}
        row["rtn"] = timed(lambda: quantize_groups(w, args.bits, args.group, False))
        row["gptq"] = timed(lambda: gptq_quantize_weight(w, h, args.bits, args.group, False))
        row["claq"] = timed(lambda: claq_quantize_weight(w, h, args.bits))
        row["claq_fit_per_column"] = timed(lambda: claq_quantize_weight(w, h, args.bits, fit_columns=1))
        row["kmeans_calm"] = timed(lambda: K.kmeans_columns(w, args.bits))
        row["kmeans_sklearn_columns"] = sklearn_column_loop_seconds(w, args.bits)
        rows.append(row)
        print(json.dumps(row), flush=True)

    block_times = {}
    for cand, scheme in (("awq", f"W{args.bits}A16G{args.group}"), ("smoothquant", "W4A8")):
        spec = QuantSpec.from_scheme(scheme)
        block_times[cand] = timed(lambda: algorithms.quantize_block(CandidateSpec.parse(cand), copy.deepcopy(block),
                                                                    inputs, spec))

    out = {"model": label, "block": args.block, "bits": args.bits, "group": args.group,
           "calibration_tokens": inputs.tokens, "device": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "per_linear_seconds": rows, "per_block_seconds": block_times}
    if not args.smoke:
        path = ROOT / "bench" / "results" / "pool-layer-times-cpu.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
    cols = ["rtn", "gptq", "claq", "claq_fit_per_column", "kmeans_calm", "kmeans_sklearn_columns"]
    print(f"\nPer-linear quantization seconds, {label} block {args.block}, W{args.bits} "
          f"(RTN/GPTQ groups of {args.group}; CLAQ per column, no groups), {inputs.tokens} calibration tokens\n")
    print("| linear | shape | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        cells = ("n/a" if r[c] is None else f"{r[c]:.2f}" for c in cols)
        print(f"| {r['linear']} | {r['shape'][0]}x{r['shape'][1]} | " + " | ".join(cells) + " |")
    n = len(names)
    print("\nWhole block: " + ", ".join(f"{k} {v:.1f} s ({v / n:.2f} s per linear)" for k, v in block_times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
