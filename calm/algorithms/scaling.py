"""Per-input-channel scaling shared by AWQ and SmoothQuant: which op a scale folds into, the fold, and the
capture of the inputs the scale searches need.

A linear y = W x equals (W diag(s)) (x / s). The division by s is folded into the op that produces x: an
RMSNorm's weight (x = g * norm(h), so g / s), or the output rows of a preceding linear (v_proj before o_proj,
up_proj before down_proj: their outputs are divided by s). The block's float function is unchanged; only
the quantization sees W diag(s). This module is a helper, not a registered algorithm.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from calm import distributed
from calm.arch import ATTENTION, MLP, expand, fold_rows, layout_of, norm_gain, set_norm_gain
from calm.config import CalmUsageError
from calm.grid import dequantize_codes, quantize_groups
from calm.model import BlockInputs, run_with_input_hooks


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """Linears that share one input and so one scale vector.

    Args:
        name: label in logs and results.
        prev: the op whose output is the linears' input and absorbs 1/s (a norm or a linear).
        linears: the linears whose input columns are multiplied by s (quantized afterwards).
        loss_module: the module whose input is the linears' input and whose output AWQ's grid search compares
            (whole attention for q/k/v, whole MLP for gate/up, the linear itself otherwise).
        float_readers: modules that also read the input and stay float (an MoE router): s folds into them too.
        prev_rows: the rows of a linear `prev` that feed the linears (a fused producer's part), else None.
    """
    name: str
    prev: str
    linears: tuple[str, ...]
    loss_module: str
    float_readers: tuple[str, ...] = ()
    prev_rows: slice | None = None


SITE_NAMES = {ATTENTION: "qkv", MLP: "gate_up"}


def scale_groups(block: nn.Module, norms_only: bool = False) -> list[ScaleGroup]:
    """The block's scale groups (calm.arch): one per pre-norm, and linear -> linear folds unless `norms_only`.

    A linear -> linear fold needs the previous linear's outputs to be exactly the next one's inputs: v_proj ->
    o_proj only when v_proj has as many outputs as o_proj has inputs (no grouped-query attention; with GQA a
    kv head feeds several query heads and the scale could not differ between them), as AutoAWQ also does.
    """
    layout = layout_of(block)
    groups = [ScaleGroup(SITE_NAMES.get(site.loss_module, site.norm), site.norm, expand(block, site.readers),
                         site.loss_module, expand(block, site.float_readers)) for site in layout.norm_sites]
    if norms_only:
        return groups
    modules = dict(block.named_modules())
    for fold in layout.linear_folds:
        prev = modules.get(fold.prev)
        if not isinstance(prev, nn.Linear) or any(not isinstance(modules.get(n), nn.Linear) for n in fold.linears):
            continue
        rows = fold_rows(block, fold)
        if rows.stop - rows.start != modules[fold.linears[0]].in_features:
            continue
        groups.append(ScaleGroup(fold.name, fold.prev, fold.linears, fold.linears[0],
                                 prev_rows=None if fold.prev_rows == "all" else rows))
    return groups


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Multiply the group's input columns by s and divide the previous op's output by s, in place."""
    modules = dict(block.named_modules())
    prev = modules[group.prev]
    s = s.to(torch.float32)
    if isinstance(prev, nn.Linear):
        rows = group.prev_rows or slice(0, prev.out_features)
        prev.weight[rows].div_(s.to(prev.weight.dtype).unsqueeze(1))
        if prev.bias is not None:
            prev.bias[rows].div_(s.to(prev.bias.dtype))
    else:
        weight = getattr(prev, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != s.shape or getattr(prev, "bias", None) is not None:
            raise CalmUsageError(f"cannot fold a scale into {group.prev} ({type(prev).__name__}): expected an "
                                 f"RMSNorm with a weight of shape {tuple(s.shape)} and no bias")
        set_norm_gain(block, prev, norm_gain(block, prev) / s.to(torch.float64))
    for name in group.linears + group.float_readers:
        lin = modules[name]
        if name in group.linears and not isinstance(lin, nn.Linear):
            raise CalmUsageError(f"{name} is already quantized; scales fold into float linears only")
        lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest onto calm's grid and back to float (out, in)."""
    n, k = w.shape
    codes, scales, zeros = quantize_groups(w, bits, group_size, symmetric)
    return dequantize_codes(codes.view(-1, group_size), scales.reshape(-1), zeros.reshape(-1)).view(n, k)


@dataclasses.dataclass
class Captured:
    """Inputs that reached one submodule: per calibration batch, the first tensor and the keyword arguments."""
    x: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def tokens(self) -> torch.Tensor:
        """All batches' inputs as one (tokens, features) matrix."""
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in self.x])


def capture(block: nn.Module, inputs: BlockInputs, names: tuple[str, ...], max_windows: int | None = None
            ) -> dict[str, Captured]:
    """Run the block on its calibration inputs (the first `max_windows` only, if given) and keep what each
    named submodule receives."""
    got = {n: Captured([], []) for n in names}

    def keep(name: str, x: torch.Tensor, kwargs: dict[str, Any]) -> None:
        got[name].x.append(x)
        got[name].kwargs.append(kwargs)

    run_with_input_hooks(block, inputs, names, keep, max_windows=max_windows)
    return got


def windows_for(inputs: BlockInputs, tokens: int) -> int:
    """How many calibration windows hold at least `tokens` tokens (all of them when tokens is 0)."""
    seqlen = inputs.hidden[0].shape[1]
    total = sum(h.shape[0] for h in inputs.hidden)
    processes = distributed.current().size if distributed.current().data else 1  # each holds a shard
    return total if tokens <= 0 else min(total, -(-tokens // (seqlen * processes)))


def spaced_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most n rows of x, evenly spaced (deterministic, covers every window)."""
    if n <= 0 or x.shape[0] <= n:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, n, device=x.device).round().long()
    return x[idx]
