"""AWQ (Lin et al., arXiv 2306.00978): activation-aware per-input-channel scales, then a clip search, then
round-to-nearest onto calm's grid (groups, asymmetric by default).

Per block, on the float weights:
1. For each scale group (q/k/v after input_layernorm, gate/up after post_attention_layernorm, o after v when
   shapes allow, down after up; see calm.algorithms.scaling), s_x = mean |x| per input channel over all
   calibration tokens. For alpha on the grid {0, 1/n_grid, ..., (n_grid-1)/n_grid}: s = s_x^alpha normalized by
   sqrt(max s * min s); the group's linears get Q(W diag(s)) diag(s)^-1; the loss is the MSE of the loss
   module's output (whole attention for q/k/v, whole MLP for gate/up, the single linear otherwise) against
   the float output. Every group is searched on the float block, as AutoAWQ does.
2. The best scales are folded into the previous op (RMSNorm weight, v_proj or up_proj rows).
3. Clip search on every linear but q and k: per output row and group, max |w| shrunk by 1 - i/n_grid for
   i < max_shrink * n_grid, chosen by the MSE of the group's partial output on sampled tokens.
4. Round-to-nearest of the clipped, scaled weights -> UniformQuantLinear.

Deviation, for the CPU budget: the grid search runs on the first `grid_tokens` calibration tokens (whole
windows, since attention needs them) and the clip search on `clip_tokens` evenly spaced tokens; the
activation statistic s_x uses every calibration token.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from calm import distributed
from calm.algorithms import register, replace_module, weight_only_spec
from calm.algorithms.gptq_core import MIN_EXPERT_TOKENS, record_fallback
from calm.algorithms.options import AlgorithmOptions, option
from calm.algorithms.scaling import (
    ScaleGroup,
    capture,
    fake_quantize,
    fold_scales,
    scale_groups,
    spaced_rows,
    windows_for,
)
from calm.arch import is_expert_linear, layout_of
from calm.config import QuantSpec
from calm.grid import quantize_groups
from calm.model import BlockInputs, block_linears
from calm.nn import UniformQuantLinear


def awq_scale(s_x: torch.Tensor, alpha: float) -> torch.Tensor:
    s = s_x.to(torch.float32).pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _run_loss_module(module: nn.Module, x: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for xi, kw in zip(x, kwargs):
            out = module(xi, **kw) if kw else module(xi)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _mse(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    se = sum(float((u.to(torch.float64) - v.to(torch.float64)).square().sum()) for u, v in zip(a, b))
    se, count = distributed.current().sum_data(se, sum(u.numel() for u in a))  # over every process's shard
    return se / count


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    """mean |x| per input channel over the tokens (of every process's shard in a data-parallel run)."""
    world = distributed.current()
    total = world.sum_data_(x.abs().sum(dim=0, dtype=torch.float64))
    return (total / world.sum_data(x.shape[0])[0]).to(x.dtype)


@torch.no_grad()
def search_scale(block: nn.Module, group: ScaleGroup, s_x: torch.Tensor, loss_x: list[torch.Tensor],
                 loss_kwargs: list[dict], spec: QuantSpec, n_grid: int) -> tuple[float, torch.Tensor, list[float]]:
    """(best alpha, its scales, the loss at every grid point) for one group; the block is left unchanged."""
    modules = dict(block.named_modules())
    loss_module = modules[group.loss_module]
    reference = _run_loss_module(loss_module, loss_x, loss_kwargs)
    originals = {n: modules[n].weight.detach().clone() for n in group.linears}
    losses = []
    best = (float("inf"), 0.0, torch.ones_like(s_x))
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = awq_scale(s_x, alpha)
            for n in group.linears:
                w = originals[n].to(torch.float32)
                g = spec.group_for(w.shape[1])
                q = fake_quantize(w * s.unsqueeze(0), spec.w_bits, g, spec.symmetric) / s.unsqueeze(0)
                modules[n].weight.copy_(q.to(originals[n].dtype))
            loss = _mse(reference, _run_loss_module(loss_module, loss_x, loss_kwargs))
            losses.append(loss)
            if loss < best[0]:
                best = (loss, alpha, s)
    finally:
        for n in group.linears:
            modules[n].weight.copy_(originals[n])
    return best[1], best[2], losses


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, n_grid: int, max_shrink: float
                ) -> torch.Tensor:
    """Per (output row, group) clip value max|w| * (1 - i/n_grid) minimizing the group's output MSE on x.

    Returns the clip bound (out, groups); the weight is then clamped to [-bound, bound].
    """
    n_out, k = w.shape
    g = spec.group_for(k)
    groups = k // g
    wg = w.to(torch.float32).reshape(n_out, groups, g)
    xg = x.to(torch.float32).reshape(-1, groups, g)
    reference = torch.einsum("tgk,ogk->tog", xg, wg)
    org_max = wg.abs().amax(dim=-1, keepdim=True)
    best_err = torch.full((n_out, groups), float("inf"), device=w.device)
    world = distributed.current()
    tokens = world.sum_data(xg.shape[0])[0]
    best_max = org_max.squeeze(-1).clone()
    for i in range(int(max_shrink * n_grid)):
        bound = org_max * (1 - i / n_grid)
        cur = torch.clamp(wg, -bound, bound)
        q = fake_quantize(cur.reshape(n_out, k), spec.w_bits, g, spec.symmetric).reshape(n_out, groups, g)
        err = world.sum_data_((torch.einsum("tgk,ogk->tog", xg, q) - reference).square().sum(dim=0)) / tokens
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, bound.squeeze(-1), best_max)
    return best_max


