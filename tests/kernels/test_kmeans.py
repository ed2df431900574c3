"""Per-column K-means kernels under the Triton interpreter (run with TRITON_INTERPRET=1, own process).

Assignments compare exactly with the reference for the same centroids; the fitted centroids may differ from
the float64-summed reference in the last bits, so the fit is judged by its weighted inertia (no worse than
the reference Lloyd's from the same init, 1e-6 relative) and by exact self-consistency.
"""
from __future__ import annotations

import pytest
import torch

from calm_kernels import kmeans as K


@pytest.fixture
def kernel_fit(poisoned):
    """The Triton fit itself (no dispatch) into poisoned codes (255, above every code) and NaN centroids."""
    def fit(w, bits, importance=None, iters=25):
        from calm_kernels import _kmeans_triton

        k = 1 << bits
        imp = K._check_importance(importance, w)
        out = (poisoned(w.shape, torch.uint8), poisoned((w.shape[1], k), torch.float32))
        return _kmeans_triton.kmeans_columns(w, k, imp, iters, out=out)
    return fit


@pytest.mark.parametrize("rows,cols,k,dtype", [(131, 7, 3, torch.float32), (40, 33, 16, torch.float16),
                                               (1, 5, 2, torch.float32), (257, 19, 8, torch.float32)])
