"""results.json (DESIGN.md's contract) and the two markdown tables a run prints and saves."""
from __future__ import annotations

from typing import Any


def block_table(results: dict[str, Any]) -> str:
    """Block, chosen candidate, CKA (NLL with score "nll") of every candidate, the winner's margin, its MSE."""
    names = list(results["blocks"][0]["scores"]) if results["blocks"] else []
    by_nll = bool(results["blocks"]) and "nll_margin" in results["blocks"][0]
    head = ("| block | chosen | " + " | ".join(f"{'NLL' if by_nll else 'CKA'} {n}" for n in names)
            + " | margin | MSE chosen | rel err chosen |")
    rule = "|" + "---|" * (len(names) + 5)
    rows = [head, rule]
    for b in results["blocks"]:
        s = b["scores"]
        chosen = s[b["chosen"]]
        cells = (f"{s[n]['nll']:.5f}" if by_nll else f"{s[n]['cka']:.6f}" for n in names)
        margin = b["nll_margin"] if by_nll else b["cka_margin"]
        rows.append(f"| {b['index']} | {b['chosen']} | " + " | ".join(cells)
                    + f" | {margin:.2e} | {chosen['mse']:.4e} | {chosen['rel_err']:.4f} |")
    counts: dict[str, int] = {}
    for b in results["blocks"]:
        counts[b["chosen"]] = counts.get(b["chosen"], 0) + 1
    rows.append("")
    rows.append("chosen: " + ", ".join(f"{n} {c}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1])))
    return "\n".join(rows)


def perplexity_table(results: dict[str, Any]) -> str:
    ev = results["evaluation"]
    t = ev["seqlen"]
    head = f"| model | held-out PPL (T={t}, {ev['tokens']} tokens) | effective bits | quantize s/block |"
    rows = [head, "|---|---|---|---|"]
    bits = results.get("effective_bits", {})
    # Seconds each candidate spent quantizing, summed over blocks (the search's per-block timings).
    seconds = results.get("quantize_seconds", {})
    n_blocks = max(1, len(results.get("blocks", [])))
    for name, ppl in results["perplexity"].items():
        label = {"fp": "FP (float32, dequantized Q4_1 source)" if results.get("default_model") else "FP",
                 "calm": "CALM hybrid"}.get(name, f"{name} (uniform)")
        b = bits.get(name)
        sec = seconds.get(name)
        rows.append(f"| {label} | {ppl:.3f} | {'' if b is None else f'{b:.3f}'} | "
                    f"{'' if sec is None else f'{sec / n_blocks:.2f}'} |")
    return "\n".join(rows)
