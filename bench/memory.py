"""Peak memory and wall time of `python -m calm.run`, per scenario, into bench/results/memory-<device>.json.

Scenarios (issue "Quantize models that do not fit"):
- `default`: `make run`'s settings (SmolLM2-135M, W3A16G64, rtn,gptq, 16 x 512 calibration, 16384 evaluation
  tokens). Target: peak resident memory <= 1.5 GB.
- `llama7b`: a Llama-2-7B-shaped checkpoint (32 blocks, hidden 4096, MLP 11008, vocabulary 32000) of random
  bfloat16 weights, written here shard by shard (one block's tensors at a time, ~13.5 GB on disk, deleted
  afterwards), run with `--pool rtn --calib-windows 4 --eval-tokens 2048`. Target: peak resident memory <= 6 GB
  on the CPU; on a GPU, with `--pool rtn,gptq`, peak device memory <= 12 GB.
- `default-gpu` (CUDA only): the default search on the GPU. Target: search <= 30 s on an H100-class device.

Each run is a child process; its peak resident memory is the kernel's own count for that child (`os.wait4`'s
rusage, ru_maxrss), its per-stage seconds and peak device memory come from the run's results.json.

    python bench/memory.py                      # every scenario this machine can run
    python bench/memory.py --scenarios default  # one
    python bench/memory.py --quick              # a smoke run: 2-block 7B-shaped model, small calibration
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calm.io import atomic_write_json  # noqa: E402

LLAMA7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
SHARD_BYTES = 2 << 30


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    return "cpu"


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


def block_tensors(config: dict, index: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One decoder block's weights, random (scaled like an initialized model), bfloat16."""
    h, m = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
              "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
              "mlp.gate_proj.weight": (m, h), "mlp.up_proj.weight": (m, h), "mlp.down_proj.weight": (h, m)}
    out = {f"model.layers.{index}.{k}": (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
           for k, s in shapes.items()}
    out[f"model.layers.{index}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out[f"model.layers.{index}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def checkpoint_pieces(config: dict, seed: int = 0):
    """The checkpoint's tensors piece by piece: embeddings, each block, final norm and head."""
    gen = torch.Generator().manual_seed(seed)
    v, h = config["vocab_size"], config["hidden_size"]
    yield {"model.embed_tokens.weight": (torch.randn(v, h, generator=gen) * 0.02).to(torch.bfloat16)}
    for i in range(config["num_hidden_layers"]):
        yield block_tensors(config, i, gen)
    yield {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
           "lm_head.weight": (torch.randn(v, h, generator=gen) * 0.02).to(torch.bfloat16)}


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on the embedded text's calibration half (ids < vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from calm.data import load_split

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = load_split(None).calibration
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 8000), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((text[i:i + 10000] for i in range(0, len(text), 10000)), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(folder))


def write_checkpoint(folder: Path, config: dict) -> Path:
    """A Hugging Face folder (config, tokenizer, safetensors shards + index) written one piece at a time, so
    this process holds at most one block's tensors and one shard."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**config, tie_word_embeddings=False, torch_dtype="bfloat16").save_pretrained(str(folder))
    write_tokenizer(folder, config["vocab_size"])
    weight_map, shard, shard_bytes, files, total = {}, {}, 0, [], 0

    def flush():
        nonlocal shard, shard_bytes
        name = f"shard-{len(files):05d}.safetensors"
        save_file(shard, str(folder / name))
        files.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for piece in checkpoint_pieces(config):
        size = sum(t.numel() * t.element_size() for t in piece.values())
        if shard and shard_bytes + size > SHARD_BYTES:
            flush()
        shard.update(piece)
        shard_bytes += size
        total += size
    flush()
    n = len(files)
    for i, (name, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(folder / name, folder / final)
        weight_map.update({k: final for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return folder


# A child inherits its parent's resident high-water mark across fork and exec (Linux keeps ru_maxrss), so the
# run is started by this small launcher: the run's own figure then starts from the launcher's few MB, not from
# this script's (which may have held a checkpoint's tensors).
LAUNCHER = """
import json, os, subprocess, sys
argv, log = json.loads(sys.argv[1]), sys.argv[2]
with open(log, "w") as out:
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}))
"""


def run_measured(argv: list[str], log_path: Path) -> tuple[int, float, float]:
    """(exit code, peak resident memory in GB, wall seconds) of `python -m calm.run argv` as a child."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    command = [sys.executable, "-m", "calm.run", *argv]
    done = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(command), str(log_path)], env=env,
                          cwd=str(ROOT), capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout)
    return measured["code"], measured["maxrss_kib"] / 2 ** 20, time.perf_counter() - start
def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


START_COMMIT = commit()  # the code the runs use (HEAD may move while a long scenario runs)


