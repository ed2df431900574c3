"""Linear CKA (calm_kernels.cka) on the CPU: the properties the search relies on, against closed forms."""
from __future__ import annotations

import pytest
import torch

from calm_kernels.cka import CKAAccumulator, linear_cka, linear_cka_reference


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(n: int, d1: int, d2: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated X, Y: Y is a noisy linear image of X, so CKA sits well inside (0, 1)."""
    g = _gen(seed)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d1, d2, generator=g, dtype=torch.float64) + 2.0 * torch.randn(n, d2, generator=g,
                                                                                        dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _gram_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al.'s sample-space definition: HSIC(K, L) = tr(K H L H) with K = X X^T, H = I - 11^T/n."""
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k = h @ (x @ x.T) @ h
    l_ = h @ (y @ y.T) @ h
    return float(torch.trace(k @ l_) / torch.sqrt(torch.trace(k @ k) * torch.trace(l_ @ l_)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d", [(257, 24), (9, 40)])  # feature-space and sample-space regimes
def test_cka_of_a_matrix_with_itself_is_one(dtype, n, d):
    x, _ = _pair(n, d, 3, seed=n + d, dtype=dtype)
    assert linear_cka(x, x).cka == pytest.approx(1.0, abs=1e-6 if dtype == torch.float32 else 1e-12)
    assert linear_cka_reference(x, x).cka == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, debiased=True).cka == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_maps_scaling_and_shifts():
    x, y = _pair(300, 16, 12, seed=1)
    base = linear_cka(x, y).cka
    assert 0.05 < base < 0.95
    q = _orthogonal(12, seed=2)
    assert linear_cka(x, y @ q).cka == pytest.approx(base, rel=1e-12)
    assert linear_cka(x @ _orthogonal(16, seed=3), y).cka == pytest.approx(base, rel=1e-12)
    assert linear_cka(x, 37.5 * y).cka == pytest.approx(base, rel=1e-12)
    assert linear_cka(1e-3 * x, y).cka == pytest.approx(base, rel=1e-12)
    assert linear_cka(x + 5.0, y - 3.0).cka == pytest.approx(base, rel=1e-12)
    # Not invariant to an anisotropic scaling of the features: the test above can tell a wrong formula apart.
    stretch = torch.ones(12, dtype=torch.float64)
    stretch[:3] = 10.0
    assert abs(linear_cka(x, y * stretch).cka - base) > 1e-3


def test_symmetric():
    x, y = _pair(200, 10, 30, seed=4)
    assert linear_cka(x, y).cka == pytest.approx(linear_cka(y, x).cka, rel=1e-12)
    r_xy, r_yx = linear_cka(x, y), linear_cka(y, x)
    assert r_xy.hsic_xy == pytest.approx(r_yx.hsic_xy, rel=1e-12)
    assert (r_xy.hsic_xx, r_xy.hsic_yy) == pytest.approx((r_yx.hsic_yy, r_yx.hsic_xx), rel=1e-12)


@pytest.mark.parametrize("n,d1,d2", [(7, 5, 9), (20, 3, 3), (33, 50, 17)])
def test_equals_the_gram_formula(n, d1, d2):
    x, y = _pair(n, d1, d2, seed=n)
    expected = _gram_cka(x, y)
    assert linear_cka(x, y).cka == pytest.approx(expected, rel=1e-10)
    assert linear_cka_reference(x, y).cka == pytest.approx(expected, rel=1e-10)


def test_stable_when_column_means_dwarf_the_spread():
    """LLM hidden states have channels whose mean is ~1000x their spread; float32 inputs must still agree
    with the float64 oracle, where the uncentered float32 identity loses every digit."""
    x, y = _pair(4096, 32, 32, seed=5)
    offset = 1000.0 * (1.0 + torch.rand(32, generator=_gen(6), dtype=torch.float64))
    x32 = (x + offset).to(torch.float32)
    y32 = (y - offset).to(torch.float32)
    expected = linear_cka_reference(x32, y32).cka  # float64 on the same (rounded) inputs
    assert 0.05 < expected < 0.95
    assert linear_cka(x32, y32).cka == pytest.approx(expected, rel=1e-5)
    acc = CKAAccumulator()
    for chunk in range(0, 4096, 1000):  # ragged batches with their own means
        acc.update(x32[chunk:chunk + 1000], y32[chunk:chunk + 1000])
    assert acc.compute().cka == pytest.approx(expected, rel=1e-5)

    def naive_fp32(a, b):  # X^T Y - n mx my^T in float32: what the accumulator must not do
        n = a.shape[0]
        def term(p, q):
            return ((p.T @ q) - n * torch.outer(p.mean(0), q.mean(0))).double().square().sum()
        return float(term(a, b) / torch.sqrt(term(a, a) * term(b, b)))
    assert abs(naive_fp32(x32, y32) - expected) > 100 * abs(linear_cka(x32, y32).cka - expected)


def test_streaming_equals_one_shot_and_reuses_the_reference_term():
    x, y = _pair(1000, 24, 24, seed=7, dtype=torch.float32)
    one_shot = linear_cka(x, y)
    batches = [slice(0, 1), slice(1, 300), slice(300, 301), slice(301, 1000)]
    acc = CKAAccumulator()
    for s in batches:
        acc.update(x[s], y[s])
    streamed = acc.compute()
    assert acc.tokens == 1000
    assert streamed.cka == pytest.approx(one_shot.cka, rel=1e-6)
    assert streamed.hsic_xx == pytest.approx(one_shot.hsic_xx, rel=1e-6)
    self_term = CKAAccumulator.reference(x[s] for s in batches)
    assert self_term == pytest.approx(one_shot.hsic_xx, rel=1e-6)
    reused = CKAAccumulator(reference_self_term=self_term)
    for s in batches:
        reused.update(x[s], y[s])
    assert reused.compute().cka == pytest.approx(one_shot.cka, rel=1e-6)
    assert one_shot.cka == pytest.approx(linear_cka_reference(x, y).cka, rel=1e-6)


def test_rejects_mismatched_or_integer_inputs():
    with pytest.raises(ValueError, match="same tokens"):
        linear_cka(torch.randn(5, 3, generator=_gen(0)), torch.randn(6, 3, generator=_gen(1)))
    with pytest.raises(TypeError, match="floating-point"):
        linear_cka(torch.ones(5, 3, dtype=torch.int32), torch.randn(5, 3, generator=_gen(0)))
    with pytest.raises(ValueError, match="before any update"):
        CKAAccumulator().compute()
