"""python -m calm.export MODEL_DIR OUT --format compressed-tensors|gguf: a calm model in a format other tools load.

GGUF (llama.cpp) is calm.gguf_export's; what follows is compressed-tensors.

compressed-tensors (`pack-quantized`), which vLLM serves and transformers loads (its compressed-tensors
integration), with the `compressed-tensors` package as the source of truth: its config models
(`QuantizationConfig`, `QuantizationScheme`, `QuantizationArgs`) describe the format and its packer
(`pack_to_int32`) packs the codes. What is exported:
- every weight-only uniform block (RTN, GPTQ, AWQ, any mix of them), with one config group per distinct
  (bits, group size, symmetry, act-order) and its exact module names as targets; codes, scales and zero points
  are calm's own (nothing is re-quantized): calm's code c and zero z on [0, 2^b) become the format's signed
  c - 2^(b-1) and z - 2^(b-1). GPTQ's default static act-order needs no reordering; its `full` act-order
  (a stored input permutation) is refused: compressed-tensors 0.20 removed the group index that held it;
- linears whose inputs are quantized per token at run time without a transform (SmoothQuant W8A8 and W4A8,
  and RTN/GPTQ at an A8 scheme): the weights as above (8-bit ones as `int-quantized`, the others packed) with
  `input_activations` dynamic, per token, symmetric at the scheme's activation bits. calm's activation scale
  is max|x| / (2^(a-1) - 1), vLLM's dynamic int8 quantizer's too; compressed-tensors' own fake quantizer
  (what transformers runs) divides by (2^a - 1) / 2 instead, so transformers' logits differ from calm's by
  that rounding. An activation clip ratio below 1 has no field in the format and is refused;
- the float tensors (embeddings, norms with SmoothQuant's scales folded in, LM head, biases) as they are;
  `--residual-rotation` models are plain models here: the rotation is folded into the saved weights.
What the format cannot hold is refused with one line naming the blocks and their candidates, and the closest
exportable setting: CLAQ codebooks, online transforms (the `rotation`, `affine` and `kurtosis` candidates:
compressed-tensors' Hadamard transform configs build their own matrices, and vLLM has no int4/int3
activation kernels to run W4A4 or W3A3), KV-cache quantization, and MoE experts (calm stores them one by one;
transformers 5 fuses them). vLLM's known limits are warned about: its kernels take zero points only at
4 and 8 bits, and Marlin needs K divisible by 128 (64 for some shapes); such a model loads in transformers but
vLLM may refuse or fall back.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from calm.config import CalmUsageError
from calm.io import FORMAT, QUANT_CONFIG, ShardedWriter, _weight_files, atomic_write_json, without_guard
from calm.progress import configure_logging, get_logger

FORMATS = ("compressed-tensors", "gguf")
logger = get_logger("calm.export")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def read_manifest(model_dir: Path) -> dict:
    path = model_dir / QUANT_CONFIG
    if not path.is_file():
        raise CalmUsageError(f"{model_dir} holds no {QUANT_CONFIG}: pass the `model` folder of a calm run "
                             f"(OUTPUT/model)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CalmUsageError(f"{path} has format {manifest.get('format')!r}; this calm exports {FORMAT}")
    return manifest


def _block_of(name: str) -> int | None:
    head, sep, rest = name.partition(".layers.")
    return int(rest.split(".", 1)[0]) if sep else None


def export_kind(cfg: dict) -> str | None:
    """How a calm module record goes into compressed-tensors: `weights` (weight-only uniform grid),
    `activations` (a uniform or rotated-without-transform grid behind the per-token activation quantizer), or
    None (the format cannot hold it)."""
    if cfg["kind"] == "uniform":
        return "weights"
    if cfg["kind"] == "act" and cfg["linear"]["kind"] == "uniform" and cfg["linear"]["symmetric"]:
        return "activations"
    if cfg["kind"] == "rotated" and not cfg["transform_orders"]:
        return "activations"
    return None


def exported_modules(manifest: dict) -> dict[str, dict]:
    """The manifest's linears, without the records of the linears that wrappers (`act`, `kv`) hold inside."""
    modules = manifest["modules"]
    return {name: cfg for name, cfg in modules.items()
            if not (name.endswith(".linear") and name.removesuffix(".linear") in modules)}


