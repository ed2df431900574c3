"""The search's state on disk: every candidate's quantized block and each block's decision, written as they are
made (atomically), so that an interrupted search resumes at the first undecided block.

Layout of `state_dir`: `block_NNN.json` (the decision, with every candidate's options) and
`block_NNN-<candidate>.safetensors` (each candidate's block; none for a candidate whose quantization failed).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from calm.config import CalmUsageError
from calm.io import atomic_write_json, load_block_state, save_block_state
from calm.nn import release_caches
from calm.search.decision import BlockDecision


class StoredBlock:
    """A candidate's quantized block: held in memory (on the CPU, caches released), or only in the search's state
    folder and read back when asked for, so that the search keeps one block per layer in memory at most."""

    def __init__(self, module: nn.Module | None = None, path: Path | None = None) -> None:
        if module is None and path is None:
            raise ValueError("a stored block needs a module or a path")
        self.module, self.path = module, path

    def load(self, skeleton: nn.Module, device: torch.device) -> nn.Module:
        """The block on `device` (`skeleton`: the float block, possibly unloaded, whose structure it shares)."""
        if self.module is not None:
            return self.module.to(device)
        return load_block_state(self.path, skeleton, device)

    def unload(self, module: nn.Module) -> None:
        if self.module is not None:
            release_caches(self.module.to("cpu"))

    def keep_in_memory(self, skeleton: nn.Module) -> "StoredBlock":
        """This block held in CPU memory (read from the state folder once)."""
        if self.module is None:
            self.module = release_caches_of(load_block_state(self.path, skeleton, torch.device("cpu")))
        return self


def release_caches_of(module: nn.Module) -> nn.Module:
    release_caches(module)
    return module


def state_name(name: str) -> str:
    """A candidate name (`gptq:act_order=static`) as a file-name part."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def check_saved_options(path: Path, saved: dict[str, dict], current: dict[str, dict]) -> None:
    """Saved blocks made with other algorithm settings (e.g. a default changed between calm versions) must not
    be reused silently."""
    changed = sorted(n for n in current if n in saved and saved[n] != current[n])
    if changed:
        details = "; ".join(f"{n}: saved {saved.get(n)} now {current[n]}" for n in changed)
        raise CalmUsageError(f"{path} was written with other settings for {', '.join(changed)} ({details}); "
                             f"resume with the calm version that wrote it, or pass a new --output")


def scoring_key(score: str, debiased_cka: bool) -> str:
    """What a decision's scores were computed with (`SearchConfig.score`, and the debiased CKA): a resumed search
    under another scoring scores the saved candidate blocks again instead of quantizing them again."""
    return score + ("+debiased" if debiased_cka else "")


def stamp_scoring(state_dir: Path, scoring: str) -> int:
    """Record `scoring` in the search's saved decisions (`state_dir/block_NNN.json`) that predate the record:
    they were scored with the run's saved settings. Returns the count of files changed. Run before a resumed
    search whose scoring may differ."""
    changed = 0
    for path in sorted(Path(state_dir).glob("block_[0-9][0-9][0-9].json")):
        saved = json.loads(path.read_text())
        if "scored_by" not in saved:
            atomic_write_json(path, {**saved, "scored_by": scoring})
            changed += 1
    return changed


@dataclasses.dataclass
class SavedBlock:
    """A block's saved decision, its candidate blocks (on disk; None for a candidate that failed), the scoring
    its scores were computed with, and the pool's candidates it has no block for (added to the pool since)."""
    decision: BlockDecision
    blocks: dict[str, StoredBlock | None]
    scored_by: str
    missing: tuple[str, ...] = ()


class BlockStateStore:
    """Per-block search state in `state_dir`; with `state_dir` None nothing is saved and nothing resumes.

    `options` (candidate name -> options with defaults, `candidate_options`) is written beside every decision
    and checked on resume; `scoring` (`scoring_key`) too, and a decision scored otherwise is loaded with its
    blocks for the search to score again."""

    def __init__(self, state_dir: Path | None, options: dict[str, dict], scoring: str = "cka") -> None:
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.options = options
        self.scoring = scoring

    def decision_path(self, index: int) -> Path:
        return self.state_dir / f"block_{index:03d}.json"

    def block_path(self, index: int, name: str) -> Path:
        return self.state_dir / f"block_{index:03d}-{state_name(name)}.safetensors"

    def save_block(self, index: int, name: str, block: nn.Module) -> None:
        if self.state_dir is not None:
            save_block_state(self.block_path(index, name), block)

    def save_decision(self, decision: BlockDecision) -> None:
        if self.state_dir is not None:
            atomic_write_json(self.decision_path(decision.index), {**decision.to_dict(),
                                                                    "candidate_options": self.options,
                                                                    "scored_by": self.scoring})

    def path_or_none(self, index: int, name: str) -> Path | None:
        return None if self.state_dir is None else self.block_path(index, name)

    def load(self, index: int) -> SavedBlock | None:
        """Block `index`'s saved state, or None when the block is not decided yet. Raises CalmUsageError when its
        blocks were made with other candidate options."""
        if self.state_dir is None:
            return None
        path = self.decision_path(index)
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        decision = BlockDecision.from_dict(saved)
        failed = decision.failed
        # Candidates the decision has no score for were added to the pool since: the search quantizes them.
        missing = tuple(n for n in self.options if n not in decision.scores)
        needed = {n: self.block_path(index, n) for n in self.options if n not in failed and n not in missing}
        if not all(p.is_file() for p in needed.values()):
            return None
        check_saved_options(path, saved.get("candidate_options", self.options), self.options)
        decision.scores = {n: s for n, s in decision.scores.items() if n in self.options}
        blocks: dict[str, StoredBlock | None] = {n: None for n in self.options if n not in missing}
        blocks.update({n: StoredBlock(path=p) for n, p in needed.items()})
        return SavedBlock(decision, blocks, saved.get("scored_by", self.scoring), missing)
