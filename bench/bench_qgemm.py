"""Benchmark: the mixed-bit dequant-GEMM (calm_kernels.qgemm) on uniform 2/3/4/8-bit and codebook 3/4/mixed
weights against bf16 cuBLAS, torch._weight_int4pack_mm (tinygemm int4), gemlite and Marlin (through vLLM), all
in one process on the same activations.

    python bench/bench_qgemm.py                  # needs a CUDA device; writes bench/results/qgemm-<device>.json
    python bench/bench_qgemm.py --shapes 8192x8192 --tokens 1 2048 --cases u4 u3 cb3
    python bench/bench_qgemm.py --smoke          # tiny shapes on the CPU (references, or the interpreter under
                                                 # TRITON_INTERPRET=1): proves the plumbing, times nothing real

Timing: every provider gets `rotation` copies of its weights (and activations) so that one call's weights are
evicted from L2 before they are used again (a 4-bit 4096 x 4096 weight is 8 MiB; H100/H200 L2 is 50 MiB);
each call is timed alone with CUDA events and the figure is the median over the calls. The same run measures
the copy bandwidth and the bf16 tensor-core peak; `roofline_us` = max(bytes of every stored weight tensor +
activations + output) / bandwidth, 2 M N K / bf16 peak).

Providers `calm` (the module forward, `path` = the one qgemm picks for M) and, at every M > 16, `calm-prefill`
and `calm-dense` (the tiled kernel and dequantize-once + cuBLAS forced on the module's kernel-ready weight):
the pair says where qgemm.DENSE_MIN_M belongs.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _common as B  # noqa: E402
from calm.nn import CodebookQuantLinear, UniformQuantLinear  # noqa: E402
from calm_kernels import packing, qgemm  # noqa: E402
from calm_kernels._dispatch import use_triton  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192)]  # (N, K) = (out_features, in_features)
TOKENS = [1, 4, 16, 64, 2048]
SMOKE_SHAPES = [(64, 256), (48, 384)]
SMOKE_TOKENS = [1, 5, 20]
GROUP = 128  # the peers' common group size (tinygemm, Marlin, gemlite)
# case -> (kind, bits, fraction of 4-bit columns, outlier fraction)
CASES = {
    "u2": ("uniform", 2, 0.0, 0.0), "u3": ("uniform", 3, 0.0, 0.0), "u4": ("uniform", 4, 0.0, 0.0),
    "u8": ("uniform", 8, 0.0, 0.0),
    "cb3": ("codebook", 3, 0.0, 0.0), "cb4": ("codebook", 4, 0.0, 0.0),
    # CLAQ adaptive precision at 3.12 bits: 12% of the columns at 4 bits, the rest at 3 (one mixed 3/4 case).
    "cb3.12": ("codebook", 3, 0.12, 0.0),
    # The same with CLAQ-style outlier reservation (1% of weights kept in float16).
    "cb3.12+or": ("codebook", 3, 0.12, 0.01),
}
L2_FALLBACK = 50 << 20


# ---- timing and device ceilings -------------------------------------------------------------------------

def cpu_median_us(calls, reps: int = 3) -> float:
    calls[0]()
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def gpu_median_us(calls, reps: int = 200) -> float:
    """Median of single calls timed with CUDA events, cycling through calls on distinct buffers."""
    for c in calls:
        c()  # autotuning and lazy initialization happen here, outside the timed calls
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        calls[i % len(calls)]()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def measure_ceilings(device: str, smoke: bool) -> dict[str, float]:
    """Copy bandwidth (bytes/s) and the bf16 matmul peak (flop/s) measured now, on this device, with this
    script's timer (CUDA events, not do_bench)."""
    timer = cpu_median_us if smoke else gpu_median_us
    return B.measure_ceilings(device, lambda fn: timer([fn]), smoke, peaks=("bf16",))


def roofline_us(ceilings: dict[str, float], bytes_moved: float, m: int, n: int, k: int) -> float:
    return B.roofline_us(ceilings, bytes_moved, 2 * m * n * k, "bf16")


def rotation_count(bytes_per_set: float, smoke: bool) -> int:
    """Copies needed so that cycling through them overflows L2 twice (at least 2, at most 64)."""
    if smoke:
        return 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or L2_FALLBACK
    return int(min(64, max(2, math.ceil(2 * l2 / max(bytes_per_set, 1)) + 1)))


def tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


# ---- weights --------------------------------------------------------------------------------------------

def make_uniform(w: torch.Tensor, bits: int) -> UniformQuantLinear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return UniformQuantLinear.from_float(lin, bits, GROUP, symmetric=False)


