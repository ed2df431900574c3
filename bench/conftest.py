"""pytest options and session of the kernel benchmark harness (`pytest bench/`; see bench/README.md).

    pytest bench/ --benchmark-json bench/results/pytest-benchmark-<device>.json   # GPU: every kernel
    pytest bench/ --bench-kernels qgemm --bench-groups 8192x8192 --bench-budget 120
    pytest bench/ --bench-smoke                                                   # CPU plumbing check
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _harness as H  # noqa: E402

SESSION_KEY = pytest.StashKey[H.Session]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("calm-bench", "calm kernel benchmarks")
    group.addoption("--bench-smoke", action="store_true",
                    help="tiny shapes on the CPU: checks the plumbing, times nothing real")
    group.addoption("--bench-kernels", default=",".join(H.KERNELS),
                    help=f"comma list of kernels to benchmark (default {','.join(H.KERNELS)})")
    group.addoption("--bench-groups", default=None, metavar="REGEX",
                    help="only the case groups whose '<kernel>-<group>' matches, e.g. 8192x8192 or W3A3.*M1$")
    group.addoption("--bench-first", default=None, metavar="REGEX",
                    help="run the case groups whose '<kernel>-<group>' matches first (e.g. the goal shapes)")
    group.addoption("--bench-budget", type=float, default=None, metavar="SECONDS",
                    help="time guard: cases reached after this many seconds are recorded as not run")
    group.addoption("--bench-out", type=Path, default=None,
                    help="folder of the <kernel>-<device>.json records (default bench/results; smoke runs: a temp "
                         "folder)")


def _wanted(config: pytest.Config) -> bool:
    """The harness sets up only when its test module is collected (not for `pytest bench/ --co` of nothing)."""
    return any(Path(a.split("::")[0]).resolve().is_relative_to(Path(__file__).parent) or
               Path(__file__).parent.is_relative_to(Path(a.split("::")[0]).resolve())
               for a in (config.args or ["."]))


def pytest_configure(config: pytest.Config) -> None:
    if not _wanted(config):
        return
    smoke = config.getoption("--bench-smoke")
    kernels = tuple(k.strip() for k in config.getoption("--bench-kernels").split(",") if k.strip())
    unknown = [k for k in kernels if k not in H.KERNELS]
    if unknown:
        raise pytest.UsageError(f"--bench-kernels: unknown {unknown}; choose from {','.join(H.KERNELS)}")
    if not smoke:
        import torch
        if not torch.cuda.is_available():
            pytest.exit("bench: no CUDA device; the kernel benchmarks need a GPU (--bench-smoke runs the CPU "
                        "plumbing check)", returncode=2)
    if config.getoption("benchmark_disable", False):
        raise pytest.UsageError("bench: --benchmark-disable leaves nothing to time; drop it")
    session = H.Session(smoke=smoke, kernels=kernels, budget_s=config.getoption("--bench-budget"),
                        out_dir=config.getoption("--bench-out") or H.default_out_dir(smoke),
                        group_filter=config.getoption("--bench-groups"),
                        group_first=config.getoption("--bench-first"))
    config.stash[SESSION_KEY] = session


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_case" not in metafunc.fixturenames:
        return
    session = metafunc.config.stash.get(SESSION_KEY, None)
    if session is None:
        metafunc.parametrize("bench_case", [])
        return
    session.start()
    cases = session.discover()
    metafunc.parametrize("bench_case", cases, ids=[c.id for c in cases])


@pytest.fixture
def bench_session(request: pytest.FixtureRequest) -> H.Session:
    return request.config.stash[SESSION_KEY]


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is None or not session.meta:
        return
    terminalreporter.section("calm kernel benchmarks")
    for line in H.summary(session):
        terminalreporter.write_line(line)
