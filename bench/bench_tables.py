"""bench/README.md's GPU tables, regenerated from bench/results/ so that every figure there comes from a JSON file.

Each table sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in bench/README.md; NAME is a kernel
(qgemm, rotated, cka, kmeans) or generate. The source is every `bench/results/<NAME>-<device>.json` written by
the harness (`pytest bench/`, records with a `timing` field) or bench/generate.py; smoke runs (devices named
cpu-smoke-*) are never shown.

    python bench/bench_tables.py           # rewrite the tables in bench/README.md
    python bench/bench_tables.py --check   # exit 1, with a diff, when bench/README.md is out of date
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"
KERNELS = ("qgemm", "rotated", "cka", "kmeans")
NO_RESULTS = "No GPU results yet: `make bench-gpu` writes them (bench/results/{name}-<device>.json) and this table."


def result_files(name: str, results: Path = RESULTS) -> list[tuple[str, list[dict]]]:
    """(device, records) of every GPU results file of this kernel written by the harness or generate.py."""
    out = []
    for path in sorted(results.glob(f"{name}-*.json")):
        try:
            records = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
            continue
        if not any("timing" in r for r in records):
            continue  # written by a bench_<kernel>.py script's own main, before the harness
        device = next((r.get("device") for r in records if r.get("device")), path.stem[len(name) + 1:])
        if str(device).startswith("cpu-smoke"):
            continue
        out.append((device, records))
    return out


def _us(x) -> str:
    return "-" if x is None else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def _shape(shape) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items()) if isinstance(shape, dict) else str(shape)


def _label(r: dict) -> str:
    return str(r.get("case") or r.get("scheme") or (f"b{r['bits']}" if r.get("bits") is not None else ""))


def _part(provider: str) -> str | None:
    return provider.split(":", 1)[1] if ":" in provider else None


def counterparts(peer: dict, rows: list[dict]) -> list[dict]:
    """The calm records of a group that a peer's time is compared with (rows: the group's records of one timing).
    A whole peer (cublas-bf16, tinygemm-int4) goes with the calm record of its own `case` when calm has that case
    (tinygemm-int4 is u4's peer, not u3's), else with every `calm` record; a part of a peer
    (torch-int-mm:gemm) goes with calm's part of the same name or the same last step (calm:gemm;
    torch-int-mm:hadamard+quantize with calm:transform+quantize)."""
    ours = [r for r in rows if r.get("provider", "").startswith("calm") and r.get("median_us")]
    part = _part(peer["provider"])
    if part is None:
        whole = [o for o in ours if o["provider"] == "calm"]
        same = [o for o in whole if peer.get("case") is not None and o.get("case") == peer["case"]]
        return same or whole
    return [o for o in ours if _part(o["provider"]) is not None and
            (_part(o["provider"]) == part or _part(o["provider"]).split("+")[-1] == part.split("+")[-1])]


def peer_ratios(rows: list[dict]) -> dict[int, list[tuple[dict, dict]]]:
    """id(calm record) -> [(peer, its record)] over one group and timing, for peers with a time."""
    out: dict[int, list[tuple[dict, dict]]] = {}
    for peer in rows:
        if not peer.get("provider") or peer["provider"].startswith("calm") or not peer.get("median_us"):
            continue
        for o in counterparts(peer, rows):
            out.setdefault(id(o), []).append((o, peer))
    return out


def kernel_table(records: list[dict]) -> list[str]:
    """One row per calm record (and calm part): CUDA-graph and eager time, roofline, and ours/peer under CUDA
    graphs for every peer it is compared with (below 1: ours is faster)."""
    ok = [r for r in records if r.get("provider") and r.get("median_us") is not None]
    rows = ["| shape | case | provider | graph us | eager us | roofline us | graph/roof | ours/peer (graph) |",
            "|---|---|---|---|---|---|---|---|"]
    index: dict[tuple, dict[str, dict]] = {}
    graph_groups: dict[tuple, list[dict]] = {}
    for r in ok:
        shape_key = json.dumps(r.get("shape"), sort_keys=True)
        index.setdefault((r.get("group"), shape_key, r["provider"], _label(r)), {})[r["timing"]] = r
        if r["timing"] == "cuda-graph":
            graph_groups.setdefault((r.get("group"), shape_key), []).append(r)
    ratios: dict[int, list[tuple[dict, dict]]] = {}
    for group_rows in graph_groups.values():
        ratios.update(peer_ratios(group_rows))
    for (_, _, provider, label), by_mode in index.items():
        if not provider.startswith("calm"):
            continue
        g, e = by_mode.get("cuda-graph"), by_mode.get("eager")
        ref = g or e
        peers = [f"{p['provider']} {o['median_us'] / p['median_us']:.2f}" for o, p in ratios.get(id(g), [])]
        roof = ref.get("roofline_us")
        over_roof = f"{g['median_us'] / roof:.2f}" if g and roof else "-"
        rows.append(f"| {_shape(ref.get('shape'))} | {label} | {provider} | {_us(g and g['median_us'])} | "
                    f"{_us(e and e['median_us'])} | {_us(roof)} | {over_roof} | {', '.join(peers) or '-'} |")
    failed = [r for r in records if r.get("error")]
    if failed:
        rows.append("")
        rows.append(f"{len(failed)} records carry an error (refused, failed or not run in the time budget); "
                    "the JSON has each message.")
    return rows


def generate_table(records: list[dict]) -> list[str]:
    ok = [r for r in records if r.get("median_us") is not None]
    rows = ["| model | variant | effective bits | tokens/s (graph) | tokens/s (eager) | tokens/s (generate()) | "
            "graph x bf16 | roofline tokens/s |", "|---|---|---|---|---|---|---|---|"]
    by: dict[tuple, dict[str, dict]] = {}
    for r in ok:
        kind = "generate" if r["provider"].endswith(":generate()") else r["timing"]
        by.setdefault((r["model"], r["provider"].removesuffix(":generate()")), {})[kind] = r
    for (model, provider), m in by.items():
        g, e, gen = m.get("cuda-graph"), m.get("eager"), m.get("generate")
        bf16 = by.get((model, "bf16"), {}).get("cuda-graph")
        ref = g or e or gen
        x = f"{g['tokens_per_s'] / bf16['tokens_per_s']:.2f}" if g and bf16 else "-"
        scaled = f" (from {ref['scaled_from_layers']} blocks)" if ref.get("scaled_from_layers") else ""
        rows.append(f"| {model}{scaled} | {provider} | {ref.get('effective_bits', 16):.3f} | "
                    f"{_tps(g)} | {_tps(e)} | {_tps(gen)} | {x} | {1e6 / ref['roofline_us']:.0f} |")
    failed = [r for r in records if r.get("error")]
    if failed:
        rows += ["", f"{len(failed)} records carry an error; the JSON has each message."]
    return rows


def _tps(r: dict | None) -> str:
    return "-" if r is None else f"{r['tokens_per_s']:.1f}"


def sass_table(records: list[dict]) -> list[str]:
    """bench/sass_count.py's static counts: instructions per weight of the hot loop, and the issue floor over the
    memory floor at the shape (above 1: issue bound even at full bandwidth; above 1.33, the 75% goal is out of
    reach as compiled)."""
    rows = ["| case | SASS instructions per weight | H100 SXM issue / memory floor (us) | ratio | "
            "H200 issue / memory floor (us) | ratio |", "|---|---|---|---|---|---|"]
    for r in records:
        floors = [f"{_us(g['issue_floor_us'])} / {_us(g['memory_floor_us'])} | {g['issue_over_memory']:.2f}"
                  for g in (r["H100 SXM"], r["H200"])]
        rows.append(f"| {r['case']} | {r['thread_instructions_per_weight']:.2f} | {' | '.join(floors)} |")
    return rows


def render_sass(results: Path = RESULTS) -> str:
    parts = []
    for path in sorted(results.glob("sass-*.json")):
        records = json.loads(path.read_text())
        meta = records[0]
        parts += [f"{meta['arch']} (no GPU: compiled by triton {meta['triton']}, commit {meta['commit']}), "
                  f"N x K = {' x '.join(map(str, meta['shape']))}:", "", *sass_table(records), ""]
    return "\n".join(parts).rstrip() or "No counts yet: `python bench/sass_count.py --arch 90 --out ...`."


def render(name: str, results: Path = RESULTS) -> str:
    if name == "sass":
        return render_sass(results)
    files = result_files(name, results)
    if not files:
        return NO_RESULTS.format(name=name)
    parts = []
    for device, records in files:
        meta = next((r for r in records if r.get("commit")), {})
        parts.append(f"{device}, torch {meta.get('torch')}, triton {meta.get('triton')}, commit {meta.get('commit')}:")
        parts.append("")
        parts += generate_table(records) if name == "generate" else kernel_table(records)
        parts.append("")
    return "\n".join(parts).rstrip()


def rewrite(text: str, results: Path = RESULTS) -> str:
    for name in (*KERNELS, "generate", "sass"):
        pattern = re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)", re.S)
        text = pattern.sub(lambda m, n=name: m.group(1) + render(n, results) + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 with a diff when bench/README.md is out of date")
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    old = args.readme.read_text()
    new = rewrite(old, args.results)
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "README.md",
                                                       "regenerated"))
            return 1
        return 0
    if new != old:
        from calm.io import atomic_write_text
        atomic_write_text(args.readme, new)
        print(f"bench_tables: rewrote the tables in {args.readme}")
    else:
        print(f"bench_tables: {args.readme} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
