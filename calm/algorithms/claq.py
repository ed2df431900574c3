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

from calm.algorithms import register, replace_module
from calm.algorithms.gptq import HessianAccumulator, _sequential_groups, inverse_cholesky, single_thread
from calm.config import CalmUsageError, QuantSpec
from calm.model import BlockInputs, block_linears, linear_inputs
from calm_kernels.kmeans import assign_columns, kmeans_columns

ORDERS = ("outlier", "saliency")
OUTLIER_THRESHOLD = 13.0  # CLAQ: a weight is an outlier when |w| >= 13 x mean |W| over the matrix


@dataclasses.dataclass
class ClaqResult:
    """One quantized matrix in the original column order.

    codes (out, in) uint8; centroids (in, 2^max_bits) float32 holding float16 values, column j uses its first
    2^column_bits[j] (the rest repeat its largest centroid); column_bits (in,) int; outliers: (rows, cols, values) or None;
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
    bits = torch.full((k,), low, dtype=torch.int64)
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
    w = weight.detach().to(torch.float32).clone()
    n, k = w.shape
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    counts = outlier_counts(w)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(k)
    w, h, counts = w[:, perm], h[perm][:, perm], counts[perm]
    hinv = inverse_cholesky(h, damp)

    saliency = (w.to(torch.float64).square() / torch.diag(hinv).to(torch.float64).square().unsqueeze(0)).mean(dim=0)
    if bits_target is None:
        col_bits = torch.full((k,), bits, dtype=torch.int64)
    else:
        score = _rank_score(counts, saliency) if order == "outlier" else saliency
        col_bits = adaptive_bits(score, bits_target)
    tail = torch.zeros(k, dtype=torch.int64)
    if outliers:
        frac = torch.full((k,), outlier_rest, dtype=torch.float64)
        top = torch.argsort(_rank_score(counts, saliency), descending=True, stable=True)
        frac[top[:int(round(outlier_columns * k))]] = outlier_top
        tail = torch.round(frac * n).to(torch.int64)

    max_bits = int(col_bits.max())
    codes = torch.zeros(n, k, dtype=torch.uint8)
    cents = torch.zeros(k, 1 << max_bits)
    deq = torch.zeros(n, k)
    keep = torch.zeros(n, k, dtype=torch.bool)

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

    with single_thread():
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            w1 = w[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            hinv1 = hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if i % fit_columns == 0:
                    # Columns i.. carry every update from the columns before them: fit their codebooks now.
                    j2 = min(i + fit_columns, i2 - i1)
                    imp = None
                    if outliers:
                        imp = torch.stack([~_tails(w1[:, j], int(tail[i1 + j])) for j in range(i, j2)], 1).float()
                    fit(torch.arange(col, i1 + j2), w1[:, i:j2], imp)
                wc = w1[:, i]
                mask = _tails(wc, int(tail[col]))
                b = int(col_bits[col])
                c = cents[col:col + 1, :1 << b]
                q = assign_columns(wc.unsqueeze(1), c)[:, 0]
                dq = torch.where(mask, wc.to(torch.float16).to(torch.float32), c[0, q.long()])
                codes[:, col] = q
                deq[:, col] = dq
                keep[:, col] = mask
                e = (wc - dq) / hinv1[i, i]
                w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
                err1[:, i] = e
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

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


@register("claq")
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, *, bits_target: float | None = None,
                   order: str = "outlier", outliers: bool = False, outlier_top: float = 0.014,
                   outlier_rest: float = 0.004, outlier_columns: float = 0.1, act_order: bool = True,
                   damp: float = 0.01, block_size: int = 128, fit_columns: int = 32, kmeans_iters: int = 25,
                   true_sequential: bool = True) -> nn.Module:
    from calm.nn import CodebookQuantLinear

    _check_spec(spec)
    if order not in ORDERS:
        raise CalmUsageError(f"claq order must be one of {ORDERS}, got {order!r}")
    if bits_target is not None and not 2.0 <= float(bits_target) <= 4.0:
        raise CalmUsageError(f"claq bits_target must be in [2, 4] (e.g. 2.1, 3.12), got {bits_target}")
    for name, value in (("outlier_top", outlier_top), ("outlier_rest", outlier_rest),
                        ("outlier_columns", outlier_columns)):
        if not 0.0 <= value <= (1.0 if name == "outlier_columns" else 0.25):
            raise CalmUsageError(f"claq {name} is a fraction ({'<= 1' if name == 'outlier_columns' else 'per tail, <= 0.25'}), got {value}")
    if damp <= 0 or block_size < 1 or fit_columns < 1 or kmeans_iters < 0:
        raise CalmUsageError("claq needs damp > 0, block_size >= 1, fit_columns >= 1 and kmeans_iters >= 0")
    bits_target = None if bits_target is None else float(bits_target)
    for group in _sequential_groups(block, true_sequential):
        linears = block_linears(block)
        accs = {n: HessianAccumulator(linears[n].in_features) for n in group}
        linear_inputs(block, inputs, group, lambda name, x: accs[name].add(x))
        for name in group:
            linear = linears[name]
            r = claq_quantize_weight(linear.weight, accs[name].hessian(), spec.w_bits, bits_target, order, outliers,
                                     outlier_top, outlier_rest, outlier_columns, act_order, damp, block_size,
                                     fit_columns, kmeans_iters)
            replace_module(block, name, CodebookQuantLinear.from_parts(r.codes, r.centroids, r.column_bits,
                                                                       r.outliers, linear.bias))
    return block


quantize_block.check_spec = _check_spec