def blocks_and_candidates(blocks_by_what: dict[str, set[int | None]], chosen: list[str]) -> str:
    """`what in blocks [1, 3] (candidates claq); ...`: what a refusal names, with the candidates that chose it."""
    parts = []
    for what, blocks in sorted(blocks_by_what.items()):
        names = sorted(b for b in blocks if b is not None)
        by = sorted({chosen[b] for b in names if b < len(chosen)})
        parts.append(f"{what} in blocks {names[:8]}{'...' if len(names) > 8 else ''}"
                     + (f" (candidates {', '.join(by)})" if by else ""))
    return "; ".join(parts)


def check_exportable(manifest: dict, config) -> None:
    """Refuse, naming the blocks and candidates, what compressed-tensors cannot hold."""
    chosen = manifest.get("chosen") or []
    bad: dict[str, set[int]] = defaultdict(set)
    for name, cfg in exported_modules(manifest).items():
        if export_kind(cfg) is None:
            kind = "rotated (online transform)" if cfg["kind"] == "rotated" else cfg["kind"]
            bad[kind].add(_block_of(name))
    if bad:
        raise CalmUsageError("compressed-tensors holds integer grids, optionally behind per-token activation "
                             "quantization, but no codebooks, online transforms or KV-cache quantization; this model "
                             "has " + blocks_and_candidates({f"{k} linears": b for k, b in bad.items()}, chosen)
                             + ". Closest exportable setting: a weight-only scheme (e.g. "
                             "W4A16G128) with a pool of rtn, gptq and awq, or W8A8/W4A8 with rtn, gptq and smoothquant")
    clipped = sorted({_block_of(n) for n, c in exported_modules(manifest).items()
                      if export_kind(c) == "activations" and c["clip_ratio"] != 1.0} - {None})
    if clipped:
        raise CalmUsageError(f"blocks {clipped[:8]} clip their activations (clip_ratio < 1), which compressed-tensors' "
                             f"dynamic per-token quantization cannot express; quantize with clip_ratio=1 (the "
                             f"smoothquant default) to export")
    permuted = sorted({_block_of(n) for n, c in exported_modules(manifest).items()
                       if weight_record(c).get("input_perm")} - {None})
    if permuted:
        by = sorted({chosen[b] for b in permuted if b < len(chosen)})
        raise CalmUsageError(f"blocks {permuted[:8]} (candidates {', '.join(by)}) reorder their inputs (GPTQ "
                             f"act_order=full), and compressed-tensors {_ct_version()} no longer holds a group "
                             f"index (actorder 'group' was removed); use GPTQ's default act_order=static, which "
                             f"needs no reordering")
    if any(".experts." in name for name in exported_modules(manifest)):
        raise CalmUsageError("MoE experts are stored one by one by calm and fused by transformers 5; exporting MoE "
                             "models to compressed-tensors is not supported yet (calm.load reads them)")


def weight_record(cfg: dict) -> dict:
    """The weight grid of a module record as (bits, group_size, symmetric, input_perm, in/out features)."""
    if cfg["kind"] == "act":
        return cfg["linear"]
    if cfg["kind"] == "rotated":  # per output channel, symmetric
        return {"bits": cfg["w_bits"], "group_size": cfg["in_features"], "symmetric": True, "input_perm": False,
                "in_features": cfg["in_features"], "out_features": cfg["out_features"]}
    return cfg


EXPORTABLE_ALGORITHMS = ("rtn", "gptq", "awq", "smoothquant")


def parse_export_formats(text: str | None) -> list[str]:
    """`--export compressed-tensors,gguf` -> the formats, each known."""
    formats = [f.strip() for f in (text or "").split(",") if f.strip()]
    for fmt in formats:
        if fmt not in FORMATS:
            raise CalmUsageError(f"--export {fmt!r}: choose one or more of {', '.join(FORMATS)} (comma-separated)")
    return formats


