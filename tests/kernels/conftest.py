"""Fixtures shared by the Triton kernel tests, which run under TRITON_INTERPRET=1 in their own pytest process
(`make test-kernels`: the variable must be set before the kernel modules are imported).

- Every test here is marked `interpreter` and skipped, with the command that runs it, unless the process has
  TRITON_INTERPRET=1, triton imports and the dispatch picks Triton for CPU tensors (not CALM_FORCE_REFERENCE=1:
  the kernels would be compared with themselves).
- `gen(seed)`: a `torch.Generator` seeded with `seed`; `rng`: one seeded from the test's node id.
- `poisoned(shape, dtype)`: an output buffer holding a value the kernel under test does not write (NaN; the
  integer extreme for integer dtypes), so an element a kernel leaves unwritten cannot pass for a result.
- `rel_err(got, want)`, `assert_rel_close(got, want, tol)`: relative error in float64 (Frobenius for tensors).
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

KERNEL_TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_TESTS in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.interpreter)


@pytest.fixture(autouse=True)
def _interpreter_only() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernel tests run under TRITON_INTERPRET=1 in their own process: make test-kernels")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from calm_kernels._dispatch import use_triton

    if not use_triton(torch.zeros(1)):
        pytest.skip("CALM_FORCE_REFERENCE=1 sends every launcher to the reference: unset it to test the kernels")


@pytest.fixture
def gen() -> Callable[[int], torch.Generator]:
    """Factory of seeded CPU generators: `gen(seed)`."""
    def make(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)
    return make


@pytest.fixture
def rng(test_seed: int) -> torch.Generator:
    """A CPU generator seeded from this test's node id (`test_seed`, tests/conftest.py)."""
    return torch.Generator().manual_seed(test_seed)


def poison_value(dtype: torch.dtype) -> float | int:
    """NaN for floating dtypes; the most negative value of a signed integer dtype (-128 for int8 codes: outside
    the code range below 8 bits, and at 8 bits produced only by clipping, since the scale maps max|x| to 127;
    -2^31 for int32 sums); the largest value of an unsigned one (255 for uint8 K-means codes, which are < 16)."""
    if dtype.is_floating_point:
        return float("nan")
    info = torch.iinfo(dtype)
    return info.min if info.min < 0 else info.max


@pytest.fixture
def poisoned() -> Callable[..., torch.Tensor]:
    """Factory of output buffers: `poisoned((m, n), torch.float16)`, filled with `poison_value(dtype)` unless
    `fill` is given."""
    def make(shape: int | Sequence[int], dtype: torch.dtype = torch.float32, fill: float | int | None = None,
             device: str = "cpu") -> torch.Tensor:
        size = (shape,) if isinstance(shape, int) else tuple(shape)
        return torch.full(size, poison_value(dtype) if fill is None else fill, dtype=dtype, device=device)
    return make


def _rel_err(got: torch.Tensor | float, want: torch.Tensor | float) -> float:
    if isinstance(got, torch.Tensor) or isinstance(want, torch.Tensor):
        got_t, want_t = torch.as_tensor(got).double(), torch.as_tensor(want).double()
        return float((got_t - want_t).norm() / want_t.norm())
    return abs(float(got) - float(want)) / abs(float(want))


@pytest.fixture
def rel_err() -> Callable[[torch.Tensor | float, torch.Tensor | float], float]:
    """`rel_err(got, want)`: |got - want| / |want| in float64, the Frobenius norm for tensors."""
    return _rel_err


@pytest.fixture
def assert_rel_close() -> Callable[..., None]:
    """`assert_rel_close(got, want, tol, what="")`: the relative error is finite and below `tol`."""
    def check(got: torch.Tensor | float, want: torch.Tensor | float, tol: float, what: str = "") -> None:
        if isinstance(got, torch.Tensor):
            assert torch.isfinite(got).all(), f"{what}: non-finite values (an unwritten poisoned output?)"
        err = _rel_err(got, want)
        assert err < tol, f"{what}: relative error {err:.3g} >= {tol:.3g}"
    return check
