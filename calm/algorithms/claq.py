"""CLAQ (Wang et al., arXiv 2405.17233): GPTQ's column loop with a per-column K-means codebook instead of the
uniform grid, adaptive precision per column and outlier reservation.

Per linear (W is out x in; a column is one input channel):
- Hessian, dead inputs, damping, optional act-order (columns by descending diag H) and the upper Cholesky
  factor of H^-1 exactly as GPTQ (calm.algorithms.gptq); after each column the error (w - q) / Hinv_jj is
  spread over the remaining columns, lazily per block of `block_size` columns.
- Codebook: column j gets 2^b_j centroids by 1-D K-means (calm_kernels.kmeans) over its out values; q is
  the nearest centroid. CLAQ's reference code fits each column's K-means when the column comes up, on its
  fully updated values (`fit_columns=1`). By default (`fit_columns=32`) the codebooks of the next 32 columns
  are fitted in one batched call when the first of them comes up: they carry every update from the columns
  before them, only not yet from the up to 31 columns of their own batch; each column is then assigned to
  its codebook after its full update. The batched fit is what makes CLAQ cost seconds per layer on a CPU
  (bench/pool_layer_times.py times both).
- Adaptive precision (`bits_target` b): columns ranked by `order`; for 2 <= b < 3 the top (b - 2) / 2 of
  them get 4 bits and the rest 2, for 3 <= b <= 4 the top (b - 3) get 4 bits and the rest 3 (3.12 -> 12% of
  columns at 4 bits). Without bits_target every column has the scheme's bits.
  `order`: "outlier" ranks by the count of |W_ij| >= 13 * mean|W| in the column (ties, which are most
  columns, broken by the saliency below); "saliency" by GPTQ's mean_i W_ij^2 / Hinv_jj^2.
- Outlier reservation (`outliers=true`): in the top `outlier_columns` (10%) of columns by the outlier count,
  the `outlier_top` (1.4%) largest and as many smallest values per column stay in floating point; elsewhere
  `outlier_rest` (0.4%) per tail. They are chosen on the column's updated values when it is quantized and
  keep their value (rounded to float16, as stored; that rounding error is spread like any other); the
  K-means fit gives weight 0 to the column's tails as they stand at fit time. Stored as sparse
  (row, column, value) entries.
Codebooks, per-column widths and outliers go into calm.nn.CodebookQuantLinear in the original column order;
its effective bits count codes, codebooks (float16) and outliers. CLAQ has no groups: the scheme's group
size and symmetric flag do not apply to it.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from calm.algorithms import register
from calm.algorithms.gptq_core import (
    column_loop,
    inverse_cholesky,
    prepare_problem,
    quantize_sequentially,
    single_thread,
)
from calm.algorithms.options import AlgorithmOptions, option
from calm.config import CalmUsageError, QuantSpec
from calm.model import BlockInputs
from calm.nn import CodebookQuantLinear
from calm_kernels.kmeans import assign_columns, kmeans_columns

ORDERS = ("outlier", "saliency")
OUTLIER_THRESHOLD = 13.0  # CLAQ: a weight is an outlier when |w| >= 13 x mean |W| over the matrix


@dataclasses.dataclass
class ClaqResult:
    """One quantized matrix in the original column order.

    codes (out, in) uint8; centroids (in, 2^max_bits) float32 holding float16 values, column j uses its first
    2^column_bits[j] (the rest repeat its largest centroid); column_bits (in,) int; outliers: (rows, cols, values)
    or None;
    dequantized: the dense (out, in) weight the codes, codebooks and outliers stand for.
    """
    codes: torch.Tensor
    centroids: torch.Tensor
    column_bits: torch.Tensor
    outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    dequantized: torch.Tensor


def adaptive_bits(score: torch.Tensor, bits_target: float) -> torch.Tensor:
    """Per-column widths for a target average: the top-scored columns get 4 bits (CLAQ's AP rule)."""
    k = score.numel()
    if not 2.0 <= bits_target <= 4.0:
        raise CalmUsageError(f"claq bits_target must be in [2, 4], got {bits_target}")
    if bits_target < 3.0:
        low, frac = 2, (bits_target - 2.0) / 2.0
    else:
        low, frac = 3, bits_target - 3.0
    n_high = int(round(frac * k))
    bits = torch.full((k,), low, dtype=torch.int64, device=score.device)
    bits[torch.argsort(score, descending=True, stable=True)[:n_high]] = 4
    return bits


def outlier_counts(w: torch.Tensor) -> torch.Tensor:
    """Per column, how many |W_ij| >= 13 x mean |W| (CLAQ's outlier order)."""
    m = w.abs().mean()
    return (w.abs() >= OUTLIER_THRESHOLD * m).sum(dim=0).to(torch.float64)


def _rank_score(primary: torch.Tensor, tie_break: torch.Tensor) -> torch.Tensor:
    """Order by `primary`, ties by `tie_break` (both nonnegative)."""
    tb = tie_break.to(torch.float64)
    return primary.to(torch.float64) + tb / (tb.max() + 1.0) * 0.5


def _tails(col: torch.Tensor, m: int) -> torch.Tensor:
    """Mask of the m largest and m smallest values of a column."""
    mask = torch.zeros_like(col, dtype=torch.bool)
    if m > 0:
        mask[torch.topk(col, m).indices] = True
        mask[torch.topk(col, m, largest=False).indices] = True
    return mask


def claq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int, bits_target: float | None = None,
                         order: str = "outlier", outliers: bool = False, outlier_top: float = 0.014,
                         outlier_rest: float = 0.004, outlier_columns: float = 0.1, act_order: bool = True,
                         damp: float = 0.01, block_size: int = 128, fit_columns: int = 32,
                         kmeans_iters: int = 25) -> ClaqResult:
    """CLAQ one weight matrix (out, in) with the Hessian (in, in) of its inputs."""
    w, h = prepare_problem(weight, hessian)
    n, k = w.shape
    counts = outlier_counts(w)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(k, device=w.device)
    w, h, counts = w[:, perm], h[perm][:, perm], counts[perm]
    hinv = inverse_cholesky(h, damp)

    saliency = (w.to(torch.float64).square() / torch.diag(hinv).to(torch.float64).square().unsqueeze(0)).mean(dim=0)
    if bits_target is None:
        col_bits = torch.full((k,), bits, dtype=torch.int64, device=w.device)
    else:
        score = _rank_score(counts, saliency) if order == "outlier" else saliency
        col_bits = adaptive_bits(score, bits_target)
    tail = torch.zeros(k, dtype=torch.int64, device=w.device)
    if outliers:
        frac = torch.full((k,), outlier_rest, dtype=torch.float64, device=w.device)
        top = torch.argsort(_rank_score(counts, saliency), descending=True, stable=True)
        frac[top[:int(round(outlier_columns * k))]] = outlier_top
        tail = torch.round(frac * n).to(torch.int64)

    max_bits = int(col_bits.max())
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    cents = torch.zeros(k, 1 << max_bits, device=w.device)
    deq = torch.zeros(n, k, device=w.device)
    keep = torch.zeros(n, k, dtype=torch.bool, device=w.device)

    def fit(cols: torch.Tensor, values: torch.Tensor, importance: torch.Tensor | None) -> None:
        """Fit the codebooks of columns `cols` (absolute indices) on `values` (n, len(cols)), by width."""
        for b in torch.unique(col_bits[cols]).tolist():
            sel = col_bits[cols] == b
            imp = importance[:, sel] if importance is not None else None
            _, c = kmeans_columns(values[:, sel], int(b), imp, kmeans_iters)
            # The module stores float16 codebooks: compensate the error of the values it will really hold.
            c = c.to(torch.float16).to(torch.float32)
            c = torch.cat([c, c[:, -1:].expand(-1, (1 << max_bits) - c.shape[1])], dim=1)
            cents[cols[sel]] = c

    def on_codebook(col: int, i: int, w1: torch.Tensor) -> torch.Tensor:
        if i % fit_columns == 0:
            # Columns i.. carry every update from the columns before them: fit their codebooks now.
            j2 = min(i + fit_columns, w1.shape[1])
            imp = None
            if outliers:
                imp = torch.stack([~_tails(w1[:, j], int(tail[col - i + j])) for j in range(i, j2)], 1).float()
            fit(torch.arange(col, col - i + j2, device=w.device), w1[:, i:j2], imp)
        wc = w1[:, i]
        mask = _tails(wc, int(tail[col]))
        c = cents[col:col + 1, :1 << int(col_bits[col])]
        q = assign_columns(wc.unsqueeze(1), c)[:, 0]
        dq = torch.where(mask, wc.to(torch.float16).to(torch.float32), c[0, q.long()])
        codes[:, col] = q
        deq[:, col] = dq
        keep[:, col] = mask
        return dq

    with single_thread():
        column_loop(w, hinv, block_size, on_codebook)

    inverse = torch.argsort(perm)
    codes, cents, col_bits, deq, keep = codes[:, inverse], cents[inverse], col_bits[inverse], deq[:, inverse], \
        keep[:, inverse]
    sparse = None
    if outliers:
        rows, cols = torch.nonzero(keep, as_tuple=True)
        sparse = (rows, cols, deq[rows, cols])
    return ClaqResult(codes, cents, col_bits, sparse, deq)


