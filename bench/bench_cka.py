"""Benchmark: fused centered-Gram linear CKA (calm_kernels.cka) against the eager PyTorch paths and pytorch-cka,
all in one process on the same inputs.

    python bench/bench_cka.py                 # needs a CUDA device; writes bench/results/cka-<device>.json
    python bench/bench_cka.py --smoke         # tiny shapes on the CPU (references, or the interpreter under
                                              # TRITON_INTERPRET=1): proves the plumbing, times nothing real

Shapes: tokens n in {16384, 262144}, features d in {576, 2048, 4096} on both sides, bf16 inputs whose columns
carry means up to 1000x their spread. Providers:
- calm: `linear_cka` one shot (fused centering, Gram tiles reduced in the epilogue, form chosen by cost; with
  few Gram tiles the tokens are split across programs, `splits_self_gram` in the record).
- calm:splits=1: the same kernels with the tokens unsplit (recorded where `calm` split them), to show the
  split's effect.
- calm:stream: `CKAAccumulator` with the FP side's self term known (the search's per-candidate path),
  batches of 16384 tokens, including the float64 (d, d) state and the final reduction.
- torch-eager-bf16: centered bf16 copies, whole Grams from cuBLAS bf16 matmuls, float64 squared sums:
  the unfused computation at the kernel's operand precision.
- eager-reference-fp64: `linear_cka_reference`, the float64 oracle.
- pytorch-cka: `cka.cka_from_features` (n x n Grams of the uncentered features, the debiased HSIC
  estimator; run only while its n x n Grams fit in memory). It estimates a different quantity, so its
  record also carries `abs_err_vs_debiased` against `linear_cka_reference(..., debiased=True)`.
Each record also carries `abs_err` = |CKA - float64 reference| (the reference is computed once per shape).
Timings are medians (triton.testing.do_bench, or CUDA-event medians of a few runs for slow peers); the
roofline time is max(bytes read / measured copy bandwidth, multiply-adds of the chosen form x 2 / measured
bf16 tensor-core peak), both measured in the same run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as B  # noqa: E402
from calm_kernels import cka as C  # noqa: E402

TOKENS = [16384, 262144]
FEATURES = [576, 2048, 4096]  # 576: few Gram tiles, the tokens are split across programs
SMOKE_TOKENS = [96, 300]
SMOKE_FEATURES = [40, 72]
STREAM_BATCH = 16384
SMOKE_STREAM_BATCH = 64
PYTORCH_CKA_MAX_BYTES = 24 << 30  # its Grams: n x n per side plus temporaries


def make_pair(n: int, d: int, device: str, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Y = a noisy linear map of X; every 8th column of both shifted by 1000x its spread (LLM-like channels)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, device=device, generator=g)
    mix = torch.randn(d, d, device=device, generator=g) / d ** 0.5
    y = x @ mix + 0.2 * torch.randn(n, d, device=device, generator=g)
    x[:, ::8] += 1000.0
    y[:, ::8] += 1000.0
    return x.to(dtype), y.to(dtype)


def torch_eager(x: torch.Tensor, y: torch.Tensor) -> float:
    xc = (x.float() - x.float().mean(0)).to(x.dtype)
    yc = (y.float() - y.float().mean(0)).to(y.dtype)
    xy = float((xc.T @ yc).double().square().sum())
    xx = float((xc.T @ xc).double().square().sum())
    yy = float((yc.T @ yc).double().square().sum())
    return xy / (xx * yy) ** 0.5


def calm_stream(x: torch.Tensor, y: torch.Tensor, self_term: float, batch: int) -> float:
    acc = C.CKAAccumulator(reference_self_term=self_term)
    for i in range(0, x.shape[0], batch):
        acc.update(x[i:i + batch], y[i:i + batch])
    return acc.compute().cka


def bench_shape(n: int, d: int, device: str, dtype: torch.dtype, timer, ceilings, smoke: bool,
                notes: list[str]) -> list[dict]:
    x, y = make_pair(n, d, device, dtype, seed=n + d)
    ref = C.linear_cka_reference(x, y).cka
    form = C._cka_form(n, d, d)
    flops = 2 * (n * (d * d + d * d) if form == "feature" else n * n * d)  # symmetric Grams count half
    read = 2 * n * d * x.element_size()  # X and Y once for the Grams (the column-mean pass reads them again)
    shape = {"n": n, "d1": d, "d2": d}
    recs: list[dict] = []
    batch = SMOKE_STREAM_BATCH if smoke else STREAM_BATCH

    def add(provider: str, fn, roof: float, slow: bool = False, extra: dict | None = None):
        value = fn()
        us = timer(fn, reps=3) if slow else timer(fn)
        recs.append({"kernel": "cka", "provider": provider, "shape": shape, "dtype": str(dtype).split(".")[-1],
                     "bits": None, "median_us": us, "roofline_us": roof, "form": form,
                     "abs_err": abs(value - ref), **(extra or {})})

    from calm_kernels import _cka_triton

    splits = _cka_triton.token_splits(n, d, d, True, x.device) if form == "feature" else 1
    add("calm", lambda: C.linear_cka(x, y).cka, B.roofline_us(ceilings, 2 * read, flops),
        extra={"splits_self_gram": splits})
    # the token split's effect: the same kernels with one token range (and, in a smoke run, a forced split)
    # (the kernels themselves: only where Triton runs, on CUDA or under the interpreter)
    from calm_kernels._dispatch import use_triton

    forced_splits = ([1] if splits > 1 else []) + ([4] if smoke and form == "feature" else [])
    for forced in forced_splits if use_triton(x) else []:
        add(f"calm:splits={forced}", lambda: C.linear_cka_kernel(x, y, "feature", splits=forced).cka,
            B.roofline_us(ceilings, 2 * read, flops))
    self_term = C.CKAAccumulator.reference(x[i:i + batch] for i in range(0, n, batch))
    stream_flops = 2 * n * (d * d + d * d / 2)  # X^T Y and the symmetric Y^T Y per candidate
    add("calm:stream", lambda: calm_stream(x, y, self_term, batch),
        B.roofline_us(ceilings, 2 * read + 2 * d * d * 8 * (n // batch + 1), stream_flops),
        extra={"batch": batch})
    add("torch-eager-bf16", lambda: torch_eager(x, y),
        B.roofline_us(ceilings, 2 * read, 2 * n * 3 * d * d), slow=True)
    add("eager-reference-fp64", lambda: C.linear_cka_reference(x, y).cka,
        B.roofline_us(ceilings, 2 * read, flops, "fp32"), slow=True)
    try:
        from cka import cka_from_features
    except ImportError as exc:
        notes.append(f"pytorch-cka not importable ({exc}; pip install pytorch-cka): its column is skipped")
    else:
        if 3 * n * n * 4 > PYTORCH_CKA_MAX_BYTES:
            notes.append(f"pytorch-cka skipped at n={n}: its n x n Grams need {3 * n * n * 4 / 2**30:.0f} GiB")
        else:
            value = float(cka_from_features(x, y))
            debiased = C.linear_cka_reference(x, y, debiased=True).cka
            add("pytorch-cka", lambda: float(cka_from_features(x, y)),
                B.roofline_us(ceilings, 2 * read, 2 * n * n * 2 * d), slow=True,
                extra={"abs_err_vs_debiased": abs(value - debiased),
                       "note": "debiased HSIC on uncentered Grams; abs_err is against the biased reference"})
    return recs


def print_table(records: list[dict]) -> None:
    print(f"{'n':>7} {'d':>5} {'form':8} {'provider':22} {'median_us':>12} {'roofline_us':>12} {'/roof':>6} "
          f"{'x calm':>8} {'abs_err':>9}")
    cases: dict[tuple, list[dict]] = {}
    for r in records:
        cases.setdefault((r["shape"]["n"], r["shape"]["d1"]), []).append(r)
    for (n, d), recs in cases.items():
        calm = next(r["median_us"] for r in recs if r["provider"] == "calm")
        for r in recs:
            print(f"{n:>7} {d:>5} {r['form']:8} {r['provider']:22} {r['median_us']:12.1f} {r['roofline_us']:12.1f} "
                  f"{r['median_us'] / r['roofline_us']:6.2f} {r['median_us'] / calm:8.2f} {r['abs_err']:9.2e}")
        print()


def goal_lines(records: list[dict]) -> list[str]:
    idx = {(r["shape"]["n"], r["shape"]["d1"], r["provider"]): r for r in records}
    lines = []
    for d in (576, 4096):
        calm = idx.get((262144, d, "calm"))
        if calm is None:
            lines.append(f"n=262144, d={d} not run: its goal is not judged")
            continue
        frac = calm["roofline_us"] / calm["median_us"]
        lines.append(f"n=262144 d={d}: {100 * frac:.0f}% of the measured bf16 tensor-core peak "
                     f"(goal >= 70%: {'met' if frac >= 0.7 else 'NOT met'})")
        unsplit = idx.get((262144, d, "calm:splits=1"))
        if unsplit is not None:
            lines.append(f"n=262144 d={d}: token split ({calm.get('splits_self_gram')} ranges) "
                         f"{unsplit['median_us'] / calm['median_us']:.2f}x the unsplit kernels' speed")
        for peer in ("torch-eager-bf16", "eager-reference-fp64"):
            r = idx.get((262144, d, peer))
            if r is not None:
                ratio = r["median_us"] / calm["median_us"]
                lines.append(f"n=262144 d={d}: {ratio:.1f}x faster than {peer} (goal >= 3x: "
                             f"{'met' if ratio >= 3 else 'NOT met'})")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: plumbing check, no real timings")
    ap.add_argument("--tokens", nargs="+", type=int, default=None, help=f"n values (default {TOKENS})")
    ap.add_argument("--features", nargs="+", type=int, default=None, help=f"d values (default {FEATURES})")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/cka-<device>.json; "
                                                            "smoke runs write to a temp folder)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_cka: no CUDA device; this benchmark needs a GPU (use --smoke for a CPU plumbing check)")
        return 2
    triton_version, status = B.triton_version(args.smoke, "bench_cka")
    if status is not None:
        return status
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    name = B.device_name(args.smoke)
    timer = B.make_timer(args.smoke)
    print(f"device: {name}; torch {torch.__version__}; triton {triton_version}"
          + (f"; smoke run on the CPU ({B.path_mode()} path), timings mean nothing" if args.smoke else ""))
    ceilings = B.measure_ceilings(device, timer, args.smoke)
    print(f"measured: copy bandwidth {ceilings['bandwidth'] / 1e9:.1f} GB/s; peaks bf16 "
          f"{ceilings['bf16'] / 1e12:.1f}, fp32 {ceilings['fp32'] / 1e12:.1f} TFLOP/s")
    records, notes = [], []
    for n in args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS):
        for d in args.features or (SMOKE_FEATURES if args.smoke else FEATURES):
            records += bench_shape(n, d, device, dtype, timer, ceilings, args.smoke, notes)
            if not args.smoke:
                torch.cuda.empty_cache()
    return B.finish(records, notes, kernel="cka", name=name, triton=triton_version,
                    ceilings_meta={"bandwidth_GBps": ceilings["bandwidth"] / 1e9,
                                   "bf16_TFLOPS": ceilings["bf16"] / 1e12,
                                   "fp32_TFLOPS": ceilings["fp32"] / 1e12},
                    smoke=args.smoke, out=args.out, print_table=print_table, goal_lines=goal_lines)


if __name__ == "__main__":
    sys.exit(main())
