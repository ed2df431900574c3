"""torchrun jobs (gloo on the CPU): candidate-parallel gives the single-process result exactly, data-parallel
within 0.1%; a job resumes on another number of processes; mismatched settings and a dead process stop every
process with one line."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calm.run import main

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a jumbo vortex".split()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny llama checkpoint, a text file, and the settings every run of this module shares."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_arch import save_family

    folder = tmp_path_factory.mktemp("dist")
    save_family("llama", folder / "ckpt")
    text = folder / "text.txt"
    text.write_text("\n\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(50)) for i in range(50)))
    return folder, ["--model", str(folder / "ckpt"), "--text", str(text), "--scheme", "W4A16G16", "--pool",
                    "rtn,gptq,awq", "--calib-windows", "4", "--calib-seqlen", "32", "--eval-seqlen", "32",
                    "--eval-tokens", "256", "--batch-windows", "2", "-q"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "calm.run", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def launch(args: list[str], rank: int, port: int, log: Path, extra_env: dict | None = None) -> subprocess.Popen:
    """One process of a 2-process job started by hand (as a multi-node launcher would), not by torchrun."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "calm.run", *args], cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def single(job):
    folder, args = job
    assert main([*args, "--output", str(folder / "single")]) == 0
    return results(folder / "single")


@pytest.mark.slow
def test_candidate_parallel_equals_the_single_process_run(job, single):
    folder, args = job
    done = torchrun([*args, "--output", str(folder / "candidates"), "--parallel", "candidates"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    two = results(folder / "candidates")
    assert [b["chosen"] for b in two["blocks"]] == [b["chosen"] for b in single["blocks"]]
    assert two["perplexity"] == single["perplexity"]
    assert [b["scores"]["gptq"]["cka"] for b in two["blocks"]] == [b["scores"]["gptq"]["cka"] for b in single["blocks"]]
    assert two["parallel"]["mode"] == "candidates" and len(two["parallel"]["per_process"]) == 2
    assert all(p["communication"]["calls"] > 0 for p in two["parallel"]["per_process"])


@pytest.mark.slow
def test_data_parallel_matches_the_single_process_run_within_a_tenth_of_a_percent(job, single):
    folder, args = job
    done = torchrun([*args, "--output", str(folder / "data"), "--parallel", "data"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    two = results(folder / "data")
    assert [b["chosen"] for b in two["blocks"]] == [b["chosen"] for b in single["blocks"]]
    for name, ppl in single["perplexity"].items():
        assert two["perplexity"][name] == pytest.approx(ppl, rel=1e-3)
    for a, b in zip(two["blocks"], single["blocks"]):  # CKA of all tokens, combined over the two shards
        assert a["scores"]["gptq"]["cka"] == pytest.approx(b["scores"]["gptq"]["cka"], abs=1e-6)


@pytest.mark.slow
def test_a_job_resumes_on_another_number_of_processes(job, single):
    """A 2-process job's block state is resumed by a single process, and the other way round."""
    folder, args = job
    out = folder / "resume"
    done = torchrun([*args, "--output", str(out), "--parallel", "candidates"])
    assert done.returncode == 0, done.stderr[-2000:]
    (out / "state" / "block_002.json").unlink()  # as if killed before the last decision
    for f in out.glob("state/block_002-*.safetensors"):
        f.unlink()
    assert main([*args, "--output", str(out)]) == 0
    assert results(out)["perplexity"] == single["perplexity"]
    done = torchrun([*[a for a in args if a != "-q"], "--output", str(out), "--parallel", "data"])
    assert done.returncode == 0 and "(resumed)" in done.stdout + done.stderr


@pytest.mark.slow
def test_mismatched_settings_are_refused_on_every_process(job, tmp_path):
    _, args = job
    port = free_port()
    procs = [launch([*args, "--output", str(tmp_path / "out"), "--seed", str(rank)], rank, port,
                    tmp_path / f"rank{rank}.log") for rank in range(2)]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [2, 2]
    for rank in range(2):
        err = [line for line in (tmp_path / f"rank{rank}.log").read_text().splitlines() if "calm: error" in line]
        assert len(err) == 1 and "run other settings than process 0" in err[0]


@pytest.mark.slow
def test_a_dead_process_stops_the_others_with_one_line(job, tmp_path):
    _, args = job
    out = tmp_path / "out"
    port = free_port()
    slow = [*args, "--output", str(out), "--parallel", "candidates", "--pool", "rtn,gptq,awq:n_grid=40,claq"]
    procs = [launch(slow, rank, port, tmp_path / f"rank{rank}.log", {"CALM_DIST_TIMEOUT": "60"})
             for rank in range(2)]
    deadline = time.time() + 120
    while not list(out.glob("state/block_000-*.safetensors")) and time.time() < deadline:
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    assert procs[0].wait(timeout=90) == 1
    assert time.time() - start < 60  # no hang
    err = [line for line in (tmp_path / "rank0.log").read_text().splitlines() if line.startswith("calm: error")]
    assert len(err) == 1 and "another process of this job stopped" in err[0] and "resume" in err[0]


@pytest.mark.slow
def test_independent_propagation_spreads_the_blocks(job):
    """Candidate-parallel with independent propagation: each process decides every other block with the whole
    pool; the decisions and the model are the single-process ones."""
    folder, args = job
    assert main([*args, "--propagation", "independent", "--output", str(folder / "ind-one")]) == 0
    done = torchrun([*args, "--propagation", "independent", "--output", str(folder / "ind-two"), "--parallel",
                     "candidates"])
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = results(folder / "ind-one"), results(folder / "ind-two")
    assert [b["chosen"] for b in two["blocks"]] == [b["chosen"] for b in one["blocks"]]
    assert two["perplexity"] == one["perplexity"]
