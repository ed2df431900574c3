"""Benchmark: per-column K-means (calm_kernels.kmeans) against scikit-learn column by column, fast-pytorch-kmeans
(MultiKMeans, all columns batched) and kmeans1d (optimal 1-D, column by column), in one process on the same W.

    python bench/bench_kmeans.py                 # needs a CUDA device; writes bench/results/kmeans-<device>.json
    python bench/bench_kmeans.py --smoke         # tiny shapes on the CPU (references, or the interpreter under
                                                 # TRITON_INTERPRET=1): proves the plumbing, times nothing real

Shapes (rows x cols): 4096x4096, 4096x14336, 14336x4096, float32 W, bits 2/3/4, 25 Lloyd iterations, unit
weights (`--importance` adds a (rows, cols) weight). Every peer starts from calm's weighted-quantile init
and runs 25 iterations (scikit-learn: init=..., n_init=1, tol=0; fast-pytorch-kmeans: tol=-1 so it never
stops early; kmeans1d has no iterations: it solves 1-D K-means exactly by dynamic programming).
Providers:
- calm: `kmeans_columns` (torch.sort of every column, the sorted-column kernel: float64 prefix sums, then
  per Lloyd step k-1 binary-searched boundaries; then the assignment kernel for the codes).
- calm:optimal: `kmeans_columns(..., method="optimal")`, the exact 1-D optimum by divide-and-conquer dynamic
  programming in PyTorch on the same device (weighted; no kernel).
- calm:assign: `assign_columns` alone for the fitted centroids (the call CLAQ's GPTQ loop makes).
- torch-eager: `kmeans_columns_reference` (the PyTorch reference on the GPU).
- torch-eager:assign: `assign_columns_reference`.
- scikit-learn, kmeans1d: CPU, one column at a time as CLAQ's code does; timed on the first
  `--cpu-columns` columns and scaled to all columns (`extrapolated_from` says so in the record).
- fast-pytorch-kmeans: `MultiKMeans` on the GPU over all columns as (cols, rows, 1) problems.
`inertia_ratio` = provider's weighted inertia / calm's on the same columns (< 1: the peer fits better).
Roofline: bytes (W read once + importance + codes + centroids written) / measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as B  # noqa: E402
from calm_kernels import kmeans as K  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
SMOKE_SHAPES = [(64, 24), (131, 7)]
BITS = [2, 3, 4]
ITERS = 25


def inertia_cols(w, codes, cent, imp, cols: int) -> float:
    return K.weighted_inertia(w[:, :cols].cpu(), codes[:, :cols].cpu(), cent[:cols].cpu(),
                              None if imp is None else imp[:, :cols].cpu())


def sklearn_columns(w_cpu, init_cpu, imp_cpu, k: int, cols: int):
    from sklearn.cluster import KMeans

    codes, cents = [], []
    for j in range(cols):
        km = KMeans(n_clusters=k, init=init_cpu[j].reshape(-1, 1).double().numpy(), n_init=1, max_iter=ITERS,
                    tol=0.0, algorithm="lloyd")
        col = w_cpu[:, j].reshape(-1, 1).double().numpy()
        km.fit(col, sample_weight=None if imp_cpu is None else imp_cpu[:, j].double().numpy())
        codes.append(torch.from_numpy(km.labels_.astype("int64")))
        cents.append(torch.from_numpy(km.cluster_centers_[:, 0]).float())
    return torch.stack(codes, 1), torch.stack(cents, 0)


def kmeans1d_columns(w_cpu, k: int, cols: int):
    import kmeans1d

    codes, cents = [], []
    for j in range(cols):
        out = kmeans1d.cluster(w_cpu[:, j].tolist(), k)
        codes.append(torch.tensor(out.clusters))
        cent = torch.tensor(out.centroids, dtype=torch.float32)
        cents.append(torch.cat([cent, cent[-1:].expand(k - cent.numel())]))  # k > distinct values: pad
    return torch.stack(codes, 1), torch.stack(cents, 0)


def multi_kmeans_columns(w, init, k: int):
    from fast_pytorch_kmeans import MultiKMeans

    km = MultiKMeans(n_clusters=k, max_iter=ITERS, tol=-1.0)
    km.centroids = init.unsqueeze(-1).clone()  # (cols, k, 1): start from calm's init, skip its own per-column init
    labels = km.fit_predict(w.T.unsqueeze(-1).contiguous())
    return labels.T, km.centroids[..., 0]


def bench_case(rows: int, cols: int, bits: int, device: str, use_imp: bool, timer, ceilings, cpu_columns: int,
               notes: list[str]) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(rows + cols + bits)
    # Heavy-tailed like LLM weights: a Student-t-ish mix of Gaussian scales per column.
    w = torch.randn(rows, cols, device=device, generator=g) * (0.5 + torch.rand(cols, device=device, generator=g))
    w = w * (1 + 3 * (torch.rand(rows, cols, device=device, generator=g) > 0.99))
    imp = torch.rand(rows, cols, device=device, generator=g) if use_imp else None
    k = 1 << bits
    shape = {"rows": rows, "cols": cols}
    roof = B.roofline_us(ceilings, rows * cols * (4 + (4 if use_imp else 0) + 1) + cols * k * 4)
    roof_assign = B.roofline_us(ceilings, rows * cols * 5 + cols * k * 4)
    codes, cent = K.kmeans_columns(w, bits, imp, ITERS)
    init = K.quantile_init_reference(w, k, K._check_importance(imp, w))
    recs: list[dict] = []

    def add(provider: str, us: float, roof_us: float, codes_p=None, cent_p=None, n_cols: int | None = None,
            extra: dict | None = None):
        ratio = None
        if codes_p is not None:
            c = n_cols or cols
            ratio = inertia_cols(w, codes_p, cent_p, imp, c) / inertia_cols(w, codes, cent, imp, c)
        recs.append({"kernel": "kmeans", "provider": provider, "shape": shape, "dtype": "float32", "bits": bits,
                     "iters": ITERS, "importance": use_imp, "median_us": us, "roofline_us": roof_us,
                     "inertia_ratio": ratio, **(extra or {})})

    add("calm", timer(lambda: K.kmeans_columns(w, bits, imp, ITERS)), roof, codes, cent)
    opt = K.kmeans_columns(w, bits, imp, method="optimal")
    add("calm:optimal", timer(lambda: K.kmeans_columns(w, bits, imp, method="optimal"), reps=3), roof, *opt)
    add("calm:assign", timer(lambda: K.assign_columns(w, cent)), roof_assign)
    ref = K.kmeans_columns_reference(w, bits, imp, ITERS)
    add("torch-eager", timer(lambda: K.kmeans_columns_reference(w, bits, imp, ITERS), reps=3), roof, *ref)
    add("torch-eager:assign", timer(lambda: K.assign_columns_reference(w, cent)), roof_assign)

    n_cpu = min(cols, cpu_columns)
    w_cpu, init_cpu = w[:, :n_cpu].float().cpu(), init[:n_cpu].cpu()
    imp_cpu = None if imp is None else imp[:, :n_cpu].cpu()
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        notes.append(f"scikit-learn not importable ({exc}; pip install scikit-learn): its column is skipped")
    else:
        t0 = time.perf_counter()
        sk = sklearn_columns(w_cpu, init_cpu, imp_cpu, k, n_cpu)
        sec = time.perf_counter() - t0
        add("scikit-learn", sec * 1e6 * cols / n_cpu, roof, *sk, n_cols=n_cpu, extra={"extrapolated_from": n_cpu})
    try:
        import kmeans1d  # noqa: F401
    except ImportError as exc:
        notes.append(f"kmeans1d not importable ({exc}; pip install kmeans1d): its column is skipped")
    else:
        if use_imp:
            notes.append("kmeans1d has no sample weights: skipped in --importance runs")
        else:
            t0 = time.perf_counter()
            km = kmeans1d_columns(w_cpu, k, n_cpu)
            sec = time.perf_counter() - t0
            add("kmeans1d", sec * 1e6 * cols / n_cpu, roof, *km, n_cols=n_cpu, extra={"extrapolated_from": n_cpu})
    try:
        import fast_pytorch_kmeans  # noqa: F401
    except ImportError as exc:
        notes.append(f"fast-pytorch-kmeans not importable ({exc}; pip install fast-pytorch-kmeans): "
                     "its column is skipped")
    else:
        if use_imp:
            notes.append("fast-pytorch-kmeans has no sample weights: skipped in --importance runs")
        else:
            fp = multi_kmeans_columns(w, init, k)
            add("fast-pytorch-kmeans", timer(lambda: multi_kmeans_columns(w, init, k), reps=3), roof, *fp)
    return recs


def print_table(records: list[dict]) -> None:
    print(f"{'rows x cols':>12} {'b':>2}  {'provider':20} {'median_us':>14} {'roofline_us':>11} {'/roof':>8} "
          f"{'x calm':>9} {'inertia/calm':>12}")
    cases: dict[tuple, list[dict]] = {}
    for r in records:
        cases.setdefault((r["shape"]["rows"], r["shape"]["cols"], r["bits"]), []).append(r)
    for (rows, cols, bits), recs in cases.items():
        calm = next(r["median_us"] for r in recs if r["provider"] == "calm")
        for r in recs:
            ir = f"{r['inertia_ratio']:12.6f}" if r["inertia_ratio"] is not None else f"{'-':>12}"
            star = "*" if "extrapolated_from" in r else " "
            print(f"{f'{rows}x{cols}':>12} {bits:>2}  {r['provider']:20} {r['median_us']:13.1f}{star} "
                  f"{r['roofline_us']:11.1f} {r['median_us'] / r['roofline_us']:8.1f} "
                  f"{r['median_us'] / calm:9.2f} {ir}")
        print()
    print("* scaled from the columns actually run (extrapolated_from in the JSON)")


def goal_lines(records: list[dict]) -> list[str]:
    lines = []
    for r in records:
        s = r["shape"]
        if r["provider"] != "calm" or (s["rows"], s["cols"]) != (4096, 4096):
            continue
        peers = {p["provider"]: p["median_us"] for p in records if p["shape"] == s and p["bits"] == r["bits"]}
        us = r["median_us"]
        roof = us / r["roofline_us"]
        parts = [f"{us:.0f} us (issue 17 goal at 4 bits, 25 iterations: <= 1000 us: "
                 f"{'met' if us <= 1000 else 'NOT met'})" if r["bits"] == 4 else f"{us:.0f} us",
                 f"{roof:.1f}x the memory roofline (goal <= 3x: {'met' if roof <= 3 else 'NOT met'})"]
        for peer, goal in (("scikit-learn", 1000), ("fast-pytorch-kmeans", 20)):
            if peer in peers:
                ratio = peers[peer] / us
                parts.append(f"{ratio:.0f}x {peer} (goal >= {goal}x: {'met' if ratio >= goal else 'NOT met'})")
        lines.append(f"4096x4096 b={r['bits']}: " + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: plumbing check, no real timings")
    ap.add_argument("--bits", nargs="+", type=int, default=BITS, choices=[1, 2, 3, 4])
    ap.add_argument("--importance", action=argparse.BooleanOptionalAction, default=False,
                    help="weighted K-means with a random (rows, cols) importance")
    ap.add_argument("--cpu-columns", type=int, default=32,
                    help="columns the CPU peers (scikit-learn, kmeans1d) run; their time is scaled to all columns")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/kmeans-<device>.json; "
                                                            "smoke runs write to a temp folder)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kmeans: no CUDA device; this benchmark needs a GPU (use --smoke for a CPU plumbing check)")
        return 2
    triton_version, status = B.triton_version(args.smoke, "bench_kmeans")
    if status is not None:
        return status
    device = "cpu" if args.smoke else "cuda"
    name = B.device_name(args.smoke)
    timer = B.make_timer(args.smoke)
    print(f"device: {name}; torch {torch.__version__}; triton {triton_version}"
          + (f"; smoke run on the CPU ({B.path_mode()} path), timings mean nothing" if args.smoke else ""))
    ceilings = B.measure_ceilings(device, timer, args.smoke)
    print(f"measured: copy bandwidth {ceilings['bandwidth'] / 1e9:.1f} GB/s")
    records, notes = [], []
    for rows, cols in SMOKE_SHAPES if args.smoke else SHAPES:
        for bits in args.bits:
            records += bench_case(rows, cols, bits, device, args.importance, timer, ceilings,
                                  min(args.cpu_columns, 4) if args.smoke else args.cpu_columns, notes)
            if not args.smoke:
                torch.cuda.empty_cache()
    return B.finish(records, notes, kernel="kmeans", name=name, triton=triton_version,
                    ceilings_meta={"bandwidth_GBps": ceilings["bandwidth"] / 1e9},
                    smoke=args.smoke, out=args.out, print_table=print_table, goal_lines=goal_lines)


if __name__ == "__main__":
    sys.exit(main())
