"""The GPTQ engine every Hessian-based algorithm shares (gptq, rotation, claq, affine, kurtosis).

GPTQ (Frantar et al., arXiv 2210.17323) quantizes a weight matrix column by column and spreads each column's
error over the columns not yet quantized through the upper Cholesky factor of H^-1, H = 2/n sum x x^T over the
calibration inputs of the linear. The pieces:
- `HessianAccumulator`: the running H of a linear's inputs (float64 sum).
- `prepare_problem`: dead inputs (H_ii = 0) get H_ii = 1 and a zero weight column.
- `inverse_cholesky`: damping (`damp` x mean diag H) and the upper Cholesky factor of H^-1.
- `column_loop`: the lazy-batch loop; what a column becomes is a callback (`QuantizeColumn`), so the uniform
  grid (`gptq_quantize_weight`) and CLAQ's K-means codebooks run the same loop.
- `sequential_groups`, `group_hessians`, `quantize_sequentially`: inside a decoder block the linears are
  quantized true-sequentially (q/k/v, then o, then gate/up, then down), each group calibrated on the
  outputs of the quantized groups before it.

act_order for the uniform grid (the block-level default is "static": on SmolLM2 at W3G64, left-to-right
GPTQ had a higher held-out block-output error than RTN in blocks where massive activations dominate the
Hessian, e.g. block 3: 0.086 vs 0.083 relative, while static order gave 0.072; see the README):
- "none": columns left to right.
- "static": columns by descending diag(H), but each group keeps its contiguous columns and a grid fitted on
  the original weights beforehand (llm-compressor's "weight"/static order): inference needs no reordering.
- "full": columns by descending diag(H) and groups follow that order; the module stores the permutation and
  reorders its input (for per-channel quantization the permutation is undone offline instead).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from calm import arch, distributed
from calm.algorithms import replace_module
from calm.config import QuantSpec
from calm.grid import fit_grid, quantize_groups, quantize_to_codes
from calm.model import BlockInputs, block_linears, linear_inputs
from calm.nn import UniformQuantLinear

ACT_ORDERS = ("none", "static", "full")

# (absolute column index, index inside the lazy block, the lazy block's updated weights (out, width)) -> the
# dequantized column (out,) that replaces w_block[:, i]; the callback records codes as it likes.
QuantizeColumn = Callable[[int, int, torch.Tensor], torch.Tensor]


class HessianAccumulator:
    """Running H = 2/n sum x x^T of a linear's inputs, products and sum in float64.

    float64 products make H independent of how the tokens are batched (to rounding of 1e-16): with float32
    products, GPTQ on the default model at 4 x 512 calibration tokens changed its codes with --batch-windows
    and a data-parallel run's shards (H differed by ~1e-7 relative, enough to flip codes near a rounding
    boundary; those changes then grew through greedy propagation into different per-block choices)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    @staticmethod
    def product(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(x^T x in float64, tokens) of a batch of inputs."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        return x.T @ x, x.shape[0]

    def add(self, x: torch.Tensor) -> None:
        self.add_product(*self.product(x))

    def add_product(self, xtx: torch.Tensor, tokens: int) -> None:
        self.h += xtx
        self.n += tokens

    def reduce(self) -> None:
        """Sum over the processes of a data-parallel run (calm.distributed; nothing alone): every process then
        holds the H of all calibration tokens."""
        world = distributed.current()
        if world.data:
            world.sum_(self.h)
            self.n = int(world.sum_data(self.n)[0])

    def hessian(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration tokens reached this linear")
        return self.h * (2.0 / self.n)


@contextlib.contextmanager
def single_thread():
    """Run a loop of small tensor ops on one thread: with two OpenMP threads each column step of GPTQ took
    4-5x longer on the 2-core CPU (thread wake-ups dominate ops on a few thousand elements)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def prepare_problem(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 copy of the weight and float64 copy of H, dead inputs (H_ii = 0) fixed: H_ii = 1, W[:, i] = 0."""
    w = weight.detach().to(torch.float32).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor (float32) of the inverse of H + damp * mean(diag H) * I (H float64, dead inputs fixed)."""
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    h = h + damp * torch.mean(torch.diag(h)) * eye
    try:
        # H^-1 = L^-T L^-1 through a triangular solve and a matmul: torch.cholesky_inverse runs ~15x slower
        # on a 2-core CPU (measured, 1536 x 1536 float64).
        l_inv = torch.linalg.solve_triangular(torch.linalg.cholesky(h), eye, upper=False)
        return torch.linalg.cholesky(l_inv.T @ l_inv, upper=True).to(torch.float32)
    except torch.linalg.LinAlgError as exc:
        raise torch.linalg.LinAlgError(f"GPTQ: the damped Hessian is not positive definite (damp={damp}); "
                                       f"raise damp") from exc


def column_loop(w: torch.Tensor, hinv: torch.Tensor, block_size: int, quantize_column: QuantizeColumn) -> None:
    """GPTQ's lazy-batch column loop over `w` (out, in), updated in place: each column is replaced by what
    `quantize_column` returns and its error, scaled by 1 / Hinv_jj, is spread over the later columns (inside
    the lazy block at once, onto the rest of the matrix once per block)."""
    k = w.shape[1]
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            dq = quantize_column(i1 + i, i, w1)
            e = (w1[:, i] - dq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                         symmetric: bool, act_order: str = "none", damp: float = 0.01, block_size: int = 128
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ one weight matrix (out, in) onto calm's uniform grid. Returns codes (out, in), scales and zeros
    (out, in/group) and the input permutation the codes are stored in (None when they are in the original
    column order)."""
    if act_order not in ACT_ORDERS:
        raise ValueError(f"act_order must be one of {ACT_ORDERS}, got {act_order!r}")
    w, h = prepare_problem(weight, hessian)
    n_out, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    n_groups = k // group_size

    perm = None
    static_scale = static_zero = None
    if act_order != "none":
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        if act_order == "static":
            _, static_scale, static_zero = quantize_groups(w, bits, group_size, symmetric)
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv = inverse_cholesky(h, damp)

    # Lazy blocks hold whole groups, so a group's grid is always fitted on fully updated columns.
    if group_size < k:
        block_size = group_size * max(1, block_size // group_size)
    codes = torch.zeros_like(w)
    scales = torch.zeros(n_out, n_groups, device=w.device)
    zeros = torch.zeros(n_out, n_groups, device=w.device)
    grid: list[torch.Tensor] = []  # the current group's (scale, zero)

    perm_host = perm.tolist() if perm is not None else None  # indexed per column: no device sync each time

    def on_grid(col: int, i: int, w1: torch.Tensor) -> torch.Tensor:
        if static_scale is not None:
            g = perm_host[col] // group_size
            grid[:] = [static_scale[:, g], static_zero[:, g]]
        elif col % group_size == 0:
            grid[:] = fit_grid(w1[:, i:i + group_size], bits, symmetric)
            scales[:, col // group_size], zeros[:, col // group_size] = grid
        scale, zero = grid
        q = quantize_to_codes(w1[:, i:i + 1], scale, zero, bits)[:, 0]
        codes[:, col] = q
        return (q - zero) * scale

    with single_thread():
        column_loop(w, hinv, block_size, on_grid)

    if static_scale is not None:
        return codes[:, torch.argsort(perm)], static_scale, static_zero, None
    if perm is not None and group_size == k:
        return codes[:, torch.argsort(perm)], scales, zeros, None
    return codes, scales, zeros, perm


def gptq_linear(linear: nn.Module, hessian: torch.Tensor, spec: QuantSpec, act_order: str, damp: float,
                block_size: int) -> UniformQuantLinear:
    """One float linear GPTQ-quantized onto spec's grouped uniform grid."""
    g = spec.group_for(linear.in_features)
    codes, scales, zeros, perm = gptq_quantize_weight(linear.weight, hessian, spec.w_bits, g, spec.symmetric,
                                                      act_order, damp, block_size)
    return UniformQuantLinear.from_codes(codes, scales, zeros, spec.w_bits, g, spec.symmetric, linear.bias, perm)


def sequential_groups(block: nn.Module, true_sequential: bool) -> list[tuple[str, ...]]:
    """The block's linears in the order they are quantized: true-sequential groups (calm.arch), or one group of
    all of them (`true_sequential=False`, or a block layout the groups do not cover)."""
    names = list(block_linears(block))
    groups = [tuple(n for n in g if n in names) for g in arch.sequential_groups(block)]
    groups = [g for g in groups if g]
    if not true_sequential or {n for g in groups for n in g} != set(names):
        return [tuple(names)]
    return groups


# An MoE expert that receives fewer routed calibration tokens than this is quantized as without calibration:
# H = I, which turns GPTQ's column loop into round-to-nearest (no error feedback) and CLAQ's K-means into an
# unweighted fit. A Hessian from a handful of tokens has a rank far below the expert's width, and GPTQ would fit
# those few tokens at the expense of every other input (GPTQModel and llm-compressor also fall back for
# experts the calibration set does not reach).
MIN_EXPERT_TOKENS = 32


def record_fallback(block: nn.Module, name: str, tokens: int) -> None:
    """Note on the block that linear `name` got the no-calibration fallback with `tokens` routed tokens (the
    search reports these per candidate and block in results.json)."""
    if not hasattr(block, "calm_fallbacks"):
        block.calm_fallbacks = {}
    block.calm_fallbacks[name] = tokens


def group_hessians(block: nn.Module, inputs: BlockInputs, group: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """H of each named linear's inputs when the block (as it stands) runs on the calibration inputs; an MoE
    expert's linear reached by fewer than MIN_EXPERT_TOKENS tokens gets H = I (recorded on the block)."""
    linears = block_linears(block)
    accs = {n: HessianAccumulator(linears[n].in_features, linears[n].weight.device) for n in group}
    # The previous input (held, so that its memory is not reused while cached) and its product: q/k/v (and
    # gate/up) read the same tensor, whose product is then computed once.
    last: list = [None, None, 0]  # input, its product, the product's serial number
    seen: dict[str, list[int]] = {n: [] for n in group}  # per linear, the serial numbers of the products it took

    def add(name: str, x: torch.Tensor) -> None:
        held = last[0]
        if held is None or (held.data_ptr(), held.shape, held.stride()) != (x.data_ptr(), x.shape, x.stride()):
            last[0], last[1], last[2] = x, HessianAccumulator.product(x), last[2] + 1
        accs[name].add_product(*last[1])
        seen[name].append(last[2])

    linear_inputs(block, inputs, group, add)
    # Linears that took the same products (dense q/k/v, gate/up: the same input tensor in every batch on every
    # process) share one H, combined over the processes once. MoE experts never share: their tokens differ
    # between processes, and every process must make the same collectives.
    first_of: dict[tuple[int, ...], str] = {}
    for n in group:
        key = tuple(seen[n])
        if key and not arch.is_expert_linear(block, n) and key in first_of:
            accs[n] = accs[first_of[key]]
        else:
            first_of.setdefault(key, n)
            accs[n].reduce()
    hessians = {}
    for n, acc in accs.items():
        if acc.n < MIN_EXPERT_TOKENS and arch.is_expert_linear(block, n):
            record_fallback(block, n, acc.n)
            hessians[n] = torch.eye(acc.h.shape[0], dtype=torch.float64, device=acc.h.device)
        else:
            hessians[n] = acc.hessian()
    return hessians


# (name inside the block, the float linear, H of its inputs) -> its quantized replacement
QuantizeLinear = Callable[[str, nn.Module, torch.Tensor], nn.Module]


def quantize_sequentially(block: nn.Module, inputs: BlockInputs, true_sequential: bool,
                          quantize_linear: QuantizeLinear) -> nn.Module:
    """Replace every linear of `block` (in place) by `quantize_linear`'s module, group by group, each group's
    Hessians taken on the block with the groups before it already quantized."""
    for group in sequential_groups(block, true_sequential):
        hessians = group_hessians(block, inputs, group)
        linears = block_linears(block)
        for name in group:
            replace_module(block, name, quantize_linear(name, linears[name], hessians[name]))
    return block
