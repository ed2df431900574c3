"""The two markdown tables a run prints and saves, from its results.json (contract in docs/results.md)."""
from __future__ import annotations

from typing import Any

from calm.evaluate import paired_difference


def block_table(results: dict[str, Any]) -> str:
    """Block, chosen candidate, CKA of every candidate and the winner's CKA margin (with score "nll" also every
    candidate's NLL and the winner's NLL margin), the winner's MSE and relative error."""
    names = list(results["blocks"][0]["scores"]) if results["blocks"] else []
    by_nll = bool(results["blocks"]) and "nll_margin" in results["blocks"][0]
    head = ("| block | chosen | " + " | ".join(f"CKA {n}" for n in names) + " | CKA margin | "
            + ("".join(f"NLL {n} | " for n in names) + "NLL margin | " if by_nll else "")
            + "MSE chosen | rel err chosen |")
    rule = "|" + "---|" * (len(names) * (2 if by_nll else 1) + (6 if by_nll else 5))
    rows = [head, rule]
    for b in results["blocks"]:
        s = b["scores"]
        chosen = s[b["chosen"]]
        cells = [f"{s[n]['cka']:.6f}" for n in names] + [f"{b['cka_margin']:.2e}"]
        if by_nll:
            cells += [f"{s[n]['nll']:.5f}" for n in names] + [f"{b['nll_margin']:.2e}"]
        rows.append(f"| {b['index']} | {b['chosen']} | " + " | ".join(cells)
                    + f" | {chosen['mse']:.4e} | {chosen['rel_err']:.4f} |")
    counts: dict[str, int] = {}
    for b in results["blocks"]:
        counts[b["chosen"]] = counts.get(b["chosen"], 0) + 1
    rows.append("")
    rows.append("chosen: " + ", ".join(f"{n} {c}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1])))
    return "\n".join(rows)


def perplexity_table(results: dict[str, Any]) -> str:
    ev = results["evaluation"]
    t = ev["seqlen"]
    windows = results.get("window_nll", {})
    paired = "calm" in windows and len(windows["calm"]) > 1
    head = (f"| model | held-out PPL (T={t}, {ev['tokens']} tokens) | effective bits | quantize s/block |"
            + (f" NLL - CALM's, mean ± SE over {len(windows['calm'])} windows |" if paired else ""))
    rows = [head, "|---|---|---|---|" + ("---|" if paired else "")]
    bits = results.get("effective_bits", {})
    # Seconds each candidate spent quantizing, summed over blocks (the search's per-block timings).
    seconds = results.get("quantize_seconds", {})
    n_blocks = max(1, len(results.get("blocks", [])))
    kept = results.get("final_check", {}).get("kept", "calm")
    labels = {"fp": "FP (float32, dequantized Q4_1 source)" if results.get("default_model") else "FP",
              "calm": "CALM hybrid" if kept == "calm" else f"CALM: {kept} kept by the final check",
              "calm-hybrid": "CALM hybrid (not kept: higher NLL on the scoring windows)"}
    for name, ppl in results["perplexity"].items():
        label = labels.get(name, f"{name} (uniform)")
        b = bits.get(name)
        sec = seconds.get(name)
        row = (f"| {label} | {ppl:.3f} | {'' if b is None else f'{b:.3f}'} | "
               f"{'' if sec is None else f'{sec / n_blocks:.2f}'} |")
        if paired:
            d, se = paired_difference(windows[name], windows["calm"]) if name in windows else (None, None)
            row += "" if d is None or name == "calm" else f" {d:+.4f} ± {se:.4f}"
            row += " |"
        rows.append(row)
    return "\n".join(rows)


def budget_table(results: dict[str, Any]) -> str:
    """With a bit budget: per block the candidate (algorithm@bits) each model under the budget chose, with its
    effective bits and loss, then each model's exact effective bits and Lagrange multiplier."""
    models = results["budget"]["models"]
    names = list(models)
    head = "| block | " + " | ".join(f"{n} | bits | loss" for n in names) + " |"
    rows = [head, "|" + "---|" * (1 + 3 * len(names))]
    for i in range(len(models[names[0]]["blocks"])):
        cells = []
        for n in names:
            b = models[n]["blocks"][i]
            cells += [b["chosen"] + (" (repaired)" if b["repaired"] else ""), f"{b['effective_bits']:.4f}",
                      f"{b['loss']:.3e}"]
        rows.append(f"| {i} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append(f"budget {results['budget']['bits_budget']} bits per weight; loss: {results['budget']['loss']}")
    for n in names:
        m = models[n]
        rows.append(f"- {n} ({m['allocation']} allocation): {m['effective_bits']:.4f} effective bits, "
                    f"lambda {m['lambda']:.4g}, summed loss {m['loss']:.4e}")
    return "\n".join(rows)


def zero_shot_table(results: dict[str, Any]) -> str:
    """Per model, every zero-shot task's acc ± stderr (and acc_norm where lm-eval reports it), the average acc
    with its standard error, and the perplexity beside it."""
    setup = results["zero_shot_setup"]
    tasks = setup["tasks"]
    rows = ["| model | " + " | ".join(tasks) + " | average acc | PPL |", "|---|" + "---|" * (len(tasks) + 2)]
    for model, figures in results["zero_shot"].items():
        cells = []
        for t in tasks:
            f = figures[t]
            cell = f"{f['acc']:.4f} ± {f.get('acc_stderr', float('nan')):.4f}"
            if "acc_norm" in f:
                cell += f" (norm {f['acc_norm']:.4f} ± {f.get('acc_norm_stderr', float('nan')):.4f})"
            cells.append(cell)
        avg = figures["average"]
        ppl = results.get("perplexity", {}).get(model)
        cells += [f"{avg['acc']:.4f} ± {avg['acc_stderr']:.4f}", "" if ppl is None else f"{ppl:.3f}"]
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    limit = "all documents" if setup["limit"] is None else f"at most {setup['limit']} documents per task"
    rows += ["", f"lm-eval {setup['lm_eval']}, {setup['num_fewshot']}-shot, {limit}, data: {setup['data']}; "
             f"average: {setup['average']}"]
    return "\n".join(rows)
