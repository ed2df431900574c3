"""Block streaming (sequential onloading): the float model is never materialized whole.

A `ModelSource` owns the model's skeleton and hands out its pieces on the compute device when their turn
comes: the embeddings (to turn token windows into block-0 inputs), one decoder block at a time, and the head
(final norm + LM head). After use a piece is released: its weights go back to the `meta` device (read from the
checkpoint again when needed) or, for a model given in memory, back to where it lives. So at any time the device
holds one float block (plus what the caller keeps: the candidate being fitted, the calibration activations).

Two sources:
- `CheckpointSource`: a Hugging Face folder of safetensors files (one file or sharded with an index). The
  skeleton is built on the meta device (parameters only: buffers such as the rotary tables are real and
  small); a piece is read from the files with `safe_open` and assigned. A `.gguf` file is converted once to
  such a folder in calm's cache (calm.model), then streamed.
- `MemorySource`: a model already in memory (`calm.quantize(model, ...)`): pieces are moved to the compute
  device and back; nothing is read.
Weights are cast to the compute dtype on load. With a residual rotation (calm.residual_rotation) every piece is
rotated as it is loaded, so the rotated float model never exists whole either.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from calm import arch
from calm.arch import decoder_blocks
from calm.config import CalmUsageError
from calm.model import BlockInputs, run_block

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Default activation budget: this share of the device's free memory when the search starts; the rest is for the
# float block, the candidates being fitted (Hessians, copies) and evaluation logits.
ACTIVATION_SHARE = 0.4
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# Device memory one block's search needs, in blocks: the float block, a candidate's deep copy being quantized,
# and room for Hessians and outputs.
BLOCK_ROOM = 3
SAFETENSORS_SINGLE = "model.safetensors"

# Applied to a piece right after it is loaded: (kind, index or None, module) with kind in
# {"embed", "block", "head"}; the residual rotation uses it.
LoadHook = Callable[[str, "int | None", nn.Module], None]


def return_freed_memory() -> None:
    """Make glibc hand freed buffers of 1 MiB and more back to the system at once.

    Streaming frees a block's weights after every block; glibc's dynamic mmap threshold rises to the size of
    the first large buffer freed, so later blocks' weights came from the heap and stayed resident: on the
    default model a streamed evaluation grew by 300 MB that way (615 -> 913 MB), and did not grow with a fixed
    threshold. A process-wide setting, so the command line calls it, not the library."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):  # not glibc
            pass


