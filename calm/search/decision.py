"""What the search records per block: each candidate's score, the choice among them, and candidate failures."""
from __future__ import annotations

import dataclasses
import math

import torch

from calm.config import CalmUsageError, NumericalError


@dataclasses.dataclass
class CandidateScore:
    cka: float
    mse: float
    rel_err: float
    seconds: float  # quantizing the block (the algorithm's own cost)
    score_seconds: float  # running the quantized block and scoring it
    nll: float | None = None  # next-token NLL on the scoring windows (score "nll" only)
    failed: str | None = None  # why the candidate cannot be chosen (its quantization broke down, or its score)
    # MoE experts quantized without calibration (too few routed tokens): linear name -> routed tokens
    fallbacks: dict[str, int] | None = None
    # Exact size of the candidate's block: stored bits of its linears (calm.nn.block_stored_bits) and their weights
    stored_bits: int | None = None
    weights: int | None = None

    @property
    def effective_bits(self) -> float | None:
        return None if self.stored_bits is None or not self.weights else self.stored_bits / self.weights

    @classmethod
    def failure(cls, reason: str, seconds: float, by: str = "cka") -> CandidateScore:
        """A candidate whose quantization raised a numerical error: no block, no outputs, never chosen."""
        return cls(float("-inf"), float("inf"), float("inf"), seconds, 0.0,
                   float("nan") if by == "nll" else None, reason)

    def failure_reason(self, by: str = "cka") -> str | None:
        """None when the candidate may be chosen by `by`; else why not (NaN and infinite scores count as failed)."""
        if self.failed is not None:
            return self.failed
        value = self.nll if by == "nll" else self.cka
        if value is None or not math.isfinite(value):
            return f"non-finite {by} ({value})"
        return None

    def checked(self, by: str = "cka") -> CandidateScore:
        """This score with `failed` set when its value for `by` is not finite (a diverged candidate)."""
        reason = self.failure_reason(by)
        return self if reason == self.failed else dataclasses.replace(self, failed=reason)

    def to_dict(self) -> dict[str, float | str]:
        d = dataclasses.asdict(self)
        for optional in ("nll", "failed", "fallbacks", "stored_bits", "weights"):
            if d[optional] is None:
                del d[optional]
        return d


@dataclasses.dataclass
class BlockDecision:
    index: int
    chosen: str
    scores: dict[str, CandidateScore]

    def _others(self, field: str) -> list[float]:
        return [getattr(s, field) for n, s in self.scores.items()
                if n != self.chosen and s.failed is None and math.isfinite(getattr(s, field))]

    @property
    def failed(self) -> dict[str, str]:
        """Candidates that could not be chosen, with the reason."""
        return {n: s.failed for n, s in self.scores.items() if s.failed is not None}

    @property
    def margin(self) -> float:
        """CKA of the winner minus the best other candidate's (0 with a single candidate, failed ones aside)."""
        others = self._others("cka")
        return self.scores[self.chosen].cka - max(others) if others else 0.0

    @property
    def nll_margin(self) -> float | None:
        """Best other candidate's NLL minus the winner's (score "nll" only; 0 with a single candidate)."""
        if any(s.nll is None for s in self.scores.values()):
            return None
        others = self._others("nll")
        return min(others) - self.scores[self.chosen].nll if others else 0.0

    def to_dict(self) -> dict:
        d = {"index": self.index, "chosen": self.chosen, "cka_margin": self.margin,
             "scores": {n: s.to_dict() for n, s in self.scores.items()}}
        if self.nll_margin is not None:
            d["nll_margin"] = self.nll_margin
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BlockDecision:
        return cls(d["index"], d["chosen"], {n: CandidateScore(**s) for n, s in d["scores"].items()})


class AllCandidatesFailed(CalmUsageError):
    """Every candidate of a block failed: nothing to choose. The CLI prints the message on one line."""

    def __init__(self, reasons: dict[str, str], block: int | None = None, blocks: int | None = None,
                 state_dir: str | None = None) -> None:
        self.reasons, self.block = dict(reasons), block
        where = "" if block is None else f" on block {block + 1}" + ("" if blocks is None else f"/{blocks}")
        why = "; ".join(f"{n}: {' '.join(r.split())}" for n, r in reasons.items())
        kept = ("" if state_dir is None or block is None else
                f"; the blocks before it stay saved in {state_dir}, where a rerun resumes")
        super().__init__(f"every candidate failed{where} ({why}): change the pool or the failing candidates' "
                         f"options{kept}")


def choose(scores: dict[str, CandidateScore], tie_tolerance: float, by: str = "cka") -> str:
    """Highest CKA (or lowest NLL with by="nll"); values within `tie_tolerance` tie, broken by lower MSE.

    Failed candidates (a `failed` reason, or a NaN or infinite score) never win; when every candidate failed,
    raises `AllCandidatesFailed` with each one's reason."""
    viable = {n: s for n, s in scores.items() if s.failure_reason(by) is None}
    if not viable:
        raise AllCandidatesFailed({n: s.failure_reason(by) for n, s in scores.items()})
    if by == "nll":
        best = min(s.nll for s in viable.values())
        tied = [n for n, s in viable.items() if s.nll - best <= tie_tolerance]
    else:
        best = max(s.cka for s in viable.values())
        tied = [n for n, s in viable.items() if best - s.cka <= tie_tolerance]
    order = list(scores)
    return min(tied, key=lambda n: (scores[n].mse, order.index(n)))


# A numerical breakdown of one candidate (its Hessian is not positive definite, an overflow): the search records
# that candidate as failed and the others still compete. Anything else (CalmUsageError, a programming error,
# out of memory) stops the search.
NUMERICAL_ERRORS: tuple[type[BaseException], ...] = (NumericalError, torch.linalg.LinAlgError, ArithmeticError)


def numerical_failure(exc: BaseException) -> str | None:
    """The reason to record when `exc` (raised by a candidate's quantization) is a numerical failure, else None.

    The error itself or an error it was explicitly raised from (`raise ... from`) must be a numerical one: GPTQ
    raises RuntimeError("... not positive definite; raise damp") from torch's LinAlgError."""
    if isinstance(exc, CalmUsageError):
        return None
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, NUMERICAL_ERRORS):
            return f"{type(exc).__name__}: {exc}"
        cause = cause.__cause__
    return None
