"""calm_search: the loop over blocks (quantize every candidate, score, choose, save, propagate), and the
whole-model check of its result."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from calm import distributed
from calm.arch import decoder_blocks, layout_of
from calm.config import CalmUsageError, QuantSpec, SearchConfig
from calm.evaluate import streamed_window_nll
from calm.io import FORMAT, load_block_state, quantized_manifest, save_model_files
from calm.model import BlockInputs, capture_block_inputs, run_block
from calm.nn import block_stored_bits, release_caches
from calm.progress import get_logger, progress
from calm.search import candidates
from calm.search.decision import AllCandidatesFailed, BlockDecision, CandidateScore, choose, numerical_failure
from calm.search.propagation import propagate
from calm.search.scoring import Scorer, make_scorer
from calm.search.state import BlockStateStore, SavedBlock, StoredBlock, scoring_key
from calm.streaming import MemorySource, ModelSource

Log = Callable[[str], None]
logger = get_logger("calm.search")


@dataclasses.dataclass
class SearchOutcome:
    decisions: list[BlockDecision]
    # every candidate's quantized block of every layer; None where that candidate failed on that layer
    candidate_blocks: dict[str, list[StoredBlock | None]]
    source: ModelSource

    @property
    def chosen_blocks(self) -> list[nn.Module]:
        """The hybrid's blocks in CPU memory (read from the state folder where they are kept)."""
        return [self.block(d.chosen, d.index) for d in self.decisions]

    @property
    def complete_candidates(self) -> list[str]:
        """The candidates with a block for every layer (none failed anywhere): the possible uniform models."""
        return [n for n, blocks in self.candidate_blocks.items() if all(b is not None for b in blocks)]

    def block(self, name: str, index: int) -> nn.Module | None:
        """Candidate `name`'s block of layer `index` in CPU memory (read from the state folder if needed); None
        where it failed."""
        stored = self.candidate_blocks[name][index]
        if stored is None:
            return None
        return stored.module if stored.module is not None else load_block_state(
            stored.path, decoder_blocks(self.source.model)[index], torch.device("cpu"))

    def uniform(self, name: str) -> list[StoredBlock]:
        return self.candidate_blocks[name]

    def hybrid(self) -> list[StoredBlock]:
        return [self.candidate_blocks[d.chosen][d.index] for d in self.decisions]

    def block_for_hybrid(self):
        """The hybrid as a `calm.evaluate.BlockFor` (for streamed evaluation and saving)."""
        return blocks_for(self.source, self.hybrid())


def blocks_for(source: ModelSource, blocks: list[StoredBlock | nn.Module]):
    """A `calm.evaluate.BlockFor` over `blocks` (stored or in memory): block i on the device while in use."""
    if len(blocks) != source.num_blocks or any(b is None for b in blocks):
        raise ValueError(f"need a block for each of the {source.num_blocks} layers (a candidate that failed on a "
                         f"layer has none there)")
    stored = [b if isinstance(b, StoredBlock) else StoredBlock(b) for b in blocks]
    return lambda i: _loaded(source, stored[i], i)


@contextlib.contextmanager
def _loaded(source: ModelSource, stored: StoredBlock, index: int) -> Iterator[nn.Module]:
    module = stored.load(decoder_blocks(source.model)[index], source.device)
    try:
        yield module
    finally:
        stored.unload(module)


@dataclasses.dataclass
class _Block:
    """One block as the search decided it: the decision, every candidate's block (None: failed) and the
    candidates' outputs on the scoring inputs (only those computed in this run). `note`: "resumed" (read back
    as saved), "scored again" (saved blocks scored under another score), "completed" (candidates added to the
    pool since were quantized), or "" (decided now)."""
    decision: BlockDecision
    blocks: dict[str, StoredBlock | None]
    outputs: dict[str, list[torch.Tensor]]
    note: str = ""


