"""Every Triton kernel compiles for sm90 (H100/H200) and sm100 (B200) without a GPU, within the device's shared
memory and without register spills (beyond a few bytes) except where its module says why
(calm_kernels/compile_check.py); the K-means Lloyd kernel without any.

The compile runs in child processes without TRITON_INTERPRET (this process runs under it, where kernels have no
compile path), one per architecture side by side. The representative configs take ~1 min cold on two shared
cores and seconds once ~/.triton/cache holds the cubins. Every autotune config: the K-means and CKA kernels
always (~1 min cold); all kernels with CALM_COMPILE_ALL=1 (~30 min cold per architecture, before changing a
config list).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from calm_kernels.compile_check import ARCHS, MODULES, problems

pytest.importorskip("triton.backends.nvidia")

REPO = Path(__file__).resolve().parents[2]
FULL_BY_DEFAULT = ("_cka_triton", "_kmeans_triton")


def compile_records(modules: list[str], full: bool, coverage: bool = False, timeout: int = 3600) -> list[dict]:
    """JSON records of `python -m calm_kernels.compile_check`, one child process per architecture."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = []
    for i, arch in enumerate(ARCHS):
        cmd = [sys.executable, "-m", "calm_kernels.compile_check", "--jsonl", "--arch", str(arch),
               "--module", *modules] + (["--full"] if full else []) + (["--coverage"] if coverage and i == 0 else [])
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise AssertionError(f"compile_check printed no records (exit {proc.returncode}):\n{err[-3000:]}")
        records += lines
    return records


def failures(records: list[dict]) -> list[str]:
    return problems([r for r in records if "label" in r])


@pytest.fixture(scope="module")
def representative() -> list[dict]:
    return compile_records(list(MODULES), full=False, coverage=True)


def test_every_kernel_has_a_compile_spec(representative):
    uncovered = next(r["uncovered"] for r in representative if "uncovered" in r)
    assert not uncovered, f"kernels that no compile_specs() lists: {uncovered} (calm_kernels/compile_check.py)"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", MODULES)
def test_representative_configs_compile(module, arch, representative):
    records = [r for r in representative if r.get("module") == module and r["arch"] == arch]
    assert records, f"nothing compiled for {module} sm{arch}"
    assert not failures(records), "\n".join(failures(records))


def test_allowed_spills_are_only_where_documented(representative):
    """The check has teeth: the float64 accumulate epilogue of the Gram kernel does spill (and says why), the
    kernels that promise none do not, and a spill with no reason is reported."""
    gram = [r for r in representative if r.get("kernel") == "_gram_kernel" and r["ok"]]
    assert any(r["stack_bytes"] and r["may_spill"] for r in gram)
    lloyd = [r for r in representative if r.get("kernel") == "_kmeans_sorted_kernel"]
    assert lloyd and all(r["ok"] and r["stack_bytes"] == 0 for r in lloyd)
    from calm_kernels.compile_check import MINOR_SPILL_BYTES

    spilled = {**gram[0], "stack_bytes": MINOR_SPILL_BYTES + 8, "may_spill": ""}
    assert failures([spilled]) and "spills" in failures([spilled])[0]
    assert not failures([{**spilled, "stack_bytes": MINOR_SPILL_BYTES}])


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_every_autotune_config_compiles(module):
    if module not in FULL_BY_DEFAULT and os.environ.get("CALM_COMPILE_ALL") != "1":
        pytest.skip("every config of this module takes tens of minutes cold on 2 cores: CALM_COMPILE_ALL=1 runs it")
    records = compile_records([module], full=True)
    assert len({r["arch"] for r in records}) == len(ARCHS)
    assert not failures(records), "\n".join(failures(records))
    # The Lloyd kernel's promise is stricter: no spill at all, at any column height (its footprint is fixed).
    lloyd = [r for r in records if r["kernel"] == "_kmeans_sorted_kernel"]
    assert all(r["stack_bytes"] == 0 for r in lloyd), [r["label"] for r in lloyd if r["stack_bytes"]]
