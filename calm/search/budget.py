"""A bit budget: per block, the (algorithm, bits) candidate that keeps the model's effective bits per weight at most
`SearchConfig.bits_budget` with the least loss, and the mixed-precision GPTQ baselines at the same budget.

Effective bits are exact: every stored bit of every decoder linear (codes, scales, zeros, codebooks,
permutations, outliers, transforms; `calm.nn.block_stored_bits`) over their weights. The budget is the integer
`limit = floor(B * total weights)` stored bits, and no model is returned above it.

1. **Rate-distortion points** (`calm_search` with independent propagation). Every candidate quantizes every
   block on the float model's inputs and is scored as the search scores (`SearchConfig.score`); its block's
   exact stored bits come with the score. Loss of a candidate on a block: with score `nll` its NLL on the
   scoring windows (the rest of the model float) minus the block's best candidate's, i.e. the NLL increase
   from quantizing that block alone, up to a constant per block; with a CKA score, the best CKA minus its CKA.
   Float inputs make the points independent of the choices, so they are computed once (and resume as any
   search does).
2. **Allocation** (`allocate`), a multiple-choice knapsack: minimize sum_l loss_l(c_l) subject to
   sum_l bits_l(c_l) <= limit. Solved exactly by a Pareto-frontier dynamic program over the blocks (partial
   choices that no other beats in both bits and loss; a few thousand states when the blocks share their
   shapes). The Lagrangian relaxation, per block argmin loss + lambda * bits with lambda bisected to the
   smallest value whose choice fits, gives the multiplier recorded beside it (the loss per bit at the margin),
   and is the fallback when the frontier grows too large: its choice only reaches each block's convex hull, so
   the bits it leaves are then spent greedily (the move with the largest loss decrease per extra bit that
   still fits, until none does).
3. **Sequential pass** (`sequential_pass`). The choices interact through propagation: block l's allocated
   candidate is fitted again on the outputs of the already-chosen quantized blocks (greedy propagation;
   `independent` keeps the step-1 blocks). Only one candidate per block is fitted, so this costs one uniform
   run. After each block its exact bits are counted; when they differ from step 1's, the remaining blocks are
   allocated again on the remaining budget, and when even the cheapest remaining blocks no longer fit, the
   block is re-fitted with its least lossy cheaper candidate that fits (the repair). The total is checked
   against `limit` at the end.

Mixed-precision GPTQ baselines (with `bits_budget` and at least two GPTQ widths in the pool), at the same limit:
- `gptq-mp`: the bits per block chosen by a published sensitivity, HAWQ-V2's trace-weighted perturbation
  Omega_l(b) = sum over the block's linears of Tr(H)/n * ||W - Q_b(W)||_F^2, with each linear's layer-output
  Hessian H = 2 X X^T / N (the Hessian GPTQ minimizes, from the float calibration inputs) in place of the loss
  Hessian, and Q_b(W) the step-1 GPTQ weights at b bits; allocated by the same Lagrangian as the hybrid, then
  its own sequential pass.
- `gptq-mp-score`: GPTQ alone allocated by the search's own losses (what the hybrid minimizes), so that the
  hybrid's gain over `gptq-mp` splits into "a better allocation" and "more than one algorithm".
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calm.config import CalmUsageError, CandidateSpec, QuantSpec, SearchConfig
from calm.io import atomic_write_json, load_block_state, save_block_state
from calm.model import (
    BlockInputs,
    block_linears,
    capture_block_inputs,
    decoder_blocks,
    run_block,
    run_with_input_hooks,
)
from calm.nn import block_stored_bits, release_caches
from calm.progress import get_logger, progress
from calm.search import candidates
from calm.search.decision import BlockDecision
from calm.search.loop import Log, SearchOutcome, as_source, calm_search
from calm.search.state import StoredBlock, state_name
from calm.streaming import ModelSource

logger = get_logger("calm.search")
HYBRID = "calm"
MP_HAWQ = "gptq-mp"
MP_SCORE = "gptq-mp-score"
BASELINE_ALGORITHM = "gptq"


class BudgetInfeasible(CalmUsageError):
    """Even the cheapest candidate of every block exceeds the budget."""


def check_budget(config: SearchConfig, spec: QuantSpec) -> None:
    """Refuse, before the model loads, a budget below every candidate's code bits (scales and zeros come on top,
    so no mix could meet it)."""
    if config.bits_budget is None:
        return
    cheapest = min(c.spec_for(spec).w_bits for c in config.pool)
    if config.bits_budget < cheapest:
        raise CalmUsageError(f"--bits-budget {config.bits_budget} is below the cheapest candidate's {cheapest}-bit "
                             f"codes (scales and zeros come on top): raise the budget or add a cheaper candidate, "
                             f"e.g. gptq@2")


def bit_limit(budget: float, weights: int) -> int:
    """The most stored bits `weights` weights may take at `budget` bits per weight (exact: the budget as written
    in decimal, e.g. 3.25, times the weights, rounded down)."""
    return math.floor(Fraction(str(budget)) * weights)


@dataclasses.dataclass(frozen=True)
class RatePoint:
    """One candidate on one block: its exact stored bits and its loss (lower is better)."""
    name: str
    stored_bits: int
    loss: float


def score_losses(decision: BlockDecision, by: str, names: list[str] | None = None) -> dict[str, float]:
    """Per candidate (of `names`, default all) that did not fail: its loss on this block relative to the best of
    them (NLL increase with by="nll", CKA decrease otherwise)."""
    viable = {n: s for n, s in decision.scores.items()
              if s.failure_reason(by) is None and (names is None or n in names)}
    if by == "nll":
        best = min(s.nll for s in viable.values())
        return {n: s.nll - best for n, s in viable.items()}
    best = max(s.cka for s in viable.values())
    return {n: best - s.cka for n, s in viable.items()}


def rate_points(decisions: list[BlockDecision], losses: list[dict[str, float]]) -> list[dict[str, RatePoint]]:
    """Per block, the candidates with a loss as rate-distortion points (bits from the step-1 blocks)."""
    return [{n: RatePoint(n, d.scores[n].stored_bits, loss) for n, loss in block.items()}
            for d, block in zip(decisions, losses)]


@dataclasses.dataclass
class Allocation:
    choice: list[str]
    lam: float  # the Lagrange multiplier (loss per stored bit): the smallest whose per-block choice fits
    stored_bits: int  # predicted from the rate points
    loss: float
    method: str  # "pareto" (exact) or "lagrangian" (Lagrangian choice + greedy fill)


def _total(points: list[dict[str, RatePoint]], choice: list[str]) -> int:
    return sum(block[n].stored_bits for block, n in zip(points, choice))


def _lagrangian_choice(points: list[dict[str, RatePoint]], lam: float) -> list[str]:
    return [min(block.values(), key=lambda p: (p.loss + lam * p.stored_bits, p.stored_bits, p.loss, p.name)).name
            for block in points]


def allocate(points: list[dict[str, RatePoint]], limit: int, weights: int | None = None,
             max_states: int = 200_000) -> Allocation:
    """Per block one candidate, total stored bits <= `limit`, least summed loss (module docstring): the exact
    optimum by the Pareto-frontier dynamic program while its frontier stays within `max_states`, else the
    Lagrangian choice at the smallest multiplier that fits followed by the greedy fill. The multiplier is
    returned either way. `weights` (of all the blocks) only words the error when nothing fits."""
    if any(not block for block in points):
        raise ValueError("a block without a viable candidate")
    cheapest = sum(min(p.stored_bits for p in block.values()) for block in points)
    if cheapest > limit:
        need = f"{cheapest / weights:.4f} bits per weight" if weights else f"{cheapest} stored bits (limit {limit})"
        raise BudgetInfeasible(f"the bit budget is below the cheapest mix: the cheapest candidate of every block "
                               f"needs {need}; raise --bits-budget or add a cheaper candidate (e.g. gptq@2)")
    lam = 0.0
    choice = _lagrangian_choice(points, 0.0)
    if _total(points, choice) > limit:
        lo, hi = 0.0, 1e-12
        while _total(points, _lagrangian_choice(points, hi)) > limit:
            lo, hi = hi, hi * 2
        for _ in range(100):
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            if _total(points, _lagrangian_choice(points, mid)) > limit:
                lo = mid
            else:
                hi = mid
        lam, choice = hi, _lagrangian_choice(points, hi)
    exact = pareto_choice(points, limit, max_states)
    method = "pareto" if exact is not None else "lagrangian"
    choice = exact if exact is not None else _greedy_fill(points, choice, limit)
    return Allocation(choice, lam, _total(points, choice), sum(b[n].loss for b, n in zip(points, choice)), method)


def pareto_choice(points: list[dict[str, RatePoint]], limit: int, max_states: int) -> list[str] | None:
    """The exact least-loss choice within `limit` (as ZeroQ and HAWQ-V2 allocate bits): block by block, keep the
    partial choices that no other beats in both bits and loss and that can still be completed within the limit;
    None when that frontier grows past `max_states` (blocks of many different sizes)."""
    rest_min = [0] * (len(points) + 1)
    for i in range(len(points) - 1, -1, -1):
        rest_min[i] = rest_min[i + 1] + min(p.stored_bits for p in points[i].values())
    # (bits, loss, index of the parent state in the previous frontier, candidate name)
    frontiers: list[list[tuple[int, float, int, str]]] = []
    frontier: list[tuple[int, float, int, str]] = [(0, 0.0, -1, "")]
    for i, block in enumerate(points):
        grown = sorted(((bits + p.stored_bits, loss + p.loss, parent, p.name)
                        for parent, (bits, loss, _, _) in enumerate(frontier) for p in block.values()
                        if bits + p.stored_bits + rest_min[i + 1] <= limit),
                       key=lambda t: (t[0], t[1], t[3]))
        frontier = []
        for state in grown:  # by bits: keep a state only when it loses less than every cheaper one
            if not frontier or state[1] < frontier[-1][1]:
                frontier.append(state)
        if len(frontier) > max_states:
            return None
        frontiers.append(frontier)
    state = frontier[-1]  # the frontier's losses decrease with bits: the last one is the least loss
    choice = []
    for i in range(len(points) - 1, -1, -1):
        choice.append(state[3])
        state = frontiers[i - 1][state[2]] if i else state
    return choice[::-1]


def _greedy_fill(points: list[dict[str, RatePoint]], choice: list[str], limit: int) -> list[str]:
    """Spend what the Lagrangian choice leaves: repeatedly the move with the largest loss decrease per extra bit
    (moves that also save bits first) that keeps the total within `limit`."""
    choice = list(choice)
    total = _total(points, choice)
    while True:
        best: tuple[float, float, int, str] | None = None
        for i, block in enumerate(points):
            current = block[choice[i]]
            for p in block.values():
                gain, extra = current.loss - p.loss, p.stored_bits - current.stored_bits
                if gain <= 0 or total + extra > limit:
                    continue
                rate = math.inf if extra <= 0 else gain / extra
                if best is None or (rate, gain) > best[:2]:
                    best = (rate, gain, i, p.name)
        if best is None:
            return choice
        _, _, i, name = best
        total += points[i][name].stored_bits - points[i][choice[i]].stored_bits
        choice[i] = name


def hawq_sensitivities(source: ModelSource, windows: torch.Tensor, batch_windows: int, first: SearchOutcome,
                       names: list[str]) -> list[dict[str, float]]:
    """HAWQ-V2's Omega_l(c) = sum over block l's linears of Tr(H)/n * ||W - Q_c(W)||_F^2 for each candidate c of
    `names` (its step-1 block), H = 2 X X^T / N of the linear's float calibration inputs X (module docstring)."""
    with source.embedding_stage() as embedder:
        inputs = capture_block_inputs(embedder, windows, batch_windows)
    if not source.keeps_activations(inputs.nbytes * 2):
        inputs = inputs.offloaded()
    result: list[dict[str, float]] = []
    for index in range(source.num_blocks):
        with source.block(index) as fp_block:
            linears = block_linears(fp_block)
            mean_square = _input_mean_squares(fp_block, inputs, tuple(linears))
            omega: dict[str, float] = {}
            for name in names:
                qblock = first.block(name, index)
                if qblock is None:
                    continue
                qlinears = block_linears(qblock)
                omega[name] = 0.0
                for lname, linear in linears.items():
                    dq = qlinears[lname].dequantized_weight(torch.float64).cpu()
                    delta = linear.weight.detach().to("cpu", torch.float64) - dq
                    omega[name] += 2 * mean_square[lname] * float(delta.square().sum())
                release_caches(qblock)
            result.append(omega)
            inputs = inputs.with_hidden(run_block(fp_block, inputs))
    return result


