"""Compare models evaluated by different `python -m calm.run` runs on the same held-out windows: perplexity and
the paired NLL difference to a reference model, mean ± standard error over the evaluation windows.

Runs made with the same text, seed, T and evaluation tokens evaluate the same windows, so their per-window
NLLs (results.json "window_nll") pair up; the standard error says how much of a difference the choice of
text could explain. Each model is RUN[:NAME], RUN a run folder or its results.json (copies are in
bench/results/run-*.json) and NAME a model of it ("calm", the saved model, by default); the first one is the
reference.

    python bench/compare_runs.py runs/i7-w3a3:affine[batch_tokens=512,lr=0.01,steps=5] runs/i7-w3a3-krev
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calm.evaluate import paired_difference  # noqa: E402


def load_model_windows(spec: str) -> tuple[str, list[float], float, dict]:
    folder, _, name = spec.partition(":")
    path = Path(folder) / "results.json" if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise SystemExit(f"compare_runs: {path} does not exist")
    results = json.loads(path.read_text())
    name = name or "calm"
    windows = results.get("window_nll", {})
    if name not in windows:
        raise SystemExit(f"compare_runs: {path} has no per-window NLL for {name!r} (has {sorted(windows)}); "
                         "runs before per-window NLLs were recorded can be resumed to add them")
    return f"{Path(folder).stem}:{name}", windows[name], results["perplexity"][name], results["evaluation"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="RUN[:NAME]; the first is the reference")
    args = p.parse_args(argv)
    loaded = [load_model_windows(m) for m in args.models]
    ref_label, ref, _, ref_eval = loaded[0]
    print(f"| model | PPL | NLL - {ref_label}'s, mean ± SE over {len(ref)} windows |")
    print("|---|---|---|")
    for label, windows, ppl, evaluation in loaded:
        if evaluation != ref_eval or len(windows) != len(ref):
            raise SystemExit(f"compare_runs: {label} was evaluated on other windows than {ref_label} "
                             f"({evaluation} vs {ref_eval})")
        d, se = paired_difference(windows, ref)
        print(f"| {label} | {ppl:.3f} | {'' if label == ref_label else f'{d:+.4f} ± {se:.4f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
