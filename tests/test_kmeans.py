"""Per-column K-means reference (CPU): contract of kmeans_columns / assign_columns."""
from __future__ import annotations

import pytest
import torch

from calm_kernels import kmeans as K


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codes_in_range_centroids_sorted_and_codes_nearest(bits):
    w = torch.randn(257, 13, generator=_gen(bits))
    codes, cent = K.kmeans_columns(w, bits)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert cent.dtype == torch.float32 and cent.shape == (13, 1 << bits)
    assert int(codes.max()) < (1 << bits)
    assert bool((cent[:, 1:] >= cent[:, :-1]).all())
    # Every value sits at its nearest centroid (the returned codes are the final assignment).
    dist = (w.unsqueeze(-1) - cent.unsqueeze(0)).abs()  # (rows, cols, k)
    chosen = dist.gather(2, codes.long().unsqueeze(-1)).squeeze(-1)
    assert torch.equal(chosen, dist.min(-1).values)


def test_lloyd_improves_on_the_quantile_init_and_matches_brute_force_1d_optimum_on_clusters():
    g = _gen(0)
    centers = torch.tensor([-3.0, -1.0, 0.5, 4.0])
    w = (centers[torch.randint(0, 4, (400, 5), generator=g)] + 0.01 * torch.randn(400, 5, generator=g))
    init = K.quantile_init_reference(w, 4)
    codes0 = K.assign_columns(w, init)
    codes, cent = K.kmeans_columns(w, 2)
    assert K.weighted_inertia(w, codes, cent) <= K.weighted_inertia(w, codes0, init) + 1e-9
    # Well-separated clusters: each centroid lands on its cluster's centre.
    assert torch.allclose(cent, centers.expand(5, 4), atol=0.01)


def test_weighted_quantile_init():
    # One column 0..9; all weight on the values 7, 8, 9 -> quantiles fall among them.
    w = torch.arange(10.0).reshape(10, 1)
    imp = torch.zeros(10)
    imp[7:] = 1.0
    init = K.quantile_init_reference(w, 2, imp.reshape(10, 1))
    # total 3: targets 0.75 and 2.25 -> the first value reaching cumulative 1 (7) and 3 (9).
    assert init.tolist() == [[7.0, 9.0]]
    unweighted = K.quantile_init_reference(w, 2)
    assert unweighted.tolist() == [[2.0, 7.0]]  # targets 2.5 and 7.5 of cumulative counts 1..10


def test_row_importance_equals_broadcast_matrix_importance():
    g = _gen(1)
    w = torch.randn(64, 7, generator=g)
    imp = torch.rand(64, generator=g)
    a = K.kmeans_columns(w, 3, imp)
    b = K.kmeans_columns(w, 3, imp.reshape(64, 1).expand(64, 7).contiguous())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_importance_steers_centroids_towards_heavy_values():
    g = _gen(2)
    w = torch.randn(200, 3, generator=g)
    imp = torch.ones(200, 3)
    imp[:20] = 1000.0
    codes, cent = K.kmeans_columns(w, 2, imp)
    plain_codes, plain = K.kmeans_columns(w, 2)
    heavy = w[:20]
    err_w = (heavy - cent.T.gather(0, codes[:20].long())).square().sum()
    err_p = (heavy - plain.T.gather(0, plain_codes[:20].long())).square().sum()
    assert err_w < err_p


