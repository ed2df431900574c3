"""How the CALM search scales with processes: 1 process, then torchrun with N processes in each parallel mode,
into bench/results/scaling-<device>.json.

Each configuration runs `python -m calm.run` on the default model (SmolLM2-135M, real text) with the same
settings and records, per process: wall time per stage (search, evaluations), seconds per decoded block,
and what it sent to the collectives (calls, bytes, seconds spent inside them, waiting for the others
included), as results.json's `parallel.per_process` reports them; and the perplexities, so that a record
shows the parallel run computed the same model.

    python bench/scaling.py                     # 1 and 2 processes, candidates and data (gloo on the CPU)
    python bench/scaling.py --processes 1,4 --modes data   # on a 4-GPU machine (NCCL)

The pool has one member per process at most in candidates mode (`--pool`, default rtn,gptq); the model of
how the search time scales to a 70B model and a pool of five is in bench/README.md ("Scaling out").
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from memory import commit, device_description, device_name  # noqa: E402

from calm.io import atomic_write_json  # noqa: E402

SETTINGS = ["--scheme", "W3A16G64", "--calib-windows", "8", "--calib-seqlen", "512", "--eval-seqlen", "512",
            "--eval-tokens", "4096", "--no-baselines"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, mode: str, pool: str, out: Path, log: Path) -> tuple[int, float]:
    args = [*SETTINGS, "--pool", pool, "--output", str(out)]
    if processes == 1:
        cmd = [sys.executable, "-m", "calm.run", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "calm.run", *args, "--parallel", mode]
    print(f"[scaling] {processes} process(es) {mode}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // processes))})
    return code, time.perf_counter() - start


def record(processes: int, mode: str, pool: str, code: int, wall: float, out: Path) -> dict:
    rec = {"processes": processes, "mode": mode, "pool": pool, "settings": SETTINGS, "exit_code": code,
           "wall_s": wall, "device": device_description(), "commit": commit()}
    path = out / "results.json"
    if code != 0 or not path.is_file():
        return rec
    results = json.loads(path.read_text())
    blocks = len(results["blocks"])
    rec.update(perplexity=results["perplexity"], chosen=[b["chosen"] for b in results["blocks"]],
               search_s=results["seconds"]["search"], search_s_per_block=results["seconds"]["search"] / blocks)
    per = results.get("parallel", {}).get("per_process")
    if per:
        rec["per_process"] = [{"search_s": p["seconds"].get("search"),
                               "eval_s": sum(v for k, v in p["seconds"].items() if k.startswith("eval_")),
                               "communication": p["communication"]} for p in per]
    else:
        rec["per_process"] = [{"search_s": results["seconds"]["search"],
                               "eval_s": sum(v for k, v in results["seconds"].items() if k.startswith("eval_")),
                               "communication": {"calls": 0, "bytes": 0, "seconds": 0.0}}]
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", default="1,2", help="process counts; 1 is the single-process reference")
    p.add_argument("--modes", default="candidates,data")
    p.add_argument("--pool", default="rtn,gptq")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"scaling-{device_name()}.json"))
    args = p.parse_args()
    records = []
    with tempfile.TemporaryDirectory(prefix="calm-scaling-") as tmp:
        work = Path(tmp)
        for n in (int(x) for x in args.processes.split(",")):
            for mode in (["single"] if n == 1 else args.modes.split(",")):
                out = work / f"{n}-{mode}"
                code, wall = launch(n, mode, args.pool, out, work / f"{n}-{mode}.log")
                rec = record(n, mode, args.pool, code, wall, out)
                records.append(rec)
                print(f"[scaling] {n} {mode}: exit {code}, {wall:.0f} s"
                      + (f", search {rec['search_s']:.0f} s" if "search_s" in rec else ""), flush=True)
                if code != 0:
                    print((work / f"{n}-{mode}.log").read_text()[-3000:], flush=True)
    base = next((r for r in records if r["processes"] == 1 and "search_s" in r), None)
    for r in records:
        if base is not None and "search_s" in r:
            r["search_speedup"] = base["search_s"] / r["search_s"]
    atomic_write_json(Path(args.out), records)
    print(f"[scaling] wrote {args.out}")
    return 0 if all(r["exit_code"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
