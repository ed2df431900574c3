"""How the benchmark harness times one provider: CUDA-graph kernel time and eager module-forward time, both with
L2 flushed, measured through pytest-benchmark's `benchmark.pedantic` with a device clock.

- cuda-graph: N launches are captured in one CUDA graph, each preceded by an L2 flush (a read of a buffer
  twice the L2 size); a second graph holds the N flushes alone. One pytest-benchmark round replays the first
  graph between two CUDA events; the clock reports (elapsed - median elapsed of the flush-only graph) / N,
  so pytest-benchmark's statistics are per-launch kernel time with no Python launch overhead in them.
- eager: before each round the L2 is flushed and the device synchronized (outside the timed region); the round
  is one Python call between two CUDA events, so the host's launch overhead counts (the device sits idle until
  the call's kernels arrive): what a user's single call costs.

On the CPU (smoke runs) the clock is time.perf_counter, the flush reads a 256 KiB buffer, and the "graph" is a
Python loop over the same N (flush, call) pairs, nothing subtracted: the plumbing runs, the numbers mean nothing.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

L2_FALLBACK_BYTES = 50 << 20  # H100/H200 L2 when the driver does not report it
CPU_FLUSH_BYTES = 256 << 10
MODES = ("cuda-graph", "eager")


@dataclass
class Plan:
    """How many launches per graph and rounds per mode, chosen from one probe call."""
    launches: int
    graph_rounds: int
    eager_rounds: int
    slow: bool = False  # a provider the script marked slow: no untimed warm-up round (it was warmed already)


class Flusher:
    """Evicts the L2 by reading a buffer twice its size (one sum reduction). Reading, not writing: the cache is left
    holding clean lines of the buffer, so the timed call that follows finds none of its operands there and pays no
    write-back of the flush's dirty lines (a write flush would charge those DRAM writes to the timed kernel)."""

    def __init__(self, device: str) -> None:
        if device == "cpu":
            nbytes = CPU_FLUSH_BYTES
        else:
            l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
            nbytes = 2 * (l2 or L2_FALLBACK_BYTES)
        self.buffer = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        self.sink = torch.zeros((), dtype=torch.float32, device=device)
        self.nbytes = nbytes

    def __call__(self) -> None:
        torch.sum(self.buffer, 0, out=self.sink)


class DeviceClock:
    """A pytest-benchmark timer. pytest-benchmark calls timer() before and after each round and records the
    difference; this clock returns a running total that grows by (round time - offset) / divisor, where the round
    time is measured with CUDA events on the current stream (the end call synchronizes) or perf_counter on the
    CPU."""

    def __init__(self, device: str, divisor: int = 1, offset_s: float = 0.0) -> None:
        self.cuda = device != "cpu"
        self.divisor = divisor
        self.offset_s = offset_s
        self.total = 0.0
        self._start = None

    def __repr__(self) -> str:  # how pytest-benchmark's JSON names the timer
        clock = "cuda-events" if self.cuda else "perf_counter"
        return f"DeviceClock({clock}, per_launch=1/{self.divisor}, minus_flush_s={self.offset_s:.3g})"

    def __call__(self) -> float:
        if self._start is None:
            if self.cuda:
                self._start = torch.cuda.Event(enable_timing=True)
                self._start.record()
            else:
                self._start = time.perf_counter()
            return self.total
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            elapsed = self._start.elapsed_time(end) * 1e-3
        else:
            elapsed = time.perf_counter() - self._start
        self._start = None
        self.total += (elapsed - self.offset_s) / self.divisor
        return self.total


def synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def cycler(calls: list[Callable]) -> Callable[[], object]:
    """One call per invocation, going round the provider's copies (the scripts may hand several)."""
    state = {"i": 0}

    def call():
        fn = calls[state["i"] % len(calls)]
        state["i"] += 1
        return fn()
    return call


def warm_up(calls: list[Callable], device: str, probe: bool = True) -> float:
    """Run every copy once (autotuning, lazy caches), on a side stream on CUDA as graph capture requires; return
    the seconds of one further synchronized call (the probe the plan is made from; 0 without `probe`)."""
    if device == "cpu":
        for c in calls:
            c()
    else:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
    if not probe:
        return 0.0
    t0 = time.perf_counter()
    calls[0]()
    synchronize(device)
    return time.perf_counter() - t0