def make_codebook(n: int, k: int, bits: int, frac4: float, outlier_frac: float, gen) -> CodebookQuantLinear:
    """Random codes and centroids of the right structure (the kernel's speed does not depend on their values)."""
    column_bits = torch.full((k,), bits, dtype=torch.int64)
    if frac4:
        column_bits[torch.randperm(k, generator=gen)[: int(round(frac4 * k))]] = 4
    max_bits = int(column_bits.max())
    centroids = torch.sort(torch.randn(k, 1 << max_bits, generator=gen) * 0.02, dim=1).values
    codes = (torch.randint(0, 256, (n, k), generator=gen) % (1 << column_bits)).to(torch.uint8)
    outliers = None
    if outlier_frac:
        nnz = int(outlier_frac * n * k)
        flat = torch.randperm(n * k, generator=gen)[:nnz]
        outliers = (flat // k, flat % k, torch.randn(nnz, generator=gen) * 0.1)
    return CodebookQuantLinear.from_parts(codes, centroids, column_bits, outliers)


def module_bytes(layer: torch.nn.Module) -> int:
    return tensor_bytes(*[t for name, t in layer.state_dict().items() if name != "bias"])


# ---- peers ----------------------------------------------------------------------------------------------

def tinygemm_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, device: str):
    """torch._weight_int4pack_mm operands for our 4-bit group-128 codes: tinygemm dequantizes
    (q - 8) * scale + zero, so zero = (8 - our zero) * scale gives the same weights."""
    n, k = codes.shape
    sz = torch.stack([scales.float(), (8 - zeros.float()) * scales.float()], dim=-1)  # (N, G, 2)
    sz = sz.transpose(0, 1).contiguous().to(device=device, dtype=torch.bfloat16)  # (G, N, 2)
    if device == "cpu":
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 8)
        return lambda x, p=packed: torch._weight_int4pack_mm_for_cpu(x, p, GROUP, sz)
    u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).to(device)
    packed = torch._convert_weight_to_int4pack(u8, 8)
    return lambda x, p=packed: torch._weight_int4pack_mm(x, p, GROUP, sz)


def gemlite_linear(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, device: str):
    from gemlite.core import DType, GemLiteLinear  # optional peer

    n, k = codes.shape
    layer = GemLiteLinear(bits, group_size=GROUP, in_features=k, out_features=n, input_dtype=DType.FP16,
                          output_dtype=DType.FP16)
    layer.pack(codes.to(device=device, dtype=torch.uint8), scales.to(device=device, dtype=torch.float16),
               zeros.to(device=device, dtype=torch.float16), None)
    return layer


