"""Benchmark: rotated W3A3/W4A4 linear (fused online Hadamard + per-token quantization, then the int8 x packed
3/4-bit GEMM) against bf16 cuBLAS, torch._int_mm (int8 cuBLASLt) behind a PyTorch Hadamard and quantizer, and
FP8 rowwise torch._scaled_mm, all in one process on the same inputs.

    python bench/bench_rotated.py                 # needs a CUDA device; writes bench/results/rotated-<device>.json
    python bench/bench_rotated.py --smoke         # tiny shapes on the CPU (references, or the interpreter under
                                                  # TRITON_INTERPRET=1): proves the plumbing, times nothing real

Timings are medians of triton.testing.do_bench (L2 flushed between repetitions). The same run measures the
device's copy bandwidth and its bf16 / int8 / fp8 matmul peaks and reports a roofline time beside every
figure: max(bytes moved / bandwidth, multiply-adds / the matching tensor-core peak).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _common as B  # noqa: E402
from calm.nn import RotatedQuantLinear  # noqa: E402
from calm_kernels import rotated as R  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K) = (out_features, in_features)
TOKENS = [1, 16, 256, 2048, 8192]
# MLP down-projections whose K needs the chunked Hadamard (148 x 8 x 16 and 28 x 32 x 32), fewer M values
WIDE_SHAPES = [(3584, 18944), (8192, 28672)]
WIDE_TOKENS = [1, 16, 2048]
SMOKE_SHAPES = [(64, 576), (48, 896)]
SMOKE_WIDE_SHAPES = [(16, 264)]  # 132 x 1 x 2: the chunked path at interpreter size
SMOKE_TOKENS = [1, 5]
SCHEMES = {"W3A3": (3, 3), "W4A4": (4, 4), "W4A8": (4, 8)}


# ---- peers ----------------------------------------------------------------------------------------------

def pytorch_hadamard_quantize(x: torch.Tensor, factors: list[torch.Tensor], norm: float, bits: int):
    """The unfused peer: Kronecker Hadamard as two batched matmuls in x's dtype, then per-token quantization."""
    m, k = x.shape
    if len(factors) == 2:
        d1, d2 = factors[0].shape[0], factors[1].shape[0]
        xr = (factors[0].T @ x.view(m, d1, d2) @ factors[1]).reshape(m, k)
    else:
        xr = x @ factors[0]
    xr = xr.float() * norm
    qmax = (1 << (bits - 1)) - 1
    scale = xr.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    codes = torch.clamp(torch.round(xr / scale), -qmax - 1, qmax).to(torch.int8)
    return codes, scale


def fp8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448.0
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


# ---- one shape ------------------------------------------------------------------------------------------

