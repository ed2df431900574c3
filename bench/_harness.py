"""The kernel benchmark harness behind `pytest bench/` (bench/conftest.py, bench/test_bench_kernels.py).

The bench_<kernel>.py scripts stay the single source of shapes, cases, peers and rooflines: the harness calls
their own `bench_shape` / `bench_case` with a recording timer that returns a unique negative sentinel instead of
a time. Each record a script builds around a sentinel becomes one pytest case per timing mode, holding the
script's closure (the provider's call on its inputs) and the script's record (provider, shape, bits, roofline,
extras); the harness times the closure (bench/_timing.py) and fills in `median_us` and `timing`. Records the
script timed itself (the CPU peers scikit-learn and kmeans1d, scaled from a few columns) are kept as they are,
marked `timing: eager`.

The adapters below are the only coupling to the scripts: one small function per kernel naming the groups
(one script call each) and calling the script with the harness's timer.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _common as B  # noqa: E402
from bench import _timing as T  # noqa: E402

KERNELS = ("qgemm", "rotated", "cka", "kmeans")
# Errors after which the CUDA context is unusable: the rest of the process is skipped (the next kernel runs in a
# fresh process under scripts/bench_gpu.sh).
STICKY_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "misaligned address",
                      "illegal instruction", "device-side assert", "uncorrectable ECC")


# ---- discovery ------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One timer call a script made: the provider's call(s) and whether it asked for a few slow repetitions."""
    calls: list[Callable] | None
    slow_rounds: int | None
    pending: int = 0  # harness cases still to run on it; the calls are dropped at zero (frees device memory)


@dataclass
class Case:
    id: str
    kernel: str
    group: str
    mode: str
    record: dict
    entry: Entry | None = None
    error: str | None = None  # a group that failed to build: the case records the error and skips