def test_empty_clusters_are_deterministic_and_keep_their_place():
    # Three distinct values, 16 centroids: most clusters are empty (duplicated quantiles).
    w = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 5.0] * 3).reshape(-1, 1).repeat(1, 2)
    first = K.kmeans_columns(w, 4)
    second = K.kmeans_columns(w, 4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    codes, cent = first
    assert bool((cent[:, 1:] >= cent[:, :-1]).all())
    recon = cent.T.gather(0, codes.long())
    assert torch.equal(recon, w)  # three values, enough centroids: exact


def test_constant_column_and_zero_importance_column():
    w = torch.randn(30, 3, generator=_gen(3))
    w[:, 1] = 2.5
    imp = torch.rand(30, 3, generator=_gen(4))
    imp[:, 2] = 0.0  # falls back to unit weights
    codes, cent = K.kmeans_columns(w, 2, imp)
    assert bool((cent[1] == 2.5).all())
    unit_codes, unit_cent = K.kmeans_columns(w[:, 2:], 2)
    assert torch.equal(cent[2:], unit_cent) and torch.equal(codes[:, 2:], unit_codes)


def test_zero_iterations_returns_the_quantile_init_and_fewer_rows_than_centroids():
    w = torch.randn(50, 4, generator=_gen(5))
    _, cent = K.kmeans_columns(w, 3, iters=0)
    assert torch.equal(cent, K.quantile_init_reference(w, 8))
    small = torch.tensor([[1.0], [-1.0], [0.5]])
    codes, cent = K.kmeans_columns(small, 3)
    assert torch.equal(cent.T.gather(0, codes.long()), small)


def test_assign_ties_go_to_lower_index_and_half_precision_input():
    w = torch.tensor([[0.5], [1.5], [-7.0], [9.0]], dtype=torch.float16)
    cent = torch.tensor([[0.0, 1.0, 2.0]])
    assert K.assign_columns(w, cent).flatten().tolist() == [0, 1, 0, 2]


def test_deterministic_across_calls():
    w = torch.randn(333, 9, generator=_gen(6))
    imp = torch.rand(333, 9, generator=_gen(7))
    a = K.kmeans_columns(w, 3, imp, iters=10)
    b = K.kmeans_columns(w.clone(), 3, imp.clone(), iters=10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _brute_force_optimum(col: torch.Tensor, weight: torch.Tensor, k: int) -> float:
    """Minimum weighted inertia over contiguous partitions of the sorted column: the O(k n^2) DP, float64."""
    order = torch.argsort(col, stable=True)
    x, wt = col[order].double(), weight[order].double()
    n = len(x)

    def cost(j: int, i: int) -> float:
        m = wt[j:i].sum()
        if m <= 0:
            return 0.0
        mu = (wt[j:i] * x[j:i]).sum() / m
        return float((wt[j:i] * (x[j:i] - mu) ** 2).sum())

    k = min(k, n)
    best = [cost(0, i) for i in range(n + 1)]
    for layer in range(2, k + 1):
        best = [float("inf")] * layer + [min(best[j] + cost(j, i) for j in range(layer - 1, i))
                                         for i in range(layer, n + 1)]
    return best[n]


@pytest.mark.parametrize("rows,cols,bits,kind", [(30, 4, 2, None), (25, 3, 3, "full"), (21, 3, 4, "mask"),
                                                 (3, 2, 3, None), (40, 2, 1, "full")])
def test_optimal_method_reaches_the_brute_force_optimum(rows, cols, bits, kind):
    g = _gen(rows * bits)
    w = torch.randn(rows, cols, generator=g) * (1 + 3 * (torch.rand(rows, cols, generator=g) > 0.9))
    imp = {"full": torch.rand(rows, cols, generator=g), "mask": (torch.rand(rows, cols, generator=g) > 0.3).float(),
           None: None}[kind]
    codes, cent = K.kmeans_columns(w, bits, imp, method="optimal")
    assert cent.shape == (cols, 1 << bits) and bool((cent[:, 1:] >= cent[:, :-1]).all())
    assert torch.equal(codes, K.assign_columns_reference(w, cent))
    for c in range(cols):
        weight = imp[:, c] if imp is not None else torch.ones(rows)
        sub = None if imp is None else imp[:, c:c + 1]
        got = K.weighted_inertia(w[:, c:c + 1], codes[:, c:c + 1], cent[c:c + 1], sub)
        optimum = _brute_force_optimum(w[:, c], weight, 1 << bits)
        assert got <= optimum * (1 + 1e-9) + 1e-12
        lloyd = K.kmeans_columns(w[:, c:c + 1], bits, sub)
        assert got <= K.weighted_inertia(w[:, c:c + 1], *lloyd, sub) * (1 + 1e-9) + 1e-12


def test_optimal_method_chunks_columns_and_keeps_the_default_unchanged():
    w = torch.randn(50, 3, generator=_gen(8))
    whole = K.optimal_centroids_reference(w, 8)
    assert torch.equal(K.optimal_centroids_reference(w, 8, max_elements=60), whole)  # one column per chunk
    # The default stays quantile init + 25 Lloyd steps (CLAQ's numbers do not move).
    default = K.kmeans_columns(w, 3)
    lloyd = K.lloyd_reference(w, K.quantile_init_reference(w, 8), None, 25)
    assert torch.equal(default[0], lloyd[0]) and torch.equal(default[1], lloyd[1])


@pytest.mark.parametrize("call,match", [
    (lambda: K.kmeans_columns(torch.randn(4, 4, generator=_gen(0)), 0), "bits"),
    (lambda: K.kmeans_columns(torch.randn(4, 4, generator=_gen(0)), 5), "bits"),
    (lambda: K.kmeans_columns(torch.randn(4, 4, generator=_gen(0)), 2.0), "bits"),
    (lambda: K.kmeans_columns(torch.randn(4, generator=_gen(0)), 2), "2-D"),
    (lambda: K.kmeans_columns(torch.randint(0, 3, (4, 4), generator=_gen(0)), 2), "floating"),
    (lambda: K.kmeans_columns(torch.zeros(0, 4), 2), "at least one row"),
    (lambda: K.kmeans_columns(torch.tensor([[float("nan")]]), 2), "NaN"),
    (lambda: K.kmeans_columns(torch.randn(4, 4, generator=_gen(0)), 2, torch.ones(3)), "importance must have shape"),
    (lambda: K.kmeans_columns(torch.randn(4, 4, generator=_gen(0)), 2, -torch.ones(4)), "nonnegative"),
    (lambda: K.kmeans_columns(torch.randn(4, 4, generator=_gen(0)), 2, iters=-1), "iters"),
    (lambda: K.kmeans_columns(torch.randn(4, 4, generator=_gen(0)), 2, method="exact"), "method"),
    (lambda: K.assign_columns(torch.randn(4, 4, generator=_gen(0)), torch.zeros(3, 2)), "cols=4"),
    (lambda: K.assign_columns(torch.randn(4, 4, generator=_gen(0)), torch.zeros(4, 17)), "1..16"),
    (lambda: K.assign_columns(torch.randn(4, 4, generator=_gen(0)), torch.full((4, 2), float("inf"))), "finite"),
])
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- On a GPU (skipped without CUDA) ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows,cols", [(4096, 300), (14336, 40), (1000, 129), (40000, 6)])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_kernels_match_the_reference(rows, cols, bits, weighted):
    g = _gen(rows + cols + bits)
    w = torch.randn(rows, cols, generator=g) * (1 + 3 * (torch.rand(rows, cols, generator=g) > 0.99))
    imp = torch.rand(rows, cols, generator=g) if weighted else None
    codes, cent = K.kmeans_columns(w.cuda(), bits, None if imp is None else imp.cuda())
    codes, cent = codes.cpu(), cent.cpu()
    ref_codes, ref_cent = K.kmeans_columns_reference(w, bits, imp)
    assert bool((cent[:, 1:] >= cent[:, :-1]).all())
    assert torch.equal(codes, K.assign_columns_reference(w, cent))
    # float64 prefix differences on the device vs float64 scatter sums in the reference: a centroid may differ
    # in its last bit, a borderline value flip and the two Lloyd runs part ways, so the fit is judged by its
    # inertia.
    assert K.weighted_inertia(w, codes, cent, imp) <= K.weighted_inertia(w, ref_codes, ref_cent, imp) * (1 + 1e-5)
    assert torch.equal(K.assign_columns(w.cuda(), ref_cent.cuda()).cpu(), ref_codes)
    assert torch.equal(K.assign_columns(w.half().cuda(), ref_cent.cuda()).cpu(),
                       K.assign_columns_reference(w.half(), ref_cent))
