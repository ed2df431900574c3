"""Pictures of a run, drawn with matplotlib from its results.json (contract in docs/results.md).

- `choices.png`: the per-block choice strip: one cell per block, coloured by the chosen candidate and labelled
  with its winning margin (and its bits per weight when the candidates record their stored bits); with a bit
  budget, one strip per model under the budget (the hybrid and the mixed-precision baselines).
- `scores.png`: every candidate's score on every block (1 - CKA on a log axis, and the scoring NLL when the
  run scored by NLL), the chosen one marked.
- `python -m calm.report RUNS...` draws `pareto.png` from several runs (calm.report).

matplotlib's object API (Figure, no pyplot) renders off-screen with no global state, so a run on a machine
without a display draws the same files.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from calm.io import atomic_write_bytes

CHOICES_PNG = "choices.png"
SCORES_PNG = "scores.png"


def candidate_colors(names: list[str]) -> dict[str, Any]:
    """A fixed colour per candidate name (tab10, then tab20 for larger pools), in the order given."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def save_figure(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _block_bits(block: dict[str, Any]) -> float | None:
    """Bits per weight of the block's chosen candidate, when the run recorded its stored bits."""
    score = block["scores"].get(block["chosen"], {})
    if score.get("stored_bits") is not None and score.get("weights"):
        return score["stored_bits"] / score["weights"]
    return None


def choice_strips(results: dict[str, Any]) -> list[tuple[str, list[str], list[str]]]:
    """(row label, chosen candidate per block, cell text per block) for every strip the picture draws."""
    blocks = results["blocks"]
    by_nll = bool(blocks) and "nll_margin" in blocks[0]
    margin_key = "nll_margin" if by_nll else "cka_margin"
    texts = []
    for b in blocks:
        text = f"{b.get(margin_key, float('nan')):.1e}"
        bits = _block_bits(b)
        texts.append(text + ("" if bits is None else f"\n{bits:.2f}b"))
    strips = [(f"search ({'NLL' if by_nll else 'CKA'} margin)", [b["chosen"] for b in blocks], texts)]
    budget = results.get("budget")
    for name, model in ((budget or {}).get("models") or {}).items():
        strips.append((f"{name} ({model['effective_bits']:.3f} bits)", [r["chosen"] for r in model["blocks"]],
                       [f"{r['effective_bits']:.2f}b" + (" R" if r.get("repaired") else "")
                        for r in model["blocks"]]))
    return strips


def draw_choices(results: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    strips = choice_strips(results)
    n_blocks = len(results["blocks"])
    names = list(dict.fromkeys([*results.get("pool", []), *(c for _, chosen, _ in strips for c in chosen)]))
    colors = candidate_colors(names)
    fig = Figure(figsize=(max(6.0, 0.55 * n_blocks + 2.5), 0.9 + 0.75 * len(strips)))
    ax = fig.add_subplot()
    for row, (_, chosen, texts) in enumerate(strips):
        y = len(strips) - 1 - row
        for i, (name, text) in enumerate(zip(chosen, texts)):
            ax.add_patch(_cell(i, y, colors[name]))
            ax.text(i + 0.5, y + 0.5, text, ha="center", va="center", fontsize=6)
    ax.set_xlim(0, n_blocks)
    ax.set_ylim(0, len(strips))
    ax.set_xticks([i + 0.5 for i in range(n_blocks)], [str(i) for i in range(n_blocks)], fontsize=7)
    ax.set_yticks([len(strips) - 1 - r + 0.5 for r in range(len(strips))], [s[0] for s in strips], fontsize=8)
    ax.set_xlabel("decoder block")
    used = [n for n in names if any(n in chosen for _, chosen, _ in strips)]
    ax.legend(handles=[Patch(color=colors[n], label=n) for n in used], loc="upper center", ncols=min(6, len(used)),
              bbox_to_anchor=(0.5, -0.35 if len(strips) == 1 else -0.2), fontsize=8, frameon=False)
    ax.set_title(f"{results.get('scheme', '')}: chosen candidate per block (cell: winning margin"
                 + (", bits per weight" if any("b" in t for _, _, ts in strips for t in ts) else "") + ")",
                 fontsize=9)
    return save_figure(fig, path)


def _cell(x: int, y: int, color):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, facecolor=color, edgecolor="white", linewidth=1.5)


def draw_scores(results: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    blocks = results["blocks"]
    names = list(dict.fromkeys(n for b in blocks for n in b["scores"]))
    colors = candidate_colors(names)
    by_nll = any("nll" in s for b in blocks for s in b["scores"].values())
    fig = Figure(figsize=(max(6.0, 0.3 * len(blocks) + 4), 3.2 * (2 if by_nll else 1)))
    axes = fig.subplots(2 if by_nll else 1, 1, sharex=True, squeeze=False)[:, 0]
    panels = [("cka", "1 - CKA (lower: closer to the float block)", lambda v: 1.0 - v)]
    if by_nll:
        panels.append(("nll", "scoring NLL (lower is better)", lambda v: v))
    x = [b["index"] for b in blocks]
    for ax, (key, label, transform) in zip(axes, panels):
        for name in names:
            ys = [_finite(transform, b["scores"].get(name, {}).get(key)) for b in blocks]
            ax.plot(x, ys, marker=".", color=colors[name], label=name, linewidth=1)
            won = [(i, y) for i, y, b in zip(x, ys, blocks) if b["chosen"] == name and y is not None]
            if won:
                ax.scatter(*zip(*won), s=40, facecolors="none", edgecolors=colors[name], linewidths=1.2)
        if key == "cka" and all(v is None or v > 0 for name in names
                                for v in (_finite(transform, b["scores"].get(name, {}).get(key)) for b in blocks)):
            ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncols=min(6, len(names)))
    axes[0].set_title(f"{results.get('scheme', '')}: every candidate's score per block (circled: chosen)", fontsize=9)
    axes[-1].set_xlabel("decoder block")
    return save_figure(fig, path)


def _finite(transform, value) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return transform(value)


def write_run_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """The run's pictures, next to its results.json (nothing to draw without blocks)."""
    if not results.get("blocks"):
        return []
    return [draw_choices(results, Path(out) / CHOICES_PNG), draw_scores(results, Path(out) / SCORES_PNG)]
