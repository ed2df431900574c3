"""The CALM search: for every decoder block, quantize it with each candidate, score by linear CKA, keep the best.

Per block l (inputs X captured on the calibration windows):
1. FP outputs Y = block(X); the FP self term ||Yc^T Yc||_F^2 is computed once and shared by the candidates.
2. Every candidate quantizes a private copy of the float block on X; the copy runs on X; linear CKA between
   Y and its outputs is accumulated batch by batch, with MSE and relative error beside it. With separate
   scoring windows, X of step 2's scoring (and Y) come from those windows instead; fitting stays on X.
   `SearchConfig.score` picks what CKA compares (`score_features`); with `cka-final` it compares the model's
   last normalized hidden states after the float blocks that follow, and MSE / relative error are of those.
   Score `nll` goes one step further: the LM head's next-token NLL on those windows (lowest wins); CKA, MSE
   and relative error are then of the block outputs, as with `cka`.
3. The highest CKA (lowest NLL with score `nll`) wins; values within `tie_tolerance` are a tie, broken by
   lower MSE (CKA is blind to a pure rescaling of the output, MSE is not).
4. Each candidate's quantized block and the decision are written to `state_dir` as they are made, so an
   interrupted search resumes at the first undecided block.
5. Propagation: greedy (X <- chosen block's outputs) or independent (X <- Y).
After the search, `check_models` gives whole-model NLLs of the hybrid and of each uniform member on the
scoring windows: calm.run's final check keeps the lowest, since no per-block score sees how errors compound.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from calm import algorithms
from calm.config import CalmUsageError, QuantSpec, SearchConfig
from calm.evaluate import token_nll, window_nll
from calm.io import atomic_write_json, load_block_state, save_block_state
from calm.model import BlockInputs, capture_block_inputs, consumer_norm, decoder_blocks, final_hidden, run_block
from calm.nn import release_caches
from calm_kernels.cka import CKAAccumulator, linear_cka_reference

Log = Callable[[str], None]


@dataclasses.dataclass
class CandidateScore:
    cka: float
    mse: float
    rel_err: float
    seconds: float  # quantizing the block (the algorithm's own cost)
    score_seconds: float  # running the quantized block and scoring it
    nll: float | None = None  # next-token NLL on the scoring windows (score "nll" only)

    def to_dict(self) -> dict[str, float]:
        d = dataclasses.asdict(self)
        if self.nll is None:
            del d["nll"]
        return d


@dataclasses.dataclass
class BlockDecision:
    index: int
    chosen: str
    scores: dict[str, CandidateScore]

    @property
    def margin(self) -> float:
        """CKA of the winner minus the best other candidate's (0 with a single candidate)."""
        others = [s.cka for n, s in self.scores.items() if n != self.chosen]
        return self.scores[self.chosen].cka - max(others) if others else 0.0

    @property
    def nll_margin(self) -> float | None:
        """Best other candidate's NLL minus the winner's (score "nll" only; 0 with a single candidate)."""
        if any(s.nll is None for s in self.scores.values()):
            return None
        others = [s.nll for n, s in self.scores.items() if n != self.chosen]
        return min(others) - self.scores[self.chosen].nll if others else 0.0

    def to_dict(self) -> dict:
        d = {"index": self.index, "chosen": self.chosen, "cka_margin": self.margin,
             "scores": {n: s.to_dict() for n, s in self.scores.items()}}
        if self.nll_margin is not None:
            d["nll_margin"] = self.nll_margin
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BlockDecision":
        return cls(d["index"], d["chosen"], {n: CandidateScore(**s) for n, s in d["scores"].items()})


def choose(scores: dict[str, CandidateScore], tie_tolerance: float, by: str = "cka") -> str:
    """Highest CKA (or lowest NLL with by="nll"); values within `tie_tolerance` tie, broken by lower MSE."""
    if by == "nll":
        best = min(s.nll for s in scores.values())
        tied = [n for n, s in scores.items() if s.nll - best <= tie_tolerance]
    else:
        best = max(s.cka for s in scores.values())
        tied = [n for n, s in scores.items() if best - s.cka <= tie_tolerance]
    return min(tied, key=lambda n: (scores[n].mse, list(scores).index(n)))


def next_token_nll(model: nn.Module, final: list[torch.Tensor], windows: torch.Tensor) -> float:
    """Mean next-token NLL of the LM head on `final` (final-norm outputs, one tensor per batch of `windows`)."""
    with torch.no_grad():
        nll = [token_nll(model.lm_head(h), ids) for h, ids in zip(final, windows.split([h.shape[0] for h in final]))]
    return float(torch.cat(nll).mean())


