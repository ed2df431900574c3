"""Static instruction counts of the decode kernels' hot loops, without a GPU: issue slots per weight, and the
fastest a kernel could run on an H100/H200 if instruction issue were its only limit.

Why: at M = 1 a dequant-GEMM reads each weight once, so it is either memory bound (the goal: >= 75% of HBM
bandwidth) or issue bound (too many instructions per weight). The second can be read off the compiled kernel
with no GPU: compile for sm90/sm100 (calm_kernels/compile_check.py), disassemble the cubin with the triton wheel's
nvdisasm, take the body of the hottest loop (the largest backward branch), and count its SASS instructions.
A warp issues one instruction per cycle per scheduler (4 schedulers per SM), so

    issue floor (s) = weights x (warp instructions per weight) / (SMs x 4 x clock)
    memory floor (s) = bytes read / HBM bandwidth

from the spec sheets (H100 SXM 3.35 TB/s, H200 4.8 TB/s, both 132 SMs at up to 1.98 GHz). The issue floor is a
lower bound: instructions with lower throughput (shared-memory loads, conversions) and stalls only add to it.
A kernel whose issue floor is above 75% of its memory floor cannot meet the bandwidth goal on that GPU.

    python bench/sass_count.py --arch 90 --out bench/results/sass-sm90.json   (then python bench/bench_tables.py)
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPUS = {"H100 SXM": {"bandwidth": 3.35e12, "sms": 132, "clock": 1.98e9},
        "H200": {"bandwidth": 4.8e12, "sms": 132, "clock": 1.98e9}}
SHAPE = (8192, 8192)  # N x K of the issue's decode goal



def _qgemm_case(path: str, bits: tuple[int, ...], mode: int):
    """Specs of a dequant-GEMM path at every config of its autotune list: bf16 activations, group 128."""
    import triton

    from calm_kernels import _qgemm_triton as T
    from calm_kernels.compile_check import spec

    widths = {f"B{i}": (bits[i] if i < len(bits) else 0) for i in range(5)}
    name = f"{'u' if mode == 0 else 'codebook '}{'/'.join(map(str, bits))}"
    return [spec(f"qgemm {path} {name}", T._qgemm_kernel, T._qgemm_pointer_types("bf16", mode),
                 dict(widths, MODE=mode, GROUP=128 if mode == 0 else 1, HAS_BIAS=True, HAS_OUTLIERS=False,
                      GEMV=path == "gemv", DOT_PRECISION="tf32"),
                 triton.Config({**cfg.kwargs, "BLOCK_M": 1 if path == "gemv" else 16}, num_warps=cfg.num_warps,
                               num_stages=cfg.num_stages))
            for cfg in {"gemv": T.gemv_configs, "small": T.small_m_configs}[path]()]


def _rotated_case(bits: int):
    """Specs of the rotated decode GEMM (int8 activations, packed signed weights) at every decode config."""
    from calm_kernels import _rotated_triton as R
    from calm_kernels.compile_check import spec

    return [spec(f"rotated decode w{bits}", R._rotated_matmul_kernel,
                 {"a_ptr": "*i8", "w_ptr": "*i32", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
                  "bias_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*i32", "cnt_ptr": "*i32"},
                 {"K": 4096, "W_BITS": bits, "HAS_BIAS": True, "OUT_INT32": False}, cfg)
            for cfg in R._gemm_configs("decode")]


# (specs builder, bits read per weight at SHAPE with its scales): uniform weights carry an fp16 scale and a uint8
# zero per 128-column group; a codebook slab 2^b float16 entries per column; rotated weights one float32 per row.
# Each case is reported at the config of its autotune list with the fewest instructions per weight (the best an
# issue-bound kernel can do; the GPU's tuning may pick another for other reasons).
CASES = [
    (lambda: _qgemm_case("gemv", (4,), 0), 4 + 24 / 128),
    (lambda: _qgemm_case("gemv", (3,), 0), 3 + 24 / 128),
    (lambda: _qgemm_case("gemv", (2,), 0), 2 + 24 / 128),
    (lambda: _qgemm_case("small", (4,), 0), 4 + 24 / 128),
    (lambda: _qgemm_case("small", (3,), 0), 3 + 24 / 128),
    (lambda: _qgemm_case("gemv", (3,), 1), 3 + 8 * 16 / SHAPE[0]),
    (lambda: _rotated_case(4), 4 + 32 / SHAPE[1]),
    (lambda: _rotated_case(3), 3 + 32 / SHAPE[1]),
]

_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def disassemble(cubin: bytes) -> str:
    from calm_kernels.compile_check import nvidia_tool

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(nvidia_tool("nvdisasm")), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout


def hot_loop(sass: str) -> collections.Counter:
    """Opcode counts of the largest loop body: from a label to the last backward branch to it."""
    lines = sass.splitlines()
    labels = {}
    best: collections.Counter = collections.Counter()
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
        b = _BRANCH.search(line)
        if b and b.group(1) in labels:  # a label seen before the branch: a backward branch, a loop
            body = collections.Counter(
                m.group(1) for m in map(_INSTRUCTION.search, lines[labels[b.group(1)]:i + 1]) if m)
            if sum(body.values()) > sum(best.values()):
                best = body
    return best


def _commit() -> str:
    """HEAD, marked when calm_kernels has uncommitted changes (the counts are then of code not in that commit)."""
    from bench._common import git_commit

    dirty = subprocess.run(["git", "status", "--porcelain", "calm_kernels"], cwd=ROOT, capture_output=True, text=True)
    return git_commit() + ("+changes" if dirty.stdout.strip() else "")


def _loop_of(spec, arch: int) -> collections.Counter:
    from calm_kernels.compile_check import compile_spec

    return hot_loop(disassemble(compile_spec(spec, arch).asm["cubin"]))


def _per_weight(spec, body: collections.Counter) -> float:
    """Warp instructions per weight: each warp runs the body once per loop trip, which covers every weight of
    the (BLOCK_N, BLOCK_K) tile once."""
    return sum(body.values()) * spec.num_warps / (spec.constexprs["BLOCK_N"] * spec.constexprs["BLOCK_K"])


def count(arch: int, every_config: bool = True) -> list[dict]:
    import triton

    records = []
    for build, bits in CASES:
        specs = build() if every_config else build()[:1]
        spec, body = min(((s, _loop_of(s, arch)) for s in specs), key=lambda sb: _per_weight(*sb))
        warp_per_weight = _per_weight(spec, body)
        n, k = SHAPE
        record = {"kernel": spec.kernel.__name__, "case": spec.label, "arch": f"sm{arch}",
                  "triton": triton.__version__, "commit": _commit(), "configs_compared": len(specs),
                  "loop_instructions": sum(body.values()), "num_warps": spec.num_warps,
                  "weights_per_iteration": spec.constexprs["BLOCK_N"] * spec.constexprs["BLOCK_K"],
                  "thread_instructions_per_weight": round(warp_per_weight * 32, 3),
                  "opcodes": dict(body.most_common()), "shape": [n, k], "bits_per_weight": bits}
        for gpu, g in GPUS.items():
            issue_us = n * k * warp_per_weight / (g["sms"] * 4 * g["clock"]) * 1e6
            memory_us = n * k * bits / 8 / g["bandwidth"] * 1e6
            record[gpu] = {"issue_floor_us": round(issue_us, 2), "memory_floor_us": round(memory_us, 2),
                           "issue_over_memory": round(issue_us / memory_us, 2)}
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", type=Path, help="write the records as JSON here")
    ap.add_argument("--first-config", action="store_true", help="only each list's first config (quick)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("sass_count: unset TRITON_INTERPRET (interpreted kernels have no compile path)", file=sys.stderr)
        return 2
    records = count(args.arch, every_config=not args.first_config)
    print(f"{'case':62} {'instr/weight':>12} {'H100 issue/mem':>15} {'H200 issue/mem':>15}")
    for r in records:
        print(f"{r['case'][:62]:62} {r['thread_instructions_per_weight']:>12} "
              f"{r['H100 SXM']['issue_over_memory']:>15} {r['H200']['issue_over_memory']:>15}")
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
