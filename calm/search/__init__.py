"""The CALM search: for every decoder block, quantize it with each candidate, score by linear CKA, keep the best.

Per block l (inputs X captured on the calibration windows):
1. FP outputs Y = block(X); the FP self term ||Yc^T Yc||_F^2 is computed once and shared by the candidates.
2. Every candidate quantizes a private copy of the float block on X; the copy runs on X; linear CKA between
   Y and its outputs is accumulated batch by batch, with MSE and relative error beside it. With separate
   scoring windows, X of step 2's scoring (and Y) come from those windows instead; fitting stays on X.
   `SearchConfig.score` picks the scorer (`scoring.SCORERS`): what CKA compares (`score_features`); with
   `cka-final` the model's last normalized hidden states after the float blocks that follow, and MSE / relative
   error are of those. Score `nll` goes one step further: the LM head's next-token NLL on those windows (lowest
   wins); CKA, MSE and relative error are then of the block outputs, as with `cka`.
3. The highest CKA (lowest NLL with score `nll`) wins; values within `tie_tolerance` are a tie, broken by
   lower MSE (CKA is blind to a pure rescaling of the output, MSE is not). A candidate whose quantization
   breaks down numerically, or whose score is NaN or infinite, is recorded as failed (with the reason) and
   never wins; when every candidate of a block fails the search stops with `AllCandidatesFailed`.
4. Each candidate's quantized block and the decision are written to `state_dir` as they are made
   (`state.BlockStateStore`), so an interrupted search resumes at the first undecided block.
5. Propagation (`propagation.propagate`): greedy (X <- chosen block's outputs) or independent (X <- Y).
After the search, `check_models` gives whole-model NLLs of the hybrid and of each uniform member on the
scoring windows: calm.run's final check keeps the lowest, since no per-block score sees how errors compound.

Modules: `decision` (scores, choice, failures), `scoring` (one scorer per score), `candidates` (the door to
the algorithm registry), `state` (resume files), `propagation`, `loop` (`calm_search` itself).
"""
from __future__ import annotations

from calm.search.candidates import candidate_options
from calm.search.decision import AllCandidatesFailed, BlockDecision, CandidateScore, choose, numerical_failure
from calm.search.loop import Log, SearchOutcome, calm_search, check_models, install_blocks
from calm.search.propagation import propagate
from calm.search.scoring import SCORERS, Scorer, block_scores, make_scorer, score_features
from calm.search.state import BlockStateStore, check_saved_options, state_name

__all__ = ["SCORERS", "AllCandidatesFailed", "BlockDecision", "BlockStateStore", "CandidateScore", "Log", "Scorer",
           "SearchOutcome", "block_scores", "calm_search", "candidate_options", "check_models", "check_saved_options",
           "choose", "install_blocks", "make_scorer", "numerical_failure", "propagate",
           "score_features", "state_name"]