def bench_shape(n: int, k: int, m: int, scheme: str, device: str, dtype: torch.dtype, timer, ceilings,
                notes: list[str]) -> list[dict]:
    w_bits, a_bits = SCHEMES[scheme]
    gen = torch.Generator(device="cpu").manual_seed(n + k + m)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    layer = RotatedQuantLinear.from_float(lin, w_bits, a_bits, transform="hadamard").to(device)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    w = lin.weight.detach().to(device=device, dtype=dtype)
    t = layer.transform
    factors = R.kernel_factors(t, device)
    layer(x)  # builds the module's cached kernel operands
    codes, scales = R.transform_quantize(x, a_bits, 1.0, t, factors)
    shape = {"M": m, "N": n, "K": k}
    rec = []

    def add(provider: str, us: float, roof: float, bits: int | None = w_bits, extra: dict | None = None):
        rec.append({"kernel": "rotated", "provider": provider, "shape": shape, "dtype": str(dtype).split(".")[-1],
                    "bits": bits, "a_bits": a_bits if bits is not None else None, "scheme": scheme,
                    "transform": "x".join(map(str, t.orders)), "median_us": us, "roofline_us": roof,
                    **(extra or {})})

    xb, out_b, w_b = m * k * 2, m * n * 2, n * k * w_bits / 8
    gemm_ops = 2 * m * n * k
    add("calm", timer(lambda: layer(x)),  # M <= 16 with a one/two-factor transform: the fused decode launch
        B.roofline_us(ceilings, xb + 2 * m * k + w_b + out_b + 8 * m + 4 * n, gemm_ops, "int8"))
    if m <= 16 and not t.chunked:  # `calm` is the fused one-launch decode here; the two launches it replaces:
        add("calm:two-launch", timer(lambda: R.rotated_matmul(*R.transform_quantize(x, a_bits, 1.0, t, factors),
                                                              layer.qweight, layer.w_scales, w_bits, None, dtype)),
            B.roofline_us(ceilings, xb + 2 * m * k + w_b + out_b + 8 * m + 4 * n, gemm_ops, "int8"))
    add("calm:transform+quantize", timer(lambda: R.transform_quantize(x, a_bits, 1.0, t, factors)),
        B.roofline_us(ceilings, xb + m * k + 4 * m))
    add("calm:gemm", timer(lambda: R.rotated_matmul(codes, scales, layer.qweight, layer.w_scales, w_bits,
                                                    None, dtype)),
        B.roofline_us(ceilings, m * k + w_b + out_b + 4 * m + 4 * n, gemm_ops, "int8"))
    add("cublas-bf16", timer(lambda: torch.nn.functional.linear(x, w)),
        B.roofline_us(ceilings, xb + n * k * 2 + out_b, gemm_ops, "bf16"), bits=16)

    # torch._int_mm behind a PyTorch Hadamard and quantizer (int8 weights: W R quantized to the same codes)
    hadamard = [f.to(device=device, dtype=dtype) for f in t.factors]
    w_codes = layer.weight_codes().to(device)
    w_t = w_codes.T  # (K, N) column-major: the layout cuBLASLt's int8 path wants
    w_scales = layer.w_scales.to(device)

    def int_mm_gemm(c, s):
        return (torch._int_mm(c, w_t).float() * s * w_scales).to(dtype)

    try:
        pc, ps = pytorch_hadamard_quantize(x, hadamard, t.norm, a_bits)
        int_mm_gemm(pc, ps)
        roof_peer = B.roofline_us(ceilings, xb + 2 * m * k + n * k + out_b, gemm_ops, "int8")
        add("torch-int-mm+pytorch-hadamard", timer(lambda: int_mm_gemm(*pytorch_hadamard_quantize(
            x, hadamard, t.norm, a_bits))), roof_peer, bits=8)
        add("torch-int-mm:hadamard+quantize", timer(lambda: pytorch_hadamard_quantize(x, hadamard, t.norm, a_bits)),
            B.roofline_us(ceilings, xb + m * k + 4 * m), bits=8)
        add("torch-int-mm:gemm", timer(lambda: int_mm_gemm(pc, ps)),
            B.roofline_us(ceilings, m * k + n * k + out_b, gemm_ops, "int8"), bits=8)
    except (RuntimeError, NotImplementedError) as exc:
        notes.append(f"torch._int_mm skipped at M={m} N={n} K={k}: {str(exc).splitlines()[0][:120]}")

    try:
        w8, ws8 = fp8_rowwise(w)
        w8_t, ws8_t = w8.T, ws8.T.contiguous()

        def fp8_gemm(a8, sa):
            return torch._scaled_mm(a8, w8_t, scale_a=sa, scale_b=ws8_t, out_dtype=dtype)

        a8, sa = fp8_rowwise(x)
        fp8_gemm(a8, sa)
        add("fp8-rowwise-scaled-mm", timer(lambda: fp8_gemm(*fp8_rowwise(x))),
            B.roofline_us(ceilings, xb + 2 * m * k + n * k + out_b, gemm_ops, "fp8"), bits=8)
        add("fp8-rowwise-scaled-mm:gemm", timer(lambda: fp8_gemm(a8, sa)),
            B.roofline_us(ceilings, m * k + n * k + out_b, gemm_ops, "fp8"), bits=8)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        notes.append(f"fp8 _scaled_mm skipped at M={m} N={n} K={k}: {str(exc).splitlines()[0][:120]}")
    return rec


# ---- report ---------------------------------------------------------------------------------------------

def print_table(records: list[dict]) -> None:
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in records:
        s = r["shape"]
        by_case.setdefault((r["scheme"], s["N"], s["K"], s["M"]), {})[r["provider"]] = r
    print(f"{'scheme':6} {'N x K':>12} {'M':>5}  {'provider':34} {'median_us':>10} {'roofline_us':>11} "
          f"{'x bf16':>7} {'/roof':>6}")
    for (scheme, n, k, m), provs in by_case.items():
        bf16 = provs.get("cublas-bf16", {}).get("median_us")
        for name, r in provs.items():
            speed = f"{bf16 / r['median_us']:7.2f}" if bf16 else "      -"
            print(f"{scheme:6} {f'{n}x{k}':>12} {m:>5}  {name:34} {r['median_us']:10.2f} {r['roofline_us']:11.2f} "
                  f"{speed} {r['median_us'] / r['roofline_us']:6.2f}")
        print()


