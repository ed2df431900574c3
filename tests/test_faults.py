"""A run killed (kill -9) at any point of the search, or stopped by a full disk, resumes and ends with the same
model files, byte for byte, as a run that was never interrupted."""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from calm.run import main

pytestmark = pytest.mark.slow

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards hex a bright vortex".split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(60)) for i in range(40)))
    return path


def _args(model_dir, text, out):
    return ["--model", str(model_dir), "--text", str(text), "--output", str(out), "--scheme", "W3A16G32",
            "--calib-windows", "4", "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-tokens", "128",
            "--batch-windows", "2", "--pool", "rtn,gptq", "-q"]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# The child kills itself with SIGKILL (no cleanup, like kill -9) at the n-th call of a state-writing function.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import calm.search.state as state
    target, n = sys.argv[1], int(sys.argv[2])
    original = getattr(state.BlockStateStore, target)
    calls = [0]
    def dying(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    setattr(state.BlockStateStore, target, dying)
    from calm.run import main
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.parametrize("target, n", [("save_block", 1), ("save_decision", 1), ("save_block", 4)])
def test_killed_run_resumes_to_identical_files(tmp_path, tiny_model_dir, text_file, target, n):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert main(_args(tiny_model_dir, text_file, clean)) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", KILLER, target, str(n), *_args(tiny_model_dir, text_file, killed)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not (killed / "model").exists()
    assert main(_args(tiny_model_dir, text_file, killed)) == 0
    assert _digests(killed / "model") == _digests(clean / "model")


def test_full_disk_while_writing_state_leaves_the_folder_resumable(tmp_path, tiny_model_dir, text_file, monkeypatch,
                                                                    capsys):
    import calm.io

    clean, full = tmp_path / "clean", tmp_path / "full"
    assert main(_args(tiny_model_dir, text_file, clean)) == 0
    real = calm.io.save_file
    calls = [0]

    def no_space(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(calm.io, "save_file", no_space)
    capsys.readouterr()
    assert main(_args(tiny_model_dir, text_file, full)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "rerun" in err[0]
    assert not list(full.rglob(".*.safetensors.*"))  # no half-written file left behind
    monkeypatch.setattr(calm.io, "save_file", real)
    assert main(_args(tiny_model_dir, text_file, full)) == 0
    assert _digests(full / "model") == _digests(clean / "model")
