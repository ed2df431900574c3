"""End-to-end quality table: held-out perplexity per scheme and method on the default model.

Runs `python -m calm.run --exact-baselines` once per scheme (each run evaluates FP, every pool member applied
uniformly with its own sequential calibration pass, and the CALM hybrid) and writes bench/results/quality.json
and bench/QUALITY.md. Runs resume from their output folders; a finished run with the same settings is reused.

    python bench/quality.py --schemes W4A16G64 W3A16G64 W2A16G64 --pool rtn,gptq
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calm.config import RunConfig  # noqa: E402
from calm.io import atomic_write_json, atomic_write_text  # noqa: E402
from calm.progress import configure_logging  # noqa: E402
from calm.run import build_parser, config_from_args, run  # noqa: E402
from calm.streaming import return_freed_memory  # noqa: E402

BEGIN, END = "<!-- bench/quality.py: begin -->", "<!-- bench/quality.py: end -->"


def with_section(path: Path, table: str) -> str:
    """QUALITY.md with this script's section replaced (other sections, written by hand, are kept)."""
    section = f"{BEGIN}\n## Weight-only schemes, pool and CALM (bench/quality.py)\n\n{table}\n{END}\n"
    text = path.read_text() if path.is_file() else "# Quality on the default model\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + section + rest.split(END, 1)[1].lstrip("\n")
    return text.rstrip("\n") + "\n\n" + section


def same_run(saved: Path, cfg: RunConfig) -> bool:
    """The folder's run_config.json is this configuration (settings added since it was written at defaults)."""
    previous = RunConfig.from_dict(json.loads(saved.read_text()))
    return json.loads(previous.to_json()) == json.loads(cfg.to_json())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", nargs="+", default=["W4A16G64", "W3A16G64", "W2A16G64"])
    p.add_argument("--pool", default="rtn,gptq")
    p.add_argument("--outputs", default="outputs/quality")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="extra flags for calm.run after --")
    args = p.parse_args()
    extra = [a for a in args.run_args if a != "--"]
    configure_logging(0)
    return_freed_memory()
    rows = []
    for scheme in args.schemes:
        out = Path(args.outputs) / f"{scheme}-{args.pool.replace(',', '_').replace(';', '_').replace(':', '-')}"
        cfg = config_from_args(build_parser().parse_args(["--scheme", scheme, "--pool", args.pool,
                                                          "--output", str(out), "--exact-baselines", *extra]))
        done = out / "results.json"
        if done.is_file() and same_run(out / "run_config.json", cfg):
            results = json.loads(done.read_text())  # this exact run finished before: reuse its figures
            print(f"[quality] {scheme}: reusing {done}", flush=True)
        else:
            results = run(cfg)
        rows.append({k: results[k] for k in ("scheme", "pool", "propagation", "calibration", "evaluation",
                                              "perplexity", "effective_bits", "seconds")}
                    | {"chosen": [b["chosen"] for b in results["blocks"]]})
    atomic_write_json(ROOT / "bench" / "results" / "quality.json", rows)
    names = list(dict.fromkeys(n for r in rows for n in r["perplexity"]))
    ev = rows[0]["evaluation"]
    lines = [f"Held-out Wikipedia perplexity (T={ev['seqlen']}, {ev['tokens']} tokens), calibration "
             f"{rows[0]['calibration']['windows']} x {rows[0]['calibration']['seqlen']} tokens, "
             f"{rows[0]['propagation']} propagation; each uniform baseline calibrated on its own quantized blocks "
             f"(`--exact-baselines`). Reproduce: `python bench/quality.py --schemes "
             f"{' '.join(r['scheme'] for r in rows)} --pool {args.pool}`.", "",
             "| scheme | " + " | ".join(names) + " | CALM choices |", "|---" * (len(names) + 2) + "|"]
    for r in rows:
        counts = {n: r["chosen"].count(n) for n in dict.fromkeys(r["chosen"])}
        lines.append(f"| {r['scheme']} | " + " | ".join(f"{r['perplexity'][n]:.2f}" if n in r["perplexity"] else ""
                                                       for n in names)
                     + " | " + ", ".join(f"{n} {c}" for n, c in counts.items()) + " |")
    atomic_write_text(ROOT / "bench" / "QUALITY.md", with_section(ROOT / "bench" / "QUALITY.md", "\n".join(lines)))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
