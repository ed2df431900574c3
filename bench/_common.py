"""Shared plumbing of the bench_*.py scripts: timers, ceilings measured in the same run, JSON out."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_timer(smoke: bool, interpreter_reps: int = 1):
    """Median microseconds of fn(). GPU: triton.testing.do_bench (L2 flushed between repetitions).

    A smoke run times 3 runs on the CPU, interpreter_reps under TRITON_INTERPRET=1."""
    if smoke:
        # The Triton interpreter runs a kernel hundreds of times slower than the references: one timed run.
        default_reps = interpreter_reps if os.environ.get("TRITON_INTERPRET") == "1" else 3

        def cpu_median_us(fn, reps: int | None = None) -> float:
            reps = min(reps or default_reps, default_reps)
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e6
        return cpu_median_us

    import triton.testing

    def gpu_median_us(fn, reps: int | None = None) -> float:
        fn()  # autotuning and lazy initialization happen here, outside the timed repetitions
        torch.cuda.synchronize()
        if reps is not None:  # slow peers: a few CUDA-event-timed runs instead of do_bench's 100 ms budget
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            return statistics.median(times)
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    return gpu_median_us


def measure_ceilings(device: str, timer, smoke: bool, peaks: tuple[str, ...] = ("fp32", "bf16"),
                     smoke_bf16_from_fp32: bool = True) -> dict[str, float]:
    """Copy bandwidth (bytes/s) and dense matmul peaks (2 x multiply-adds per second) measured now.

    peaks: any of fp32, bf16, int8 (torch._int_mm), fp8 (torch._scaled_mm); an int8 or fp8 peak that cannot be
    measured is taken as 2 x bf16. smoke_bf16_from_fp32: in a smoke run the bf16 peak is the fp32 matmul's (bf16
    matmul on the CPU is an emulation, not a ceiling); False times the bf16 matmul on the CPU all the same."""
    n_copy = (1 << 22) if smoke else (1 << 28)  # 16 MiB on the CPU, 1 GiB of float32 on the GPU
    src = torch.empty(n_copy, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ceilings = {"bandwidth": 2 * src.numel() * 4 / (timer(lambda: dst.copy_(src)) * 1e-6)}
    s = 256 if smoke else 8192
    a = torch.randn(s, s, device=device)
    b = torch.randn(s, s, device=device)
    bf16_from_fp32 = smoke and smoke_bf16_from_fp32
    fp32 = None
    if "fp32" in peaks or ("bf16" in peaks and bf16_from_fp32):
        fp32 = 2 * s ** 3 / (timer(lambda: a @ b) * 1e-6)
        if "fp32" in peaks:
            ceilings["fp32"] = fp32
    if "bf16" in peaks:
        if bf16_from_fp32:
            ceilings["bf16"] = fp32
        else:
            ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
            ceilings["bf16"] = 2 * s ** 3 / (timer(lambda: ab @ bb) * 1e-6)
    if "int8" in peaks:
        a8 = torch.randint(-64, 64, (s, s), dtype=torch.int8, device=device)
        b8 = torch.randint(-64, 64, (s, s), dtype=torch.int8, device=device).T.contiguous().T
        try:
            ceilings["int8"] = 2 * s ** 3 / (timer(lambda: torch._int_mm(a8, b8)) * 1e-6)
        except (RuntimeError, NotImplementedError) as exc:
            print(f"note: int8 peak not measured (torch._int_mm: {str(exc).splitlines()[0]}); using 2 x bf16")
            ceilings["int8"] = 2 * ceilings["bf16"]
    if "fp8" in peaks:
        try:
            af8, bf8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).T.contiguous().T
            one = torch.ones((), device=device)
            ceilings["fp8"] = 2 * s ** 3 / (timer(lambda: torch._scaled_mm(af8, bf8, scale_a=one, scale_b=one,
                                                                             out_dtype=torch.bfloat16)) * 1e-6)
        except (RuntimeError, NotImplementedError, AttributeError) as exc:
            print(f"note: fp8 peak not measured ({str(exc).splitlines()[0][:100]}); using 2 x bf16")
            ceilings["fp8"] = 2 * ceilings["bf16"]
    return ceilings


def roofline_us(ceilings: dict[str, float], bytes_moved: float, flops: float = 0.0, peak: str = "bf16") -> float:
    return max(bytes_moved / ceilings["bandwidth"], flops / ceilings[peak] if flops else 0.0) * 1e6


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(smoke: bool) -> str:
    return f"cpu-smoke-{platform.machine()}" if smoke else torch.cuda.get_device_name()


def device_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def triton_version(smoke: bool, script: str, under_test: str = "the kernels under test are Triton"
                   ) -> tuple[str | None, int | None]:
    """(version, None) or (None, exit status) when a GPU run lacks triton."""
    try:
        import triton
        return triton.__version__, None
    except ImportError:
        if smoke:
            return None, None
        print(f"{script}: triton is not installed; pip install triton ({under_test})")
        return None, 2


def path_mode() -> str:
    return "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "reference"


def write_records(records: list[dict], kernel: str, name: str, smoke: bool, out: Path | None) -> Path:
    if out is None:
        folder = Path(os.environ.get("TMPDIR", "/tmp")) if smoke else ROOT / "bench" / "results"
        out = folder / f"{kernel}-{device_slug(name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1))
    return out


SMOKE_GOALS = "goals: judged on a GPU run only (a smoke run times the CPU references)"


def finish(records: list[dict], notes: list[str], *, kernel: str, name: str, triton: str | None,
           ceilings_meta: dict[str, float], smoke: bool, out: Path | None, print_table, goal_lines,
           smoke_goals: str = SMOKE_GOALS) -> int:
    """The common end of main(): run metadata into every record, the table, notes, goals, the JSON file."""
    meta = {"device": name, "torch": torch.__version__, "triton": triton, "commit": git_commit(),
            "ceilings": ceilings_meta}
    for r in records:
        r.update(meta)
    print_table(records)
    for note in dict.fromkeys(notes):
        print("note:", note)
    if smoke:
        print(smoke_goals)
    else:
        for line in goal_lines(records):
            print("goal:", line)
    out = write_records(records, kernel, name, smoke, out)
    print(f"wrote {len(records)} records to {out}")
    return 0
