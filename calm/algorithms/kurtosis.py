"""Kurtosis-guided transform choice per linear (adaptive layer-wise transformations, Pham et al., arXiv
2511.17809; only the abstract was available, so threshold and mapping are options).

For every linear of the model, the weight kurtosis kappa = E[(w - mu)^4] / sigma^4 over all its weights, and
its robust z-score z = 0.6745 (kappa - median) / MAD over the population of linears (`scope=model`: every
linear of the model, gathered once before the search through the registry's `prepare` hook; `scope=block`:
the block's own linears). A linear is an outlier when z > threshold (`side=upper`) or |z| > threshold
(`side=abs`); outliers get the `outlier` transform, the others the `inlier` transform, each one of
'rotation' (fixed Hadamard), 'affine' (learned Kronecker transform, calm.algorithms.affine) or 'none'.
The rule replaces a per-block search over transforms by one statistic of the weights: it costs one
candidate's quantization (plus affine training only where 'affine' is chosen) instead of every transform's.

On the default model (SmolLM2-135M, 210 linears): median kappa 4.09, MAD 0.58; 13 linears have z > 3.5
(q/k/o of block 0, o of 2 and 24, q/k of 17-19, gate/up of 27-28) and none has z < -3.5. The default mapping
(heavy-tailed -> rotation, the rest -> affine) is the measured one: the other way round (learned transforms
for the 13 heavy-tailed linears only) was far worse at W3A3 (perplexity 1126 against 700, bench/QUALITY.md)
and worse at W4A4; what paid was the learned transform on most linears, and the fixed rotation is enough for
the few whose weights are heavy-tailed.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from calm.algorithms import actquant, affine, register
from calm.algorithms.options import option
from calm.algorithms.rotation import quantize_linears
from calm.config import CalmUsageError, QuantSpec
from calm.model import BlockInputs, block_linears

TRANSFORMS = ("rotation", "affine", "none")
SIDES = ("upper", "abs")
SCOPES = ("model", "block")
MAD_TO_SIGMA = 0.6745  # Iglewicz-Hoaglin modified z-score: MAD of a normal sample is 0.6745 sigma


def weight_kurtosis(w: torch.Tensor) -> float:
    """Pearson kurtosis E[(w - mu)^4] / sigma^4 over all entries (3 for a Gaussian), in float64."""
    x = w.detach().to(torch.float64).flatten()
    c = x - x.mean()
    var = c.square().mean()
    if var == 0:
        return 0.0
    return float(c.pow(4).mean() / var.square())


def robust_z(values: torch.Tensor, median: float | None = None, mad: float | None = None) -> torch.Tensor:
    """0.6745 (v - median) / MAD; the median and MAD of `values` unless given. MAD = 0 (over half the values
    equal) gives z = 0 for those values and +-inf for the others."""
    v = values.to(torch.float64)
    med = float(v.median()) if median is None else median
    mad_ = float((v - med).abs().median()) if mad is None else mad
    if mad_ == 0:
        return torch.where(v == med, torch.zeros_like(v), torch.sign(v - med) * float("inf"))
    return MAD_TO_SIGMA * (v - med) / mad_


def population(blocks: list[nn.Module]) -> dict[str, float]:
    kappas = torch.tensor([weight_kurtosis(m.weight) for b in blocks for m in block_linears(b).values()
                           if hasattr(m, "weight")], dtype=torch.float64, device="cpu")
    if kappas.numel() == 0:
        raise CalmUsageError("kurtosis: no float linears to measure")
    med = float(kappas.median())
    return {"median": med, "mad": float((kappas - med).abs().median()), "count": int(kappas.numel())}


def choose_transforms(block: nn.Module, threshold: float, side: str, outlier: str, inlier: str,
                      stats: dict[str, float] | None) -> dict[str, tuple[float, str]]:
    """Per linear name: (z-score, chosen transform)."""
    linears = block_linears(block)
    kappas = torch.tensor([weight_kurtosis(m.weight) for m in linears.values()], dtype=torch.float64,
                          device="cpu")
    z = robust_z(kappas) if stats is None else robust_z(kappas, stats["median"], stats["mad"])
    chosen = {}
    for (name, _), zi in zip(linears.items(), z.tolist()):
        hit = zi > threshold if side == "upper" else abs(zi) > threshold
        chosen[name] = (zi, outlier if hit else inlier)
    return chosen


@dataclasses.dataclass(frozen=True)
class KurtosisOptions(affine.TrainingOptions):
    threshold: float = option(3.5, "robust z-score above which a linear's weights count as heavy-tailed", low=0.0)
    side: str = option("upper", "upper: z > threshold; abs: |z| > threshold", choices=SIDES)
    outlier: str = option("rotation", "transform of the heavy-tailed linears", choices=TRANSFORMS)
    inlier: str = option("affine", "transform of the other linears", choices=TRANSFORMS)
    scope: str = option("model", "population of the median/MAD: every linear of the model, or the block's",
                        choices=SCOPES)
    clip_ratio: float | str = option("auto", "activation clip in (0, 1] (the learned clips' start where affine is "
                                     "chosen), or auto (by activation bits)", choices=("auto",), low=0.0, high=1.0,
                                     low_open=True)


def _prepare(float_blocks: list[nn.Module], spec: QuantSpec, options: KurtosisOptions) -> dict:
    return {"population": population(float_blocks)} if options.scope == "model" else {}


@register("kurtosis", KurtosisOptions, prepare=_prepare,
          check_spec=actquant.transform_spec_check("kurtosis", "chooses activation transforms"))
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, options: KurtosisOptions,
                   context: dict) -> nn.Module:
    clip_ratio = actquant.resolve_clip(options.clip_ratio, spec.a_bits)
    stats = context.get("population") if options.scope == "model" else None
    chosen = choose_transforms(block, options.threshold, options.side, options.outlier, options.inlier, stats)
    for name, linear in block_linears(block).items():
        if chosen[name][1] != "none":
            actquant.transform_for(linear.in_features, True, "kurtosis")
    if any(t == "affine" for _, t in chosen.values()):
        modes = {"affine": "learned", "rotation": "hadamard", "none": "none"}
        with torch.enable_grad():
            return affine.quantize_with_transforms(block, inputs, spec, lambda n, m: modes[chosen[n][1]],
                                                   weights=options.weights, steps=options.steps, lr=options.lr,
                                                   batch_tokens=options.batch_tokens, a_clip_init=clip_ratio)

    def transform(name, linear):
        return actquant.transform_for(linear.in_features, chosen[name][1] == "rotation", "kurtosis")

    return quantize_linears(block, inputs, spec, transform, weights=options.weights, clip_ratio=clip_ratio)
