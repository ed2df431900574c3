"""Per-column weighted 1-D K-means (the codebook fit of CLAQ and SqueezeLLM-style quantizers).

Contract
- `kmeans_columns(w, bits, importance=None, iters=25) -> (codes, centroids)`: every column of w (rows, cols)
  gets k = 2^bits centroids (bits 1..4) fitted to its `rows` values; codes (rows, cols) uint8 index the
  column's centroids; centroids (cols, k) float32, ascending in each column.
- `assign_columns(w, centroids) -> codes`: nearest centroid per value, ties to the lower index.
- `importance`: nonnegative finite weights per value, (rows, cols) or (rows,) (one weight per row, shared by
  every column). A column whose weights sum to zero is fitted with unit weights, so its codes stay
  meaningful.

The algorithm, identical in the reference and the kernel (the kernel is tested against this text):
1. Init, weighted quantiles: sort the column, take the cumulative weight c and total T; centroid j is the
   smallest value v whose cumulative weight (all values <= v) reaches (j + 1/2) T / k.
2. `iters` Lloyd iterations, a fixed count (no early exit, so the work and the result do not depend on
   timing): assign every value to its nearest centroid (distance |w - c_j| in float32, strict `<` so ties
   keep the lower index), then move every centroid to the weighted mean of its values. A centroid with no
   weight assigned (empty cluster) keeps its previous value: deterministic, and in 1-D it stays between its
   neighbours, so the order is kept.
3. Sort the centroids (a no-op in exact arithmetic: 1-D Lloyd preserves the order; it guards rounding),
   then the final codes are `assign_columns` against the returned centroids.

Numerics: values and centroids are float32; distances are one float32 subtraction and an abs, so kernel and
reference assign identically for the same centroids. The reference sums the weighted means in float64, the
kernel in float32, so centroids may differ in the last bits.

Dispatch: Triton (`_kmeans_triton.py`) for CUDA tensors or under TRITON_INTERPRET=1, the reference
otherwise; columns taller than MAX_KERNEL_ROWS always run the reference. On a shared 2-core CPU, call the
reference under one torch thread (calm.algorithms.gptq.single_thread): measured 4-10x faster than two
contended threads on 576x576 .. 1536x576 weights (0.4-3.5 s for 25 iterations at 2-4 bits, one thread).
Lloyd from quantile init is a local method: on the bench's smoke shapes (64 and 131 rows, 1% of values 4x
larger) kmeans1d's exact 1-D optimum reached 0.42-0.99x this inertia at 2-4 bits. On the default model's
layer-5 q_proj (576x576) and down_proj (576x1536), per column over the output rows, the optimum reached
0.99x / 0.94-0.96x / 0.63-0.68x of it at 2 / 3 / 4 bits, and 100 iterations instead of 25 gained 0% / 0.3% /
1.5-3.6%: at 4 bits the fit, not the iteration count, limits it.

Tested: the reference on the CPU (tests/test_kmeans.py); the kernels under the interpreter
(tests/kernels/test_kmeans.py) and compiled for sm90 without a device (tests/test_kernel_compile.py). Not
yet run on a GPU: configs untuned, no performance figure.
"""
from __future__ import annotations

import torch

from calm_kernels._dispatch import use_triton

MAX_BITS = 4  # codes are uint8 and the kernel keeps k centroids per column in registers
# The fit kernel holds a whole column in one program's registers; taller columns run the reference.
MAX_KERNEL_ROWS = 32768


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


def kmeans_columns_reference(w: torch.Tensor, bits: int, importance: torch.Tensor | None = None,
                             iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    k = _check_bits(bits)
    _check_weights(w)
    _check_iters(iters)
    imp = _check_importance(importance, w)
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
                   iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted K-means of every column of w (rows, cols) into 2^bits centroids.

    Returns (codes uint8 (rows, cols), centroids float32 (cols, 2^bits) ascending per column);
    `centroids.gather(1, codes.T.long()).T` is the quantized matrix.
    """
    k = _check_bits(bits)
    _check_weights(w)
    _check_iters(iters)
    imp = _check_importance(importance, w)
    if w.shape[0] <= MAX_KERNEL_ROWS and use_triton(w):
        from calm_kernels import _kmeans_triton

        return _kmeans_triton.kmeans_columns(w, k, imp, iters)
    init = quantile_init_reference(w, k, imp)
    return lloyd_reference(w, init, imp, iters)


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
    if use_triton(w, centroids):
        from calm_kernels import _kmeans_triton

        return _kmeans_triton.assign_columns(w, centroids)
    return assign_columns_reference(w, centroids)