def marlin_gemm(w: torch.Tensor, bits: int, m: int, device: str):
    """A Marlin GEMM through vLLM's own test helpers (weights re-quantized by Marlin: same shape and bits,
    symmetric, group 128). The kernel's signature changed across vLLM releases: two are tried."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
    from vllm.model_executor.layers.quantization.utils.marlin_utils_test import marlin_quantize
    from vllm.scalar_type import scalar_types

    qtype = {4: scalar_types.uint4b8, 8: scalar_types.uint8b128}[bits]
    n, k = w.shape
    b = w.T.contiguous().to(device=device, dtype=torch.float16)
    q = marlin_quantize(b, qtype, GROUP, act_order=False) if "act_order" in marlin_quantize.__code__.co_varnames \
        else marlin_quantize(b, qtype, GROUP)
    q_w, s = q[1], q[2]
    g_idx, perm = (q[3], q[4]) if len(q) > 4 else (None, None)
    empty = torch.empty(0, dtype=torch.int, device=device)
    g_idx = empty if g_idx is None else g_idx
    perm = empty if perm is None else perm
    forms = []
    if hasattr(ops, "marlin_gemm"):  # recent vLLM
        from vllm.model_executor.layers.quantization.utils.marlin_utils_test import MarlinWorkspace
        scratch = MarlinWorkspace(n, mu.GPTQ_MARLIN_MIN_THREAD_N, mu.GPTQ_MARLIN_MAX_PARALLEL).scratch
        forms.append(lambda x: ops.marlin_gemm(x, None, q_w, None, s, None, None, None, scratch, qtype, x.shape[0],
                                               n, k, False, False, False))
    if hasattr(ops, "gptq_marlin_gemm"):  # vLLM 0.6 - 0.10 signatures
        ws = (mu.marlin_make_workspace_new(torch.device(device)) if hasattr(mu, "marlin_make_workspace_new")
              else mu.marlin_make_workspace(n, torch.device(device)))
        forms.append(lambda x: ops.gptq_marlin_gemm(x, None, q_w, s, None, empty, g_idx, perm, ws, qtype,
                                                    x.shape[0], n, k, True))
        forms.append(lambda x: ops.gptq_marlin_gemm(x, q_w, s, empty, g_idx, perm, ws, qtype, x.shape[0], n, k,
                                                    True))
    probe = torch.zeros(m, k, dtype=torch.float16, device=device)
    errors = []
    for fn in forms:
        try:
            fn(probe)
            return fn
        except (TypeError, RuntimeError) as exc:
            errors.append(str(exc).splitlines()[0][:80])
    raise RuntimeError(f"no known Marlin signature fits this vLLM: {errors or 'no Marlin op found'}")


# ---- one shape ------------------------------------------------------------------------------------------

def bench_shape(n: int, k: int, tokens: list[int], cases: list[str], device: str, smoke: bool, ceilings,
                notes: list[str]) -> list[dict]:
    timer = cpu_median_us if smoke else gpu_median_us
    dtype = torch.float32 if smoke else torch.bfloat16  # bf16 matmul on the CPU is slow and not the point
    gen = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=gen) * 0.02
    rec: list[dict] = []
    shape_meta = {"N": n, "K": k}

    def add(provider, m, us, roof, bits, case, extra=None):
        rec.append({"kernel": "qgemm", "provider": provider, "shape": {**shape_meta, "M": m}, "case": case,
                    "dtype": str(dtype if provider.startswith(("calm", "cublas", "tinygemm")) else torch.float16)
                    .split(".")[-1], "bits": bits, "median_us": us, "roofline_us": roof, **(extra or {})})

    layers = {}
    for case in cases:
        kind, bits, frac4, ofrac = CASES[case]
        layers[case] = (make_uniform(w, bits) if kind == "uniform"
                        else make_codebook(n, k, bits, frac4, ofrac, gen))
    uniform4 = layers["u4"] if "u4" in layers else make_uniform(w, 4)
    codes4 = packing.unpack_codes(uniform4.qweight, 4, k)

    for m in tokens:
        xs_host = torch.randn(m, k, generator=gen)
        io_bytes = (m * k + m * n) * 2

        # ours
        for case, layer in layers.items():
            per_set = module_bytes(layer) + io_bytes
            r = rotation_count(per_set, smoke)
            copies = [layer.to(device) if i == 0 else _clone_module(layer, device) for i in range(r)]
            xs = [xs_host.to(device=device, dtype=dtype) for _ in range(r)]
            with torch.no_grad():
                us = timer([lambda c=c, x=x: c(x) for c, x in zip(copies, xs)])
            eff = layer.effective_bits
            roof = roofline_us(ceilings, per_set, m, n, k)
            add("calm", m, us, roof, CASES[case][1], case,
                {"effective_bits": eff, "rotation": r, "path": qgemm.choose_path(m)})
            # Both large-M paths at every M > 16, so the run measures where dequantize-once + cuBLAS should
            # take over (qgemm.DENSE_MIN_M is a guess until then).
            if m > qgemm.SMALL_MAX_M and not use_triton(xs[0], copies[0].qweight):
                notes.append("calm-prefill / calm-dense: the Triton paths do not run here (CPU without "
                             "TRITON_INTERPRET=1) - skipped")
            elif m > qgemm.SMALL_MAX_M:
                for path in ("prefill", "dense"):
                    with torch.no_grad():
                        us = timer([lambda c=c, x=x, p=path: qgemm.matmul_prepared(x, c._kernel_cache, c.bias, path=p)
                                    for c, x in zip(copies, xs)])
                    add(f"calm-{path}", m, us, roof, CASES[case][1], case,
                        {"effective_bits": eff, "rotation": r, "path": path})
            del copies, xs

        # bf16 cuBLAS
        per_set = n * k * 2 + io_bytes
        r = rotation_count(per_set, smoke)
        ws = [w.to(device=device, dtype=dtype) for _ in range(r)]
        xs = [xs_host.to(device=device, dtype=dtype) for _ in range(r)]
        add("cublas-bf16", m, timer([lambda a=a, b=b: torch.nn.functional.linear(a, b) for a, b in zip(xs, ws)]),
            roofline_us(ceilings, per_set, m, n, k), 16, "bf16", {"rotation": r})
        del ws, xs

        # tinygemm int4 (same codes, scales and zeros as our u4)
        try:
            per_set = n * k // 2 + uniform4.scales.numel() * 4 + io_bytes
            r = rotation_count(per_set, smoke)
            fns = [tinygemm_int4(codes4, uniform4.scales, uniform4.zeros, device) for _ in range(r)]
            xs = [xs_host.to(device=device, dtype=torch.bfloat16) for _ in range(r)]
            check = fns[0](xs[0]).float()
            ref = xs[0].float() @ uniform4.dequantized_weight().to(device).T
            rel = float((check - ref).norm() / ref.norm())
            if rel > 2e-2:
                notes.append(f"tinygemm int4 disagrees with our 4-bit weights (rel err {rel:.3g}) at {n}x{k} M={m}")
            add("tinygemm-int4", m, timer([lambda f=f, x=x: f(x) for f, x in zip(fns, xs)]),
                roofline_us(ceilings, per_set, m, n, k), 4, "u4", {"rotation": r, "rel_err_vs_calm_u4": rel})
            del fns, xs
        except (RuntimeError, NotImplementedError, AttributeError) as exc:
            notes.append(f"torch._weight_int4pack_mm skipped: {str(exc).splitlines()[0][:140]}")

        # gemlite (same codes/scales/zeros as our uniform cases, fp16)
        for case in [c for c in cases if CASES[c][0] == "uniform" and CASES[c][1] in (2, 4, 8)]:
            if smoke:
                notes.append("gemlite: needs a CUDA device; not run in a smoke run")
                break
            try:
                layer = layers[case]
                bits = CASES[case][1]
                codes = packing.unpack_codes(layer.qweight, bits, k)
                per_set = module_bytes(layer) + io_bytes
                r = rotation_count(per_set, smoke)
                gls = [gemlite_linear(codes, layer.scales, layer.zeros, bits, device) for _ in range(r)]
                xs = [xs_host.to(device=device, dtype=torch.float16) for _ in range(r)]
                add("gemlite", m, timer([lambda g=g, x=x: g(x) for g, x in zip(gls, xs)]),
                    roofline_us(ceilings, per_set, m, n, k), bits, case, {"rotation": r})
                del gls, xs
            except ImportError:
                notes.append("gemlite: not installed (pip wheel gemlite --no-deps; pip install the wheel) - skipped")
                break
            except Exception as exc:  # a third-party API that moves between releases: report, do not stop
                notes.append(f"gemlite {case} skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:140]}")

        # Marlin through vLLM (4- and 8-bit, symmetric, group 128)
        for bits in (4, 8):
            if smoke:
                notes.append("Marlin: needs a CUDA device and vLLM; not run in a smoke run")
                break
            try:
                per_set = n * k * bits // 8 + (k // GROUP) * n * 2 + io_bytes
                r = rotation_count(per_set, smoke)
                fns = [marlin_gemm(w, bits, m, device) for _ in range(r)]
                xs = [xs_host.to(device=device, dtype=torch.float16) for _ in range(r)]
                add("marlin-vllm", m, timer([lambda f=f, x=x: f(x) for f, x in zip(fns, xs)]),
                    roofline_us(ceilings, per_set, m, n, k), bits, f"u{bits}", {"rotation": r})
                del fns, xs
            except ImportError:
                notes.append("Marlin: vLLM not installed (or its wheel does not match this torch) - skipped")
                break
            except Exception as exc:
                notes.append(f"Marlin {bits}-bit skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:140]}")
        if not smoke:
            torch.cuda.empty_cache()
    return rec


def _clone_module(layer: torch.nn.Module, device: str) -> torch.nn.Module:
    import copy

    return copy.deepcopy(layer).to(device)


# ---- report ---------------------------------------------------------------------------------------------

def print_table(records: list[dict]) -> None:
    by_shape: dict[tuple, list[dict]] = {}
    for r in records:
        s = r["shape"]
        by_shape.setdefault((s["N"], s["K"], s["M"]), []).append(r)
    print(f"{'N x K':>12} {'M':>5}  {'provider':14} {'case':10} {'bits':>4} {'eff':>6} {'median_us':>10} "
          f"{'roofline_us':>11} {'x bf16':>7} {'/roof':>6}")
    for (n, k, m), rows in by_shape.items():
        bf16 = next((r["median_us"] for r in rows if r["provider"] == "cublas-bf16"), None)
        for r in rows:
            speed = f"{bf16 / r['median_us']:7.2f}" if bf16 else "      -"
            eff = f"{r['effective_bits']:6.3f}" if "effective_bits" in r else "     -"
            print(f"{f'{n}x{k}':>12} {m:>5}  {r['provider']:14} {r['case']:10} {r['bits']:>4} {eff} "
                  f"{r['median_us']:10.2f} {r['roofline_us']:11.2f} {speed} {r['median_us'] / r['roofline_us']:6.2f}")
        print()


def goal_lines(records: list[dict]) -> list[str]:
    """The issue's goals (stated for an H100), as ratios from this run: bandwidth fractions are roofline_us
    (bytes / measured copy bandwidth at M=1) over the measured time."""
    idx = {(r["shape"]["N"], r["shape"]["K"], r["shape"]["M"], r["provider"], r["case"]): r for r in records}
    lines = []

    def ours(case, m=1):
        return idx.get((8192, 8192, m, "calm", case))

    for case, goal in (("u4", 0.75), ("cb3", 0.60)):
        r = ours(case)
        if r:
            frac = r["roofline_us"] / r["median_us"]
            lines.append(f"8192x8192 M=1 {case}: {r['median_us']:.1f} us = {frac:.0%} of copy bandwidth "
                         f"(goal >= {goal:.0%}: {'met' if frac >= goal else 'NOT met'})")
    u4 = ours("u4")
    for case in ("u3", "u2"):
        r = ours(case)
        if r and u4:
            # faster than W4 by at least 0.8x the byte ratio: t4 / t <= ... i.e. speedup >= 0.8 * bytes4 / bytes
            byte_ratio = u4["effective_bits"] / r["effective_bits"]
            speedup = u4["median_us"] / r["median_us"]
            verdict = "met" if speedup >= 0.8 * byte_ratio else "NOT met"
            lines.append(f"8192x8192 M=1 {case}: {speedup:.2f}x faster than u4 (goal >= 0.8 x byte ratio "
                         f"{byte_ratio:.2f} = {0.8 * byte_ratio:.2f}: {verdict})")
    marlin = idx.get((8192, 8192, 1, "marlin-vllm", "u4"))
    if marlin and u4:
        lines.append(f"8192x8192 M=1 u4: {u4['median_us']:.1f} us vs Marlin {marlin['median_us']:.1f} us "
                     f"({marlin['median_us'] / u4['median_us']:.2f}x; the issue expects about 2x)")
    for (n, k, m, prov, case), r in idx.items():
        bf16 = idx.get((n, k, m, "cublas-bf16", "bf16"))
        if prov.startswith("calm") and m == 2048 and bf16:
            x = bf16["median_us"] / r["median_us"]
            lines.append(f"{n}x{k} M=2048 {prov} {case}: {x:.2f}x cuBLAS bf16 "
                         f"(goal >= 0.9x: {'met' if x >= 0.9 else 'NOT met'})")
    return lines


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: write N x K as e.g. 4096x14336") from None
    return n, k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: plumbing check, no real timings")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=None, help="N x K (default: the issue's four)")
    ap.add_argument("--tokens", nargs="+", type=int, default=None, help=f"M values (default {TOKENS})")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/qgemm-<device>.json; "
                                                            "smoke runs write to a temp folder)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_qgemm: no CUDA device; this benchmark needs a GPU (use --smoke for a CPU plumbing check)")
        return 2
    triton_version, status = B.triton_version(args.smoke, "bench_qgemm", "the kernel under test is Triton")
    if status is not None:
        return status
    device = "cpu" if args.smoke else "cuda"
    device_name = B.device_name(args.smoke)
    shapes = args.shapes or (SMOKE_SHAPES if args.smoke else SHAPES)
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    print(f"device: {device_name}; torch {torch.__version__}; triton {triton_version}"
          + (f"; smoke run on the CPU ({B.path_mode()} path), timings mean nothing" if args.smoke else ""))
    ceilings = measure_ceilings(device, args.smoke)
    print(f"measured: copy bandwidth {ceilings['bandwidth'] / 1e9:.1f} GB/s; bf16 peak "
          f"{ceilings['bf16'] / 1e12:.1f} TFLOP/s")
    records, notes = [], []
    for n, k in shapes:
        if k % GROUP:
            print(f"skip {n}x{k}: K must be a multiple of the group size {GROUP}")
            continue
        records += bench_shape(n, k, tokens, args.cases, device, args.smoke, ceilings, notes)
    return B.finish(records, notes, kernel="qgemm", name=device_name, triton=triton_version,
                    ceilings_meta={"bandwidth_GBps": ceilings["bandwidth"] / 1e9,
                                   "bf16_TFLOPS": ceilings["bf16"] / 1e12},
                    smoke=args.smoke, out=args.out, print_table=print_table, goal_lines=goal_lines,
                    smoke_goals=B.SMOKE_GOALS + "; GPU numbers are pending")


if __name__ == "__main__":
    sys.exit(main())
