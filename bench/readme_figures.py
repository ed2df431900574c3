"""The README's result tables, regenerated from bench/results/ so they cannot go stale.

Each table sits between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->` in README.md and is rendered from
the `results.json` copies in bench/results/ (a run's results.json, or bench/quality.py's quality.json). The
tables are declared below: adding a row is one line naming its file and model.

    python bench/readme_figures.py           # rewrite the tables in README.md (and those bench/QUALITY.md marks)
    python bench/readme_figures.py --check   # exit 1, with a diff, when either is out of date
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
QUALITY = ROOT / "bench" / "QUALITY.md"  # may carry any of the tables too (only those it marks)
AFFINE = "affine[batch_tokens=512,lr=0.01,steps=5]"


def load(name: str) -> dict | list:
    return json.loads((RESULTS / name).read_text())


def fmt_ppl(x: float) -> str:
    return f"{x:.0f}" if x >= 10000 else f"{x:.2f}"


def paired(a: list[float], b: list[float]) -> str:
    """Mean and standard error over windows of a - b (NLL), as `+0.046 ± 0.010`."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return f"{mean:+.3f} ± {(var / len(d)) ** 0.5:.3f}"


def choices(chosen: list[str]) -> str:
    return ", ".join(f"{n} {c}" for n, c in Counter(chosen).most_common())


