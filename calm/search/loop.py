"""calm_search: the loop over blocks (quantize every candidate, score, choose, save, propagate), and the
whole-model check of its result."""
from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from calm.config import QuantSpec, SearchConfig
from calm.evaluate import window_nll
from calm.model import BlockInputs, capture_block_inputs, decoder_blocks, run_block
from calm.nn import release_caches
from calm.progress import get_logger, progress
from calm.search import candidates
from calm.search.decision import AllCandidatesFailed, BlockDecision, CandidateScore, choose, numerical_failure
from calm.search.propagation import propagate
from calm.search.scoring import Scorer, make_scorer
from calm.search.state import BlockStateStore

Log = Callable[[str], None]
logger = get_logger("calm.search")


@dataclasses.dataclass
class SearchOutcome:
    decisions: list[BlockDecision]
    # every candidate's quantized copy of every block; None where that candidate failed on that block
    candidate_blocks: dict[str, list[nn.Module | None]]
    float_blocks: list[nn.Module]

    @property
    def chosen_blocks(self) -> list[nn.Module]:
        return [self.candidate_blocks[d.chosen][d.index] for d in self.decisions]

    @property
    def complete_candidates(self) -> dict[str, list[nn.Module]]:
        """The candidates with a block for every layer (none failed anywhere): the possible uniform models."""
        return {n: blocks for n, blocks in self.candidate_blocks.items() if all(b is not None for b in blocks)}


@dataclasses.dataclass
class _Block:
    """One block as the search decided it: the decision, every candidate's block (None: failed) and the
    candidates' outputs on the scoring inputs (empty when resumed)."""
    decision: BlockDecision
    blocks: dict[str, nn.Module | None]
    outputs: dict[str, list[torch.Tensor]]
    resumed: bool = False


def _decide(index: int, fp_block: nn.Module, inputs: BlockInputs, score_inputs: BlockInputs,
            reference: list[torch.Tensor], spec: QuantSpec, config: SearchConfig, contexts: dict[str, dict],
            scorer: Scorer, store: BlockStateStore, bar) -> _Block:
    """Quantize block `index` with every candidate (fitted on `inputs`), score each on `score_inputs` against
    the float `reference`, save each block as it is made, choose. A candidate whose quantization breaks down
    numerically is recorded as failed; when all fail, raises AllCandidatesFailed (earlier blocks stay saved)."""
    scorer.prepare(index, reference, score_inputs)
    scores: dict[str, CandidateScore] = {}
    blocks: dict[str, nn.Module | None] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    for cand in config.pool:
        tq = time.perf_counter()
        try:
            qblock = candidates.quantize(cand, copy.deepcopy(fp_block), inputs, spec, contexts[cand.name])
        except Exception as exc:  # numerical breakdowns only; anything else is re-raised
            reason = numerical_failure(exc)
            if reason is None:
                raise
            scores[cand.name] = CandidateScore.failure(reason, time.perf_counter() - tq, scorer.by)
            blocks[cand.name] = None
            bar.update(1)
            continue
        quantize_seconds = time.perf_counter() - tq
        ts = time.perf_counter()
        outs = run_block(qblock, score_inputs)
        scored = scorer.score(outs)
        scores[cand.name] = dataclasses.replace(scored, seconds=quantize_seconds,
                                                score_seconds=time.perf_counter() - ts)
        outputs[cand.name], blocks[cand.name] = outs, qblock
        store.save_block(index, cand.name, qblock)
        bar.update(1)
    decision = BlockDecision(index, choose(scores, config.tie_tolerance, scorer.by), scores)
    store.save_decision(decision)
    return _Block(decision, blocks, outputs)


def _block_line(block: _Block, total: int, score: str, seconds: float, elapsed: float) -> str:
    d = block.decision
    cells = "  ".join(f"{n}={s.cka:.6f}" if s.nll is None else f"{n}={s.nll:.5f}" for n, s in d.scores.items())
    return (f"block {d.index + 1:>3}/{total}: {d.chosen:<10} {score} {cells}"
            f"{'  (resumed)' if block.resumed else ''}  {seconds:.1f}s (total {elapsed:.0f}s)")


def calm_search(model: nn.Module, windows: torch.Tensor, spec: QuantSpec, config: SearchConfig,
                state_dir: Path | None = None, log: Log | None = None,
                score_windows: torch.Tensor | None = None) -> SearchOutcome:
    """Run the search on calibration `windows` (n, T). The model's blocks are left untouched (float).

    With `score_windows` (m, T), candidates are fitted on `windows` and scored on `score_windows` only, so a
    candidate that fits the calibration tokens closely but generalizes worse is not preferred for it. Progress
    lines go to `log` (default: the `calm.search` logger at INFO); warnings to that logger."""
    log = log or logger.info
    for cand in config.pool:
        candidates.validate(cand, spec)
    names = [c.name for c in config.pool]
    float_blocks = list(decoder_blocks(model))
    contexts = {c.name: candidates.prepare(c, float_blocks, spec) for c in config.pool}
    t0 = time.perf_counter()
    inputs: BlockInputs = capture_block_inputs(model, windows, config.batch_windows)
    separate = score_windows is not None
    score_inputs = capture_block_inputs(model, score_windows, config.batch_windows) if separate else inputs
    log(f"captured block inputs: {inputs.tokens} tokens in {len(inputs)} batches"
        + (f"; scoring on {score_inputs.tokens} other tokens" if separate else ""))
    store = BlockStateStore(state_dir, candidates.candidate_options(config))
    scorer = make_scorer(model, config, score_windows if separate else windows)
    decisions: list[BlockDecision] = []
    candidate_blocks: dict[str, list[nn.Module | None]] = {n: [] for n in names}

    with progress(total=len(float_blocks) * len(names), desc="CALM search", unit="candidate") as bar:
        for index, fp_block in enumerate(float_blocks):
            tb = time.perf_counter()
            reference = run_block(fp_block, score_inputs)
            saved = store.load(index, fp_block)
            if saved is not None:
                block = _Block(*saved, outputs={}, resumed=True)
                bar.update(len(names))
            else:
                try:
                    block = _decide(index, fp_block, inputs, score_inputs, reference, spec, config, contexts,
                                    scorer, store, bar)
                except AllCandidatesFailed as exc:  # name the block; the blocks before it stay saved
                    raise AllCandidatesFailed(exc.reasons, index, len(float_blocks),
                                              None if state_dir is None else str(state_dir)) from None
                if block.decision.failed:
                    logger.warning(f"block {index + 1}/{len(float_blocks)}: "
                                   + "; ".join(f"{n} failed ({r})" for n, r in block.decision.failed.items())
                                   + f"; chose {block.decision.chosen} among the others")
            decisions.append(block.decision)
            for n in names:
                if block.blocks[n] is not None:
                    release_caches(block.blocks[n])
                candidate_blocks[n].append(block.blocks[n])
            inputs, score_inputs = propagate(config.propagation, inputs, score_inputs,
                                             chosen=block.blocks[block.decision.chosen],
                                             chosen_outputs=block.outputs.get(block.decision.chosen),
                                             float_block=fp_block, reference=reference)
            log(_block_line(block, len(float_blocks), config.score, time.perf_counter() - tb,
                            time.perf_counter() - t0))
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
    missing = [i for i, b in enumerate(blocks) if b is None]
    if missing:
        raise ValueError(f"no block for layers {missing} (a candidate that failed there)")
    for i, b in enumerate(blocks):
        layers[i] = b
