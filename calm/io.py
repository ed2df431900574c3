"""Save and load quantized models and per-block search state. Every file is written atomically (temp + rename).

Saved model folder:
- `model.safetensors`: the whole state dict (packed buffers of calm.nn modules, float tensors elsewhere);
  tensors shared by tied weights are stored once.
- `config.json` + tokenizer files: the base model's Hugging Face config and tokenizer.
- `quantization_config.json`: {"format": "calm-v1", "modules": {name: quant_config}, "tied": [[alias, source]]}.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

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


def install_quantized_modules(root: nn.Module, manifest: dict[str, dict[str, Any]], prefix: str = "") -> None:
    """Replace the named submodules of `root` with empty quantized modules described by `manifest`."""
    for full_name, cfg in manifest.items():
        if not full_name.startswith(prefix):
            continue
        name = full_name[len(prefix):]
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        old = getattr(parent, child)
        new = build_quantized_linear(cfg)
        ref = next(old.parameters(), None) if isinstance(old, nn.Module) else None
        if ref is None:
            ref = next(old.buffers(), None)
        setattr(parent, child, new.to(ref.device) if ref is not None else new)


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


def save_quantized(model: nn.Module, tokenizer, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state, tied = _dedupe(model.state_dict())
    manifest = {"format": FORMAT, "modules": quantized_manifest(model), "tied": tied, **(extra or {})}
    with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as staging:
        model.config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), out / name)
    atomic_save_tensors(out / WEIGHTS, state, metadata={"format": FORMAT})
    atomic_write_json(out / QUANT_CONFIG, manifest)


def load_quantized(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Rebuild a model saved by `save_quantized`: (model, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(path)
    if not (src / QUANT_CONFIG).is_file():
        raise FileNotFoundError(f"{src} holds no {QUANT_CONFIG}: not a model saved by calm")
    manifest = json.loads((src / QUANT_CONFIG).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{src / QUANT_CONFIG} has format {manifest.get('format')!r}; this calm reads {FORMAT}")
    config = AutoConfig.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_quantized_modules(model, manifest["modules"])
    state = load_file(str(src / WEIGHTS))
    for alias, source in manifest.get("tied", []):
        state[alias] = state[source]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not any(k == a for a, _ in manifest.get("tied", []))]
    if missing or unexpected:
        raise ValueError(f"saved state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(str(src)) if (src / "tokenizer_config.json").is_file() else None
    return model.to(device), tokenizer


def save_block_state(path: Path, block: nn.Module) -> None:
    """A quantized block's tensors and module manifest, for resuming a search."""
    manifest = quantized_manifest(block)
    atomic_save_tensors(path, dict(block.state_dict()), metadata={"manifest": json.dumps(manifest)})


def load_block_state(path: Path, float_block: nn.Module) -> nn.Module:
    """A copy of `float_block` with the quantized modules and tensors stored at `path`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["manifest"])
    block = copy.deepcopy(float_block)
    install_quantized_modules(block, manifest)
    block.load_state_dict(load_file(str(path)), strict=True)
    return block