def default_schemes() -> str:
    """bench/quality.py's runs: FP, RTN, GPTQ (each its own sequential pass) and the hybrid, per scheme."""
    rows = load("quality.json")
    lines = ["| scheme | FP | RTN | GPTQ | CALM hybrid | CALM choices | effective bits |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["perplexity"]
        lines.append(f"| {r['scheme']} | {fmt_ppl(p['fp'])} | {fmt_ppl(p['rtn'])} | {fmt_ppl(p['gptq'])} | "
                     f"{fmt_ppl(p['calm'])} | {choices(r['chosen'])} | {r['effective_bits']['calm']:.3f} |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    file: str
    model: str = "calm"


W3_POOL = (
    Row("RTN W3 G64 (uniform)", "quality.json:W3A16G64", "rtn"),
    Row("GPTQ W3 G64 (uniform)", "quality.json:W3A16G64", "gptq"),
    Row("AWQ W3 G64 (uniform)", "run-u-w3g64-awq.json"),
    Row("CLAQ 3-bit, per-column codebooks (uniform)", "run-u-w3pc-claq.json"),
    Row("SmoothQuant W4A8, alpha 0.5 (uniform)", "run-sq-w4a8.json", "smoothquant"),
    Row("RTN W4A8 (uniform)", "run-sq-w4a8.json", "rtn"),
    Row("SmoothQuant W8A8, alpha 0.5 (uniform)", "run-sq-w8a8.json"),
    Row("CALM over {rtn, gptq, awq, claq}, `--score cka --score-windows 16`", "run-i6-cka-other.json"),
    Row("CALM over {rtn, gptq, awq, claq}, `--score nll --score-windows 16`", "run-i6-nll.json"),
)


def _run(file: str) -> dict:
    name, _, scheme = file.partition(":")
    data = load(name)
    return next(r for r in data if r["scheme"] == scheme) if scheme else data


def w3_pool() -> str:
    lines = ["| model | held-out PPL | effective bits | CALM choices |", "|---|---|---|---|"]
    for row in W3_POOL:
        r = _run(row.file)
        chosen = r.get("chosen") or [b["chosen"] for b in r.get("blocks", [])]
        mix = choices(chosen) if row.label.startswith("CALM") else ""
        lines.append(f"| {row.label} | {fmt_ppl(r['perplexity'][row.model])} | "
                     f"{r['effective_bits'][row.model]:.3f} | {mix} |")
    return "\n".join(lines)


# (label, W4A4 (file, model), W3A3 (file, model)); NLL differences are paired with uniform affine's windows.
ACTIVATION = (
    ("RTN, no transform", ("run-i7-w4a4-full.json", "rtn"), ("run-i7-w3a3-full.json", "rtn")),
    ("GPTQ, no transform", ("run-i7-w4a4-full.json", "gptq"), ("run-i7-w3a3-full.json", "gptq")),
    ("rotation (Hadamard + GPTQ)", ("run-i7-w4a4-full.json", "rotation"), ("run-i7-w3a3-full.json", "rotation")),
    ("affine (5 steps x 512 tokens, lr 0.01)", ("run-i7-w4a4-full.json", AFFINE), ("run-i7-w3a3-full.json", AFFINE)),
    ("CALM over the four, `--score cka --score-windows 16`", ("run-i7-w4a4-full-cka.json", "calm"),
     ("run-i7-w3a3-full.json", "calm-hybrid")),
    ("CALM over the four, `--score nll --score-windows 16`", ("run-i7-w4a4-full.json", "calm"), None),
)


def activation() -> str:
    lines = ["| model | W4A4 | NLL - affine's | W3A3 | NLL - affine's |", "|---|---|---|---|---|"]
    refs = {s: load(f)["window_nll"][AFFINE] for s, f in (("w4", "run-i7-w4a4-full.json"),
                                                          ("w3", "run-i7-w3a3-full.json"))}
    for label, *cells in ACTIVATION:
        out = [label]
        for scheme, cell in zip(("w4", "w3"), cells):
            if cell is None:
                out += ["", ""]
                continue
            r = load(cell[0])
            out.append(fmt_ppl(r["perplexity"][cell[1]]))
            out.append("" if cell[1] == AFFINE else paired(r["window_nll"][cell[1]], refs[scheme]))
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


# (label, file, model): the zero-shot runs (bench/quality.py with --zero-shot, and the bit-budget run).
ZERO_SHOT = (
    ("FP", "run-zs-W3A16G64.json", "fp"),
    ("W3 G64: RTN (uniform)", "run-zs-W3A16G64-rtn.json", "rtn"),
    ("W3 G64: GPTQ (uniform)", "run-zs-W3A16G64.json", "gptq"),
    ("W3 G64: CALM over {rtn, gptq} (every block chose GPTQ)", "run-zs-W3A16G64.json", "calm"),
    ("W4 G64: RTN (uniform)", "run-zs-W4A16G64.json", "rtn"),
    ("W4 G64: GPTQ (uniform)", "run-zs-W4A16G64.json", "gptq"),
    ("W4 G64: CALM over {rtn, gptq}", "run-zs-W4A16G64.json", "calm"),
    ("W4A4: affine (uniform)", "run-zs-W4A4.json", AFFINE),
    ("W4A4: CALM over {rtn, gptq, rotation, affine}", "run-zs-W4A4.json", "calm"),
    ("W4A4: rotation (Hadamard + GPTQ, uniform)", "run-zs-W4A4-300.json", "rotation"),
    ("W4A4: affine (uniform)", "run-zs-W4A4-300.json", AFFINE),
    ("W4A4: CALM over {rtn, gptq, rotation, affine}", "run-zs-W4A4-300.json", "calm"),
    ("W3A3: rotation (Hadamard + GPTQ, uniform)", "run-zs-W3A3.json", "rotation"),
    ("W3A3: affine (uniform)", "run-zs-W3A3.json", AFFINE),
    ("W3A3: CALM over {rtn, gptq, rotation, affine}", "run-zs-W3A3.json", "calm"),
    ("3.25-bit budget: GPTQ mixed precision (gptq-mp-score) over G64 widths", "run-budget-3.25-nll.json",
     "gptq-mp-score"),
    ("3.25-bit budget: CALM over {gptq@2, gptq@3, gptq@4, claq@3}", "run-budget-3.25-nll.json", "calm"),
    ("3.25-bit budget: GPTQ mixed precision (gptq-mp-score) over G64 and G192 widths",
     "run-budget-3.25-groups.json", "gptq-mp-score"),
    ("3.25-bit budget: CALM over {gptq@2, gptq@3, gptq@4, claq@3, gptq@3g192, gptq@4g192}",
     "run-budget-3.25-groups.json", "calm"),
    ("3.25-bit budget: GPTQ mixed precision (gptq-mp-score) over 3- and 4-bit G64 and G192 widths",
     "run-budget-3.25-no2.json", "gptq-mp-score"),
    ("2.5-bit budget: CALM over {gptq@2, gptq@3, gptq@4, claq@3}", "run-budget-2.5-nll.json", "calm"),
)


def zero_shot() -> str:
    """Held-out perplexity, every task's accuracy and their average (± standard error) per model."""
    first = load(ZERO_SHOT[0][1])["zero_shot_setup"]
    tasks = first["tasks"]
    lines = ["| model | effective bits | PPL | documents per task | " + " | ".join(tasks) + " | average acc |",
             "|---|---|---|---|" + "---|" * (len(tasks) + 1)]
    for label, file, model in ZERO_SHOT:
        r = load(file)
        setup = r["zero_shot_setup"]
        if setup["tasks"] != tasks or setup["lm_eval"] != first["lm_eval"]:
            raise SystemExit(f"{file}: zero-shot tasks or lm-eval version differ from {ZERO_SHOT[0][1]}'s")
        figures = r["zero_shot"].get(model)
        cells = [f"{figures[t]['acc']:.3f}" for t in tasks] if figures else [""] * len(tasks)
        avg = f"{figures['average']['acc']:.4f} ± {figures['average']['acc_stderr']:.4f}" if figures else ""
        limit = "all" if setup["limit"] is None else f"first {setup['limit']}"
        lines.append(f"| {label} | {r['effective_bits'][model]:.3f} | {fmt_ppl(r['perplexity'][model])} | {limit} | "
                     + " | ".join(cells) + f" | {avg} |")
    lines += ["", f"lm-eval {first['lm_eval']}, 0-shot, validation splits (offline), acc; the average's "
              f"standard error is sqrt(sum of the task variances) / tasks."]
    return "\n".join(lines)


def budget(file: str = "run-budget-3.25.json") -> str:
    """A bit-budget run: each model's exact effective bits, perplexity and its per-block mix."""
    r = load(file)
    models = r["budget"]["models"]
    lines = ["| model | allocation | effective bits | PPL | blocks (candidate x count) |", "|---|---|---|---|---|"]
    for name, m in models.items():
        mix = choices([b["chosen"] for b in m["blocks"]])
        lines.append(f"| {name} | {m['allocation']} | {m['effective_bits']:.4f} | "
                     f"{fmt_ppl(r['perplexity'][name])} | {mix} |")
    return "\n".join(lines)


TABLES = {"default-schemes": default_schemes, "w3-pool": w3_pool, "activation": activation}
TABLES |= {"zero-shot": zero_shot, "budget": lambda: budget("run-budget-3.25-groups.json"),
           "budget-g64": lambda: budget("run-budget-3.25-nll.json"),
           "budget-no2": lambda: budget("run-budget-3.25-no2.json"),
           "budget-3.0": lambda: budget("run-budget-3.0-groups.json"),
           "budget-cka": budget, "budget-2.5": lambda: budget("run-budget-2.5-nll.json"),
           "budget-2.5-cka": lambda: budget("run-budget-2.5.json")}
README_TABLES = ("default-schemes", "w3-pool", "activation", "budget", "zero-shot")  # bench/QUALITY.md: any


def render(text: str, every: bool = True) -> str:
    """Text with every marked table regenerated; `every`: each of README_TABLES must be marked (the README)."""
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- figures:{name} -->\n).*?(<!-- /figures:{name} -->)", re.S)
        if not pattern.search(text):
            if every and name in README_TABLES:
                raise SystemExit(f"README.md has no <!-- figures:{name} --> ... <!-- /figures:{name} --> block")
            continue
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when README.md or bench/QUALITY.md differs from "
                   "its regeneration")
    args = p.parse_args()
    stale = 0
    for path, every in ((README, True), (QUALITY, False)):
        current = path.read_text(encoding="utf-8")
        fresh = render(current, every)
        if args.check:
            if fresh != current:
                sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), fresh.splitlines(True),
                                                           path.name, "regenerated"))
                print(f"{path.relative_to(ROOT)} is out of date: run python bench/readme_figures.py")
                stale = 1
        else:
            path.write_text(fresh, encoding="utf-8")
    return stale


if __name__ == "__main__":
    sys.exit(main())