def make_plan(probe_s: float, flush_s: float, smoke: bool, slow_rounds: int | None = None) -> Plan:
    """About 50 ms of timed work per mode: graphs of up to 20 launches, 3-20 rounds; 5-50 eager rounds.
    slow_rounds: the script marked this provider slow (a reference, a CPU-heavy peer): that many eager rounds."""
    if smoke:
        return Plan(launches=2, graph_rounds=2, eager_rounds=2)
    per_launch = max(probe_s, 1e-6) + flush_s
    launches = int(min(20, max(1, 1e-3 // per_launch)))
    graph_rounds = int(min(20, max(3, 0.05 // (launches * per_launch))))
    eager_rounds = int(min(50, max(5, 0.05 // per_launch)))
    if slow_rounds is not None:
        return Plan(launches, graph_rounds, max(3, slow_rounds), slow=True)
    return Plan(launches, graph_rounds, eager_rounds)


def _median_elapsed(fn: Callable[[], object], device: str, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        clock = DeviceClock(device)
        clock()
        fn()
        times.append(clock())
    return statistics.median(times)


class _PythonGraph:
    """The CPU stand-in for a captured graph: the same sequence, replayed by Python."""

    def __init__(self, seq: list[Callable]) -> None:
        self.seq = seq

    def replay(self) -> None:
        for fn in self.seq:
            fn()


def capture(seq: list[Callable], device: str):
    """A CUDA graph of the calls in seq (the CPU: a Python replay of them)."""
    if device == "cpu":
        return _PythonGraph(seq)
    return capture_cuda_graph(lambda: [fn() for fn in seq])


def capture_cuda_graph(body: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """torch.cuda.graph around body, restoring the caller's stream when the capture fails (torch's context manager
    leaves its capture stream current when capture_end raises, e.g. after a host sync inside the body)."""
    previous = torch.cuda.current_stream()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            body()
    except BaseException:
        torch.cuda.set_stream(previous)
        raise
    torch.cuda.synchronize()
    return graph


def time_cuda_graph(benchmark, calls: list[Callable], flush: Flusher, device: str, plan: Plan) -> dict:
    """Per-launch kernel time of the provider with the L2 flushed before every launch (see the module doc)."""
    seq: list[Callable] = []
    for i in range(plan.launches):
        seq += [flush, calls[i % len(calls)]]
    graph = capture(seq, device)
    flush_graph = capture([flush] * plan.launches, device)
    flush_graph.replay()
    flush_s = _median_elapsed(flush_graph.replay, device, max(3, plan.graph_rounds))
    # On the CPU the flush is no L2 eviction worth subtracting, and a loaded host makes the difference noisy.
    offset_s = 0.0 if device == "cpu" else flush_s
    benchmark._timer = DeviceClock(device, divisor=plan.launches, offset_s=offset_s)
    benchmark.pedantic(graph.replay, rounds=plan.graph_rounds, warmup_rounds=1, iterations=1)
    return {"median_us": _benchmark_median_s(benchmark) * 1e6, "launches_per_graph": plan.launches,
            "rounds": plan.graph_rounds, "flush_us": flush_s / plan.launches * 1e6}


def time_eager(benchmark, calls: list[Callable], flush: Flusher, device: str, plan: Plan) -> dict:
    """One Python call per round from an idle device with a cold L2 (flush and synchronize are untimed setup)."""
    def setup():
        flush()
        synchronize(device)

    benchmark._timer = DeviceClock(device)
    benchmark.pedantic(cycler(calls), setup=setup, rounds=plan.eager_rounds, warmup_rounds=0 if plan.slow else 1,
                       iterations=1)
    return {"median_us": _benchmark_median_s(benchmark) * 1e6, "rounds": plan.eager_rounds}


def _benchmark_median_s(benchmark) -> float:
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        raise RuntimeError("pytest-benchmark recorded no statistics: run without --benchmark-disable")
    return float(stats.stats.median)
