"""How the search scores a candidate block against the float block: one `Scorer` per `SearchConfig.score`.

A scorer is prepared once per block with the float block's outputs on the scoring inputs (the reference),
then scores each candidate's outputs on the same inputs. `SCORERS` maps each score name to its scorer.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from calm import distributed
from calm.config import CalmUsageError, SearchConfig
from calm.model import BlockInputs
from calm.search.decision import CandidateScore
from calm.streaming import ModelSource
from calm_kernels.cka import CKAAccumulator, linear_cka_reference


def score_features(y: torch.Tensor, score: str, norm: nn.Module | None) -> torch.Tensor:
    """The (tokens, d) features a score compares: the raw block output (`cka`), or the output as the RMS norm
    that reads it next sees it, with that norm's weight (`cka-normed`) or without (`cka-rms`).

    Raw residual streams are dominated by the few massive-activation tokens and channels, so raw CKA saturates
    (0.99999x from the blocks where they appear); normalizing each token as the next block does gives every
    token equal weight. On the default model this did not rank candidates by their effect on perplexity any
    better than raw CKA (bench/QUALITY.md, "What the search's score sees")."""
    y2 = y.reshape(-1, y.shape[-1])
    if score == "cka" or isinstance(norm, nn.Identity):  # Identity: the next block reads the stream as it is
        return y2
    if norm is None:
        raise ValueError(f"score {score!r} needs the norm that reads the block's output")
    y64 = y2.to(torch.float64)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    z = y64 * torch.rsqrt(y64.square().mean(-1, keepdim=True) + eps)
    if score == "cka-normed":
        z = z * getattr(norm, "calm_gain", norm.weight).detach().to(z.device, torch.float64)
    return z.to(torch.float32)


def block_scores(reference: list[torch.Tensor], outputs: list[torch.Tensor], score: str = "cka",
                 norm: nn.Module | None = None, debiased: bool = False,
                 reference_self_term: float | None = None) -> tuple[float, float, float]:
    """(CKA by `score`, MSE, relative Frobenius error) of `outputs` against `reference`, streamed batch by batch.
    MSE and relative error are always of the raw outputs. `reference_self_term` (of the reference's score
    features) may be passed when several candidates are scored against the same reference."""
    acc = CKAAccumulator(reference_self_term=reference_self_term)
    sq_err = sq_ref = 0.0
    count = 0
    ref_features, out_features = [], []
    for y, yq in zip(reference, outputs):
        fy, fq = score_features(y, score, norm), score_features(yq, score, norm)
        if debiased:
            ref_features.append(fy)
            out_features.append(fq)
        else:
            acc.update(fy, fq)
        diff = (yq - y).to(torch.float64)
        sq_err += float(diff.square().sum())
        sq_ref += float(y.to(torch.float64).square().sum())
        count += diff.numel()
    world = distributed.current()
    if debiased:
        if world.data:
            raise CalmUsageError("the debiased CKA needs every token in one process: drop --debiased-cka or use "
                                 "--parallel candidates")
        cka = linear_cka_reference(torch.cat(ref_features), torch.cat(out_features), debiased=True).cka
    else:
        if world.data:  # each process scored its shard of the windows: combine into the CKA of all tokens
            acc.combine(world.sum_)
        cka = acc.compute().cka
    sq_err, sq_ref, count = world.sum_data(sq_err, sq_ref, count)
    if not torch.isfinite(torch.tensor(cka)) or math.isnan(sq_err):
        return float("-inf"), float("inf"), float("inf")
    return cka, sq_err / count, (sq_err / sq_ref) ** 0.5 if sq_ref > 0 else float("inf")


class Scorer:
    """Linear CKA of a block's raw outputs against the float block's (score `cka`), with MSE and relative error.

    Subclasses change what CKA compares (`features`, `compared`) or add the next-token NLL (`nll`). `by` names
    the CandidateScore field that ranks candidates (`choose`)."""

    features = "cka"  # score_features' variant
    by = "cka"

    def __init__(self, source: ModelSource, config: SearchConfig, windows: torch.Tensor) -> None:
        """`windows`: the token ids of the scoring inputs (the LM head's targets with score `nll`)."""
        self.source, self.windows, self.debiased = source, windows, config.debiased_cka
        self.index = -1
        self.inputs: BlockInputs | None = None
        self.norm: nn.Module | None = None
        self.reference: list[torch.Tensor] = []
        self.self_term: float | None = None

    def prepare(self, index: int, reference: list[torch.Tensor], inputs: BlockInputs) -> None:
        """Block `index`'s float outputs `reference` on the scoring `inputs`; the candidates are scored next."""
        self.index, self.inputs = index, inputs
        self.norm = None if self.features == "cka" else self.source.consumer_norm(index)
        self.reference = self.compared(reference)
        # The reference's self term is shared by every candidate of the block.
        world = distributed.current()
        self.self_term = CKAAccumulator.reference((score_features(y, self.features, self.norm)
                                                   for y in self.reference), world.sum_ if world.data else None)

    def compared(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """What CKA, MSE and relative error compare for a block's outputs (the outputs themselves)."""
        return outputs

    def nll(self, outputs: list[torch.Tensor]) -> float | None:
        return None

    def score(self, outputs: list[torch.Tensor]) -> CandidateScore:
        """A candidate's outputs on the scoring inputs, scored (timings left at 0 for the caller to fill in);
        `failed` is set when the ranking value is NaN or infinite."""
        cka, mse, rel = block_scores(self.reference, self.compared(outputs), self.features, self.norm,
                                     self.debiased, self.self_term)
        return CandidateScore(cka, mse, rel, 0.0, 0.0, self.nll(outputs)).checked(self.by)


class NormedScorer(Scorer):
    """`cka-normed`: the outputs as the RMS norm that reads them next sees them, with its weight."""
    features = "cka-normed"


class RMSScorer(Scorer):
    """`cka-rms`: the outputs normalized per token as that norm does, without its weight."""
    features = "cka-rms"


class FinalScorer(Scorer):
    """`cka-final`: the model's last normalized hidden states when the float blocks after this one run on the
    outputs (what the LM head reads); MSE and relative error are of those too."""

    def compared(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.source.final_states(self.source.run_tail(self.index, outputs, self.inputs), self.inputs)


class NLLScorer(Scorer):
    """`nll`: the LM head's next-token NLL on the scoring windows through the float blocks after this one
    (lowest wins); CKA, MSE and relative error stay those of the block outputs."""
    by = "nll"

    def nll(self, outputs: list[torch.Tensor]) -> float:
        last = self.source.run_tail(self.index, outputs, self.inputs)
        # Every window has T - 1 predictions: the mean of the window means is the mean over all tokens (over
        # every process's shard of the windows in a data-parallel run).
        nll = self.source.window_nll(last, self.inputs, self.windows)
        total, count = distributed.current().sum_data(float(nll.sum()), nll.numel())
        return total / count


SCORERS: dict[str, type[Scorer]] = {"cka": Scorer, "cka-normed": NormedScorer, "cka-rms": RMSScorer,
                                    "cka-final": FinalScorer, "nll": NLLScorer}


def make_scorer(source: ModelSource, config: SearchConfig, windows: torch.Tensor) -> Scorer:
    """The scorer of `config.score`, scoring on the token `windows` the scoring inputs were captured from."""
    return SCORERS[config.score](source, config, windows)
