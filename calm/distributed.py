"""Scale-out with torch.distributed: `torchrun --nproc-per-node N -m calm.run ...` (NCCL on GPUs, gloo on CPUs).

Two ways to split the search (`--parallel`):
- `candidates`: the pool's candidates are spread over the processes; every process holds all calibration
  windows, quantizes and scores its own candidates, the scores are exchanged, every process makes the same
  choice and reads the winner's block from the shared state folder. The result is the single-process one
  exactly. With independent propagation (every block calibrated on float inputs) the blocks themselves are
  spread too: each process decides its blocks with the whole pool, and the decisions are exchanged at the end.
  The evaluations after the search (float, uniform members, hybrid) and the exact baselines' own sequential
  passes are spread over the processes as well.
- `data`: the calibration windows (and the scoring and evaluation windows) are sharded over the processes;
  every statistic an algorithm sums over tokens (GPTQ/CLAQ/rotation Hessians, AWQ's activation means, losses
  and clip errors, SmoothQuant's maxima, the affine candidate's gradients, CKA's co-moments, MSE and NLL sums)
  is all-reduced, so every process fits the same quantized block on 1/N of the activations each.
- `auto`: `candidates` when the pool has at least as many members as there are processes (or the blocks can be
  spread), else `data`.
One process alone (no torchrun) is the plain single-process run. Only rank 0 writes results.json, the model
and the tables; block state goes to the output folder's `state/`, which every process must see (one machine,
or a shared filesystem), so a killed job resumes at the first undecided block on any number of processes.

Why hand-written over torch.distributed and not a library: no PTQ toolkit spreads an algorithm *search*; the
collectives themselves are torch.distributed's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import os
import pickle
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from calm.config import PARALLEL_MODES as MODES
from calm.config import CalmUsageError

# Seconds a collective waits for the other processes before the job stops (a process that died): long enough
# for the slowest candidate of a block on one process while the others wait at the exchange.
DEFAULT_TIMEOUT = 3600
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place: rank, number of processes, and how the work is split ("single" when alone)."""
    rank: int = 0
    size: int = 1
    mode: str = "single"

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def data(self) -> bool:
        return self.active and self.mode == "data"

    @property
    def candidates(self) -> bool:
        return self.active and self.mode == "candidates"

    def owner(self, index: int) -> int:
        """The rank that does item `index` of a list spread round-robin."""
        return index % self.size

    def mine(self, items: Sequence[T]) -> list[T]:
        return [x for i, x in enumerate(items) if self.owner(i) == self.rank]

    def shard(self, windows: torch.Tensor | None) -> torch.Tensor | None:
        """This process's windows in `data` mode (every size-th, from its rank); all of them otherwise."""
        if windows is None or not self.data:
            return windows
        return windows[self.rank::self.size]

    def unshard(self, per_window: torch.Tensor) -> torch.Tensor:
        """Per-window values of this process's shard, gathered back into the unsharded window order."""
        if not self.data:
            return per_window
        parts = self.gather(per_window.cpu())
        out = torch.empty(sum(p.shape[0] for p in parts), dtype=per_window.dtype)
        for rank, part in enumerate(parts):
            out[rank::self.size] = part
        return out

    # Collectives (no-ops alone) ------------------------------------------------------------------------------
    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the processes in place (and return it)."""
        if self.active:
            with traffic(t.numel() * t.element_size()):
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            with traffic(t.numel() * t.element_size()):
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t

    def sum_data_(self, t: torch.Tensor) -> torch.Tensor:
        """`sum_` in `data` mode (a token statistic to combine over the shards); untouched otherwise."""
        return self.sum_(t) if self.data else t

    def max_data_(self, t: torch.Tensor) -> torch.Tensor:
        return self.max_(t) if self.data else t

    def sum_data(self, *values: float) -> list[float]:
        """Python numbers summed over the shards in `data` mode."""
        if not self.data:
            return list(values)
        return self.sum_(torch.tensor(values, dtype=torch.float64, device=_collective_device())).tolist()

    def gather(self, obj: T) -> list[T]:
        """Every process's `obj`, by rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        with traffic(len(pickle.dumps(obj))):
            torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T, src: int = 0) -> T:
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        with traffic(len(pickle.dumps(obj)) if self.rank == src else 0):
            torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            with traffic(0):
                torch.distributed.barrier()


# What this process sent to collectives: calls, bytes (its own contribution) and seconds inside them (waiting
# for the others included), for results.json and bench/scaling.py.
TRAFFIC = {"calls": 0, "bytes": 0, "seconds": 0.0}


@contextlib.contextmanager
def traffic(nbytes: int):
    start = time.perf_counter()
    try:
        yield
    finally:
        TRAFFIC["calls"] += 1
        TRAFFIC["bytes"] += int(nbytes)
        TRAFFIC["seconds"] += time.perf_counter() - start


SINGLE = World()
_current = SINGLE


def current() -> World:
    """The world of this process (set by `start`; the single process otherwise)."""
    return _current


def _collective_device() -> torch.device:
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def alone():
    """Run the body as a single process (no collectives), e.g. one exact baseline per process."""
    global _current
    saved, _current = _current, SINGLE
    try:
        yield
    finally:
        _current = saved


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started this process among several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(parallel: str, pool_size: int, device: torch.device, settings: str, spreads_blocks: bool = False
          ) -> World:
    """Join the process group torchrun set up (nothing when launched alone), choose the mode and check that
    every process runs the same settings. `device`: this process's compute device (cuda:LOCAL_RANK on GPUs);
    `spreads_blocks`: the search can spread blocks over the processes (independent propagation), so a pool
    smaller than the number of processes still keeps them all busy in candidates mode."""
    global _current
    if parallel not in MODES:
        raise CalmUsageError(f"--parallel {parallel!r}: choose one of {', '.join(MODES)}")
    if not launched():
        _current = SINGLE
        return _current
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=int(os.environ.get("CALM_DIST_TIMEOUT", DEFAULT_TIMEOUT)))
        torch.distributed.init_process_group(backend, timeout=timeout)
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mode = parallel if parallel != "auto" else ("candidates" if pool_size >= size or spreads_blocks else "data")
    world = World(rank, size, mode)
    digests = world.gather(hashlib.sha256(settings.encode()).hexdigest())
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise CalmUsageError(f"processes {differ} run other settings than process 0: give every process the same "
                             f"command line")
    if mode == "candidates" and pool_size < size and not spreads_blocks:
        raise CalmUsageError(f"--parallel candidates spreads {pool_size} candidates over {size} processes, so "
                             f"{size - pool_size} would idle: use --parallel data (or auto), or fewer processes")
    _current = world
    return world


def local_device(name: str) -> str:
    """The device name this process uses: under torchrun on GPUs, `cuda` means cuda:LOCAL_RANK."""
    if launched() and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


def stop() -> None:
    global _current
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _current = SINGLE


def failure_line(exc: BaseException) -> str | None:
    """One line for a collective that failed because another process died or hung; None for other errors."""
    names = {"DistBackendError", "DistNetworkError", "DistStoreError", "DistError"}
    if type(exc).__name__ in names or (isinstance(exc, RuntimeError) and any(
            s in str(exc) for s in ("Connection closed by peer", "Connection reset by peer", "Timed out",
                                    "timed out", "NCCL communicator was aborted", "Broken pipe"))):
        first = " ".join(str(exc).split())[:200]
        return (f"another process of this job stopped or stalled ({type(exc).__name__}: {first}); rerun the same "
                f"torchrun command to resume from the blocks already saved")
    return None
