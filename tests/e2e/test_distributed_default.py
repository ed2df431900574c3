"""The real default model (SmolLM2-135M) on the CPU with 2 gloo processes (torchrun): the same per-block
decisions and perplexities within 0.1% of the single-process run (data-parallel: every token statistic is
all-reduced over the two shards of the calibration and evaluation windows)."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from calm.run import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--scheme", "W3A16G64", "--pool", "rtn,gptq", "--calib-windows", "4", "--calib-seqlen", "512",
        "--eval-seqlen", "512", "--eval-tokens", "2048", "--no-baselines", "-q"]


def test_two_processes_match_one_on_the_default_model(tmp_path):
    assert main([*ARGS, "--output", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), "-m", "calm.run", *ARGS, "--output",
                           str(tmp_path / "two"), "--parallel", "data"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert [b["chosen"] for b in two["blocks"]] == [b["chosen"] for b in one["blocks"]]
    for name, ppl in one["perplexity"].items():
        assert two["perplexity"][name] == pytest.approx(ppl, rel=1e-3)
