"""Linear CKA kernels on a CUDA device against the float64 reference (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from calm_kernels import cka as C

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _pair(n: int, dx: int, dy: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g)
    y = x[:, :dy] * 0.5 + torch.randn(n, dy, generator=g) if dy <= dx else torch.randn(n, dy, generator=g)
    x[:, ::5] += 1000.0
    y[:, 1::7] -= 1000.0
    return x, y


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("n,dx,dy,form", [(5000, 700, 333, "feature"), (300, 2000, 1500, "sample"),
                                          (4099, 129, 129, "auto")])
def test_fp32_tf32x3_matches_float64_reference(n, dx, dy, form):
    x, y = _pair(n, dx, dy, n + dx)
    ref = C.linear_cka_reference(x, y)
    got = C.linear_cka_kernel(x.cuda(), y.cuda(), form)
    for name in ("cka", "hsic_xy", "hsic_xx", "hsic_yy"):
        assert _rel(getattr(got, name), getattr(ref, name)) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_within_operand_rounding(dtype):
    x, y = _pair(6000, 512, 256, 3)
    x, y = x.to(dtype), y.to(dtype)
    ref = C.linear_cka_reference(x, y)  # float64 of the same half-precision values
    for form in ("feature", "sample"):
        got = C.linear_cka_kernel(x.cuda(), y.cuda(), form)
        assert abs(got.cka - ref.cka) < 1e-3
        assert _rel(got.hsic_xy, ref.hsic_xy) < 1e-2


def test_streaming_equals_one_shot_on_device():
    x, y = _pair(20000, 640, 640, 4)
    xc, yc = x.cuda(), y.cuda()
    self_term = C.CKAAccumulator.reference(xc[i:i + 4096] for i in range(0, 20000, 4096))
    acc = C.CKAAccumulator(reference_self_term=self_term)
    for i in range(0, 20000, 4096):
        acc.update(xc[i:i + 4096], yc[i:i + 4096])
    streamed = acc.compute()
    one_shot = C.linear_cka(xc, yc)
    ref = C.linear_cka_reference(x, y)
    assert _rel(streamed.cka, one_shot.cka) < 1e-5
    assert _rel(streamed.cka, ref.cka) < 1e-5