def test_assign_kernel_equals_reference_exactly(rows, cols, k, dtype, gen, poisoned):
    from calm_kernels import _kmeans_triton

    g = gen(rows * cols + k)
    # Integer-valued weights against centroids on a half-integer grid: many exact ties (lower index wins).
    w = torch.randint(-8, 9, (rows, cols), generator=g).to(dtype)
    w[: rows // 2] += torch.randn(rows // 2, cols, generator=g).to(dtype)
    cent = (torch.randint(-16, 17, (cols, k), generator=g) * 0.5).sort(dim=1).values
    codes = _kmeans_triton.assign_columns(w, cent, out=poisoned((rows, cols), torch.uint8))
    assert torch.equal(codes, K.assign_columns_reference(w, cent))
    assert torch.equal(K.assign_columns(w, cent), codes)  # the public launcher dispatches to the kernel


def test_assign_kernel_strided_input(gen):
    w = torch.randn(23, 37, generator=gen(1)).T  # (37, 23), column-contiguous
    cent = torch.randn(23, 4, generator=gen(2)).sort(dim=1).values
    assert torch.equal(K.assign_columns(w, cent), K.assign_columns_reference(w, cent))


# rows > 16 span several prefix-sum tiles (the interpreter config has BLOCK_R = 16); cols > 2 several programs.
CASES = {
    "ragged-2bit": (97, 5, 2, None, torch.float32),
    "row-importance-3bit": (61, 6, 3, "row", torch.float32),
    "full-importance-4bit": (45, 3, 4, "full", torch.float32),
    "1bit-odd": (33, 3, 1, None, torch.float32),
    "fp16-3bit": (70, 5, 3, None, torch.float16),
    "mask-importance-4bit": (150, 3, 4, "mask", torch.float32),  # CLAQ's 0/1 outlier masks: runs of zero weight
    "one-row": (1, 3, 2, "full", torch.float32),
    "tile-edge-16-rows": (16, 4, 2, None, torch.float16),
}


def _importance(kind, rows, cols, g):
    if kind == "row":
        return torch.rand(rows, generator=g)
    if kind == "full":
        return torch.rand(rows, cols, generator=g) ** 2
    if kind == "mask":
        return (torch.rand(rows, cols, generator=g) > 0.3).float()
    return None


@pytest.mark.parametrize("name", list(CASES))
def test_fit_matches_reference_lloyd(name, gen, kernel_fit):
    rows, cols, bits, kind, dtype = CASES[name]
    g = gen(len(name))
    w = (torch.randn(rows, cols, generator=g) * torch.linspace(0.1, 3.0, cols)).to(dtype)
    importance = _importance(kind, rows, cols, g)
    iters = 8
    codes, cent = kernel_fit(w, bits, importance, iters)
    imp = K._check_importance(importance, w)
    ref_codes, ref_cent = K.lloyd_reference(w, K.quantile_init_reference(w, 1 << bits, imp), imp, iters)
    assert codes.dtype == torch.uint8 and int(codes.max()) < (1 << bits)
    assert bool(torch.isfinite(cent).all()) and bool((cent[:, 1:] >= cent[:, :-1]).all())
    # The returned codes are exactly the assignment against the returned centroids.
    assert torch.equal(codes, K.assign_columns_reference(w, cent))
    ours = K.weighted_inertia(w, codes, cent, importance)
    theirs = K.weighted_inertia(w, ref_codes, ref_cent, importance)
    assert ours <= theirs * (1 + 1e-6)
    assert torch.allclose(cent, ref_cent, rtol=1e-5, atol=1e-6)


def test_init_equals_reference_quantiles_exactly(gen, kernel_fit):
    # Unit weights: cumulative weights are exact integers, so the binary search hits the same values.
    w = torch.randn(45, 5, generator=gen(3)).half()
    w[:, 0] = 1.0  # constant column: every quantile is that value
    w[:25, 1] = -2.0  # a heavy repeated value
    _, cent = kernel_fit(w, 3, iters=0)
    assert torch.equal(cent, K.quantile_init_reference(w, 8))


def test_degenerate_columns_and_strided_input(gen, kernel_fit):
    g = gen(4)
    w = torch.randn(5, 30, generator=g).T.clone()  # (30, 5), column-major: strides (1, 30)
    assert w.stride() == (1, 30)
    w[:, 2] = 0.25
    importance = torch.rand(30, 5, generator=g)
    importance[:, 3] = 0.0  # fitted with unit weights
    codes, cent = kernel_fit(w, 2, importance, iters=6)
    ref_codes, ref_cent = K.kmeans_columns_reference(w, 2, importance, iters=6)
    assert torch.equal(cent[2], torch.full((4,), 0.25))
    assert torch.allclose(cent, ref_cent, rtol=1e-5, atol=1e-6)
    assert torch.equal(codes, K.assign_columns_reference(w, cent))


def test_more_centroids_than_rows():
    w = torch.tensor([[3.0, -1.0], [-2.0, 0.5], [0.0, 0.5]])
    codes, cent = K.kmeans_columns(w, 3, iters=4)  # public launcher -> kernel
    assert torch.equal(cent.T.gather(0, codes.long()), w)  # every value is its own centroid
    assert bool((cent[:, 1:] >= cent[:, :-1]).all())


def test_deterministic(gen, kernel_fit):
    g = gen(12)
    w = torch.randn(50, 6, generator=g)
    imp = torch.rand(50, 6, generator=g)
    first = kernel_fit(w, 2, imp, iters=5)
    second = kernel_fit(w.clone(), 2, imp.clone(), iters=5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_repeated_values_and_duplicate_centroids(gen, kernel_fit):
    # Few distinct values, many centroids: duplicated quantiles give exactly equal centroids, whose clusters
    # must stay empty (the reference's ties go to the lower index) while the boundary search skips them.
    g = gen(21)
    w = torch.randint(-2, 3, (90, 4), generator=g).float() * 0.5
    w[:, 3] = torch.where(torch.rand(90, generator=g) > 0.9, 7.0, -1.0)  # one heavy value, one rare outlier
    imp = torch.rand(90, 4, generator=g)
    for importance in (None, imp):
        codes, cent = kernel_fit(w, 4, importance, iters=6)
        ref_codes, ref_cent = K.kmeans_columns_reference(w, 4, importance, iters=6)
        assert torch.allclose(cent, ref_cent, rtol=1e-6, atol=1e-7)
        assert torch.equal(codes, K.assign_columns_reference(w, cent))


def test_poisoned_outputs_are_fully_written(gen, kernel_fit):
    w = torch.randn(37, 9, generator=gen(22)).half()
    codes, cent = kernel_fit(w, 3, None, iters=3)  # kernel_fit hands the kernel 255 codes and NaN centroids
    assert int(codes.max()) < 8 and bool(torch.isfinite(cent).all())


def test_optimal_method_through_the_public_launcher(gen):
    # The DP runs in PyTorch; the codes come from the assignment kernel.
    g = gen(23)
    w = torch.randn(40, 6, generator=g)
    imp = torch.rand(40, 6, generator=g)
    codes, cent = K.kmeans_columns(w, 3, imp, method="optimal")
    ref_codes, ref_cent = K.kmeans_columns_reference(w, 3, imp, method="optimal")
    assert torch.equal(cent, ref_cent) and torch.equal(codes, ref_codes)
    lloyd = K.kmeans_columns(w, 3, imp)
    assert K.weighted_inertia(w, codes, cent, imp) <= K.weighted_inertia(w, *lloyd, imp) * (1 + 1e-9)


@pytest.mark.slow  # ~1 min in the interpreter, almost all of it the prefix pass's 2063 row tiles
def test_column_taller_than_the_old_on_chip_limit(gen, kernel_fit):
    # 33000 rows: above the 32768 the previous whole-column-in-registers kernel took; here only the prefix pass
    # grows with the height (2063 row tiles of 16 in the interpreter), the searches take 16 steps.
    g = gen(24)
    w = torch.randn(33000, 1, generator=g)
    imp = torch.rand(33000, generator=g)
    codes, cent = kernel_fit(w, 4, imp, iters=3)
    ref_codes, ref_cent = K.kmeans_columns_reference(w, 4, imp, iters=3)
    assert torch.allclose(cent, ref_cent, rtol=1e-5, atol=1e-6)
    assert torch.equal(codes, K.assign_columns_reference(w, cent))


def test_weights_spanning_ten_orders_of_magnitude(gen, kernel_fit):
    # Light clusters next to heavy values: their means are differences of large float64 prefix sums.
    g = gen(25)
    w = torch.randn(120, 3, generator=g)
    imp = torch.ones(120, 3)
    imp[:6] = 1e10
    codes, cent = kernel_fit(w, 3, imp, iters=5)
    ref_codes, ref_cent = K.kmeans_columns_reference(w, 3, imp, iters=5)
    assert bool((cent[:, 1:] >= cent[:, :-1]).all())
    assert torch.allclose(cent, ref_cent, rtol=1e-4, atol=1e-5)
    assert torch.equal(codes, K.assign_columns_reference(w, cent))