@dataclasses.dataclass(frozen=True)
class AWQOptions(AlgorithmOptions):
    n_grid: int = option(20, "grid points of the scale exponent alpha = i / n_grid (and of the clip search)",
                         low=1)
    clip: bool = option(True, "search a clip per output row and group (all linears but q and k)")
    max_shrink: float = option(0.5, "largest clip shrink searched", low=0.0, high=1.0, high_open=True)
    grid_tokens: int = option(2048, "calibration tokens of the scale search (whole windows; 0 = all)", low=0)
    clip_tokens: int = option(512, "evenly spaced tokens of the clip search", low=1)
    scale_o: bool = option(True, "also scale o_proj through v_proj (only without grouped-query attention)")


@register("awq", AWQOptions, check_spec=weight_only_spec("awq"))
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, options: AWQOptions,
                   context: dict) -> nn.Module:
    n_grid, clip, max_shrink = options.n_grid, options.clip, options.max_shrink
    grid_tokens, clip_tokens, scale_o = options.grid_tokens, options.clip_tokens, options.scale_o
    groups = [g for g in scale_groups(block) if scale_o or g.name != "o"]
    linears = block_linears(block)
    for lin in linears.values():
        spec.group_for(lin.in_features)

    # 1. Activation statistics on every calibration token (at the loss module's input, which every linear of the
    # group reads: an MoE expert alone sees only its routed tokens); the loss modules' inputs on the grid subset.
    loss_modules = tuple(dict.fromkeys(g.loss_module for g in groups))
    stats_in = capture(block, inputs, loss_modules)
    s_x = {g.name: mean_abs(stats_in[g.loss_module].tokens()) for g in groups}
    del stats_in
    windows = windows_for(inputs, grid_tokens)
    loss_in = capture(block, inputs, loss_modules, max_windows=windows)

    chosen: dict[str, torch.Tensor] = {}
    for g in groups:
        c = loss_in[g.loss_module]
        _, chosen[g.name], _ = search_scale(block, g, s_x[g.name], c.x, c.kwargs, spec, n_grid)
    del loss_in

    # 2. Fold every group's scales; the block's float function is unchanged.
    for g in groups:
        fold_scales(block, g, chosen[g.name])

    # 3-4. Clip search on the scaled weights with their new inputs, then round-to-nearest.
    # AWQ does not clip q and k: q.k products are too sensitive to clipping.
    clip_names = tuple(n for n in linears if n not in layout_of(block).no_clip) if clip else ()
    clip_in = capture(block, inputs, clip_names, max_windows=windows) if clip_names else {}
    for name, lin in block_linears(block).items():
        w = lin.weight.detach().to(torch.float32)
        g = spec.group_for(lin.in_features)
        routed = sum(x.reshape(-1, x.shape[-1]).shape[0] for x in clip_in[name].x) if name in clip_in else 0
        routed = int(distributed.current().sum_data(routed)[0])
        if name in clip_in and routed < MIN_EXPERT_TOKENS and is_expert_linear(block, name):
            record_fallback(block, name, routed)  # too few routed tokens to choose a clip: scaled RTN
        elif name in clip_in:
            x = spaced_rows(clip_in[name].tokens(), clip_tokens)
            bound = search_clip(w, x, spec, n_grid, max_shrink).repeat_interleave(g, dim=1)
            w = torch.clamp(w, -bound, bound)
        codes, scales, zeros = quantize_groups(w, spec.w_bits, g, spec.symmetric)
        replace_module(block, name, UniformQuantLinear.from_codes(codes, scales, zeros, spec.w_bits, g,
                                                                  spec.symmetric, lin.bias))
    return block
