"""Per-column weighted 1-D K-means (the codebook fit of CLAQ and SqueezeLLM-style quantizers).

Contract
- `kmeans_columns(w, bits, importance=None, iters=25, method="lloyd") -> (codes, centroids)`: every column of
  w (rows, cols) gets k = 2^bits centroids (bits 1..4) fitted to its `rows` values; codes (rows, cols) uint8
  index the column's centroids; centroids (cols, k) float32, ascending in each column.
- `assign_columns(w, centroids) -> codes`: nearest centroid per value, ties to the lower index.
- `importance`: nonnegative finite weights per value, (rows, cols) or (rows,) (one weight per row, shared by
  every column). A column whose weights sum to zero is fitted with unit weights, so its codes stay
  meaningful.
- `method`: "lloyd" (the default, below) or "optimal" (exact 1-D weighted K-means, below; `iters` unused).

The "lloyd" algorithm, identical in the reference and the kernel (the kernel is tested against this text):
1. Init, weighted quantiles: sort the column, take the cumulative weight c and total T; centroid j is the
   smallest value v whose cumulative weight (all values <= v) reaches (j + 1/2) T / k.
2. `iters` Lloyd iterations, a fixed count (no early exit, so the work and the result do not depend on
   timing): assign every value to its nearest centroid (distance |w - c_j| in float32, strict `<` so ties
   keep the lower index), then move every centroid to the weighted mean of its values. A centroid with no
   weight assigned (empty cluster) keeps its previous value: deterministic, and in 1-D it stays between its
   neighbours, so the order is kept.
3. Sort the centroids (a no-op in exact arithmetic: 1-D Lloyd preserves the order; it guards rounding),
   then the final codes are `assign_columns` against the returned centroids.

The reference (`lloyd_reference`, the CPU path) assigns every value to every centroid, O(rows * k) per
iteration, and sums the weighted means in float64. The kernel (`_kmeans_triton.py`) runs the same steps on
sorted columns: with sorted centroids each cluster is a contiguous range of the sorted column, so a step is
k - 1 binary-searched boundaries (the first sorted value strictly closer to c_j than to c_{j-1}, the same
float32 comparison) and differences of float64 prefix sums: O(rows) once, then O(k log rows) per iteration,
and its registers do not depend on the column height. The two agree exactly on assignments except where
two centroids are within float32 rounding of each other without being equal (the nearest-centroid map is
then not monotone in the value), and on centroids to the last bits (float64 sums in a different order).

The "optimal" method (`optimal_reference`, on any device, no kernel): the exact minimum of the weighted
inertia over all partitions of the sorted column into min(k, rows) contiguous clusters (an optimal 1-D
clustering is contiguous), by dynamic programming over prefix sums with the divide-and-conquer speed-up
(the optimal split point is monotone, since the 1-D cost is Monge): O(k rows log rows) per column,
vectorized over columns; float64 costs on mean-centred values, so "exact" is up to float64 rounding of
near-ties. Centroids are the clusters' weighted means (a cluster without weight: the midpoint of its values),
padded with the largest when rows < k; the codes are `assign_columns` against them, as in step 3. On a
random 576x576 float32 matrix, one torch thread of the shared 2-core CPU: 2.0 s at 2 bits and 8.1 s at 4 bits
(the Lloyd reference: 0.2 s and 0.4 s).

Numerics: values and centroids are float32; distances are one float32 subtraction and an abs, so kernel and
reference assign identically for the same centroids.

Dispatch: Triton (`_kmeans_triton.py`) for CUDA tensors or under TRITON_INTERPRET=1, the reference
otherwise. On a shared 2-core CPU, call the reference under one torch thread (calm.algorithms.gptq.single_thread):
measured 4-10x faster than two contended threads on 576x576 .. 1536x576 weights (0.4-3.5 s for 25 iterations
at 2-4 bits, one thread). Lloyd from quantile init is a local method: on the bench's smoke shapes (64 and 131
rows, 1% of values 4x larger) kmeans1d's exact 1-D optimum reached 0.42-0.99x this inertia at 2-4 bits. On the
default model's layer-5 q_proj (576x576) and down_proj (576x1536), per column over the output rows, the optimum
reached 0.99x / 0.94-0.96x / 0.63-0.68x of it at 2 / 3 / 4 bits, and 100 iterations instead of 25 gained 0% /
0.3% / 1.5-3.6%: at 4 bits the fit, not the iteration count, limits it (method="optimal" closes that gap).

Tested: the references on the CPU (tests/test_kmeans.py); the kernels under the interpreter
(tests/kernels/test_kmeans.py, up to 33000 rows) and compiled for sm90/sm100 without a device, with no
register spills in any config; the height is a runtime argument that sizes no register tile
(calm_kernels/compile_check.py). Not yet run on a GPU: configs untuned, no performance
figure.
"""
from __future__ import annotations