@dataclasses.dataclass
class SearchOutcome:
    decisions: list[BlockDecision]
    candidate_blocks: dict[str, list[nn.Module]]  # every candidate's quantized copy of every block
    float_blocks: list[nn.Module]

    @property
    def chosen_blocks(self) -> list[nn.Module]:
        return [self.candidate_blocks[d.chosen][d.index] for d in self.decisions]


def score_features(y: torch.Tensor, score: str, norm: nn.Module | None) -> torch.Tensor:
    """The (tokens, d) features a score compares: the raw block output (`cka`), or the output as the RMS norm
    that reads it next sees it, with that norm's weight (`cka-normed`) or without (`cka-rms`).

    Raw residual streams are dominated by the few massive-activation tokens and channels, so raw CKA saturates
    (0.99999x from the blocks where they appear); normalizing each token as the next block does gives every
    token equal weight. On the default model this did not rank candidates by their effect on perplexity any
    better than raw CKA (bench/QUALITY.md, "What the search's score sees")."""
    y2 = y.reshape(-1, y.shape[-1])
    if score == "cka":
        return y2
    if norm is None:
        raise ValueError(f"score {score!r} needs the norm that reads the block's output")
    y64 = y2.to(torch.float64)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    z = y64 * torch.rsqrt(y64.square().mean(-1, keepdim=True) + eps)
    if score == "cka-normed":
        z = z * norm.weight.detach().to(torch.float64)
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
    if debiased:
        cka = linear_cka_reference(torch.cat(ref_features), torch.cat(out_features), debiased=True).cka
    else:
        cka = acc.compute().cka
    if not torch.isfinite(torch.tensor(cka)) or sq_err != sq_err:
        return float("-inf"), float("inf"), float("inf")
    return cka, sq_err / count, (sq_err / sq_ref) ** 0.5 if sq_ref > 0 else float("inf")


def candidate_options(config: SearchConfig) -> dict[str, dict]:
    """Every candidate's options with the algorithm's defaults filled in, as saved beside each block."""
    return {c.name: json.loads(json.dumps(algorithms.options_of(c))) for c in config.pool}


def _check_saved_options(path: Path, saved: dict[str, dict], current: dict[str, dict]) -> None:
    """Saved blocks made with other algorithm settings (e.g. a default changed between calm versions) must not
    be reused silently."""
    changed = sorted(n for n in current if saved.get(n) != current[n])
    if changed:
        details = "; ".join(f"{n}: saved {saved.get(n)} now {current[n]}" for n in changed)
        raise CalmUsageError(f"{path} was written with other settings for {', '.join(changed)} ({details}); "
                             f"resume with the calm version that wrote it, or pass a new --output")


