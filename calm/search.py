"""The CALM search: for every decoder block, quantize it with each candidate, score by linear CKA, keep the best.

Per block l (inputs X captured on the calibration windows):
1. FP outputs Y = block(X); the FP self term ||Yc^T Yc||_F^2 is computed once and shared by the candidates.
2. Every candidate quantizes a private copy of the float block on X; the copy runs on X; linear CKA between
   Y and its outputs is accumulated batch by batch, with MSE and relative error beside it.
3. The highest CKA wins; CKA values within `tie_tolerance` are a tie, broken by lower MSE (CKA is blind to
   a pure rescaling of the output, MSE is not).
4. Each candidate's quantized block and the decision are written to `state_dir` as they are made, so an
   interrupted search resumes at the first undecided block.
5. Propagation: greedy (X <- chosen block's outputs) or independent (X <- Y).
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
from calm.config import QuantSpec, SearchConfig
from calm.io import atomic_write_json, load_block_state, save_block_state
from calm.model import BlockInputs, capture_block_inputs, decoder_blocks, run_block
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

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


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

    def to_dict(self) -> dict:
        return {"index": self.index, "chosen": self.chosen, "cka_margin": self.margin,
                "scores": {n: s.to_dict() for n, s in self.scores.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "BlockDecision":
        return cls(d["index"], d["chosen"], {n: CandidateScore(**s) for n, s in d["scores"].items()})


def choose(scores: dict[str, CandidateScore], tie_tolerance: float) -> str:
    best = max(s.cka for s in scores.values())
    tied = [n for n, s in scores.items() if best - s.cka <= tie_tolerance]
    return min(tied, key=lambda n: (scores[n].mse, list(scores).index(n)))


@dataclasses.dataclass
class SearchOutcome:
    decisions: list[BlockDecision]
    candidate_blocks: dict[str, list[nn.Module]]  # every candidate's quantized copy of every block
    float_blocks: list[nn.Module]

    @property
    def chosen_blocks(self) -> list[nn.Module]:
        return [self.candidate_blocks[d.chosen][d.index] for d in self.decisions]


def score_outputs(reference: list[torch.Tensor], outputs: list[torch.Tensor], reference_self_term: float,
                  debiased: bool) -> tuple[float, float, float]:
    """(CKA, MSE, relative Frobenius error) of `outputs` against `reference`, streamed batch by batch."""
    acc = CKAAccumulator(reference_self_term=reference_self_term)
    sq_err = sq_ref = 0.0
    count = 0
    for y, yq in zip(reference, outputs):
        y2 = y.reshape(-1, y.shape[-1])
        yq2 = yq.reshape(-1, yq.shape[-1])
        if not debiased:
            acc.update(y2, yq2)
        diff = (yq2 - y2).to(torch.float64)
        sq_err += float(diff.square().sum())
        sq_ref += float(y2.to(torch.float64).square().sum())
        count += diff.numel()
    if debiased:
        cka = linear_cka_reference(torch.cat([y.reshape(-1, y.shape[-1]) for y in reference]),
                                   torch.cat([y.reshape(-1, y.shape[-1]) for y in outputs]), debiased=True).cka
    else:
        cka = acc.compute().cka
    if not torch.isfinite(torch.tensor(cka)) or sq_err != sq_err:
        return float("-inf"), float("inf"), float("inf")
    return cka, sq_err / count, (sq_err / sq_ref) ** 0.5 if sq_ref > 0 else float("inf")


def state_name(name: str) -> str:
    """A candidate name (`gptq:act_order=static`) as a file-name part."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _state_paths(state_dir: Path, index: int, names: list[str]) -> tuple[Path, dict[str, Path]]:
    return (state_dir / f"block_{index:03d}.json",
            {n: state_dir / f"block_{index:03d}-{state_name(n)}.safetensors" for n in names})


def calm_search(model: nn.Module, windows: torch.Tensor, spec: QuantSpec, config: SearchConfig,
                state_dir: Path | None = None, log: Log = print) -> SearchOutcome:
    """Run the search on calibration `windows` (n, T). The model's blocks are left untouched (float)."""
    for cand in config.pool:
        algorithms.validate_candidate(cand, spec)
    names = [c.name for c in config.pool]
    blocks = decoder_blocks(model)
    float_blocks = list(blocks)
    t0 = time.perf_counter()
    inputs: BlockInputs = capture_block_inputs(model, windows, config.batch_windows)
    log(f"captured block inputs: {inputs.tokens} tokens in {len(inputs)} batches")
    decisions: list[BlockDecision] = []
    candidate_blocks: dict[str, list[nn.Module]] = {n: [] for n in names}

    for index, fp_block in enumerate(float_blocks):
        tb = time.perf_counter()
        reference = run_block(fp_block, inputs)
        decision_path, block_paths = (None, {}) if state_dir is None else _state_paths(state_dir, index, names)
        outputs: dict[str, list[torch.Tensor]] = {}
        if decision_path is not None and decision_path.is_file() and all(p.is_file() for p in block_paths.values()):
            decision = BlockDecision.from_dict(json.loads(decision_path.read_text()))
            qblocks = {n: load_block_state(block_paths[n], fp_block) for n in names}
            resumed = True
        else:
            resumed = False
            self_term = CKAAccumulator.reference(y.reshape(-1, y.shape[-1]) for y in reference)
            scores: dict[str, CandidateScore] = {}
            qblocks = {}
            for cand in config.pool:
                tq = time.perf_counter()
                qblock = algorithms.quantize_block(cand, copy.deepcopy(fp_block), inputs, spec)
                quantize_seconds = time.perf_counter() - tq
                ts = time.perf_counter()
                outs = run_block(qblock, inputs)
                cka, mse, rel = score_outputs(reference, outs, self_term, config.debiased_cka)
                scores[cand.name] = CandidateScore(cka, mse, rel, quantize_seconds, time.perf_counter() - ts)
                outputs[cand.name] = outs
                qblocks[cand.name] = qblock
                if state_dir is not None:
                    save_block_state(block_paths[cand.name], qblock)
            decision = BlockDecision(index, choose(scores, config.tie_tolerance), scores)
            if decision_path is not None:
                atomic_write_json(decision_path, decision.to_dict())
        decisions.append(decision)
        for n in names:
            release_caches(qblocks[n])
            candidate_blocks[n].append(qblocks[n])

        if config.propagation == "greedy":
            chosen_out = outputs.get(decision.chosen) or run_block(qblocks[decision.chosen], inputs)
            release_caches(qblocks[decision.chosen])
            inputs = inputs.with_hidden(chosen_out)
        else:
            inputs = inputs.with_hidden(reference)
        cells = "  ".join(f"{n}={s.cka:.6f}" for n, s in decision.scores.items())
        log(f"block {index + 1:>3}/{len(float_blocks)}: {decision.chosen:<10} CKA {cells}"
            f"{'  (resumed)' if resumed else ''}  {time.perf_counter() - tb:.1f}s "
            f"(total {time.perf_counter() - t0:.0f}s)")
    return SearchOutcome(decisions, candidate_blocks, float_blocks)


def install_blocks(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Put `blocks` into the model as its decoder layers (a hybrid or a uniform model)."""
    layers = decoder_blocks(model)
    if len(blocks) != len(layers):
        raise ValueError(f"{len(blocks)} blocks for a model with {len(layers)} layers")
    for i, b in enumerate(blocks):
        layers[i] = b
