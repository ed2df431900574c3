"""Held-out perplexity of pool candidates with only the first N decoder blocks quantized (the rest float).

A cheaper stand-in for `python -m calm.run` when a CPU cannot afford every candidate on every block: each
candidate quantizes blocks 0..N-1 on the float model's block inputs (independent propagation, so all
candidates see the same inputs, computed once) and is scored per block by linear CKA, MSE and relative
error against the float block output (calm.search.block_scores); the model with those N blocks replaced
is evaluated with the GPTQ perplexity protocol (calm.evaluate). `--calm a,b,c` also assembles the CALM
hybrid over those candidates (per block the highest CKA, ties by MSE, as calm.search.choose) and evaluates
it. A candidate may carry its own scheme: `gptq@W3A16` (per channel) next to `gptq` (the --scheme).
Same calibration and evaluation text as calm.run. Prints a table and a per-block table; writes JSON.

    POOL="rtn;gptq;awq;claq;gptq@W3A16;claq:bits_target=3.12;claq:bits_target=2.1;claq:bits_target=2.1,outliers=true"
    python bench/pool_partial.py --scheme W3A16G64 --blocks 6 --eval-tokens 8192 --calm rtn,gptq,awq,claq \
        --pool "$POOL"
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calm import algorithms  # noqa: E402
from calm.config import CalmUsageError, CandidateSpec, DataConfig, QuantSpec  # noqa: E402
from calm.data import load_corpus  # noqa: E402
from calm.evaluate import perplexity  # noqa: E402
from calm.model import capture_block_inputs, decoder_blocks, load_model, run_block  # noqa: E402
from calm.nn import model_effective_bits, release_caches  # noqa: E402
from calm.search import CandidateScore, block_scores, choose  # noqa: E402
from calm_kernels.cka import CKAAccumulator  # noqa: E402


def parse(pool: str, default_scheme: str) -> list[tuple[str, CandidateSpec, QuantSpec]]:
    out = []
    for part in filter(None, (x.strip() for x in pool.split(";"))):
        text, _, scheme = part.partition("@")
        cand = CandidateSpec.parse(text)
        spec = QuantSpec.from_scheme(scheme or default_scheme)
        algorithms.validate_candidate(cand, spec)
        out.append((cand.name + (f"@{spec.scheme}" if scheme else ""), cand, spec))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise CalmUsageError(f"the pool names a candidate twice: {names}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default="W3A16")
    p.add_argument("--pool", required=True)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--calib-windows", type=int, default=DataConfig().calib_windows)
    p.add_argument("--calm", default="", help="comma-separated candidate names to build the CALM hybrid from")
    p.add_argument("--output", default=None, help="JSON file for the results")
    args = p.parse_args()
    pool = parse(args.pool, args.scheme)
    names = [n for n, _, _ in pool]
    calm_names = [c for c in args.calm.split(",") if c]
    if any(c not in names for c in calm_names):
        raise CalmUsageError(f"--calm names {calm_names}, not all in the pool {names}")

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
    quantized = {n: [] for n in names}
    seconds = {n: [] for n in names}
    scores: list[dict[str, CandidateScore]] = []
    for i in range(n):
        reference = run_block(fp_blocks[i], inputs)
        self_term = CKAAccumulator.reference(y.reshape(-1, y.shape[-1]) for y in reference)
        scores.append({})
        for name, cand, spec in pool:
            t = time.perf_counter()
            qb = algorithms.quantize_block(cand, copy.deepcopy(fp_blocks[i]), inputs, spec)
            seconds[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            cka, mse, rel = block_scores(reference, run_block(qb, inputs), reference_self_term=self_term)
            scores[i][name] = CandidateScore(cka, mse, rel, seconds[name][-1], time.perf_counter() - t)
            release_caches(qb)
            quantized[name].append(qb)
        inputs = inputs.with_hidden(reference)
        print(f"block {i + 1}/{n}: " + ", ".join(f"{k} {v[-1]:.1f}s CKA {scores[i][k].cka:.6f}"
                                                 for k, v in seconds.items()), flush=True)

    chosen = []
    if calm_names:
        chosen = [choose({c: s[c] for c in calm_names}, 1e-7) for s in scores]
        quantized["calm"] = [quantized[c][i] for i, c in enumerate(chosen)]
    bits = {}
    for name in list(quantized):
        for i in range(n):
            layers[i] = quantized[name][i]
        t = time.perf_counter()
        ppl[name] = perplexity(model, corpus.evaluation, batch_windows=4)
        bits[name] = model_effective_bits(quantized[name])
        for i in range(n):
            release_caches(layers[i])
            layers[i] = fp_blocks[i]
        print(f"{name}: {ppl[name]:.3f} ({time.perf_counter() - t:.0f}s)", flush=True)

    ev = corpus.evaluation
    lines = [f"Default scheme {args.scheme}, blocks 0..{n - 1} of {len(fp_blocks)} quantized (rest float), independent "
             f"propagation, calibration {tuple(corpus.calibration.shape)}, held-out PPL at T={ev.shape[1]} on "
             f"{ev.numel()} tokens", "",
             "| candidate | PPL | effective bits (quantized blocks) | quantize s/block |", "|---|---|---|---|",
             f"| fp | {ppl['fp']:.3f} | 16 | |"]
    for name in quantized:
        s = seconds.get(name)
        label = f"CALM over {{{', '.join(calm_names)}}}" if name == "calm" else name
        lines.append(f"| {label} | {ppl[name]:.3f} | {bits[name]:.3f} | "
                     f"{'' if not s else f'{sum(s) / len(s):.1f}'} |")
    lines += ["", "| block | CALM choice | margin | " + " | ".join(f"CKA {c}" for c in names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for i, s in enumerate(scores):
        pick = chosen[i] if chosen else ""
        margin = (s[pick].cka - max(s[c].cka for c in calm_names if c != pick)) if pick and len(calm_names) > 1 else 0.0
        lines.append(f"| {i} | {pick} | {margin:.2e} | " + " | ".join(f"{s[c].cka:.6f}" for c in names) + " |")
    print("\n" + "\n".join(lines))
    if args.output:
        Path(args.output).write_text(json.dumps({
            "default_scheme": args.scheme, "pool": names, "blocks": n, "perplexity": ppl, "effective_bits": bits,
            "quantize_seconds": seconds, "calm_pool": calm_names, "calm_chosen": chosen,
            "scores": [{k: v.to_dict() for k, v in s.items()} for s in scores],
            "eval_tokens": int(ev.numel()), "seqlen": int(ev.shape[1]),
            "calibration": list(corpus.calibration.shape)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