def _input_mean_squares(block: nn.Module, inputs: BlockInputs, names: tuple[str, ...]) -> dict[str, float]:
    """Per linear, the mean of x_k^2 over its calibration tokens and input channels k: Tr(X X^T / N) / n."""
    sums = {n: 0.0 for n in names}
    counts = {n: 0 for n in names}

    def consume(name: str, x: torch.Tensor, kwargs: dict[str, Any]) -> None:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
        sums[name] += float(x2.square().sum())
        counts[name] += x2.numel()

    run_with_input_hooks(block, inputs, names, consume)
    return {n: sums[n] / counts[n] for n in names}


@dataclasses.dataclass
class Mix:
    """One model under the budget: per block the chosen candidate and its block from the sequential pass."""
    name: str
    allocation: str  # "score" or "hawq"
    candidates: list[str]
    lam: float
    method: str  # how the allocation was solved: "pareto" (exact) or "lagrangian"
    planned: list[str]  # the allocation before the sequential pass
    blocks: list[StoredBlock]
    records: list[dict[str, Any]]  # per block: chosen, algorithm, bits, stored_bits, weights, loss, planned, ...
    limit: int

    @property
    def chosen(self) -> list[str]:
        return [r["chosen"] for r in self.records]

    @property
    def stored_bits(self) -> int:
        return sum(r["stored_bits"] for r in self.records)

    @property
    def weights(self) -> int:
        return sum(r["weights"] for r in self.records)

    @property
    def effective_bits(self) -> float:
        return self.stored_bits / self.weights

    def to_dict(self) -> dict[str, Any]:
        return {"allocation": self.allocation, "candidates": self.candidates, "lambda": self.lam,
                "method": self.method, "limit_bits": self.limit, "stored_bits": self.stored_bits,
                "weights": self.weights,
                "effective_bits": self.effective_bits, "loss": sum(r["loss"] for r in self.records),
                "blocks": self.records}