def _decide(index: int, fp_block: nn.Module, inputs: BlockInputs, score_inputs: BlockInputs,
            reference: list[torch.Tensor], spec: QuantSpec, config: SearchConfig, contexts: dict[str, dict],
            scorer: Scorer, store: BlockStateStore, bar, saved: SavedBlock | None = None,
            device: torch.device | None = None) -> _Block:
    """Quantize block `index` with every candidate (fitted on `inputs`), score each on `score_inputs` against
    the float `reference`, save each block as it is made, choose. A candidate whose quantization breaks down
    numerically is recorded as failed; when all fail, raises AllCandidatesFailed (earlier blocks stay saved).

    With `saved` (a resumed block that is incomplete: candidates added to the pool, or scored under another
    score), the saved candidates' blocks are kept (and scored again when their scoring differs) and only the
    others are quantized."""
    scorer.prepare(index, reference, score_inputs)
    scores: dict[str, CandidateScore] = {}
    blocks: dict[str, StoredBlock | None] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    world = distributed.current()
    rescore = saved is not None and saved.scored_by != store.scoring
    for cand in world.mine(config.pool) if world.candidates else config.pool:
        old = None if saved is None else saved.decision.scores.get(cand.name)
        if old is not None:
            stored = blocks[cand.name] = saved.blocks.get(cand.name)
            if stored is None or not rescore:  # failed (still no block), or its score stands
                scores[cand.name] = old
            else:
                ts = time.perf_counter()
                module = stored.load(fp_block, device)
                outs = outputs[cand.name] = run_block(module, score_inputs)
                stored.unload(module)
                scores[cand.name] = dataclasses.replace(
                    scorer.score(outs), seconds=old.seconds, score_seconds=time.perf_counter() - ts,
                    fallbacks=old.fallbacks, stored_bits=old.stored_bits, weights=old.weights)
            bar.update(1)
            continue
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
        stored, weights = block_stored_bits(qblock)
        scores[cand.name] = dataclasses.replace(scored, seconds=quantize_seconds,
                                                score_seconds=time.perf_counter() - ts,
                                                fallbacks=getattr(qblock, "calm_fallbacks", None),
                                                stored_bits=stored, weights=weights)
        if world.main or not world.data:  # data-parallel: every process holds the same block; rank 0 saves it
            store.save_block(index, cand.name, qblock)
        outputs[cand.name] = outs
        blocks[cand.name] = StoredBlock(qblock, store.path_or_none(index, cand.name))
        bar.update(1)
    if world.candidates:  # every process gets every score; the others' blocks are in the shared state folder
        gathered = {name: score for part in world.gather(scores) for name, score in part.items()}
        scores = {c.name: gathered[c.name] for c in config.pool}
        for name, score in scores.items():
            if name not in blocks:
                blocks[name] = None if score.failed else StoredBlock(path=store.block_path(index, name))
                bar.update(1)
    decision = BlockDecision(index, choose(scores, config.tie_tolerance, scorer.by), scores)
    if world.main:
        store.save_decision(decision)
    note = ("" if saved is None else "completed" if saved.missing else "scored again" if rescore
            else "chosen again")  # the last: its saved choice left the pool
    return _Block(decision, blocks, outputs, note)


def _block_line(block: _Block, total: int, score: str, seconds: float, elapsed: float) -> str:
    d = block.decision
    cells = "  ".join(f"{n}={s.cka:.6f}" if s.nll is None else f"{n}={s.nll:.5f}" for n, s in d.scores.items())
    return (f"block {d.index + 1:>3}/{total}: {d.chosen:<10} {score} {cells}"
            f"{f'  ({block.note})' if block.note else ''}  {seconds:.1f}s (total {elapsed:.0f}s)")


def as_source(model: nn.Module | ModelSource) -> ModelSource:
    """A ModelSource for `model`: itself, or a model in memory computed where and in the dtype it is."""
    if isinstance(model, ModelSource):
        return model
    ref = next(model.parameters())
    return MemorySource(model, None, ref.device, ref.dtype)