def state_name(name: str) -> str:
    """A candidate name (`gptq:act_order=static`) as a file-name part."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _state_paths(state_dir: Path, index: int, names: list[str]) -> tuple[Path, dict[str, Path]]:
    return (state_dir / f"block_{index:03d}.json",
            {n: state_dir / f"block_{index:03d}-{state_name(n)}.safetensors" for n in names})


def calm_search(model: nn.Module, windows: torch.Tensor, spec: QuantSpec, config: SearchConfig,
                state_dir: Path | None = None, log: Log = print,
                score_windows: torch.Tensor | None = None) -> SearchOutcome:
    """Run the search on calibration `windows` (n, T). The model's blocks are left untouched (float).

    With `score_windows` (m, T), candidates are fitted on `windows` and scored on `score_windows` only, so a
    candidate that fits the calibration tokens closely but generalizes worse is not preferred for it."""
    for cand in config.pool:
        algorithms.validate_candidate(cand, spec)
    names = [c.name for c in config.pool]
    blocks = decoder_blocks(model)
    float_blocks = list(blocks)
    contexts = {c.name: algorithms.prepare(c, float_blocks, spec) for c in config.pool}
    t0 = time.perf_counter()
    inputs: BlockInputs = capture_block_inputs(model, windows, config.batch_windows)
    separate = score_windows is not None
    score_inputs = capture_block_inputs(model, score_windows, config.batch_windows) if separate else inputs
    log(f"captured block inputs: {inputs.tokens} tokens in {len(inputs)} batches"
        + (f"; scoring on {score_inputs.tokens} other tokens" if separate else ""))
    decisions: list[BlockDecision] = []
    candidate_blocks: dict[str, list[nn.Module]] = {n: [] for n in names}
    options = candidate_options(config)

    for index, fp_block in enumerate(float_blocks):
        tb = time.perf_counter()
        reference = run_block(fp_block, score_inputs)
        decision_path, block_paths = (None, {}) if state_dir is None else _state_paths(state_dir, index, names)
        outputs: dict[str, list[torch.Tensor]] = {}  # on the scoring inputs
        if decision_path is not None and decision_path.is_file() and all(p.is_file() for p in block_paths.values()):
            saved = json.loads(decision_path.read_text())
            _check_saved_options(decision_path, saved.get("candidate_options", options), options)
            decision = BlockDecision.from_dict(saved)
            qblocks = {n: load_block_state(block_paths[n], fp_block) for n in names}
            resumed = True
        else:
            resumed = False
            # nll: CKA, MSE and relative error stay those of the block outputs; only the NLL needs the tail.
            at_end = config.score == "cka-final"
            score = "cka" if config.score in ("cka-final", "nll") else config.score
            norm = None if score == "cka" else consumer_norm(model, index)

            def compared(outs: list[torch.Tensor]) -> list[torch.Tensor]:
                return final_hidden(model, index, outs, score_inputs) if at_end else outs

            compared_reference = compared(reference)
            self_term = CKAAccumulator.reference(score_features(y, score, norm) for y in compared_reference)
            scores: dict[str, CandidateScore] = {}
            qblocks = {}
            for cand in config.pool:
                tq = time.perf_counter()
                qblock = algorithms.quantize_block(cand, copy.deepcopy(fp_block), inputs, spec, contexts[cand.name])
                quantize_seconds = time.perf_counter() - tq
                ts = time.perf_counter()
                outs = run_block(qblock, score_inputs)
                cka, mse, rel = block_scores(compared_reference, compared(outs), score, norm, config.debiased_cka,
                                             self_term)
                nll = (next_token_nll(model, final_hidden(model, index, outs, score_inputs),
                                      score_windows if separate else windows)
                       if config.score == "nll" else None)
                scores[cand.name] = CandidateScore(cka, mse, rel, quantize_seconds, time.perf_counter() - ts, nll)
                outputs[cand.name] = outs
                qblocks[cand.name] = qblock
                if state_dir is not None:
                    save_block_state(block_paths[cand.name], qblock)
            by = "nll" if config.score == "nll" else "cka"
            decision = BlockDecision(index, choose(scores, config.tie_tolerance, by), scores)
            if decision_path is not None:
                atomic_write_json(decision_path, {**decision.to_dict(), "candidate_options": options})
        decisions.append(decision)
        for n in names:
            release_caches(qblocks[n])
            candidate_blocks[n].append(qblocks[n])

        if config.propagation == "greedy":
            chosen = qblocks[decision.chosen]
            scored_out = outputs.get(decision.chosen) or run_block(chosen, score_inputs)
            fitted_out = run_block(chosen, inputs) if separate else scored_out
            release_caches(chosen)
        else:
            scored_out = reference
            fitted_out = run_block(fp_block, inputs) if separate else reference
        inputs = inputs.with_hidden(fitted_out)
        score_inputs = score_inputs.with_hidden(scored_out) if separate else inputs
        cells = "  ".join(f"{n}={s.cka:.6f}" if s.nll is None else f"{n}={s.nll:.5f}"
                          for n, s in decision.scores.items())
        log(f"block {index + 1:>3}/{len(float_blocks)}: {decision.chosen:<10} {config.score} {cells}"
            f"{'  (resumed)' if resumed else ''}  {time.perf_counter() - tb:.1f}s "
            f"(total {time.perf_counter() - t0:.0f}s)")
    return SearchOutcome(decisions, candidate_blocks, float_blocks)


def check_models(model: nn.Module, models: dict[str, list[nn.Module]], windows: torch.Tensor,
                 batch_windows: int = 4) -> dict[str, torch.Tensor]:
    """Per-window mean next-token NLL of the whole model with each block list of `models` installed, on
    `windows` (held-out calibration windows). The model is left with the last list installed."""
    nll = {}
    for name, blocks in models.items():
        install_blocks(model, blocks)
        nll[name] = window_nll(model, windows, batch_windows)
        release_caches(model)
    return nll


def install_blocks(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Put `blocks` into the model as its decoder layers (a hybrid or a uniform model)."""
    layers = decoder_blocks(model)
    if len(blocks) != len(layers):
        raise ValueError(f"{len(blocks)} blocks for a model with {len(layers)} layers")
    for i, b in enumerate(blocks):
        layers[i] = b