def sequential_pass(source: ModelSource, windows: torch.Tensor, spec: QuantSpec, config: SearchConfig,
                    first: SearchOutcome, points: list[dict[str, RatePoint]], allocation: Allocation, limit: int,
                    state_dir: Path | None, label: str, log: Log) -> tuple[list[StoredBlock], list[dict[str, Any]]]:
    """Fit each block's allocated candidate on the chosen quantized blocks' outputs (greedy propagation), with
    exact bits, re-allocation and repair (module docstring). Each block is saved to `state_dir` as it is made,
    so an interrupted pass resumes."""
    pool = {c.name: c for c in config.pool}
    contexts: dict[str, dict] = {}
    plan = list(allocation.choice)
    n_blocks = source.num_blocks
    with source.embedding_stage() as embedder:
        inputs = capture_block_inputs(embedder, windows, config.batch_windows)
    if not source.keeps_activations(inputs.nbytes * 3):
        inputs = inputs.offloaded()
    float_inputs = True  # no quantized block has been propagated yet: step 1's blocks are this pass's too
    # A saved block of this pass is valid only while every block before it was read back too: otherwise its
    # inputs (or the plan that led to it) may have changed, e.g. after a resume under another score.
    resumable = True
    used = 0
    blocks: list[StoredBlock] = []
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with progress(total=n_blocks, desc=f"budget pass {label}", unit="block") as bar:
        for index in range(n_blocks):
            tb = time.perf_counter()
            rest_min = sum(min(p.stored_bits for p in points[k].values()) for k in range(index + 1, n_blocks))
            tried: set[str] = set()
            name = plan[index]
            with source.block(index) as fp_block:
                while True:
                    tried.add(name)
                    module, resumed = _block_for(source, fp_block, index, name, pool, contexts, first, inputs,
                                                 spec, config, float_inputs, state_dir if resumable else None,
                                                 plan[index])
                    bits, weights = block_stored_bits(module)
                    if used + bits + rest_min <= limit:
                        break
                    cheaper = sorted((p for p in points[index].values()
                                      if p.name not in tried and used + p.stored_bits + rest_min <= limit),
                                     key=lambda p: (p.loss, p.stored_bits, p.name))
                    if not cheaper:
                        raise BudgetInfeasible(f"block {index + 1}/{n_blocks} of {label}: no candidate fits the "
                                               f"{limit - used - rest_min} stored bits left ({name} needs {bits}); "
                                               f"raise --bits-budget")
                    logger.info(f"{label} block {index + 1}: {name} takes {bits} bits, over the budget; "
                                f"repairing with {cheaper[0].name}")
                    name = cheaper[0].name
                used += bits
                resumable = resumable and resumed
                record = {"index": index, "chosen": name, "algorithm": pool[name].algorithm,
                          "bits": pool[name].spec_for(spec).w_bits,
                          "group_size": pool[name].spec_for(spec).group_size, "stored_bits": bits, "weights": weights,
                          "effective_bits": bits / weights, "loss": points[index][name].loss,
                          "planned": plan[index], "repaired": name != plan[index], "refitted": not float_inputs}
                if not resumed:
                    _save_record(state_dir, index, name, module, record)
                if config.propagation == "greedy":
                    inputs = inputs.with_hidden(run_block(module.to(source.device), inputs))
                    float_inputs = False
                else:
                    inputs = inputs.with_hidden(run_block(fp_block, inputs))
                release_caches(module.to("cpu"))
                path = None if state_dir is None else _block_path(state_dir, index, name)
                blocks.append(StoredBlock(None if path is not None else module, path))
            records.append(record)
            if bits != points[index][name].stored_bits and index + 1 < n_blocks:
                rest = allocate(points[index + 1:], limit - used)
                plan[index + 1:] = rest.choice
                logger.info(f"{label} block {index + 1}: {bits} exact bits against {points[index][name].stored_bits}"
                            f" predicted; the remaining blocks are allocated again")
            bar.update(1)
            log(f"{label} block {index + 1:>3}/{n_blocks}: {name:<12} {bits / weights:.4f} bits/weight, "
                f"running {used / sum(r['weights'] for r in records):.4f}  {time.perf_counter() - tb:.1f}s "
                f"(total {time.perf_counter() - t0:.0f}s)")
    if used > limit:  # unreachable by construction; never hand back a model over the budget
        raise RuntimeError(f"{label}: {used} stored bits over the limit {limit}")
    return blocks, records


