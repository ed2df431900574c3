"""GPTQ (Frantar et al., arXiv 2210.17323): column-by-column quantization with second-order error compensation.

Per linear: H = 2/n sum x x^T over calibration tokens; dead inputs get H_ii = 1 and a zero weight column;
damping adds `damp` x mean(diag H); the upper Cholesky factor of H^-1 drives the error spread. Columns are
processed in lazy blocks; with groups, the scale and zero of a group are fitted when its first column comes
up, on the already-updated weights. Inside a decoder block, linears are quantized true-sequentially
(q/k/v, then o, then gate/up, then down), each group calibrated on the outputs of the quantized ones before.

act_order (the block-level default is "static": on SmolLM2 at W3G64, left-to-right GPTQ had a higher held-out
block-output error than RTN in blocks where massive activations dominate the Hessian, e.g. block 3: 0.086 vs
0.083 relative, while static order gave 0.072; measured with 16 x 512 calibration tokens, see README):
- "none": columns left to right.
- "static": columns by descending diag(H), but each group keeps its contiguous columns and a grid fitted on
  the original weights beforehand (llm-compressor's "weight"/static order): inference needs no reordering.
- "full": columns by descending diag(H) and groups follow that order; the module stores the permutation and
  reorders its input (for per-channel quantization the permutation is undone offline instead).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from calm.algorithms import register, replace_module
from calm.config import CalmUsageError, QuantSpec
from calm.grid import fit_grid, quantize_groups, quantize_to_codes
from calm.model import SEQUENTIAL_GROUPS, BlockInputs, block_linears, linear_inputs
from calm.nn import UniformQuantLinear

ACT_ORDERS = ("none", "static", "full")


class HessianAccumulator:
    """Running H = 2/n sum x x^T of a linear's inputs (float64 sum, float32 per-batch products)."""

    def __init__(self, in_features: int) -> None:
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.h += (x.T @ x).to(torch.float64)
        self.n += x.shape[0]

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


def _column_loop(w: torch.Tensor, hinv: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, bits: int, group_size: int, symmetric: bool, block_size: int,
                 perm: torch.Tensor | None, static_scale: torch.Tensor | None, static_zero: torch.Tensor | None
                 ) -> None:
    """GPTQ's lazy-batch column loop; fills `codes`, `scales`, `zeros` and updates `w` in place."""
    k = w.shape[1]
    scale = zero = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static_scale is not None:
                g = int(perm[col]) // group_size
                scale, zero = static_scale[:, g], static_zero[:, g]
            elif col % group_size == 0:
                scale, zero = fit_grid(w1[:, i:i + group_size], bits, symmetric)
                scales[:, col // group_size] = scale
                zeros[:, col // group_size] = zero
            q = quantize_to_codes(w1[:, i:i + 1], scale, zero, bits)[:, 0]
            dq = (q - zero) * scale
            codes[:, col] = q
            e = (w1[:, i] - dq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor (float32) of the inverse of H + damp * mean(diag H) * I (H float64, dead inputs fixed)."""
    k = h.shape[0]
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    try:
        # H^-1 = L^-T L^-1 through a triangular solve and a matmul: torch.cholesky_inverse runs ~15x slower
        # on a 2-core CPU (measured, 1536 x 1536 float64).
        l_inv = torch.linalg.solve_triangular(torch.linalg.cholesky(h), torch.eye(k, dtype=h.dtype), upper=False)
        return torch.linalg.cholesky(l_inv.T @ l_inv, upper=True).to(torch.float32)
    except torch.linalg.LinAlgError as exc:
        raise RuntimeError(f"GPTQ: the damped Hessian is not positive definite (damp={damp}); raise damp") from exc


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                         symmetric: bool, act_order: str = "none", damp: float = 0.01, block_size: int = 128
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ one weight matrix (out, in). Returns codes (out, in), scales and zeros (out, in/group) and the input
    permutation the codes are stored in (None when they are in the original column order)."""
    if act_order not in ACT_ORDERS:
        raise CalmUsageError(f"act_order must be one of {ACT_ORDERS}, got {act_order!r}")
    w = weight.detach().to(torch.float32).clone()
    n_out, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
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
    scales = torch.zeros(n_out, n_groups)
    zeros = torch.zeros(n_out, n_groups)
    with single_thread():
        _column_loop(w, hinv, codes, scales, zeros, bits, group_size, symmetric, block_size, perm,
                     static_scale, static_zero)

    if static_scale is not None:
        inverse = torch.argsort(perm)
        return codes[:, inverse], static_scale, static_zero, None
    if perm is not None and group_size == k:
        return codes[:, torch.argsort(perm)], scales, zeros, None
    return codes, scales, zeros, perm


def _sequential_groups(block: nn.Module, true_sequential: bool) -> list[tuple[str, ...]]:
    names = list(block_linears(block))
    groups = [tuple(n for n in g if n in names) for g in SEQUENTIAL_GROUPS]
    groups = [g for g in groups if g]
    covered = {n for g in groups for n in g}
    if not true_sequential or covered != set(names):
        # An unfamiliar block layout: calibrate every linear on the float block in one pass.
        return [tuple(names)]
    return groups


@register("gptq")
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, *, act_order: str = "static",
                   damp: float = 0.01, block_size: int = 128, true_sequential: bool = True,
                   clip_ratio: float = 1.0) -> nn.Module:
    if act_order not in ACT_ORDERS:
        raise CalmUsageError(f"gptq act_order must be one of {ACT_ORDERS}, got {act_order!r}")
    if spec.a_bits != 16 or spec.k_bits != 16 or spec.v_bits != 16:
        # Activation/KV schemes: per-channel symmetric GPTQ weights in RotatedQuantLinear without a transform
        # (the "no rotation" baseline), run by the engine the rotation candidates share.
        from calm.algorithms import rotation
        clip_ratio, _ = rotation.check_options("gptq", "gptq", clip_ratio, 1.0, act_order, damp)
        return rotation.quantize_linears(block, inputs, spec, lambda name, linear: None, weights="gptq",
                                         clip_ratio=clip_ratio, act_order=act_order, damp=damp,
                                         block_size=block_size, true_sequential=true_sequential)
    for group in _sequential_groups(block, true_sequential):
        linears = block_linears(block)
        accs = {n: HessianAccumulator(linears[n].in_features) for n in group}
        linear_inputs(block, inputs, group, lambda name, x: accs[name].add(x))
        for name in group:
            linear = linears[name]
            g = spec.group_for(linear.in_features)
            codes, scales, zeros, perm = gptq_quantize_weight(linear.weight, accs[name].hessian(), spec.w_bits, g,
                                                              spec.symmetric, act_order, damp, block_size)
            replace_module(block, name, UniformQuantLinear.from_codes(codes, scales, zeros, spec.w_bits, g,
                                                                      spec.symmetric, linear.bias, perm))
    return block


def _check_spec(spec: QuantSpec) -> None:
    from calm.algorithms import actquant
    actquant.check_activation_spec(spec, "gptq")


quantize_block.check_spec = _check_spec
