"""Save and load quantized models and per-block search state. Every file is written atomically (temp + rename).

Saved model folder:
- the state dict (packed buffers of calm.nn modules, float tensors elsewhere) as safetensors in Hugging Face's
  layout: `model.safetensors` when it fits one shard, else `model-0000i-of-0000n.safetensors` shards with a
  `model.safetensors.index.json` weight map; tensors shared by tied weights are stored once. Written piece
  by piece (`ShardedWriter`), so a streamed model is saved without ever being whole in memory.
- `config.json` + tokenizer files: the base model's Hugging Face config and tokenizer; config.json also carries
  `quantization_config` = {"quant_method": "calm", "format", "modules", "tied"}, for transformers
  (calm.hf_quantizer).
- `quantization_config.json`: {"format": "calm-v1", "modules": {name: quant_config}, "tied": [[alias, source]]}.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from calm.arch import unfuse_experts
from calm.nn import build_quantized_linear, is_quantized_linear

FORMAT = "calm-v1"
QUANT_CONFIG = "quantization_config.json"
WEIGHTS = "model.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def quantized_manifest(module: nn.Module, prefix: str = "") -> dict[str, dict[str, Any]]:
    return {f"{prefix}{name}": m.quant_config() for name, m in module.named_modules() if is_quantized_linear(m)}


def install_quantized_modules(root: nn.Module, manifest: dict[str, dict[str, Any]], prefix: str = "",
                              device: torch.device | str | None = None) -> None:
    """Replace the named submodules of `root` with empty quantized modules described by `manifest`, on
    `device` (default: where the replaced module is; never `meta`, whose non-persistent buffers would be
    empty)."""
    for full_name, cfg in manifest.items():
        if not full_name.startswith(prefix):
            continue
        name = full_name[len(prefix):]
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        old = getattr(parent, child)
        new = build_quantized_linear(cfg)
        target = device
        if target is None:
            ref = next(old.parameters(), None) if isinstance(old, nn.Module) else None
            if ref is None:
                ref = next(old.buffers(), None)
            target = ref.device if ref is not None and ref.device.type != "meta" else None
        setattr(parent, child, new.to(target) if target is not None else new)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    tied: list[list[str]] = []
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            tied.append([key, seen[ident]])
            continue
        seen[ident] = key
        unique[key] = t
    return unique, tied


WEIGHTS_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 << 30  # 2 GiB shards: Hugging Face's default is 5 GB; smaller ones keep peak memory low


class ShardedWriter:
    """Writes a model's tensors, given piece by piece, into safetensors shards of at most `max_shard_bytes`
    (a tensor larger than that gets a shard of its own) in a staging folder; `finish` names them in Hugging
    Face's layout, writes the index and moves everything into `out`. Only the current shard is held."""

    def __init__(self, out: Path, max_shard_bytes: int | None = None, file_format: str = FORMAT) -> None:
        self.out = Path(out)
        self.file_format = file_format  # the safetensors metadata "format": calm-v1, or "pt" for other readers
        self.out.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(dir=self.out, prefix=".staging-"))
        self.max_shard_bytes = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
                self._flush()
            self.pending[name] = t.detach().contiguous().cpu()
            self.pending_bytes += nbytes
            self.total_bytes += nbytes

    def _flush(self) -> None:
        save_file(self.pending, str(self.staging / f"shard-{len(self.shards):05d}"),
                  metadata={"format": self.file_format})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = [WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for old in list(self.out.glob("model*.safetensors")) + [self.out / WEIGHTS_INDEX]:
            old.unlink(missing_ok=True)  # a previous save with another sharding
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes, "format": self.file_format},
                     "weight_map": {k: names[i] for i, keys in enumerate(self.shards) for k in keys}}
            atomic_write_json(self.staging / WEIGHTS_INDEX, index)
        for i, name in enumerate(names):
            os.replace(self.staging / f"shard-{i:05d}", self.staging / name)
        for entry in os.listdir(self.staging):
            os.replace(self.staging / entry, self.out / entry)
        os.rmdir(self.staging)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def add_transformers_quantization_config(config_json: Path, manifest: dict[str, Any]) -> None:
    """config.json's `quantization_config` (quant_method "calm"): transformers builds the model through calm's
    quantizer when calm is imported (calm.hf_quantizer)."""
    config = json.loads(config_json.read_text())
    config["quantization_config"] = {"quant_method": "calm", "format": manifest["format"],
                                     "modules": manifest["modules"], "tied": manifest.get("tied", []),
                                     "guard": manifest.get("guard")}
    atomic_write_json(config_json, config)