def calm_search(model: nn.Module | ModelSource, windows: torch.Tensor, spec: QuantSpec, config: SearchConfig,
                state_dir: Path | None = None, log: Log | None = None,
                score_windows: torch.Tensor | None = None) -> SearchOutcome:
    """Run the search on calibration `windows` (n, T). `model`: a ModelSource streaming the float model block by
    block (calm.streaming), or a model in memory; its blocks are left untouched (float).

    With `score_windows` (m, T), candidates are fitted on `windows` and scored on `score_windows` only, so a
    candidate that fits the calibration tokens closely but generalizes worse is not preferred for it. Each
    candidate's block is written to `state_dir` as it is made and dropped from memory once the block is decided
    (read back from there when asked for); without a state folder the blocks stay in memory. Progress
    lines go to `log` (default: the `calm.search` logger at INFO); warnings to that logger."""
    log = log or logger.info
    source = as_source(model)
    layout = layout_of(decoder_blocks(source.model)[0])
    for cand in config.pool:
        candidates.validate(cand, spec)
        candidates.validate_family(cand, layout, spec)
    names = [c.name for c in config.pool]
    n_blocks = source.num_blocks
    contexts = {c.name: candidates.prepare(c, source.iter_blocks(), spec) for c in config.pool}
    t0 = time.perf_counter()
    separate = score_windows is not None
    world = distributed.current()
    if world.candidates and state_dir is None:
        raise CalmUsageError("--parallel candidates exchanges the candidates' blocks through the state folder: "
                             "give the search a state folder (the command line always does)")
    windows, score_windows = world.shard(windows), world.shard(score_windows)
    with source.embedding_stage() as embedder:
        inputs = capture_block_inputs(embedder, windows, config.batch_windows)
        score_inputs = capture_block_inputs(embedder, score_windows, config.batch_windows) if separate else inputs
    if not source.keeps_activations(inputs.nbytes * (2 + len(names)) * (2 if separate else 1)):
        inputs = inputs.offloaded()
        score_inputs = score_inputs.offloaded() if separate else inputs
    log(f"captured block inputs: {inputs.tokens} tokens in {len(inputs)} batches"
        + (f"; scoring on {score_inputs.tokens} other tokens" if separate else "")
        + ("; activations offloaded to CPU memory" if inputs.hidden[0].device != inputs.device else ""))
    store = BlockStateStore(state_dir, candidates.candidate_options(config),
                            scoring_key(config.score, config.debiased_cka))
    scorer = make_scorer(source, config, score_windows if separate else windows)
    decisions: list[BlockDecision] = []
    candidate_blocks: dict[str, list[StoredBlock | None]] = {n: [] for n in names}

    # Candidate-parallel with independent propagation: every block's inputs are float outputs, known without
    # the decisions before it, so the blocks themselves are spread over the processes (each decides its blocks
    # with the whole pool, alone) and the decisions are exchanged at the end.
    spread = world.candidates and config.propagation == "independent"
    inputs_as_saved = True  # every block so far propagated what the saved state was fitted on
    with progress(total=n_blocks * len(names), desc="CALM search", unit="candidate") as bar:
        for index in range(n_blocks):
            tb = time.perf_counter()
            inputs = inputs.at_layer(index)
            score_inputs = score_inputs.at_layer(index) if separate else inputs
            with source.block(index) as fp_block:
                reference = run_block(fp_block, score_inputs)
                if spread and world.owner(index) != world.rank:  # another process decides this block
                    inputs, score_inputs = propagate("independent", inputs, score_inputs, chosen=None,
                                                     chosen_outputs=None, float_block=fp_block, reference=reference)
                    decisions.append(None)
                    for n in names:
                        candidate_blocks[n].append(None)
                    bar.update(len(names))
                    continue
                saved = store.load(index) if inputs_as_saved else None
                complete = (saved is not None and not saved.missing and saved.scored_by == store.scoring
                            and saved.decision.chosen in names)
                if saved is not None and not complete and world.active:
                    saved = None  # completing a block is done in one process only: decide it again together
                if world.active and not spread and not all(world.gather(saved is not None)):
                    saved = None  # decide it again together: a process that does not see the state would wait
                if saved is not None and complete:
                    block = _Block(saved.decision, saved.blocks, outputs={}, note="resumed")
                    bar.update(len(names))
                else:
                    try:
                        with distributed.alone() if spread else contextlib.nullcontext():
                            block = _decide(index, fp_block, inputs, score_inputs, reference, spec, config,
                                            contexts, scorer, store, bar, saved, source.device)
                    except AllCandidatesFailed as exc:  # name the block; the blocks before it stay saved
                        raise AllCandidatesFailed(exc.reasons, index, n_blocks,
                                                  None if state_dir is None else str(state_dir)) from None
                    # Blocks after one whose choice changed were fitted on other inputs: they are fitted again.
                    inputs_as_saved = config.propagation == "independent" or (
                        saved is not None and block.decision.chosen == saved.decision.chosen)
                    if block.decision.failed:
                        logger.warning(f"block {index + 1}/{n_blocks}: "
                                       + "; ".join(f"{n} failed ({r})" for n, r in block.decision.failed.items())
                                       + f"; chose {block.decision.chosen} among the others")
                chosen = block.blocks[block.decision.chosen]
                if chosen.module is None:  # resumed: read the chosen block back, the others stay on disk
                    chosen.keep_in_memory(fp_block)
                chosen_module = chosen.module.to(source.device)
                inputs, score_inputs = propagate(config.propagation, inputs, score_inputs, chosen=chosen_module,
                                                 chosen_outputs=block.outputs.get(block.decision.chosen),
                                                 float_block=fp_block, reference=reference)
            decisions.append(block.decision)
            for n in names:
                stored = block.blocks[n]
                if stored is not None and stored.module is not None:
                    release_caches(stored.module.to("cpu"))
                    if stored.path is not None:
                        stored.module = None  # on disk: read back when an evaluation or the saving asks for it
                candidate_blocks[n].append(stored)
            log(_block_line(block, n_blocks, config.score, time.perf_counter() - tb, time.perf_counter() - t0))
    if spread:
        decisions, candidate_blocks = _exchange_blocks(world, decisions, candidate_blocks, store, names)
    return SearchOutcome(decisions, candidate_blocks, source)


