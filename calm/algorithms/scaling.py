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

from calm.config import CalmUsageError
from calm.grid import dequantize_codes, quantize_groups
from calm.model import BlockInputs, run_with_input_hooks


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """Linears that share one input and so one scale vector.

    Args:
        name: label in logs and results.
        prev: the op whose output is the linears' input and absorbs 1/s (an RMSNorm or a Linear).
        linears: the linears whose input columns are multiplied by s.
        loss_module: the module whose output AWQ's grid search compares (whole attention for q/k/v, whole
            MLP for gate/up, the linear itself otherwise).
    """
    name: str
    prev: str
    linears: tuple[str, ...]
    loss_module: str


# LLaMA/Qwen2/Mistral decoder blocks.
LLAMA_SCALE_GROUPS = (
    ScaleGroup("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "self_attn"),
    ScaleGroup("o", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


def scale_groups(block: nn.Module, norms_only: bool = False) -> list[ScaleGroup]:
    """The groups of LLAMA_SCALE_GROUPS this block can take.

    A linear -> linear fold needs the previous linear's outputs to be exactly the next one's inputs: v_proj ->
    o_proj only when v_proj has as many outputs as o_proj has inputs (no grouped-query attention; with GQA a
    kv head feeds several query heads and the scale could not differ between them), as AutoAWQ also does.
    """
    modules = dict(block.named_modules())
    missing = [n for g in LLAMA_SCALE_GROUPS if g.prev.endswith("layernorm")
               for n in (g.prev, *g.linears, g.loss_module) if n not in modules]
    if missing:
        raise CalmUsageError(f"this decoder block has no {sorted(set(missing))}: scale folding knows LLaMA/Qwen2/"
                             f"Mistral-style blocks only")
    groups = []
    for g in LLAMA_SCALE_GROUPS:
        prev = modules.get(g.prev)
        if isinstance(prev, nn.Linear):
            if norms_only or any(n not in modules for n in g.linears):
                continue
            if prev.out_features != modules[g.linears[0]].in_features:
                continue
        groups.append(g)
    return groups


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Multiply the group's input columns by s and divide the previous op's output by s, in place."""
    modules = dict(block.named_modules())
    prev = modules[group.prev]
    s = s.to(torch.float32)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        weight = getattr(prev, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != s.shape or getattr(prev, "bias", None) is not None:
            raise CalmUsageError(f"cannot fold a scale into {group.prev} ({type(prev).__name__}): expected an "
                                 f"RMSNorm with a weight of shape {tuple(s.shape)} and no bias")
        weight.div_(s.to(weight.dtype))
    for name in group.linears:
        lin = modules[name]
        if not isinstance(lin, nn.Linear):
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
    return total if tokens <= 0 else min(total, -(-tokens // seqlen))


def spaced_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most n rows of x, evenly spaced (deterministic, covers every window)."""
    if n <= 0 or x.shape[0] <= n:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, n, device=x.device).round().long()
    return x[idx]