def _block_path(state_dir: Path, index: int, name: str) -> Path:
    return state_dir / f"block_{index:03d}-{state_name(name)}.safetensors"


def _record_path(state_dir: Path, index: int) -> Path:
    return state_dir / f"block_{index:03d}.json"


def _save_record(state_dir: Path | None, index: int, name: str, module: nn.Module, record: dict[str, Any]) -> None:
    if state_dir is None:
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    save_block_state(_block_path(state_dir, index, name), module)
    atomic_write_json(_record_path(state_dir, index), record)


def _block_for(source: ModelSource, fp_block: nn.Module, index: int, name: str, pool: dict[str, CandidateSpec],
               contexts: dict[str, dict], first: SearchOutcome, inputs: BlockInputs, spec: QuantSpec,
               config: SearchConfig, float_inputs: bool, state_dir: Path | None, planned: str
               ) -> tuple[nn.Module, bool]:
    """Block `index` quantized by `name` for the sequential pass, and whether it was read back from the pass's
    state: saved by an earlier run of this pass with the same plan, step 1's block while the inputs are still
    the float model's (or with independent propagation), else fitted now."""
    if state_dir is not None:
        record_path, block_path = _record_path(state_dir, index), _block_path(state_dir, index, name)
        if record_path.is_file() and block_path.is_file():
            saved = json.loads(record_path.read_text())
            if saved.get("chosen") == name and saved.get("planned") == planned:
                return load_block_state(block_path, fp_block, source.device), True
    if float_inputs or config.propagation != "greedy":
        return first.block(name, index).to(source.device), False
    cand = pool[name]
    if name not in contexts:
        contexts[name] = candidates.prepare(cand, source.iter_blocks(), spec)
    return candidates.quantize(cand, copy.deepcopy(fp_block), inputs, spec, contexts[name]), False


