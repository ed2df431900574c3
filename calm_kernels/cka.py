"""Linear CKA (Kornblith et al. 2019) between two representations of the same n tokens.

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F),   Xc = X - column means

Public API (the search depends on it; the Triton kernel plugs in behind it):
- `linear_cka(x, y, debiased=False) -> CKAResult`: one shot on whole matrices.
- `CKAAccumulator`: streaming over calibration batches in the feature-space form, so a block's outputs are
  never held whole. `CKAAccumulator.reference(...)` computes the full-precision side's self term once per
  block; candidates then reuse it.
- `linear_cka_reference` (float64 oracle), `linear_cka_kernel(x, y, form)` (the Triton one-shot path with
  the form forced, for tests and benchmarks), `CoMoment` / `ShiftedCoMoment` (the two streaming states).
Both `linear_cka` and `CKAAccumulator.update` dispatch through `calm_kernels._dispatch`: Triton for
fp16/bf16/fp32 tensors on CUDA or under TRITON_INTERPRET=1, the reference otherwise (float64 inputs always
take the reference). One accumulator keeps the path its first batch took.

Numerics: LLM hidden states have channels whose mean is ~1000x their spread, so the uncentered identity
X^T Y - n mx my^T cancels catastrophically. Reference path (CPU, float64 inputs): each batch is centered on
its own mean (in float64, then the product runs in float32) and batches are merged with Chan's parallel
co-moment update in float64. The final Frobenius reductions run in float64: candidates differ in the
3rd-5th decimal.

Triton path (CUDA tensors or TRITON_INTERPRET=1; fp16/bf16/fp32 inputs; kernels in `_cka_triton.py`):
- One shot (`linear_cka`): column means from float64 column sums, subtracted while each tile is loaded
  (never a centered copy); the feature-space form (three Grams, the two self Grams on their upper tiles
  only, cost ~ n (dx dy + (dx^2 + dy^2) / 2)) or the sample-space form (both n x n Grams tile by tile, upper
  tiles only, cost ~ n^2 (dx + dy) / 2), whichever costs less; every Gram tile is reduced to its squared
  sum in float64 in the kernel's epilogue and never written out. When d is small (few Gram tiles for the
  SMs, e.g. d = 576) the feature-space Grams also split the tokens across programs: float32 partial Grams
  in a (splits, dx, dy) workspace, summed in float64 in a fixed order (deterministic; no atomics).
- Streaming (`CKAAccumulator`): each side is shifted by its first batch's column means (fixed from then on,
  so no merge is needed), the kernel adds the shifted co-moment tile by tile into a float64 (dx, dy) state,
  and `compute` removes the remaining mean offset exactly: Xc^T Yc = S - sx sy^T / n, with sx the float64
  column sums of X - shift (of the order of the spread, so nothing cancels).
Tested under the Triton interpreter only (fp32: relative error < 1e-6 against the float64 reference,
including 1000x means); not yet run on a GPU, where fp32 operands use tf32x3 and fp16/bf16 operands are
the centered values rounded once to the input dtype (see `_cka_triton.py`). Emulated in float64 (n=4096,
d=576, every 50th channel mean 1000, Y = X + noise, CKA ~0.9998): that rounding moves CKA by at most 2e-7
from the exact CKA of the stored bf16 values, while storing the outputs in bf16 at all moves it by 1e-4
to 2.4e-4 and swapped the order of two candidates whose exact CKAs differ by 1.8e-5 (0.9998129 vs
0.9997945). Keep block outputs in float32 when candidates are close.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from calm_kernels._dispatch import use_triton

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class CKAResult:
    """CKA and its three terms: hsic_xy = ||Yc^T Xc||_F^2, hsic_xx = ||Xc^T Xc||_F^2, hsic_yy likewise."""
    cka: float
    hsic_xy: float
    hsic_xx: float
    hsic_yy: float


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() > 2:
        x = x.reshape(-1, x.shape[-1])
    if y.dim() > 2:
        y = y.reshape(-1, y.shape[-1])
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"CKA takes (tokens, features) matrices, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same tokens on both sides: {x.shape[0]} rows vs {y.shape[0]} rows")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise TypeError(f"CKA takes floating-point inputs, got {x.dtype} and {y.dtype}")
    return x, y


def _ratio(xy: float, xx: float, yy: float) -> float:
    denom = (xx ** 0.5) * (yy ** 0.5)
    return float(xy / denom) if denom > 0 else 0.0


def linear_cka_reference(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> CKAResult:
    """Float64 oracle. Feature space when n >= d, sample space (n x n Grams) when n is the smaller side."""
    x, y = _check_pair(x, y)
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    n = x.shape[0]
    if debiased:
        return _debiased_sample_space(x, y)
    xc = x - x.mean(0, keepdim=True)
    yc = y - y.mean(0, keepdim=True)
    if n < max(x.shape[1], y.shape[1]):
        kx = xc @ xc.T
        ky = yc @ yc.T
        xy = float((kx * ky).sum())
        xx = float((kx * kx).sum())
        yy = float((ky * ky).sum())
    else:
        xy = float((yc.T @ xc).square().sum())
        xx = float((xc.T @ xc).square().sum())
        yy = float((yc.T @ yc).square().sum())
    return CKAResult(_ratio(xy, xx, yy), xy, xx, yy)


def _unbiased_hsic(kx: torch.Tensor, ky: torch.Tensor) -> float:
    """Song et al. (2012) unbiased HSIC estimator (up to a constant factor that cancels in CKA)."""
    n = kx.shape[0]
    if n < 4:
        raise ValueError(f"debiased CKA needs at least 4 tokens, got {n}")
    kx = kx.clone()
    ky = ky.clone()
    kx.fill_diagonal_(0)
    ky.fill_diagonal_(0)
    kxy = (kx * ky).sum()
    kx1 = kx.sum(1)
    ky1 = ky.sum(1)
    value = kxy + kx1.sum() * ky1.sum() / ((n - 1) * (n - 2)) - 2 * (kx1 @ ky1) / (n - 2)
    return float(value / (n * (n - 3)))


def _debiased_sample_space(x: torch.Tensor, y: torch.Tensor) -> CKAResult:
    # The unbiased estimator is invariant to a constant shift of the features; centering first keeps it exact.
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    kx = x @ x.T
    ky = y @ y.T
    xy = _unbiased_hsic(kx, ky)
    xx = _unbiased_hsic(kx, kx)
    yy = _unbiased_hsic(ky, ky)
    return CKAResult(_ratio(xy, xx, yy), xy, xx, yy)


def _kernel_path(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype in _KERNEL_DTYPES and y.dtype in _KERNEL_DTYPES and use_triton(x, y)


def _column_mean32(x: torch.Tensor) -> torch.Tensor:
    """Column means from float64 sums, as float32 (the kernels' shift)."""
    return (x.sum(0, dtype=torch.float64) / x.shape[0]).to(torch.float32)


def _cka_form(n: int, dx: int, dy: int) -> str:
    """'feature' or 'sample', whichever needs fewer multiply-adds (symmetric Grams count half)."""
    feature = n * (dx * dy + (dx * dx + dy * dy) / 2)
    sample = n * n * (dx + dy) / 2
    return "sample" if sample < feature else "feature"


def linear_cka_kernel(x: torch.Tensor, y: torch.Tensor, form: str = "auto", splits: int | None = None
                      ) -> CKAResult:
    """The one-shot Triton path (fused centering, Gram tiles reduced in their epilogue); form 'auto' picks
    the cheaper of 'feature' and 'sample'. `splits`: token ranges of the feature-space Grams (None: chosen
    from the Gram's tile count and the device's SMs, `_cka_triton.token_splits`). Needs CUDA tensors or
    TRITON_INTERPRET=1."""
    x, y = _check_pair(x, y)
    if form not in ("auto", "feature", "sample"):
        raise ValueError(f"form must be 'auto', 'feature' or 'sample', got {form!r}")
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be a positive number of token ranges or None (automatic), got {splits}")
    if x.shape[0] == 0:
        raise ValueError("CKA of zero tokens is undefined; pass at least one row")
    from calm_kernels import _cka_triton

    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    mx, my = _column_mean32(x), _column_mean32(y)
    if form == "auto":
        form = _cka_form(n, dx, dy)
    if form == "sample":
        xy, xx, yy = _cka_triton.sample_space_terms(x, y, mx, my)
    else:
        xy = _cka_triton.gram_squared_sum(x, y, mx, my, splits=splits)
        xx = _cka_triton.gram_squared_sum(x, None, mx, splits=splits)
        yy = _cka_triton.gram_squared_sum(y, None, my, splits=splits)
    return CKAResult(_ratio(xy, xx, yy), xy, xx, yy)


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> CKAResult:
    """Linear CKA of two (tokens, features) matrices (leading dims are flattened into tokens)."""
    if debiased:
        return linear_cka_reference(x, y, debiased=True)
    x, y = _check_pair(x, y)
    if _kernel_path(x, y):
        return linear_cka_kernel(x, y)
    acc = CKAAccumulator()
    acc.update(x, y)
    return acc.compute()


class CoMoment:
    """Streaming centered co-moment sum_i (x_i - mx)(y_i - my)^T, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean_x: torch.Tensor | None = None
        self.mean_y: torch.Tensor | None = None
        self.matrix: torch.Tensor | None = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = _check_pair(x, y)
        nb = x.shape[0]
        if nb == 0:
            return
        mx = x.to(torch.float64).mean(0)
        my = y.to(torch.float64).mean(0)
        # float64 inputs stay float64 (tests, oracles); anything else multiplies in float32 after centering.
        compute = torch.float64 if x.dtype == torch.float64 and y.dtype == torch.float64 else torch.float32
        xc = (x.to(torch.float64) - mx).to(compute)
        yc = (y.to(torch.float64) - my).to(compute)
        m_b = (xc.T @ yc).to(torch.float64)
        if self.n == 0:
            self.n, self.mean_x, self.mean_y, self.matrix = nb, mx, my, m_b
            return
        n = self.n + nb
        dx = mx - self.mean_x
        dy = my - self.mean_y
        self.matrix = self.matrix + m_b + torch.outer(dx, dy) * (self.n * nb / n)
        self.mean_x = self.mean_x + dx * (nb / n)
        self.mean_y = self.mean_y + dy * (nb / n)
        self.n = n


def frobenius_sq(m: torch.Tensor) -> float:
    return float(m.to(torch.float64).square().sum())


class ShiftedCoMoment:
    """Kernel-path streaming co-moment: S = sum_i (x_i - s)(y_i - t)^T in float64, with s, t the first batch's
    column means; `centered()` returns Xc^T Yc = S - sx sy^T / n (sx, sy: float64 column sums of x - s, y - t).

    `symmetric=True` accumulates X^T X from `update(x)` alone (upper tiles computed, mirrored)."""

    def __init__(self, symmetric: bool = False) -> None:
        self.symmetric = symmetric
        self.n = 0
        self.state: torch.Tensor | None = None

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        from calm_kernels import _cka_triton

        if self.symmetric != (y is None):
            raise ValueError("a symmetric co-moment takes update(x); a cross one takes update(x, y)")
        x, y2 = _check_pair(x, x if y is None else y)
        nb = x.shape[0]
        if nb == 0:
            return
        if self.state is None:
            self.shift_x = _column_mean32(x)
            self.shift_y = self.shift_x if y is None else _column_mean32(y2)
            self.sum_x = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.sum_y = self.sum_x if y is None else torch.zeros(y2.shape[1], dtype=torch.float64, device=x.device)
            self.state = torch.zeros(x.shape[1], y2.shape[1], dtype=torch.float64, device=x.device)
        elif x.shape[1] != self.state.shape[0] or y2.shape[1] != self.state.shape[1]:
            raise ValueError(f"batch features {x.shape[1]}, {y2.shape[1]} differ from the first batch's "
                             f"{tuple(self.state.shape)}")
        self.sum_x += x.sum(0, dtype=torch.float64) - nb * self.shift_x.to(torch.float64)
        if y is not None:
            self.sum_y += y2.sum(0, dtype=torch.float64) - nb * self.shift_y.to(torch.float64)
        _cka_triton.gram_accumulate(self.state, x, None if y is None else y2, self.shift_x,
                                    None if y is None else self.shift_y)
        self.n += nb

    def centered(self) -> torch.Tensor:
        return self.state - torch.outer(self.sum_x, self.sum_y) / self.n

    @property
    def matrix(self) -> torch.Tensor | None:
        return None if self.state is None else self.centered()


AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes, in place


def _global_centered(m: "CoMoment | ShiftedCoMoment", all_reduce: AllReduce) -> tuple[torch.Tensor, int]:
    """The centered co-moment over the tokens of every process: each process's one is turned into raw sums
    (count, sum x, sum y, sum x y^T about zero), the sums are all-reduced, and centered again."""
    if isinstance(m, ShiftedCoMoment):
        s_x, s_y = m.shift_x.to(torch.float64), m.shift_y.to(torch.float64)
        sum_x, sum_y = m.sum_x + m.n * s_x, m.sum_y + m.n * s_y
        raw = m.state + torch.outer(m.sum_x, s_y) + torch.outer(s_x, m.sum_y) + m.n * torch.outer(s_x, s_y)
    else:
        sum_x, sum_y = m.mean_x * m.n, m.mean_y * m.n
        raw = m.matrix + torch.outer(sum_x, sum_y) / m.n
    count = torch.tensor([float(m.n)], dtype=torch.float64, device=raw.device)
    for t in (count, sum_x, sum_y, raw):
        all_reduce(t)
    return raw - torch.outer(sum_x, sum_y) / count, int(count)


class _Combined:
    """A co-moment already combined over processes (what `CKAAccumulator.compute` reads)."""

    def __init__(self, matrix: torch.Tensor, n: int) -> None:
        self.matrix, self.n = matrix, n


class CKAAccumulator:
    """Streaming linear CKA in the feature-space form.

    `reference_self_term` is ||Xc^T Xc||_F^2 of the full-precision side when already known (from
    `CKAAccumulator.reference`); then only X^T Y and Y^T Y are accumulated per candidate.
    """

    def __init__(self, reference_self_term: float | None = None) -> None:
        self._xx_known = reference_self_term
        self._kernel: bool | None = None  # decided by the first batch: Triton path or reference
        self._start(False)
        self._kernel = None

    def _start(self, kernel: bool) -> None:
        self._kernel = kernel
        if kernel:
            self._xy, self._yy = ShiftedCoMoment(), ShiftedCoMoment(symmetric=True)
            self._xx = ShiftedCoMoment(symmetric=True) if self._xx_known is None else None
        else:
            self._xy, self._yy = CoMoment(), CoMoment()
            self._xx = CoMoment() if self._xx_known is None else None

    @staticmethod
    def reference(batches, all_reduce: AllReduce | None = None) -> float:
        """||Xc^T Xc||_F^2 of the full-precision outputs, streamed over `batches` (with `all_reduce`: over the
        batches of every process)."""
        m = None
        for x in batches:
            if m is None:
                kernel = _kernel_path(x, x)
                m = ShiftedCoMoment(symmetric=True) if kernel else CoMoment()
            if isinstance(m, ShiftedCoMoment):
                m.update(x)
            else:
                m.update(x, x)
        if m is None or m.matrix is None:
            raise ValueError("no calibration batches were given")
        return frobenius_sq(m.matrix if all_reduce is None else _global_centered(m, all_reduce)[0])

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = _check_pair(x, y)
        kernel = _kernel_path(x, y)
        if self._kernel is None:
            self._start(kernel)
        elif kernel != self._kernel:
            raise ValueError("all batches of one CKAAccumulator must take the same path: keep them on one "
                             "device and in fp16/bf16/fp32 (or all float64)")
        if self._kernel:
            self._xy.update(x, y)
            self._yy.update(y)
            if self._xx is not None:
                self._xx.update(x)
            return
        self._xy.update(x, y)
        self._yy.update(y, y)
        if self._xx is not None:
            self._xx.update(x, x)

    @property
    def tokens(self) -> int:
        return self._xy.n

    def combine(self, all_reduce: AllReduce) -> None:
        """Combine the accumulators of every process (data-parallel: each saw a shard of the tokens), so that
        `compute` gives the CKA of all tokens. Every process must call it."""
        if self._xy.matrix is None:
            raise ValueError("CKAAccumulator.combine() before any update()")
        for name in ("_xy", "_yy", "_xx"):
            m = getattr(self, name)
            if m is not None:
                setattr(self, name, _Combined(*_global_centered(m, all_reduce)))

    def compute(self) -> CKAResult:
        if self._xy.matrix is None:
            raise ValueError("CKAAccumulator.compute() before any update()")
        xy = frobenius_sq(self._xy.matrix)
        yy = frobenius_sq(self._yy.matrix)
        xx = self._xx_known if self._xx is None else frobenius_sq(self._xx.matrix)
        return CKAResult(_ratio(xy, xx, yy), xy, xx, yy)