def goal_lines(records: list[dict]) -> list[str]:
    """The issue's goals on an H100, as ratios from this run."""
    idx = {(r["scheme"], r["shape"]["N"], r["shape"]["K"], r["shape"]["M"], r["provider"]): r["median_us"]
           for r in records}
    lines = []
    for (scheme, n, k, m, prov), us in idx.items():
        if prov != "calm":
            continue
        bf16 = idx.get((scheme, n, k, m, "cublas-bf16"))
        tq = idx.get((scheme, n, k, m, "calm:transform+quantize"))
        if bf16 is None:
            continue
        if m == 2048:
            ok = bf16 / us >= 1.6
            lines.append(f"{scheme} {n}x{k} M=2048: {bf16 / us:.2f}x bf16 incl. transform+quantize "
                         f"(goal >= 1.6x: {'met' if ok else 'NOT met'}); transform+quantize "
                         f"{100 * tq / us:.1f}% of total (goal <= 10%: {'met' if tq / us <= 0.10 else 'NOT met'})")
        if m == 1 and scheme.startswith("W3"):
            ok = bf16 / us >= 1.5
            lines.append(f"{scheme} {n}x{k} M=1: {bf16 / us:.2f}x bf16 (goal >= 1.5x: {'met' if ok else 'NOT met'})")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: plumbing check, no real timings")
    ap.add_argument("--schemes", nargs="+", default=["W3A3", "W4A4"], choices=sorted(SCHEMES))
    ap.add_argument("--tokens", nargs="+", type=int, default=None, help=f"M values (default {TOKENS})")
    ap.add_argument("--no-wide", action="store_true", help=f"skip the chunked-Hadamard widths {WIDE_SHAPES}")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/rotated-<device>.json; "
                                                            "smoke runs write to a temp folder)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_rotated: no CUDA device; this benchmark needs a GPU (use --smoke for a CPU plumbing check)")
        return 2
    triton_version, status = B.triton_version(args.smoke, "bench_rotated")
    if status is not None:
        return status
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16  # bf16 matmul on the CPU is slow and not the point
    device_name = B.device_name(args.smoke)
    timer = B.make_timer(args.smoke, interpreter_reps=3)
    cases = [(shape, args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS))
             for shape in (SMOKE_SHAPES if args.smoke else SHAPES)]
    if not args.no_wide:  # the interpreter runs the chunked path slowly: one token in a smoke run
        cases += [(shape, args.tokens or ([1] if args.smoke else WIDE_TOKENS))
                  for shape in (SMOKE_WIDE_SHAPES if args.smoke else WIDE_SHAPES)]
    print(f"device: {device_name}; torch {torch.__version__}; triton {triton_version}"
          + (f"; smoke run on the CPU ({B.path_mode()} path), timings mean nothing" if args.smoke else ""))
    ceilings = B.measure_ceilings(device, timer, args.smoke, peaks=("bf16", "int8", "fp8"),
                                  smoke_bf16_from_fp32=False)
    print(f"measured: copy bandwidth {ceilings['bandwidth'] / 1e9:.1f} GB/s; peaks bf16 {ceilings['bf16'] / 1e12:.1f}, "
          f"int8 {ceilings['int8'] / 1e12:.1f}, fp8 {ceilings['fp8'] / 1e12:.1f} T(FL)OP/s")
    records, notes = [], []
    for scheme in args.schemes:
        for (n, k), tokens in cases:
            if args.smoke and (n, k) in SMOKE_WIDE_SHAPES and scheme != args.schemes[0]:
                continue
            for m in tokens:
                records += bench_shape(n, k, m, scheme, device, dtype, timer, ceilings, notes)
                if not args.smoke:
                    torch.cuda.empty_cache()
    return B.finish(records, notes, kernel="rotated", name=device_name, triton=triton_version,
                    ceilings_meta={"bandwidth_GBps": ceilings["bandwidth"] / 1e9,
                                   **{f"{p}_TOPS": ceilings[p] / 1e12 for p in ("bf16", "int8", "fp8")}},
                    smoke=args.smoke, out=args.out, print_table=print_table, goal_lines=goal_lines)


if __name__ == "__main__":
    sys.exit(main())