def load_guard(manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor that makes transformers without calm refuse the folder, and its name in the manifest.

    transformers 5 only warns about an unknown quant_method and would build a float model with random weights
    in place of the packed ones. An empty tensor under the float weight name of one quantized linear makes it
    stop instead, on a size mismatch ("ckpt: torch.Size([0])") naming that linear. calm's readers drop it;
    calm's transformers quantizer lists it as an expected unexpected key."""
    name = next((n for n in manifest["modules"] if ".experts." not in n), None)
    if name is None:
        return {}
    manifest["guard"] = f"{name}.weight"
    return {manifest["guard"]: torch.zeros(0)}


def without_guard(state: dict[str, torch.Tensor], manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A shard's tensors without the load guard (`load_guard`)."""
    guard = manifest.get("guard")
    return {k: v for k, v in state.items() if k != guard} if guard in state else state


def save_model_files(out: Path, config, tokenizer, manifest: dict[str, Any],
                     pieces: Iterable[dict[str, torch.Tensor]]) -> None:
    """The saved model folder from its config, tokenizer, manifest and state dict pieces (in order)."""
    writer = ShardedWriter(out)
    try:
        config.save_pretrained(str(writer.staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(writer.staging))
        for piece in pieces:
            writer.add(piece)
        # After the pieces: a streamed save fills the manifest's modules as it writes them.
        writer.add(load_guard(manifest))
        add_transformers_quantization_config(writer.staging / "config.json", manifest)
        atomic_write_json(writer.staging / QUANT_CONFIG, manifest)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def save_quantized(model: nn.Module, tokenizer, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Save a quantized model held in memory."""
    state, tied = _dedupe(model.state_dict())
    manifest = {"format": FORMAT, "modules": quantized_manifest(model), "tied": tied, **(extra or {})}
    save_model_files(Path(path), model.config, tokenizer, manifest, [state])


def _weight_files(src: Path) -> list[Path]:
    if (src / WEIGHTS_INDEX).is_file():
        weight_map = json.loads((src / WEIGHTS_INDEX).read_text())["weight_map"]
        return [src / f for f in dict.fromkeys(weight_map.values())]
    if (src / WEIGHTS).is_file():
        return [src / WEIGHTS]
    raise FileNotFoundError(f"{src} has no {WEIGHTS} or {WEIGHTS_INDEX}")


def load_quantized(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Rebuild a model saved by calm: (model, tokenizer). The model is built on the meta device and the saved
    tensors are assigned shard by shard on `device` (float weights in `dtype`), so no float copy of the model
    is made first."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(path)
    if not (src / QUANT_CONFIG).is_file():
        raise FileNotFoundError(f"{src} holds no {QUANT_CONFIG}: not a model saved by calm")
    manifest = json.loads((src / QUANT_CONFIG).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{src / QUANT_CONFIG} has format {manifest.get('format')!r}; this calm reads {FORMAT}")
    config = AutoConfig.from_pretrained(str(src))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_experts(model)  # calm quantizes and saves MoE experts one by one (calm.arch)
    install_quantized_modules(model, manifest["modules"], device=device)
    # Assigned tensors keep their dtype: give each the model's (float weights in `dtype`, an older format's
    # int64 permutation as today's int16/int32).
    dtypes = {name: t.dtype for name, t in model.state_dict(keep_vars=True).items()}
    tied = {alias: source for alias, source in manifest.get("tied", [])}
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in _weight_files(src):
        state = without_guard(load_file(str(file), device=str(device)), manifest)
        state = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in state.items()}
        state.update({alias: state[source] for alias, source in tied.items() if source in state})
        # Modules consume what an older format stored and they rebuild; only what nobody takes is unexpected.
        unexpected += model.load_state_dict(state, strict=False, assign=True).unexpected_keys
        loaded.update(state)
    missing = sorted(set(model.state_dict()) - loaded)
    if missing or unexpected:
        raise ValueError(f"saved state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False) and not tied:
        model.tie_weights()
    model.eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(str(src)) if (src / "tokenizer_config.json").is_file() else None
    return model.to(device), tokenizer


def save_block_state(path: Path, block: nn.Module) -> None:
    """A quantized block's tensors and module manifest, for resuming a search."""
    manifest = quantized_manifest(block)
    atomic_save_tensors(path, dict(block.state_dict()), metadata={"manifest": json.dumps(manifest)})


def load_block_state(path: Path, float_block: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """The quantized block stored at `path`, built from a copy of `float_block` (whose weights may be unloaded,
    on the meta device) on `device` (default: the float block's)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["manifest"])
    if device is None:
        ref = next(float_block.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
    block = copy.deepcopy(float_block)
    install_quantized_modules(block, manifest, device=device)
    block.load_state_dict(load_file(str(path), device=str(device)), strict=True, assign=True)
    return block.to(device)