import torch

from calm_kernels._dispatch import use_triton

MAX_BITS = 4  # codes are uint8 and the kernel keeps k centroids per column in registers
METHODS = ("lloyd", "optimal")


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS} (k = 2^bits centroids), got {bits!r}")
    return 1 << bits


def _check_weights(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"w must be a 2-D (rows, cols) tensor, got {shape}")
    if not w.is_floating_point():
        raise ValueError(f"w must be floating point (fp16/bf16/fp32/fp64), got {w.dtype}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"w must have at least one row and one column, got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w holds NaN or inf values; K-means needs finite weights (clean or clamp them first)")


def _check_importance(importance: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor | None:
    """Validated importance as float32 (rows, cols) or (rows, 1); None means unit weights."""
    if importance is None:
        return None
    if not isinstance(importance, torch.Tensor) or not importance.is_floating_point():
        raise ValueError("importance must be a floating-point tensor of nonnegative weights")
    if importance.device != w.device:
        raise ValueError(f"importance is on {importance.device} but w is on {w.device}; move one of them")
    rows, cols = w.shape
    if importance.shape == (rows,):
        imp = importance.reshape(rows, 1)
    elif importance.shape == (rows, cols):
        imp = importance
    else:
        raise ValueError(f"importance must have shape ({rows},) or ({rows}, {cols}) to match w, "
                         f"got {tuple(importance.shape)}")
    imp = imp.to(torch.float32)
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError("importance must be finite and nonnegative (e.g. a Hessian diagonal, clamp it at 0)")
    return imp


def _check_iters(iters: int) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a nonnegative integer, got {iters!r}")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} ('lloyd': quantile init and `iters` Lloyd steps; "
                         f"'optimal': exact 1-D K-means by dynamic programming), got {method!r}")


def _unit_where_zero(imp: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, cols) float32 weights; columns whose weights sum to zero get unit weights."""
    imp = imp.expand(imp.shape[0], cols)
    dead = imp.to(torch.float64).sum(0) == 0
    return torch.where(dead.unsqueeze(0), torch.ones_like(imp), imp)


# ----------------------------------------------------------------------------------------------------------
# References (the CPU path and the kernels' oracle)
# ----------------------------------------------------------------------------------------------------------

def assign_columns_reference(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each value in its column: (rows, cols) uint8, ties to the lower index."""
    w32 = w.to(torch.float32)
    c_rows = centroids.to(torch.float32).T.contiguous()  # (k, cols): centroid j of every column, contiguous
    best = (w32 - c_rows[0]).abs_()  # float32 |w - c_j|, as the kernels compute it
    code = torch.zeros_like(best)
    d = torch.empty_like(best)
    closer = torch.empty_like(best)
    for j in range(1, c_rows.shape[0]):
        torch.sub(w32, c_rows[j], out=d).abs_()
        torch.lt(d, best, out=closer)  # strict: a tie keeps the lower index
        # The last j that beat the running minimum is the answer, i.e. the largest such j: a max of
        # j * closer (float arithmetic; boolean selects are several times slower on the CPU).
        torch.maximum(code, closer.mul_(j), out=code)
        torch.minimum(best, d, out=best)
    return code.to(torch.uint8)


def quantile_init_reference(w: torch.Tensor, k: int, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted-quantile initial centroids (cols, k) float32 (step 1 of the module docstring)."""
    w32 = w.to(torch.float32)
    rows, cols = w32.shape
    imp = _unit_where_zero(importance if importance is not None else torch.ones(rows, 1, device=w.device), cols)
    values, order = torch.sort(w32, dim=0, stable=True)
    cum = torch.gather(imp.to(torch.float64), 0, order).cumsum(0)  # (rows, cols)
    total = cum[-1]
    targets = (torch.arange(k, dtype=torch.float64, device=w.device) + 0.5) / k  # (k,)
    targets = targets.unsqueeze(1) * total.unsqueeze(0)  # (k, cols)
    # First sorted position whose cumulative weight reaches the target; ties in value share the group's value.
    idx = torch.searchsorted(cum.T.contiguous(), targets.T.contiguous(), right=False).clamp_max(rows - 1)
    return torch.gather(values, 0, idx.T).T.contiguous()


def lloyd_reference(w: torch.Tensor, centroids: torch.Tensor, importance: torch.Tensor | None = None,
                    iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3 from given initial centroids (cols, k): (codes uint8 (rows, cols), sorted float32 centroids)."""
    w32 = w.to(torch.float32)
    rows, cols = w32.shape
    k = centroids.shape[1]
    imp = _unit_where_zero(importance if importance is not None else torch.ones(rows, 1, device=w.device), cols)
    imp64 = imp.to(torch.float64)
    wimp64 = imp64 * w32.to(torch.float64)
    c = centroids.to(torch.float32).clone()
    for _ in range(iters):
        codes = assign_columns_reference(w32, c).long()
        mass = torch.zeros(k, cols, dtype=torch.float64, device=w.device).scatter_add_(0, codes, imp64)
        moment = torch.zeros(k, cols, dtype=torch.float64, device=w.device).scatter_add_(0, codes, wimp64)
        mean = (moment / mass.clamp_min(torch.finfo(torch.float64).tiny)).to(torch.float32).T
        c = torch.where((mass > 0).T, mean, c)
    c = torch.sort(c, dim=1).values.contiguous()
    return assign_columns_reference(w32, c), c


def _optimal_chunk(w32: torch.Tensor, imp: torch.Tensor, k: int) -> torch.Tensor:
    """Exact weighted 1-D K-means centroids (cols, k) of the columns of w32 (rows, cols); imp (rows, cols) > 0 sum."""
    rows, cols = w32.shape
    dev = w32.device
    values, order = torch.sort(w32.T, dim=1, stable=True)
    x = values.to(torch.float64)
    wt = torch.gather(imp.T.to(torch.float64), 1, order)
    shift = x.mean(1, keepdim=True)  # centred values: the prefix-sum cost formula cancels less
    xc = x - shift
    pad = torch.zeros(cols, 1, dtype=torch.float64, device=dev)
    mass_p = torch.cat([pad, wt.cumsum(1)], 1).reshape(-1)  # flat (cols * (rows + 1)): entry i sums i values
    s1_p = torch.cat([pad, (wt * xc).cumsum(1)], 1).reshape(-1)
    s2_p = torch.cat([pad, (wt * xc * xc).cumsum(1)], 1).reshape(-1)
    stride = rows + 1

    def cost(col: torch.Tensor, j: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Weighted sum of squared deviations from the weighted mean of sorted values [j, i) of column col."""
        a, b = col * stride + j, col * stride + i
        m = mass_p[b] - mass_p[a]
        s = s1_p[b] - s1_p[a]
        q = s2_p[b] - s2_p[a]
        return torch.where(m > 0, q - s * s / torch.where(m > 0, m, 1.0), 0.0).clamp_min(0.0)

    all_cols = torch.arange(cols, device=dev)
    positions = torch.arange(stride, device=dev)
    k_eff = min(k, rows)
    best = cost(all_cols.repeat_interleave(stride), torch.zeros(cols * stride, dtype=torch.long, device=dev),
                positions.repeat(cols)).view(cols, stride)  # one cluster over the first i values
    splits = []  # per layer: (cols, rows + 1) start of the last cluster in the best partition of the first i
    for layer in range(2, k_eff + 1):
        new = torch.full((cols, stride), float("inf"), dtype=torch.float64, device=dev)
        split = torch.zeros((cols, stride), dtype=torch.long, device=dev)
        # Divide and conquer over i in [layer, rows], breadth first so every column advances together: the
        # best split of the midpoint bounds the splits of the halves (monotone for the leftmost minimum).
        seg_lo = torch.tensor([layer], device=dev)
        seg_hi = torch.tensor([rows], device=dev)
        opt_lo = torch.full((1, cols), layer - 1, dtype=torch.long, device=dev)
        opt_hi = torch.full((1, cols), rows - 1, dtype=torch.long, device=dev)
        while seg_lo.numel():
            mid = (seg_lo + seg_hi) // 2
            first = opt_lo
            last = torch.minimum(opt_hi, mid[:, None] - 1)
            counts = (last - first + 1).reshape(-1)
            group = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts)
            offsets = torch.cumsum(counts, 0) - counts
            j = first.reshape(-1)[group] + torch.arange(group.numel(), device=dev) - offsets[group]
            col = group % cols
            i = mid[group // cols]
            val = best.reshape(-1)[col * stride + j] + cost(col, j, i)
            gmin = torch.full((counts.numel(),), float("inf"), dtype=torch.float64, device=dev)
            gmin = gmin.scatter_reduce(0, group, val, "amin")
            hit = val == gmin[group]
            jbest = torch.full((counts.numel(),), rows, dtype=torch.long, device=dev)
            jbest = jbest.scatter_reduce(0, group[hit], j[hit], "amin").view(-1, cols)
            new[:, mid] = gmin.view(-1, cols).T
            split[:, mid] = jbest.T
            left = seg_lo <= mid - 1
            right = mid + 1 <= seg_hi
            seg_lo = torch.cat([seg_lo[left], (mid + 1)[right]])
            seg_hi = torch.cat([(mid - 1)[left], seg_hi[right]])
            opt_lo, opt_hi = torch.cat([opt_lo[left], jbest[right]]), torch.cat([jbest[left], opt_hi[right]])
        best = new
        splits.append(split)
    bounds = [torch.full((cols,), rows, dtype=torch.long, device=dev)]
    for split in reversed(splits):
        bounds.insert(0, split[all_cols, bounds[0]])
    bounds.insert(0, torch.zeros(cols, dtype=torch.long, device=dev))
    b = torch.stack(bounds, 1)  # (cols, k_eff + 1), nondecreasing, clusters [b_j, b_j+1) nonempty
    lo, hi = b[:, :-1], b[:, 1:]
    flat_lo, flat_hi = all_cols[:, None] * stride + lo, all_cols[:, None] * stride + hi
    mass = mass_p[flat_hi] - mass_p[flat_lo]
    mean = (s1_p[flat_hi] - s1_p[flat_lo]) / torch.where(mass > 0, mass, 1.0) + shift
    midpoint = (x.gather(1, lo) + x.gather(1, hi - 1)) / 2  # a cluster without weight: any value in it will do
    cent = torch.where(mass > 0, mean, midpoint).to(torch.float32)
    if k_eff < k:
        cent = torch.cat([cent, cent[:, -1:].expand(cols, k - k_eff)], 1)
    return torch.sort(cent, dim=1).values.contiguous()


def optimal_centroids_reference(w: torch.Tensor, k: int, importance: torch.Tensor | None = None,
                                max_elements: int = 1 << 22) -> torch.Tensor:
    """Exact weighted 1-D K-means centroids (cols, k) float32 (method "optimal" of the module docstring).

    Columns run in chunks of about `max_elements` prefix entries (memory is a few dozen bytes per entry)."""
    w32 = w.to(torch.float32)
    rows, cols = w32.shape
    imp = _unit_where_zero(importance if importance is not None else torch.ones(rows, 1, device=w.device), cols)
    chunk = max(1, max_elements // (rows + 1))
    return torch.cat([_optimal_chunk(w32[:, c0:c0 + chunk], imp[:, c0:c0 + chunk], k)
                      for c0 in range(0, cols, chunk)], 0)


def kmeans_columns_reference(w: torch.Tensor, bits: int, importance: torch.Tensor | None = None,
                             iters: int = 25, method: str = "lloyd") -> tuple[torch.Tensor, torch.Tensor]:
    k = _check_bits(bits)
    _check_weights(w)
    _check_iters(iters)
    _check_method(method)
    imp = _check_importance(importance, w)
    if method == "optimal":
        cent = optimal_centroids_reference(w, k, imp)
        return assign_columns_reference(w, cent), cent
    init = quantile_init_reference(w, k, imp)
    return lloyd_reference(w, init, imp, iters)


def weighted_inertia(w: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor,
                     importance: torch.Tensor | None = None) -> float:
    """sum_i imp_i (w_i - c[code_i])^2 over the whole matrix, in float64 (unit weights when importance is None)."""
    c = centroids.to(torch.float64).T  # (k, cols)
    q = torch.gather(c, 0, codes.long())
    err = (w.to(torch.float64) - q).square()
    if importance is not None:
        imp = importance.to(torch.float64)
        err = err * (imp.reshape(-1, 1) if imp.dim() == 1 else imp)
    return float(err.sum())


# ----------------------------------------------------------------------------------------------------------
# Public launchers: Triton on CUDA or under TRITON_INTERPRET=1, the reference otherwise
# ----------------------------------------------------------------------------------------------------------

def kmeans_columns(w: torch.Tensor, bits: int, importance: torch.Tensor | None = None,
                   iters: int = 25, method: str = "lloyd") -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted K-means of every column of w (rows, cols) into 2^bits centroids.

    Returns (codes uint8 (rows, cols), centroids float32 (cols, 2^bits) ascending per column);
    `centroids.gather(1, codes.T.long()).T` is the quantized matrix. `method="optimal"` fits the exact 1-D
    optimum instead of `iters` Lloyd steps (slower; a PyTorch implementation on any device).
    """
    k = _check_bits(bits)
    _check_weights(w)
    _check_iters(iters)
    _check_method(method)
    imp = _check_importance(importance, w)
    if method == "optimal":
        cent = optimal_centroids_reference(w, k, imp)
        return _assign(w, cent), cent
    if use_triton(w):
        from calm_kernels import _kmeans_triton

        return _kmeans_triton.kmeans_columns(w, k, imp, iters)
    init = quantile_init_reference(w, k, imp)
    return lloyd_reference(w, init, imp, iters)


def _assign(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    if use_triton(w, centroids):
        from calm_kernels import _kmeans_triton

        return _kmeans_triton.assign_columns(w, centroids)
    return assign_columns_reference(w, centroids)


def assign_columns(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Codes (rows, cols) uint8 of the nearest centroid (cols, k) for each value of w, ties to the lower index."""
    _check_weights(w)
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 2 or centroids.shape[0] != w.shape[1]:
        shape = tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__
        raise ValueError(f"centroids must be (cols={w.shape[1]}, k), got {shape}")
    k = centroids.shape[1]
    if not 1 <= k <= 1 << MAX_BITS:
        raise ValueError(f"centroids must hold 1..{1 << MAX_BITS} values per column (uint8 codes), got {k}")
    if not centroids.is_floating_point() or not bool(torch.isfinite(centroids).all()):
        raise ValueError("centroids must be finite floating-point values")
    if centroids.device != w.device:
        raise ValueError(f"centroids are on {centroids.device} but w is on {w.device}; move one of them")
    return _assign(w, centroids)