def check_run_exportable(fmt: str, spec, pool) -> None:
    """Refuse `--export` before the search when the scheme or a pool member cannot give an exportable model."""
    if fmt not in FORMATS:
        raise CalmUsageError(f"--export {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "gguf":
        check_run_gguf_exact(spec, pool)
    if spec.k_bits != 16 or spec.v_bits != 16:
        raise CalmUsageError(f"--export {fmt}: scheme {spec.scheme} quantizes the KV cache, which calm cannot export "
                             f"yet; drop K/V from the scheme")
    if spec.a_bits != 16 and (fmt == "gguf" or any(c.spec_for(spec).group_size for c in pool)):
        raise CalmUsageError(f"--export {fmt}: scheme {spec.scheme} quantizes activations"
                             + (", which GGUF does not hold (weights only); use a weight-only scheme such as W4A16G32"
                                if fmt == "gguf" else " behind grouped weights, which compressed-tensors' activation "
                                "schemes do not pair; use per-channel weights (e.g. W8A8 or W4A8)"))
    bad = [c.name for c in pool if c.algorithm not in EXPORTABLE_ALGORITHMS
           or (c.algorithm == "smoothquant" and (spec.a_bits == 16 or c.options.get("clip_ratio", 1.0) != 1.0))
           or (c.algorithm == "gptq" and c.options.get("act_order") == "full")]
    if bad:
        raise CalmUsageError(f"--export {fmt}: candidates {', '.join(bad)} make blocks compressed-tensors cannot hold "
                             f"(codebooks, online transforms, reordered inputs, clipped activations); use a pool of "
                             f"{', '.join(EXPORTABLE_ALGORITHMS)} (GPTQ with its default act_order)")


def check_run_gguf_exact(spec, pool) -> None:
    """`--export gguf` writes exact types only: symmetric 4- or 8-bit grids in groups of 32k from rtn/gptq/awq.
    (An asymmetric 4-bit model is exact as Q4_1 only where its minimums are float16 numbers, which is known after
    the search: export it with `python -m calm.export ... --format gguf --requantize Q4_1`.)"""
    bits = sorted({c.spec_for(spec).w_bits for c in pool})
    problems = []
    if spec.a_bits != 16 or spec.k_bits != 16 or spec.v_bits != 16:
        problems.append(f"scheme {spec.scheme} quantizes activations or the KV cache")
    if not spec.symmetric:
        problems.append("the grid is asymmetric (GGUF's exact types for calm are symmetric Q4_0 and Q8_0)")
    if set(bits) - {4, 8}:
        problems.append(f"weights have {bits} bits (exact: 4 or 8)")
    groups = sorted({c.spec_for(spec).group_size for c in pool})
    if any(g % 32 for g in groups):
        problems.append(f"groups of {groups} (exact: multiples of 32)")
    bad = [c.name for c in pool if c.algorithm not in EXPORTABLE_ALGORITHMS
           or (c.algorithm == "gptq" and c.options.get("act_order") == "full")]
    if bad:
        problems.append(f"candidates {', '.join(bad)} make codebooks, transforms or reordered inputs")
    if problems:
        raise CalmUsageError("--export gguf writes exact GGUF types only, and " + "; ".join(problems) + ". Use e.g. "
                             "--scheme W4A16G32 --symmetric with a pool of rtn, gptq and awq, or export afterwards "
                             "with python -m calm.export MODEL_DIR OUT --format gguf --requantize Q4_1")


def export(fmt: str, model_dir: str | Path, out: str | Path, requantize: str | None = None) -> dict:
    """Export a calm model folder to `fmt` (one of FORMATS)."""
    if fmt == "gguf":
        from calm.gguf_export import export_gguf

        return export_gguf(model_dir, out, requantize=requantize)
    if requantize is not None:
        raise CalmUsageError("--requantize applies to --format gguf only; compressed-tensors copies calm's codes")
    return export_compressed_tensors(model_dir, out)


def open_export(model_dir: str | Path, out: str | Path, check) -> tuple[Path, Path, dict, Any]:
    """(source folder, output folder, manifest, transformers config) of an export, after `check(manifest,
    config)` and a refusal of a non-empty output folder: every format's first step."""
    from transformers import AutoConfig

    src, out = Path(model_dir), Path(out)
    manifest = read_manifest(src)
    config = AutoConfig.from_pretrained(str(src))
    check(manifest, config)
    if out.exists() and any(out.iterdir()):
        raise CalmUsageError(f"{out} is not empty: pass a new folder for the export")
    return src, out, manifest, config


def _ct_version() -> str:
    from importlib.metadata import version

    return version("compressed-tensors")


def scheme_key(cfg: dict) -> tuple:
    """What decides a module's config group: its weight grid, and its activation bits (16: none)."""
    w = weight_record(cfg)
    group = w["group_size"] if w["group_size"] < w["in_features"] else None
    a_bits = cfg["a_bits"] if export_kind(cfg) == "activations" else 16
    return w["bits"], group, w["symmetric"], a_bits


def group_format(bits: int, a_bits: int) -> str:
    """8-bit weights behind activation quantization are vLLM's W8A8 `int-quantized`; the rest is packed."""
    return "int-quantized" if bits == 8 and a_bits != 16 else "pack-quantized"


def quantization_config(manifest: dict) -> dict:
    """The `quantization_config` of config.json, built with compressed-tensors' own models (validated there)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, cfg in exported_modules(manifest).items():
        groups[scheme_key(cfg)].append(name)
    config_groups, formats = {}, set()
    for i, ((bits, group, symmetric, a_bits), names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                   strategy="group" if group else "channel", group_size=group)
        activations = None if a_bits == 16 else QuantizationArgs(num_bits=a_bits, type="int", symmetric=True,
                                                                 strategy="token", dynamic=True)
        fmt = group_format(bits, a_bits)
        formats.add(fmt)
        config_groups[f"group_{i}"] = QuantizationScheme(targets=sorted(names), weights=weights,
                                                         input_activations=activations, format=fmt)
    qc = QuantizationConfig(config_groups=config_groups,
                            format=formats.pop() if len(formats) == 1 else "mixed-precision",
                            quantization_status="compressed", ignore=["lm_head"])
    return qc.model_dump(exclude_none=True) | {"quant_method": "compressed-tensors"}


def warn_vllm_limits(manifest: dict) -> list[str]:
    warnings = []
    grids = [weight_record(c) for c in exported_modules(manifest).values()]
    asym = sorted({c["bits"] for c in grids if not c["symmetric"] and c["bits"] not in (4, 8)})
    if asym:
        warnings.append(f"vLLM's kernels take zero points (asymmetric grids) only at 4 and 8 bits; this model has "
                        f"asymmetric {asym}-bit linears: transformers loads it, vLLM may refuse it (use --symmetric "
                        f"or 4 bits)")
    odd_k = sorted({c["in_features"] for c in grids if c["in_features"] % 128})
    if odd_k:
        warnings.append(f"Marlin (vLLM's fast path) needs in_features divisible by 128; {odd_k} are not: vLLM "
                        f"falls back to a slower kernel or refuses")
    low = sorted({(scheme_key(c)[0], c["a_bits"]) for c in exported_modules(manifest).values()
                  if export_kind(c) == "activations" and (c["a_bits"] != 8 or scheme_key(c)[0] not in (4, 8))})
    if low:
        warnings.append(f"vLLM's integer activation kernels are W8A8 (and W4A8 on some platforms); this model has "
                        f"{', '.join(f'W{w}A{a}' for w, a in low)} linears: transformers loads it, vLLM may refuse it")
    for w in warnings:
        logger.warning(w)
    return warnings


def module_tensors(name: str, cfg: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One linear's tensors in its config group's layout: `weight_packed` (pack-quantized) or `weight` int8
    (int-quantized), `weight_scale`, and `weight_zero_point` for asymmetric grids."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from calm_kernels.packing import unpack_codes
    from calm_kernels.rotated import unpack_weight_codes

    w = weight_record(cfg)
    bits, n, k = w["bits"], w["out_features"], w["in_features"]
    offset = 1 << (bits - 1)
    if cfg["kind"] == "rotated":  # signed codes, one float32 scale per output channel
        signed = unpack_weight_codes(state[f"{name}.qweight"], bits, k).to(torch.int16)
        scales = state[f"{name}.w_scales"].reshape(n, 1).clone()
        zeros = None
    else:
        prefix = f"{name}.linear" if cfg["kind"] == "act" else name
        signed = unpack_codes(state[f"{prefix}.qweight"], bits, k).to(torch.int16) - offset  # stored column order
        scales = state[f"{prefix}.scales"].clone()
        zeros = None if w["symmetric"] else state[f"{prefix}.zeros"].to(torch.int16) - offset
    out = {}
    if group_format(bits, scheme_key(cfg)[3]) == "int-quantized":
        out[f"{name}.weight"] = signed.to(torch.int8)
    else:
        out[f"{name}.weight_packed"] = pack_to_int32(signed.to(torch.int8), bits)
        out[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    out[f"{name}.weight_scale"] = scales
    if zeros is not None:
        if int(zeros.min()) < -offset or int(zeros.max()) >= offset:
            raise CalmUsageError(f"{name}: a zero point lies outside the {bits}-bit range, which the format cannot "
                                 f"hold")
        out[f"{name}.weight_zero_point"] = pack_to_int32(zeros.to(torch.int8), bits, packed_dim=0)
    for bias in (f"{name}.bias", f"{name}.linear.bias"):
        if bias in state:
            out[f"{name}.bias"] = state[bias]
    return out


def export_compressed_tensors(model_dir: str | Path, out: str | Path) -> dict:
    """Write `out` (a Hugging Face folder in compressed-tensors' pack-quantized format) from the calm model folder
    `model_dir`; returns what was exported (config groups, warnings)."""

    src, out, manifest, config = open_export(model_dir, out, check_exportable)
    qconfig = quantization_config(manifest)
    warnings = warn_vllm_limits(manifest)
    modules = exported_modules(manifest)
    owned = {f"{name}.{suffix}": name for name in modules
             for suffix in ("qweight", "scales", "zeros", "input_perm", "bias", "w_scales", "transform_norm",
                            "linear.qweight", "linear.scales", "linear.zeros", "linear.input_perm", "linear.bias")}
    tied = {alias: source for alias, source in manifest.get("tied", [])}
    writer = ShardedWriter(out, file_format="pt")
    try:
        from safetensors.torch import load_file

        for file in _weight_files(src):
            state = without_guard(load_file(str(file)), manifest)
            plain = {k: v for k, v in state.items() if k not in owned}
            if not getattr(config, "tie_word_embeddings", False):  # tied: transformers ties them on load
                plain.update({alias: state[source].clone() for alias, source in tied.items() if source in state})
            writer.add(plain)
            for name in dict.fromkeys(owned[k] for k in state if k in owned):
                writer.add(module_tensors(name, modules[name], state))
        config_dict = config.to_dict()
        config_dict["quantization_config"] = qconfig
        atomic_write_json(writer.staging / "config.json", config_dict)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, writer.staging / f)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    logger.info(f"exported {len(modules)} linears in {len(qconfig['config_groups'])} config groups to {out}")
    return {"format": "compressed-tensors", "config_groups": qconfig["config_groups"], "warnings": warnings}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calm.export", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", help="a calm model folder (OUTPUT/model of python -m calm.run)")
    p.add_argument("out", help="the export folder (new or empty)")
    p.add_argument("--format", choices=FORMATS, default="compressed-tensors")
    p.add_argument("--requantize", default=None, metavar="TYPE",
                   help="gguf only: write the layers GGUF cannot hold exactly as TYPE (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) "
                   "and report the error it adds; without it they are refused")
    args = p.parse_args(argv)
    configure_logging(0)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        export(args.format, args.model_dir, args.out, requantize=args.requantize)
    except CalmUsageError as exc:
        print(f"calm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