def _check_spec(spec: QuantSpec) -> None:
    if spec.a_bits != 16 or spec.k_bits != 16 or spec.v_bits != 16:
        raise CalmUsageError(f"claq is weight-only; scheme {spec.scheme} also quantizes activations/KV: use an A16 "
                             f"scheme such as W{spec.w_bits}A16")
    if not 2 <= spec.w_bits <= 4:
        raise CalmUsageError(f"claq codebooks hold 2 to 4 bits per column; scheme {spec.scheme} asks {spec.w_bits}: "
                             f"use W2/W3/W4 (bits_target sets an adaptive average on top)")


@dataclasses.dataclass(frozen=True)
class CLAQOptions(AlgorithmOptions):
    bits_target: float | None = option(None, "average code width with adaptive precision: top columns at 4 bits, "
                                       "the rest at 2 (below 3) or 3 (e.g. 2.1, 3.12); null = the scheme's bits",
                                       low=2.0, high=4.0)
    order: str = option("outlier", "column ranking for adaptive precision", choices=ORDERS)
    outliers: bool = option(False, "keep the tails of each column in float16 (outlier reservation)")
    outlier_top: float = option(0.014, "fraction per tail kept in the top outlier columns", low=0.0, high=0.25)
    outlier_rest: float = option(0.004, "fraction per tail kept in the other columns", low=0.0, high=0.25)
    outlier_columns: float = option(0.1, "fraction of columns (by outlier count) that keep outlier_top", low=0.0,
                                    high=1.0)
    act_order: bool = option(True, "quantize columns by descending diag H")
    damp: float = option(0.01, "damping, as a fraction of mean(diag H)", low=0.0, low_open=True)
    block_size: int = option(128, "columns per lazy batch", low=1)
    fit_columns: int = option(32, "codebooks fitted per batched K-means call (1 = CLAQ's per-column fit)", low=1)
    kmeans_iters: int = option(25, "Lloyd iterations per K-means fit", low=0)
    true_sequential: bool = option(True, "q/k/v, then o, then gate/up, then down, each calibrated on the "
                                   "quantized ones before")


@register("claq", CLAQOptions, check_spec=_check_spec, grouped=False)
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, options: CLAQOptions,
                   context: dict) -> nn.Module:
    def quantize_linear(name: str, linear: nn.Module, hessian: torch.Tensor) -> nn.Module:
        r = claq_quantize_weight(linear.weight, hessian, spec.w_bits, options.bits_target, options.order,
                                 options.outliers, options.outlier_top, options.outlier_rest,
                                 options.outlier_columns, options.act_order, options.damp, options.block_size,
                                 options.fit_columns, options.kmeans_iters)
        return CodebookQuantLinear.from_parts(r.codes, r.centroids, r.column_bits, r.outliers, linear.bias)

    return quantize_sequentially(block, inputs, options.true_sequential, quantize_linear)