@dataclasses.dataclass
class BudgetOutcome(SearchOutcome):
    """A budget search: step 1's outcome (every candidate's block on float inputs: the uniform members), the
    hybrid (`mixes["calm"]`) and the mixed-precision baselines, each from its own sequential pass."""
    bits_budget: float = 0.0
    loss: str = "nll"
    mixes: dict[str, Mix] = dataclasses.field(default_factory=dict)
    sensitivities: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def hybrid(self) -> list[StoredBlock]:
        return self.mixes[HYBRID].blocks

    @property
    def chosen_blocks(self) -> list[nn.Module]:
        skeletons = decoder_blocks(self.source.model)
        return [b.module if b.module is not None else load_block_state(b.path, skeletons[i], torch.device("cpu"))
                for i, b in enumerate(self.hybrid())]

    def baselines(self) -> dict[str, list[StoredBlock]]:
        return {n: m.blocks for n, m in self.mixes.items() if n != HYBRID}

    def record(self) -> dict[str, Any]:
        """results.json's `budget` (docs/results.md)."""
        mixes = {n: m.to_dict() for n, m in self.mixes.items()}
        for i, omega in enumerate(self.sensitivities):
            if MP_HAWQ in mixes:
                mixes[MP_HAWQ]["blocks"][i]["sensitivity"] = omega
        return {"bits_budget": self.bits_budget, "loss": self.loss, "models": mixes}