def _exchange_blocks(world: distributed.World, decisions: list[BlockDecision | None],
                     candidate_blocks: dict[str, list[StoredBlock | None]], store: BlockStateStore,
                     names: list[str]) -> tuple[list[BlockDecision], dict[str, list[StoredBlock | None]]]:
    """Every process's decisions, and the blocks the others made (read from the shared state folder)."""
    mine = {d.index: d for d in decisions if d is not None}
    every = {i: d for part in world.gather(mine) for i, d in part.items()}
    decisions = [every[i] for i in range(len(decisions))]
    for i, d in enumerate(decisions):
        if i in mine:
            continue
        for n in names:
            candidate_blocks[n][i] = None if n in d.failed else StoredBlock(path=store.block_path(i, n))
    return decisions, candidate_blocks


def check_models(model: nn.Module | ModelSource, models: dict[str, list[StoredBlock | nn.Module]],
                 windows: torch.Tensor, batch_windows: int = 4) -> dict[str, torch.Tensor]:
    """Per-window mean next-token NLL of the whole model with each block list of `models` (streamed block by
    block), on `windows` (held-out calibration windows)."""
    source = as_source(model)
    return {name: streamed_window_nll(source, windows, blocks_for(source, blocks), batch_windows)
            for name, blocks in models.items()}


def save_streamed(source: ModelSource, blocks: list[StoredBlock | nn.Module], path: Path,
                  extra: dict | None = None) -> None:
    """Save the model whose decoder blocks are `blocks` (stored or in memory) and whose other pieces are the
    source's, piece by piece into sharded safetensors (calm.io), never holding the whole model."""
    block_for = blocks_for(source, blocks)
    model = source.model
    embed_prefix = _prefix(model, source.embeddings())
    head_prefix = _prefix(model, source.head())
    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    manifest_modules: dict[str, dict] = {}

    def pieces():
        with source.embedding_stage():
            yield {embed_prefix + k: v for k, v in source.embeddings().state_dict().items()}
        for i in range(source.num_blocks):
            prefix = _prefix(model, decoder_blocks(model)[i])
            with block_for(i) as block:
                manifest_modules.update(quantized_manifest(block, prefix))
                yield {prefix + k: v for k, v in block.state_dict().items()}
        with source.head_stage() as (norm, head):
            yield {_prefix(model, norm) + k: v for k, v in norm.state_dict().items()}
            if not tied:
                yield {head_prefix + k: v for k, v in head.state_dict().items()}

    manifest = {"format": FORMAT, "modules": manifest_modules,
                "tied": [[head_prefix + "weight", embed_prefix + "weight"]] if tied else [], **(extra or {})}
    save_model_files(Path(path), source.config, source.tokenizer, manifest, pieces())


def _prefix(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise ValueError("module is not part of the model")


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
