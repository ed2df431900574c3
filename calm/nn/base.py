"""What every calm.nn quantized linear shares: the registry, the rebuild-from-config path and the bit accounting.

Each quantized module holds plain buffers only (no tensor subclasses), so `state_dict` / safetensors carry
everything. It describes itself with `quant_config()` (a JSON-able dict) and is rebuilt empty from it by
`build_quantized_linear(config)` before its state is loaded: that is how `calm.load` restores a model.

Bit accounting. A module's `stored_bits()` is the size of its state dict, bit for bit what `calm.io` writes to
`model.safetensors` for it: sum of numel * element size * 8 over every persistent buffer (codes, scales, zero
points, codebooks, permutations, outliers, transform factors and norms), recursing into a wrapped linear,
except the float `bias` (a float model's bias is not counted either, so both sides of a comparison leave it
out). `effective_bits` is that divided by in_features * out_features. Buffers that hold no information (a
symmetric grid's constant zero point, a Hadamard transform rebuilt from the layer's size) are registered
non-persistent: the kernels still read them, nothing saves or counts them. `model_effective_bits` is the
stored bits of every decoder linear over their weights, float linears at 16 bits per weight.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# kind -> class; filled by `register` as calm.nn's modules are imported.
QUANTIZED_LINEARS: dict[str, type[nn.Module]] = {}


def register(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make `cls` (with a unique `kind`) rebuildable by `build_quantized_linear`."""
    kind = getattr(cls, "kind", None)
    if not kind or QUANTIZED_LINEARS.get(kind, cls) is not cls:
        raise ValueError(f"quantized linear {cls.__name__} needs a unique `kind`, got {kind!r}")
    QUANTIZED_LINEARS[kind] = cls
    return cls


def is_quantized_linear(module: nn.Module) -> bool:
    return isinstance(module, tuple(QUANTIZED_LINEARS.values()))


def build_quantized_linear(cfg: dict[str, Any]) -> nn.Module:
    """An empty module of the kind `cfg` describes, ready for `load_state_dict`."""
    kind = cfg.get("kind")
    if kind not in QUANTIZED_LINEARS:
        raise ValueError(f"unknown quantized module kind {kind!r}; known: {sorted(QUANTIZED_LINEARS)}")
    return QUANTIZED_LINEARS[kind].from_quant_config(cfg)


def stored_bits(module: nn.Module) -> int:
    """Bits of everything `module` saves (its state dict, nested modules included) except float biases."""
    return sum(t.numel() * t.element_size() * 8 for name, t in module.state_dict().items()
               if name.rpartition(".")[2] != "bias")


class QuantizedLinear(nn.Module):
    """Base of the packed linears: derived caches dropped when buffers move or load, and exact bit accounting.

    Subclasses set `kind`, `in_features`, `out_features`, list their caches in `_CACHES`, and may declare
    `_derived_entries()`: non-persistent buffers that older checkpoints still carry, dropped on load after a
    check that the saved value is the one the module derives.
    """

    kind: str
    in_features: int
    out_features: int
    _CACHES: tuple[str, ...] = ()

    def _drop_caches(self) -> None:
        for name in self._CACHES:
            setattr(self, name, None)

    def _apply(self, fn, recurse=True):
        self._drop_caches()
        return super()._apply(fn, recurse)

    def _derived_entries(self) -> dict[str, torch.Tensor]:
        """name -> buffer that is not saved because it is derived from the config (see the class docstring)."""
        return {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._drop_caches()
        for name, buf in self._derived_entries().items():
            saved = state_dict.pop(prefix + name, None)
            if saved is not None and not torch.equal(saved.to(device=buf.device, dtype=buf.dtype), buf):
                raise ValueError(f"{prefix}{name} in the saved state differs from the value this "
                                 f"{type(self).__name__} derives from its configuration; it is not stored")
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def stored_bits(self) -> int:
        """Bits this module saves (see the module docstring): everything in its state dict but the bias."""
        return stored_bits(self)

    @property
    def effective_bits(self) -> float:
        """Stored bits per weight: `stored_bits()` / (in_features * out_features), the float bias excluded."""
        return self.stored_bits() / (self.in_features * self.out_features)


def dense_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CPU reference forward of a packed linear. Dequantizing once and keeping the dense copy makes
    repeated forwards (search, evaluation) cost a plain matmul; the packed buffers stay the source of truth
    (`release_caches` and `_apply` drop the copy)."""
    if module._dense_cache is None or module._dense_cache.dtype != x.dtype:
        module._dense_cache = module.dequantized_weight(x.dtype)
    return nn.functional.linear(x, module._dense_cache, module.bias)


def release_caches(module: nn.Module) -> None:
    """Drop the dense weights that CPU forwards keep, so idle quantized blocks take their packed size only."""
    for m in module.modules():
        if hasattr(m, "_dense_cache"):
            m._dense_cache = None


def top_level_linears(module: nn.Module) -> dict[str, nn.Module]:
    """Float and quantized linears of `module` by name, not descending into a quantized linear (a
    KVQuantLinear's inner linear is part of it, not a layer of its own)."""
    found: dict[str, nn.Module] = {}
    for name, m in module.named_modules():
        if any(name.startswith(p + ".") for p in found):
            continue
        if isinstance(m, nn.Linear) or is_quantized_linear(m):
            found[name] = m
    return found


def weight_bits(module: nn.Module) -> tuple[float, int]:
    """(stored bits, weights) of a linear: a quantized module's `stored_bits()`, a float one at 16 per weight."""
    if is_quantized_linear(module):
        return float(module.stored_bits()), module.in_features * module.out_features
    n = module.weight.numel()
    return 16.0 * n, n


def block_stored_bits(block: nn.Module) -> tuple[int, int]:
    """(stored bits, weights) of every linear of a decoder block, as exact integers: what `model_effective_bits`
    sums for it (a bit budget is checked on these, never on a rounded ratio)."""
    bits = weights = 0
    for m in top_level_linears(block).values():
        if is_quantized_linear(m):
            bits += m.stored_bits()
            weights += m.in_features * m.out_features
        else:
            bits += 16 * m.weight.numel()
            weights += m.weight.numel()
    return bits, weights


def model_effective_bits(blocks: list[nn.Module]) -> float:
    """Stored bits per weight over every linear of the given decoder blocks (embeddings and head are not
    counted): total stored bits of the linears / their total weights, float linears at 16 bits."""
    bits = weights = 0.0
    for block in blocks:
        for m in top_level_linears(block).values():
            b, n = weight_bits(m)
            bits += b
            weights += n
    return bits / weights if weights else 16.0