def resolve_device(name: str) -> torch.device:
    """The compute device a `--device` value names; a CUDA device that is not there is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CalmUsageError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; install a "
                                 f"CUDA build of torch (README, 'Installing on a GPU machine') or use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CalmUsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices "
                                 f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype a `--dtype` value names ("auto": bfloat16 on CUDA, float32 on the CPU, where bfloat16
    runs several times slower)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class CheckpointReader:
    """Lazy access to the tensors of a Hugging Face checkpoint folder by name."""

    def __init__(self, folder: Path, prefix: str = "") -> None:
        self.folder = Path(folder)
        self.prefix = prefix  # a multimodal checkpoint's prefix of the language model's tensors
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / SAFETENSORS_SINGLE).is_file():
            from safetensors import safe_open

            path = self.folder / SAFETENSORS_SINGLE
            with safe_open(str(path), framework="pt") as f:
                self.files = {name: path for name in f.keys()}
        else:
            raise CalmUsageError(f"{self.folder} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}: calm streams "
                                 f"safetensors checkpoints (convert .bin weights with save_pretrained first)")

    def __contains__(self, name: str) -> bool:
        return self.prefix + name in self.files

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once for them and closed after: safetensors maps the file, and
        a handle kept open would keep every page read so far in this process's resident memory."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[self.prefix + name], []).append(name)
        out = {}
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                out.update({name: f.get_tensor(self.prefix + name).clone() for name in group})
        return out


def _module_prefix(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise ValueError("module is not part of the model")


def release_to_meta(module: nn.Module) -> None:
    """Drop a module's parameters and persistent buffers (they are re-read from the checkpoint when needed).
    Non-persistent buffers stay: the checkpoint does not hold them (Gemma's embedding scale, rotary tables)."""
    kept = [(m, name, b) for m in module.modules() for name, b in m._buffers.items()
            if b is not None and name in m._non_persistent_buffers_set]
    module.to("meta")
    for m, name, b in kept:
        m._buffers[name] = b


class ModelSource:
    """The float model, piece by piece on `device` in `dtype` (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.load_hooks: list[LoadHook] = []
        # Bytes of activations the search may keep on the device (None: a share of its free memory at start).
        self.activation_budget: int | None = None

    @property
    def config(self):
        return self.model.config

    @property
    def num_blocks(self) -> int:
        return len(decoder_blocks(self.model))

    def keeps_activations(self, nbytes: int) -> bool:
        """Whether `nbytes` of calibration activations stay on the device (else they live in CPU memory)."""
        if self.device.type == "cpu":
            return True
        budget = self.activation_budget
        if budget is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * ACTIVATION_SHARE)
        return nbytes <= budget

    def block_bytes(self) -> int:
        """Bytes one float decoder block takes in the compute dtype (the largest block)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return max(sum(p.numel() for p in b.parameters()) for b in decoder_blocks(self.model)) * size

    def check_device_room(self, free_bytes: int | None = None) -> None:
        """Refuse a device without room for one float block and the candidate being fitted (a copy of it and
        its Hessians): about BLOCK_ROOM times the block."""
        if self.device.type != "cuda":
            return
        if free_bytes is None:
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
        need = BLOCK_ROOM * self.block_bytes()
        if free_bytes < need:
            raise CalmUsageError(f"{self.device} has {free_bytes / 2 ** 30:.1f} GiB free, and one decoder block of "
                                 f"this model needs about {need / 2 ** 30:.1f} GiB there (the block, the candidate "
                                 f"being fitted, its Hessians): free the device, use a larger one, --dtype bfloat16, "
                                 f"or --device cpu")

    # Pieces --------------------------------------------------------------------------------------------------
    def embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def final_norm(self) -> nn.Module:
        return arch.final_norm(self.model)

    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def _materialize(self, module: nn.Module) -> None:
        raise NotImplementedError

    def _release(self, module: nn.Module) -> None:
        raise NotImplementedError

    def _run_hooks(self, kind: str, index: int | None, module: nn.Module) -> None:
        for hook in self.load_hooks:
            hook(kind, index, module)

    def load_block(self, index: int) -> nn.Module:
        """Float block `index` on the device (the model's own module, materialized)."""
        block = decoder_blocks(self.model)[index]
        self._materialize(block)
        self._run_hooks("block", index, block)
        return block

    def release_block(self, index: int) -> None:
        self._release(decoder_blocks(self.model)[index])

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        try:
            yield self.load_block(index)
        finally:
            self.release_block(index)

    def iter_blocks(self) -> Iterator[nn.Module]:
        """Every float block in turn, each released when the next is asked for."""
        for i in range(self.num_blocks):
            with self.block(i) as b:
                yield b

    @contextlib.contextmanager
    def _stage(self, kind: str, module: nn.Module, materialize=None) -> Iterator[nn.Module]:
        """`module` loaded on the device (and its load hooks run) for the duration of the `with`."""
        (materialize or self._materialize)(module)
        self._run_hooks(kind, None, module)
        try:
            yield module
        finally:
            self._release(module)

    @contextlib.contextmanager
    def embedding_stage(self) -> Iterator[nn.Module]:
        """The model with its embeddings on the device, to capture block-0 inputs (blocks stay unloaded)."""
        with self._stage("embed", self.embeddings()):
            yield self.model

    @contextlib.contextmanager
    def head_stage(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """(final norm, LM head) on the device."""
        norm, head = self.final_norm(), self.head()
        with self._stage("head", nn.ModuleList([norm, head]), lambda _: self._materialize_head(norm, head)):
            yield norm, head

    def _materialize_head(self, norm: nn.Module, head: nn.Module) -> None:
        self._materialize(norm)
        self._materialize(head)

    @contextlib.contextmanager
    def norm_stage(self) -> Iterator[nn.Module]:
        """The final norm alone on the device."""
        with self._stage("norm", self.final_norm()) as norm:
            yield norm

    def consumer_norm(self, index: int) -> nn.Module:
        """A copy of the norm that first reads block `index`'s output (the next block's first pre-norm, or the
        final norm), on the device; an identity where the next block reads the stream as it is (OLMo 2)."""
        if index + 1 < self.num_blocks:
            with self.block(index + 1) as nxt:
                sites = arch.layout_of(nxt).norm_sites
                return _with_gain(nxt, nxt.get_submodule(sites[0].norm)) if sites else nn.Identity()
        with self.norm_stage() as norm:
            return _with_gain(decoder_blocks(self.model)[0], norm)

    # Passes over the rest of the model ------------------------------------------------------------------------
    def run_tail(self, index: int, hidden: list[torch.Tensor], inputs: BlockInputs) -> list[torch.Tensor]:
        """The outputs of the float blocks after block `index` when block `index` output `hidden`."""
        state = inputs.with_hidden(hidden)
        for j in range(index + 1, self.num_blocks):
            with self.block(j) as block:
                state = state.at_layer(j)
                state = state.with_hidden(run_block(block, state))
        return state.hidden

    def final_states(self, hidden: list[torch.Tensor], inputs: BlockInputs) -> list[torch.Tensor]:
        """The final norm of the last block's outputs: what the LM head reads."""
        with self.norm_stage() as norm, torch.no_grad():
            return inputs.store([norm(inputs.with_hidden(hidden).batch(i)).detach() for i in range(len(hidden))])

    def window_nll(self, hidden: list[torch.Tensor], inputs: BlockInputs, windows: torch.Tensor) -> torch.Tensor:
        """Mean next-token NLL of each window (n,), float64, from the last block's outputs `hidden` (one tensor
        per batch of `windows`): final norm and LM head, one window at a time so that the logits of a single
        window (T x vocabulary) are the largest thing held."""
        from calm.evaluate import token_nll

        state = inputs.with_hidden(hidden)
        nll = []
        cap = arch.logit_softcap(self.model)
        with self.head_stage() as (norm, head), torch.no_grad():
            start = 0
            for i in range(len(state)):
                h = state.batch(i)
                for row in range(h.shape[0]):
                    ids = windows[start + row:start + row + 1]
                    nll.append(token_nll(arch.apply_softcap(head(norm(h[row:row + 1])), cap), ids).mean(1).cpu())
                start += h.shape[0]
        return torch.cat(nll)

    def close(self) -> None:
        pass


def _with_gain(block: nn.Module, norm: nn.Module) -> nn.Module:
    """A copy of `norm` carrying the gain it multiplies by (`calm_gain`: w, or 1 + w in Gemma's norms)."""
    out = copy.deepcopy(norm)
    out.calm_gain = arch.norm_gain(block, norm)
    return out


class MemorySource(ModelSource):
    """A model already in memory: pieces move to the compute device and back to where they live."""

    def __init__(self, model: nn.Module, tokenizer, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__(model, tokenizer, torch.device(device), dtype)
        ref = next(model.parameters())
        self.home = ref.device
        if ref.dtype != dtype and self.device != self.home:
            # Each piece would be cast on the way to the device and back: refuse the silent precision loss.
            raise CalmUsageError(f"the model is {ref.dtype} on {self.home}; cast it to {dtype} first or pass "
                                 f"dtype={ref.dtype}")
        if ref.dtype != dtype:
            model.to(dtype)
        arch.unfuse_experts(model)

    def _materialize(self, module: nn.Module) -> None:
        module.to(self.device)

    def _release(self, module: nn.Module) -> None:
        module.to(self.home)


class CheckpointSource(ModelSource):
    """A checkpoint folder streamed with `safe_open`; the skeleton's parameters live on `meta` when unloaded."""

    def __init__(self, folder: Path, tokenizer, device: torch.device | str, dtype: torch.dtype) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        stored_config = AutoConfig.from_pretrained(str(folder))
        config = arch.language_config(stored_config)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        arch.unfuse_experts(model)
        model.eval()
        model.config.use_cache = False
        super().__init__(model, tokenizer, torch.device(device), dtype)
        self.reader = CheckpointReader(folder, arch.checkpoint_prefix(stored_config))
        for module in model.modules():  # the real buffers (rotary tables) are small: they live on the device
            for name, buf in module._buffers.items():
                if buf is not None and buf.device.type != "meta":
                    module._buffers[name] = buf.to(self.device)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.tied:
            # One parameter for both on meta: the head is materialized from the embedding's tensor.
            self.head().weight = self.embeddings().weight

    def _materialize(self, module: nn.Module, names: dict[str, str] | None = None) -> None:
        prefix = _module_prefix(self.model, module)
        wanted = {key: (names or {}).get(key, arch.checkpoint_name(self.model, prefix + key))
                  for key in module.state_dict(keep_vars=True)}
        missing = [n for n in wanted.values() if n not in self.reader]
        if missing:
            raise CalmUsageError(f"{self.reader.folder} has no tensor {missing[0]!r}: the checkpoint does not match "
                                 f"its config.json")
        tensors = self.reader.read(list(wanted.values()))
        state = {key: tensors[name].to(self.device, self.dtype) for key, name in wanted.items()}
        module.load_state_dict(state, strict=True, assign=True)

    def _materialize_head(self, norm: nn.Module, head: nn.Module) -> None:
        self._materialize(norm)
        head_prefix = _module_prefix(self.model, head)
        if head_prefix + "weight" not in self.reader:  # tied: the checkpoint stores the embedding only
            embed_prefix = _module_prefix(self.model, self.embeddings())
            self._materialize(head, {"weight": embed_prefix + "weight"})
        else:
            self._materialize(head)

    def _release(self, module: nn.Module) -> None:
        release_to_meta(module)