class RecordingTimer:
    """Stands in for a script's timer: remembers the call and returns a sentinel (-1, -2, ...)."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def __call__(self, fn, reps: int | None = None) -> float:
        calls = list(fn) if isinstance(fn, (list, tuple)) else [fn]
        self.entries.append(Entry(calls=calls, slow_rounds=reps))
        return -float(len(self.entries))

    def entry_for(self, value) -> Entry | None:
        if isinstance(value, float) and value < 0 and value.is_integer() and -value <= len(self.entries):
            return self.entries[int(-value) - 1]
        return None


def _script(kernel: str):
    return importlib.import_module(f"bench.bench_{kernel}")


def call_script(fn: Callable, timer: RecordingTimer, **kwargs) -> list[dict]:
    """Call a script's bench_shape / bench_case with the harness's timer, whichever way the script takes one: a
    `timer` parameter, or module-level helpers (`cpu_median_us`, `gpu_median_us`: a list of calls and reps) that are
    patched for the call. `rotation_count` (copies that defeat L2) is pinned to 1: the harness flushes L2 itself."""
    import inspect

    mod = sys.modules[fn.__module__]
    params = inspect.signature(fn).parameters
    if "timer" in params:
        kwargs["timer"] = timer
    patches = [mock.patch.object(mod, name, lambda calls, reps=None: timer(calls))
               for name in ("cpu_median_us", "gpu_median_us") if hasattr(mod, name)]
    if hasattr(mod, "rotation_count"):
        patches.append(mock.patch.object(mod, "rotation_count", lambda *a, **k: 1))
    if "timer" not in params and not patches:
        raise RuntimeError(f"{fn.__module__}.{fn.__name__} takes no timer and has no timer helpers to patch: "
                           "update the adapter in bench/_harness.py")
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        return fn(**{k: v for k, v in kwargs.items() if k in params or k == "timer"})


def _qgemm_groups(mod, device: str, smoke: bool) -> Iterator[tuple[str, Callable]]:
    shapes = mod.SMOKE_SHAPES if smoke else mod.SHAPES
    tokens = mod.SMOKE_TOKENS if smoke else mod.TOKENS
    for n, k in shapes:
        if k % mod.GROUP:
            continue
        yield (f"{n}x{k}", lambda timer, ceilings, notes, n=n, k=k: call_script(
            mod.bench_shape, timer, n=n, k=k, tokens=tokens, cases=list(mod.CASES), device=device, smoke=smoke,
            ceilings=ceilings, notes=notes))


def _rotated_groups(mod, device: str, smoke: bool) -> Iterator[tuple[str, Callable]]:
    dtype = torch.float32 if smoke else torch.bfloat16
    cases = [(shape, mod.SMOKE_TOKENS if smoke else mod.TOKENS) for shape in
             (mod.SMOKE_SHAPES if smoke else mod.SHAPES)]
    # widths that need the chunked Hadamard, where the script has them (fewer M values; smoke: M=1, one scheme)
    wide = getattr(mod, "SMOKE_WIDE_SHAPES", []) if smoke else getattr(mod, "WIDE_SHAPES", [])
    cases += [(shape, [1] if smoke else getattr(mod, "WIDE_TOKENS", mod.TOKENS)) for shape in wide]
    for scheme in ("W3A3", "W4A4"):
        for (n, k), tokens in cases:
            if smoke and (n, k) in wide and scheme != "W3A3":
                continue
            for m in tokens:
                yield (f"{scheme}-{n}x{k}-M{m}", lambda timer, ceilings, notes, n=n, k=k, m=m, scheme=scheme:
                       call_script(mod.bench_shape, timer, n=n, k=k, m=m, scheme=scheme, device=device, dtype=dtype,
                                   ceilings=ceilings, notes=notes, smoke=smoke))


def _cka_groups(mod, device: str, smoke: bool) -> Iterator[tuple[str, Callable]]:
    dtype = torch.float32 if smoke else torch.bfloat16
    for n in mod.SMOKE_TOKENS if smoke else mod.TOKENS:
        for d in mod.SMOKE_FEATURES if smoke else mod.FEATURES:
            yield (f"n{n}-d{d}", lambda timer, ceilings, notes, n=n, d=d: call_script(
                mod.bench_shape, timer, n=n, d=d, device=device, dtype=dtype, ceilings=ceilings, smoke=smoke,
                notes=notes))


def _kmeans_groups(mod, device: str, smoke: bool) -> Iterator[tuple[str, Callable]]:
    for rows, cols in mod.SMOKE_SHAPES if smoke else mod.SHAPES:
        for bits in mod.BITS:
            yield (f"{rows}x{cols}-b{bits}", lambda timer, ceilings, notes, rows=rows, cols=cols, bits=bits:
                   call_script(mod.bench_case, timer, rows=rows, cols=cols, bits=bits, device=device, use_imp=False,
                               ceilings=ceilings, cpu_columns=4 if smoke else 32, notes=notes, smoke=smoke))


ADAPTERS = {"qgemm": _qgemm_groups, "rotated": _rotated_groups, "cka": _cka_groups, "kmeans": _kmeans_groups}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+:=-]+", "_", text).strip("_")


def _case_label(rec: dict) -> str:
    parts = [rec.get("provider", "?")]
    for key in ("case", "scheme"):
        if rec.get(key) is not None:
            parts.append(str(rec[key]))
    shape = rec.get("shape")
    if isinstance(shape, dict):
        parts.append("-".join(f"{k}{v}" for k, v in shape.items()))
    return _slug("-".join(parts))


# ---- the session ----------------------------------------------------------------------------------------

@dataclass
class Session:
    smoke: bool
    kernels: tuple[str, ...]
    out_dir: Path
    budget_s: float | None
    group_filter: str | None = None
    group_first: str | None = None  # groups matching this run first (the goal cases, before the budget runs out)
    started: float = field(default_factory=time.monotonic)
    device: str = "cpu"
    device_label: str = ""
    ceilings: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    records: dict[str, list[dict]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    poisoned: str | None = None
    flusher: T.Flusher | None = None
    scripts: dict = field(default_factory=dict)

    # -- set-up --
    def start(self) -> None:
        self.device = "cpu" if self.smoke else "cuda"
        self.device_label = B.device_name(self.smoke)
        timer = B.make_timer(self.smoke)
        self.ceilings = B.measure_ceilings(self.device, timer, self.smoke, peaks=("fp32", "bf16", "int8", "fp8"))
        triton_version, _ = B.triton_version(True, "bench")
        self.meta = {"device": self.device_label, "torch": torch.__version__, "triton": triton_version,
                     "commit": B.git_commit(),
                     "ceilings": {"bandwidth_GBps": self.ceilings["bandwidth"] / 1e9,
                                  **{f"{p}_TFLOPS": self.ceilings[p] / 1e12 for p in ("fp32", "bf16", "int8", "fp8")}}}
        self.flusher = T.Flusher(self.device)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def over_budget(self, fraction: float = 1.0) -> bool:
        return self.budget_s is not None and self.elapsed() > fraction * self.budget_s

    def discover(self) -> list[Case]:
        """Every kernel's groups, each built by its script with the recording timer; a group that fails (or is
        reached after half the time budget) becomes one error case."""
        cases: list[Case] = []
        for kernel in self.kernels:
            self.records.setdefault(kernel, [])
            try:
                mod = self.scripts[kernel] = _script(kernel)
                groups = list(ADAPTERS[kernel](mod, self.device, self.smoke))
                if self.group_first:
                    groups.sort(key=lambda g: not re.search(self.group_first, f"{kernel}-{g[0]}"))
            except Exception as exc:  # a script that no longer imports or changed its case lists
                cases.append(self._error_case(kernel, "import", f"{type(exc).__name__}: {exc}"))
                continue
            for group, run in groups:
                if self.group_filter and not re.search(self.group_filter, f"{kernel}-{group}"):
                    continue
                if self.over_budget(0.5) or self.poisoned:
                    cases.append(self._error_case(kernel, group, self.poisoned or
                                                  "not run: half the time budget went on building cases"))
                    continue
                cases += self._discover_group(kernel, group, run)
        return cases

    def _discover_group(self, kernel: str, group: str, run: Callable) -> list[Case]:
        timer = RecordingTimer()
        notes: list[str] = []
        try:
            built = run(timer, self.ceilings, notes)
        except Exception as exc:
            self._check_sticky(exc)
            return [self._error_case(kernel, group, _one_line(exc), detail=traceback.format_exc(limit=3))]
        finally:
            self.notes += [f"{kernel}: {n}" for n in notes]
        cases, seen = [], set()
        for rec in built:
            entry = timer.entry_for(rec.get("median_us"))
            if entry is None:  # timed by the script itself (a CPU peer): kept as is
                self.add_record(kernel, {**rec, "timing": "eager", "timed_by": "script", "group": group})
                continue
            template = {k: v for k, v in rec.items() if k != "median_us"}
            for mode in T.MODES:
                if mode == "cuda-graph" and entry.slow_rounds is not None:
                    continue  # the script marked it slow (a reference or heavy peer): eager only
                base = f"{kernel}-{group}-{_case_label(rec)}-{mode}"
                case_id, i = base, 1
                while case_id in seen:
                    i += 1
                    case_id = f"{base}-{i}"
                seen.add(case_id)
                entry.pending += 1
                cases.append(Case(case_id, kernel, group, mode, template, entry))
        if not cases and not any(r.get("group") == group for r in self.records[kernel]):
            return [self._error_case(kernel, group, "the script's timer was not intercepted (no sentinel came "
                                                    "back): update the adapter in bench/_harness.py")]
        return cases

    def _error_case(self, kernel: str, group: str, error: str, detail: str | None = None) -> Case:
        rec = {"kernel": kernel, "provider": None, "shape": None, "dtype": None, "bits": None, "roofline_us": None,
               "group": group}
        if detail:
            rec["traceback"] = detail
        return Case(_slug(f"{kernel}-{group}-error"), kernel, group, "none", rec, error=error)

    # -- running --
    def run(self, case: Case, benchmark) -> dict:
        """Time one case; on failure the error goes into its record. Returns the record."""
        rec = {**case.record, "group": case.group, "timing": case.mode, "pytest_id": case.id}
        try:
            if case.error is not None:
                raise CaseNotRun(case.error)
            if self.poisoned:
                raise CaseNotRun(f"not run: {self.poisoned}")
            if self.over_budget():
                raise CaseNotRun(f"not run: time budget of {self.budget_s:.0f} s spent")
            rec.update(self._measure(case, benchmark))
        except Exception as exc:
            self._check_sticky(exc)
            rec.update(median_us=None, error=_one_line(exc))
        finally:
            if case.entry is not None:
                case.entry.pending -= 1
                if case.entry.pending <= 0:
                    case.entry.calls = None  # the group's tensors go once its last case has run
                    if self.device != "cpu" and not self.poisoned:
                        torch.cuda.empty_cache()
        self.add_record(case.kernel, rec)
        return rec

    def _measure(self, case: Case, benchmark) -> dict:
        calls = case.entry.calls
        with torch.no_grad():
            probe_s = T.warm_up(calls, self.device, probe=case.entry.slow_rounds is None)
            flush_s = 0.0 if self.smoke else self.flusher.nbytes / self.ceilings["bandwidth"]
            plan = T.make_plan(probe_s, flush_s, self.smoke, case.entry.slow_rounds)
            if case.mode == "cuda-graph":
                try:
                    return T.time_cuda_graph(benchmark, calls, self.flusher, self.device, plan)
                except Exception:
                    if self.device != "cpu":
                        torch.cuda.synchronize()  # raises if the failed capture broke the context
                    raise
            return T.time_eager(benchmark, calls, self.flusher, self.device, plan)

    def _check_sticky(self, exc: BaseException) -> None:
        text = str(exc)
        if any(s in text for s in STICKY_CUDA_ERRORS):
            self.poisoned = f"the CUDA context failed earlier ({_one_line(exc)[:120]})"

    # -- output --
    def add_record(self, kernel: str, rec: dict) -> None:
        self.records.setdefault(kernel, []).append({**rec, **self.meta})
        self.write(kernel)

    def path(self, kernel: str) -> Path:
        return self.out_dir / f"{kernel}-{B.device_slug(self.device_label)}.json"

    def write(self, kernel: str) -> None:
        from calm.io import atomic_write_json  # after each case: a killed run keeps what it measured
        atomic_write_json(self.path(kernel), self.records[kernel])


class CaseNotRun(Exception):
    pass


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


# ---- the printed summary --------------------------------------------------------------------------------

def _fmt(x: float | None, width: int = 9, digits: int = 2) -> str:
    return f"{x:{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def ratio_lines(records: list[dict]) -> list[str]:
    """Per group and timing mode: each provider's time, its roofline, time/roofline, and for a peer ours/peer
    (calm's time over the peer's, below 1 when ours is faster) against the calm records it is compared with
    (bench_tables.counterparts: the same case, or the same part)."""
    from bench.bench_tables import counterparts

    lines: list[str] = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("provider") is None:
            continue
        groups.setdefault((r.get("group"), json.dumps(r.get("shape"), sort_keys=True), r.get("timing")), []).append(r)
    header = f"{'timing':10} {'provider':34} {'case':10} {'bits':>4} {'median_us':>11} {'roofline_us':>11} " \
             f"{'/roof':>7}  ours/peer"
    for (group, shape, timing), rows in groups.items():
        lines.append(f"-- {group} {shape}")
        lines.append(header)
        for r in rows:
            us, roof = r.get("median_us"), r.get("roofline_us")
            rel = []
            if us and not r["provider"].startswith("calm"):
                for o in counterparts(r, rows):
                    rel.append(f"{o['provider']} {o.get('case') or ''} {o['median_us'] / us:.2f}".replace("  ", " "))
            label = r.get("case") or r.get("scheme") or ""
            tail = ", ".join(rel) if rel else (r.get("error") or "")
            lines.append(f"{timing:10} {r['provider'][:34]:34} {str(label)[:10]:10} {str(r.get('bits')):>4} "
                         f"{_fmt(us, 11)} {_fmt(roof, 11)} {_fmt(us / roof if us and roof else None, 7)}  {tail}")
    return lines


def goal_lines(mod, records: list[dict]) -> list[str]:
    """The script's own goal lines, judged once per timing mode on the records that have a time."""
    out = []
    for mode in T.MODES:
        ok = [r for r in records if r.get("timing") == mode and r.get("median_us")]
        if not ok:
            continue
        try:
            out += [f"goal [{mode}]: {line}" for line in mod.goal_lines(ok)]
        except Exception as exc:  # a goal that needs a provider that failed
            out.append(f"goal [{mode}]: not judged ({_one_line(exc)})")
    return out


def summary(session: Session) -> list[str]:
    lines = [f"device: {session.device_label}; torch {session.meta.get('torch')}; triton "
             f"{session.meta.get('triton')}; measured " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                                     session.meta.get("ceilings", {}).items())]
    if session.smoke:
        lines.append("smoke run on the CPU: timings mean nothing; goals are judged on a GPU run only")
    for kernel, records in session.records.items():
        lines.append(f"== {kernel}: {len(records)} records -> {session.path(kernel)}")
        lines += ratio_lines(records)
        failed = [r for r in records if r.get("error")]
        if failed:
            lines.append(f"{len(failed)} {kernel} records carry an error (not run, refused or failed):")
            for msg, count in _count(r["error"] for r in failed):
                lines.append(f"  {count} x {msg[:160]}")
        if not session.smoke and kernel in session.scripts:
            lines += goal_lines(session.scripts[kernel], records)
    for note, count in _count(session.notes):
        lines.append(f"note: {note}" + (f" (x{count})" if count > 1 else ""))
    return lines


def _count(items) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for x in items:
        counts[x] = counts.get(x, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


def default_out_dir(smoke: bool) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / "calm-bench-smoke" if smoke else ROOT / "bench" / "results"