def record(name: str, argv: list[str], code: int, rss_gb: float, wall: float, results: dict | None,
           targets: dict[str, float]) -> dict:
    import transformers

    measured = {"peak_rss_gb": rss_gb}
    if results is not None:
        memory = results.get("memory", {})
        device_peaks = [m["peak_device_gb"] for m in memory.values() if "peak_device_gb" in m]
        if device_peaks:
            measured["peak_device_gb"] = max(device_peaks)
        measured["search_s"] = results.get("seconds", {}).get("search")
    met = {k: (measured.get(k) is not None and measured[k] <= v) for k, v in targets.items()}
    return {"scenario": name, "command": "python -m calm.run " + " ".join(argv), "exit_code": code,
            "device": device_description(), "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": START_COMMIT, "wall_s": wall, **measured,
            "stage_seconds": None if results is None else results.get("seconds"),
            "stage_memory": None if results is None else results.get("memory"),
            "perplexity": None if results is None else results.get("perplexity"),
            "effective_bits": None if results is None else results.get("effective_bits"),
            "targets": targets, "met": met}


def scenario(name: str, argv: list[str], work: Path, targets: dict[str, float]) -> dict:
    out = work / name
    argv = [*argv, "--output", str(out)]
    print(f"[memory] {name}: python -m calm.run {' '.join(argv)}", flush=True)
    code, rss, wall = run_measured(argv, work / f"{name}.log")
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
    rec = record(name, argv, code, rss, wall, results, targets)
    print(f"[memory] {name}: exit {code}, peak RSS {rss:.2f} GB, {wall:.0f} s"
          + (f", search {rec['search_s']:.0f} s" if rec.get("search_s") else "")
          + (f", peak device {rec['peak_device_gb']:.2f} GB" if "peak_device_gb" in rec else "")
          + f"; targets met: {rec['met']}", flush=True)
    if code != 0:
        print((work / f"{name}.log").read_text()[-3000:], flush=True)
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--scenarios", default="default,llama7b" + (",default-gpu" if cuda else ""))
    p.add_argument("--quick", action="store_true", help="smoke run: small settings, 2-block 7B-shaped model")
    p.add_argument("--keep-checkpoint", default=None, help="write (or reuse) the 7B-shaped checkpoint here")
    p.add_argument("--blocks", type=int, default=None, help="decoder blocks of the 7B-shaped checkpoint (default 32; "
                   "peak memory does not depend on it when streaming, the time does)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"memory-{device_name()}.json"))
    args = p.parse_args()
    quick = ["--calib-windows", "2", "--eval-tokens", "1024"] if args.quick else []
    records = []
    with tempfile.TemporaryDirectory(prefix="calm-memory-") as tmp:
        work = Path(tmp)
        for name in args.scenarios.split(","):
            if name == "default":
                records.append(scenario(name, [*quick, "--device", "cpu"], work, {"peak_rss_gb": 1.5}))
            elif name == "default-gpu":
                records.append(scenario(name, [*quick, "--device", "cuda"], work, {"search_s": 30.0}))
            elif name == "llama7b":
                config = dict(LLAMA7B, num_hidden_layers=args.blocks or (2 if args.quick else 32))
                folder = Path(args.keep_checkpoint) if args.keep_checkpoint else work / "llama7b-checkpoint"
                need = 14e9 * config["num_hidden_layers"] / 32 + 1e9
                free = shutil.disk_usage(folder.parent if folder.parent.exists() else work).free
                if not (folder / "config.json").is_file():
                    if free < need:
                        raise SystemExit(f"bench/memory.py: the 7B-shaped checkpoint needs {need / 1e9:.0f} GB "
                                         f"of disk, {free / 1e9:.0f} GB free at {folder.parent}")
                    print(f"[memory] writing the 7B-shaped checkpoint to {folder}", flush=True)
                    write_checkpoint(folder, config)
                try:
                    base = ["--model", str(folder), "--calib-windows", "4", "--eval-tokens", "2048", "--no-baselines"]
                    label = name if config["num_hidden_layers"] == 32 else f"{name}-{config['num_hidden_layers']}blocks"
                    records.append(scenario(label, [*base, "--pool", "rtn", "--device", "cpu"], work,
                                            {"peak_rss_gb": 6.0}))
                    if cuda:
                        records.append(scenario(name + "-gpu", [*base, "--pool", "rtn,gptq", "--device", "cuda"],
                                                work, {"peak_device_gb": 12.0}))
                finally:
                    if not args.keep_checkpoint:
                        shutil.rmtree(folder, ignore_errors=True)
            else:
                raise SystemExit(f"unknown scenario {name!r}")
    atomic_write_json(Path(args.out), records)
    print(f"[memory] wrote {args.out}")
    return 0 if all(r["exit_code"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