def baseline_candidates(config: SearchConfig, spec: QuantSpec) -> list[str]:
    """The pool's GPTQ members when they span at least two widths (bits, group size), else no mixed-precision
    baseline."""
    gptq = [c for c in config.pool if c.algorithm == BASELINE_ALGORITHM]
    widths = {(c.spec_for(spec).w_bits, c.spec_for(spec).group_size) for c in gptq}
    return [c.name for c in gptq] if len(widths) > 1 else []


def budget_search(model: nn.Module | ModelSource, windows: torch.Tensor, spec: QuantSpec, config: SearchConfig,
                  state_dir: Path | None = None, log: Log | None = None, score_windows: torch.Tensor | None = None,
                  baselines: bool = True) -> BudgetOutcome:
    """The hybrid under `config.bits_budget` (and with `baselines`, the mixed-precision GPTQ baselines at the
    same limit): rate-distortion points, allocation, sequential pass (module docstring). State: step 1 in
    `state_dir`, each sequential pass in `state_dir/budget-<model>`."""
    if config.bits_budget is None:
        raise ValueError("budget_search needs SearchConfig.bits_budget")
    check_budget(config, spec)
    log = log or logger.info
    source = as_source(model)
    log(f"bit budget {config.bits_budget}: step 1, every candidate on every block with the float model's inputs")
    first = calm_search(source, windows, spec, dataclasses.replace(config, propagation="independent"),
                        state_dir=state_dir, log=log, score_windows=score_windows)
    by = "nll" if config.score == "nll" else "cka"
    weights = sum(d.scores[next(iter(score_losses(d, by)))].weights for d in first.decisions)
    limit = bit_limit(config.bits_budget, weights)
    outcome = BudgetOutcome(first.decisions, first.candidate_blocks, first.source, config.bits_budget,
                            "nll increase" if by == "nll" else "cka decrease")
    plans: dict[str, tuple[str, list[str], list[dict[str, float]]]] = {
        HYBRID: ("score", [c.name for c in config.pool], [score_losses(d, by) for d in first.decisions])}
    gptq = baseline_candidates(config, spec) if baselines else []
    if gptq:
        outcome.sensitivities = hawq_sensitivities(source, windows, config.batch_windows, first, gptq)
        plans[MP_HAWQ] = ("hawq", gptq, [{n: o[n] for n in gptq if n in score_losses(d, by)}
                                         for d, o in zip(first.decisions, outcome.sensitivities)])
        plans[MP_SCORE] = ("score", gptq, [score_losses(d, by, gptq) for d in first.decisions])
    for name, (kind, names, losses) in plans.items():
        points = rate_points(first.decisions, losses)
        allocation = allocate(points, limit, weights)
        log(f"{name}: allocation by {kind} ({allocation.method}, lambda {allocation.lam:.4g}): predicted "
            f"{allocation.stored_bits / weights:.4f} bits/weight (limit {limit / weights:.4f}), "
            + ", ".join(f"{n} {allocation.choice.count(n)}" for n in names if n in allocation.choice))
        sub = None if state_dir is None else Path(state_dir) / f"budget-{state_name(name)}"
        blocks, records = sequential_pass(source, windows, spec, config, first, points, allocation, limit, sub,
                                          name, log)
        outcome.mixes[name] = Mix(name, kind, names, allocation.lam, allocation.method, allocation.choice, blocks,
                                  records, limit)
        log(f"{name}: {outcome.mixes[name].effective_bits:.4f} effective bits per weight (budget "
            f"{config.bits_budget})")
    # The hybrid's choices are the decisions of the run (margins are then against the unconstrained best).
    outcome.decisions = [dataclasses.replace(d, chosen=c) for d, c in zip(first.decisions,
                                                                          outcome.mixes[HYBRID].chosen)]
    return outcome
