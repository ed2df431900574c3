"""transformers loads calm checkpoints: `import calm` then `AutoModelForCausalLM.from_pretrained(folder)`.

A calm model folder's `config.json` carries `quantization_config = {"quant_method": "calm", "format": "calm-v1",
"modules": {name: quant_config}, "tied": [[alias, source]]}` (written by calm.io, the same manifest as
`quantization_config.json`). transformers looks `quant_method` up in its registries; this module adds calm's
config (`CalmQuantizationConfig`) and quantizer (`CalmHfQuantizer`) to them with transformers'
`register_quantization_config` / `register_quantizer`. The quantizer replaces the manifest's linears, on the
meta device, with empty calm.nn modules of every kind (uniform, codebook, rotated, KV and activation wrappers),
so transformers' own loader fills their persistent buffers from the safetensors by name; after loading it
rebuilds the buffers calm does not save (a symmetric grid's zero points, a Hadamard transform) from each
module's config, since transformers hands non-persistent buffers back uninitialised. The forward is calm's,
so the logits are `calm.load`'s.

Registration needs torch, and `import calm` must not import it, so `calm/__init__.py` installs an import hook
(`calm._transformers_hook`) that calls `register()` once `transformers.quantizers.auto` is imported, or at once
if it already was. `register()` is idempotent and may be called directly.

Without calm, transformers 5 only logs "Unknown quantization type, got calm ... we will skip the quantization"
and would build a float model with randomly initialised linears; the empty guard tensor calm saves
(calm.io.load_guard) makes it stop on a size mismatch instead. Import calm first.

This module imports only torch and transformers' quantizer bases at the top, because `register()` runs while
transformers is still importing its modeling code; calm's own modules load when a model is built.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "calm"


class CalmQuantizationConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` for a calm checkpoint.

    Args:
        format: the checkpoint format, "calm-v1" (calm.io.FORMAT).
        modules: quantized module name -> its `quant_config()` (calm.nn), as in quantization_config.json.
        tied: [alias, source] pairs of state-dict entries stored once.
        guard: the empty tensor that stops transformers without calm (calm.io.load_guard), or None.
    """

    def __init__(self, format: str = "calm-v1", modules: dict[str, dict[str, Any]] | None = None,
                 tied: list[list[str]] | None = None, guard: str | None = None, **kwargs) -> None:
        self.quant_method = QUANT_METHOD
        self.format = format
        self.modules = dict(modules or {})
        self.tied = [list(pair) for pair in (tied or [])]
        self.guard = guard
        self.post_init()

    def post_init(self) -> None:
        from calm.io import FORMAT

        if self.format != FORMAT:
            raise ValueError(f"quantization_config has calm format {self.format!r}; this calm reads {FORMAT}: "
                             f"install the calm version that wrote the checkpoint")
        kinds = {cfg.get("kind") for cfg in self.modules.values()}
        from calm.nn import QUANTIZED_LINEARS

        unknown = sorted(str(k) for k in kinds - set(QUANTIZED_LINEARS))
        if unknown:
            raise ValueError(f"quantization_config names calm module kinds {unknown} this calm does not know "
                             f"(known: {sorted(QUANTIZED_LINEARS)}): install the calm version that wrote it")

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format": self.format, "modules": self.modules, "tied": self.tied,
                "guard": self.guard}


@contextlib.contextmanager
def _plain_construction():
    """calm.nn modules built on the CPU in float32 whatever transformers' model-init context sets (the meta
    device, the load dtype as default): their constant buffers and the cached Hadamard transforms must be real."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(old)


def _empty_module(cfg: dict[str, Any], dtype: torch.dtype | None) -> torch.nn.Module:
    """A calm.nn module for `cfg` on the meta device, its float bias in the model's dtype."""
    from calm.nn import build_quantized_linear

    with _plain_construction():
        module = build_quantized_linear(cfg)
    for sub in module.modules():
        bias = sub._buffers.get("bias")
        if bias is not None and dtype is not None and dtype.is_floating_point:
            sub._buffers["bias"] = bias.to(dtype)
    return module.to("meta")


def _restore_derived_buffers(module: torch.nn.Module) -> None:
    """Rebuild the non-persistent buffers of one calm.nn module (not a wrapper) from its config, on the device
    of its loaded codes."""
    names = list(module._non_persistent_buffers_set)
    if not names:
        return
    device = module.qweight.device
    with _plain_construction():
        fresh = type(module).from_quant_config(module.quant_config())
    for name in names:
        module._buffers[name] = fresh._buffers[name].to(device)
    module._drop_caches()


class CalmHfQuantizer(HfQuantizer):
    """Loads a calm checkpoint into a transformers model (see the module docstring). Only pre-quantized
    checkpoints: quantizing is `calm.quantize` / `python -m calm.run`."""

    requires_calibration = True
    quantization_config: CalmQuantizationConfig

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("calm checkpoints cannot be offloaded to disk: give every module a CPU or GPU "
                             "device in device_map")

    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs):
        from calm.arch import unfuse_experts

        unfuse_experts(model)  # calm quantizes and saves MoE experts one by one (calm.arch)
        dtype = dtype or model.dtype  # transformers' preprocess_model keeps the load dtype to itself
        for name, cfg in self.quantization_config.modules.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _empty_module(cfg, dtype))
        if self.quantization_config.guard:  # the tensor that stops transformers without calm: not a weight
            model._keys_to_ignore_on_load_unexpected = (set(model._keys_to_ignore_on_load_unexpected or ())
                                                        | {f"^{re.escape(self.quantization_config.guard)}$"})
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from calm.nn import is_quantized_linear

        for module in model.modules():
            if is_quantized_linear(module) and "qweight" in module._buffers:
                _restore_derived_buffers(module)
        params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
        for alias, source in self.quantization_config.tied:
            if alias in params and source in params and params[alias] is not params[source]:
                with torch.no_grad():
                    params[alias].copy_(params[source])
        return model

    def is_serializable(self) -> bool:
        return False  # calm.io.save_quantized writes calm checkpoints

    @property
    def is_trainable(self) -> bool:
        return False


_registered = False


def register() -> None:
    """Add calm to transformers' quantization registries (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD, CalmQuantizationConfig) is not CalmQuantizationConfig:
        raise RuntimeError(f"transformers already has a quantization method {QUANT_METHOD!r} that is not calm's")
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(CalmQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(CalmHfQuantizer)
    _registered = True
