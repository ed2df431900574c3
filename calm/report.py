"""The markdown tables a run prints and saves, from its results.json (contract in docs/results.md), and
`python -m calm.report RUNS...`: every model of several runs against its effective bits (calm.plots draws)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from calm.config import CalmUsageError
from calm.evaluate import paired_difference
from calm.io import atomic_write_text


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


# python -m calm.report RUNS... ---------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelPoint:
    """One model of one run: where it sits in quality against size."""
    run: str
    model: str
    scheme: str
    effective_bits: float
    perplexity: float | None
    zero_shot: float | None = None
    zero_shot_stderr: float | None = None
    front: bool = False  # on the perplexity Pareto front (no other point has fewer or equal bits and lower PPL)
    zero_shot_front: bool = False  # on the zero-shot front (none has fewer or equal bits and higher accuracy)


def read_run(path: Path) -> tuple[str, dict[str, Any]]:
    """(run name, results) from a run folder (its results.json) or a JSON file of results.json's keys (such as
    python -m calm.evaluate --output writes)."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise CalmUsageError(f"{path} is neither a run folder with a results.json nor a results file")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CalmUsageError(f"{file} is not JSON ({exc})") from exc
    if "effective_bits" not in results:
        raise CalmUsageError(f"{file} has no effective_bits: not a calm results file")
    return (path.name if path.is_dir() else path.stem), results


def model_points(runs: list[tuple[str, dict[str, Any]]]) -> list[ModelPoint]:
    """Every model of every run (the float model once), with the Pareto fronts marked."""
    points: list[ModelPoint] = []
    seen_fp = False
    for run, results in runs:
        zero_shot = results.get("zero_shot") or {}
        for model, bits in results["effective_bits"].items():
            if model == "fp":
                if seen_fp:
                    continue
                seen_fp = True
            avg = zero_shot.get(model, {}).get("average")
            scheme = "float" if model == "fp" else results.get("scheme", "")
            points.append(ModelPoint(run, model, scheme, bits,
                                     results.get("perplexity", {}).get(model),
                                     None if avg is None else avg["acc"], None if avg is None else avg["acc_stderr"]))
    mark_fronts(points)
    return points


def mark_fronts(points: list[ModelPoint]) -> None:
    """A point is on the front when no other point is at most as large and strictly better."""
    for p in points:
        if p.perplexity is not None:
            p.front = not any(q is not p and q.perplexity is not None and q.effective_bits <= p.effective_bits
                              and q.perplexity < p.perplexity for q in points)
        if p.zero_shot is not None:
            p.zero_shot_front = not any(q is not p and q.zero_shot is not None
                                        and q.effective_bits <= p.effective_bits and q.zero_shot > p.zero_shot
                                        for q in points)


def points_table(points: list[ModelPoint]) -> str:
    rows = ["| run | model | scheme | effective bits | PPL | zero-shot avg acc | front |",
            "|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p.effective_bits, p.run, p.model)):
        ppl = "" if p.perplexity is None else f"{p.perplexity:.3f}"
        zs = "" if p.zero_shot is None else f"{p.zero_shot:.4f} ± {p.zero_shot_stderr:.4f}"
        front = ", ".join(k for k, on in (("PPL", p.front), ("zero-shot", p.zero_shot_front)) if on)
        rows.append(f"| {p.run} | {p.model} | {p.scheme} | {p.effective_bits:.3f} | {ppl} | {zs} | {front} |")
    return "\n".join(rows)


def draw_pareto(points: list[ModelPoint], path: Path) -> Path:
    """Perplexity (log axis) and, when any run has it, the zero-shot average against effective bits, every
    model of every run, the Pareto front drawn as a step line."""
    from matplotlib.figure import Figure

    from calm.plots import candidate_colors, save_figure

    with_zs = any(p.zero_shot is not None for p in points)
    fig = Figure(figsize=(7.5, 4.2 * (2 if with_zs else 1)))
    axes = fig.subplots(2 if with_zs else 1, 1, sharex=True, squeeze=False)[:, 0]
    colors = candidate_colors(list(dict.fromkeys(p.run for p in points)))
    panels = [("perplexity", "front", "held-out perplexity (log)", min)]
    if with_zs:
        panels.append(("zero_shot", "zero_shot_front", "zero-shot average acc", max))
    for ax, (key, front_key, label, _) in zip(axes, panels):
        shown = [p for p in points if getattr(p, key) is not None]
        same_spot: dict[tuple, list[str]] = {}  # one label for the models of a run that coincide (calm = gptq)
        for p in shown:
            err = p.zero_shot_stderr if key == "zero_shot" else None
            ax.errorbar(p.effective_bits, getattr(p, key), yerr=err, fmt="o", color=colors[p.run], ms=5,
                        capsize=2, label=p.run)
            same_spot.setdefault((p.run, p.effective_bits, f"{getattr(p, key):.6g}"), []).append(p.model)
        for (_, bits, value), models in same_spot.items():
            ax.annotate(" = ".join(models), (bits, float(value)), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        front = sorted((p for p in shown if getattr(p, front_key)), key=lambda p: p.effective_bits)
        if front:
            ax.step([p.effective_bits for p in front], [getattr(p, key) for p in front], where="post",
                    color="black", alpha=0.5, linewidth=1, label="Pareto front")
        if key == "perplexity" and shown and all(p.perplexity > 0 for p in shown):
            ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    axes[-1].set_xlabel("effective bits per weight (decoder linears, everything stored)")
    axes[0].set_title("quality against size, every model of every run", fontsize=10)
    return save_figure(fig, path)


def report(paths: list[Path], out: Path) -> str:
    """Write `pareto.png` and `report.md` (every model's point, then each run's tables) into `out`; returns the
    markdown."""
    runs = [read_run(p) for p in paths]
    points = model_points(runs)
    out.mkdir(parents=True, exist_ok=True)
    draw_pareto(points, out / "pareto.png")
    parts = ["# calm report", "", "![quality against size](pareto.png)", "", "## Every model", "",
             points_table(points)]
    for run, results in runs:
        parts += ["", f"## {run}", ""]
        if results.get("blocks"):
            parts += [perplexity_table(results), ""]
        if results.get("zero_shot"):
            parts += [zero_shot_table(results), ""]
    text = "\n".join(parts).rstrip() + "\n"
    atomic_write_text(out / "report.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calm.report", description="perplexity and zero-shot average "
                                "against effective bits for every model of the runs given (a Pareto front), "
                                "with markdown tables")
    p.add_argument("runs", nargs="+", help="run folders (with results.json) or results files")
    p.add_argument("--output", default="outputs/report", help="folder for pareto.png and report.md")
    args = p.parse_args(argv)
    try:
        text = report([Path(r) for r in args.runs], Path(args.output))
    except CalmUsageError as exc:
        print(f"calm: error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    print(f"\nwritten: {Path(args.output) / 'report.md'}, {Path(args.output) / 'pareto.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
