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
- the float tensors (embeddings, norms, LM head, biases) as they are.
What the format cannot hold is refused with one line naming the blocks and their candidates, and the closest
exportable setting: CLAQ codebooks, rotated or activation-quantized linears (W4A4, W3A3, SmoothQuant's
RotatedQuantLinear, learned affine transforms), KV-cache quantization, and MoE experts (calm stores them one
by one; transformers 5 fuses them). vLLM's known limits are warned about: its kernels take zero points only at
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

import torch

from calm.config import CalmUsageError
from calm.io import FORMAT, QUANT_CONFIG, ShardedWriter, _weight_files, atomic_write_json
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


def check_exportable(manifest: dict, config) -> None:
    """Refuse, naming the blocks and candidates, what compressed-tensors' pack-quantized cannot hold."""
    chosen = manifest.get("chosen") or []
    bad: dict[str, set[int]] = defaultdict(set)
    for name, cfg in manifest["modules"].items():
        if cfg["kind"] != "uniform":
            bad[cfg["kind"]].add(_block_of(name))
    if bad:
        parts = []
        for kind, blocks in sorted(bad.items()):
            names = sorted(b for b in blocks if b is not None)
            by = sorted({chosen[b] for b in names if b < len(chosen)})
            parts.append(f"{kind} linears in blocks {names[:8]}{'...' if len(names) > 8 else ''}"
                         + (f" (candidates {', '.join(by)})" if by else ""))
        raise CalmUsageError("compressed-tensors pack-quantized holds weight-only integer grids only; this model has "
                             + "; ".join(parts) + ". Closest exportable setting: a weight-only scheme (e.g. W4A16G128) "
                             "with a pool of rtn, gptq and awq")
    permuted = sorted({_block_of(n) for n, c in manifest["modules"].items() if c.get("input_perm")} - {None})
    if permuted:
        by = sorted({chosen[b] for b in permuted if b < len(chosen)})
        raise CalmUsageError(f"blocks {permuted[:8]} (candidates {', '.join(by)}) reorder their inputs (GPTQ "
                             f"act_order=full), and compressed-tensors {_ct_version()} no longer holds a group "
                             f"index (actorder 'group' was removed); use GPTQ's default act_order=static, which "
                             f"needs no reordering")
    if any(".experts." in name for name in manifest["modules"]):
        raise CalmUsageError("MoE experts are stored one by one by calm and fused by transformers 5; exporting MoE "
                             "models to compressed-tensors is not supported yet (calm.load reads them)")


EXPORTABLE_ALGORITHMS = ("rtn", "gptq", "awq")


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
    if spec.a_bits != 16 or spec.k_bits != 16 or spec.v_bits != 16:
        raise CalmUsageError(f"--export {fmt}: scheme {spec.scheme} quantizes activations or the KV cache, which "
                             f"pack-quantized cannot hold; use a weight-only scheme such as W4A16G128")
    bad = [c.name for c in pool if c.algorithm not in EXPORTABLE_ALGORITHMS
           or (c.algorithm == "gptq" and c.options.get("act_order") == "full")]
    if bad:
        raise CalmUsageError(f"--export {fmt}: candidates {', '.join(bad)} make blocks pack-quantized cannot hold "
                             f"(codebooks, transforms, reordered inputs); use a pool of "
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
    if spec.group_size % 32:
        problems.append(f"groups of {spec.group_size} (exact: multiples of 32)")
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


def _ct_version() -> str:
    from importlib.metadata import version

    return version("compressed-tensors")


def scheme_key(cfg: dict) -> tuple:
    return cfg["bits"], cfg["group_size"], cfg["symmetric"], cfg["input_perm"], cfg["in_features"]


def quantization_config(manifest: dict) -> dict:
    """The `quantization_config` of config.json, built with compressed-tensors' own models (validated there)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, cfg in manifest["modules"].items():
        bits, group, symmetric, perm, k = scheme_key(cfg)
        groups[(bits, group if group < k else None, symmetric, perm)].append(name)
    config_groups = {}
    for i, ((bits, group, symmetric, _), names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="group" if group else "channel", group_size=group)
        config_groups[f"group_{i}"] = QuantizationScheme(targets=sorted(names), weights=args)
    qc = QuantizationConfig(config_groups=config_groups, format="pack-quantized",
                            quantization_status="compressed", ignore=["lm_head"])
    return qc.model_dump(exclude_none=True) | {"quant_method": "compressed-tensors"}


def warn_vllm_limits(manifest: dict) -> list[str]:
    warnings = []
    asym = sorted({c["bits"] for c in manifest["modules"].values() if not c["symmetric"] and c["bits"] not in (4, 8)})
    if asym:
        warnings.append(f"vLLM's kernels take zero points (asymmetric grids) only at 4 and 8 bits; this model has "
                        f"asymmetric {asym}-bit linears: transformers loads it, vLLM may refuse it (use --symmetric "
                        f"or 4 bits)")
    odd_k = sorted({c["in_features"] for c in manifest["modules"].values() if c["in_features"] % 128})
    if odd_k:
        warnings.append(f"Marlin (vLLM's fast path) needs in_features divisible by 128; {odd_k} are not: vLLM "
                        f"falls back to a slower kernel or refuses")
    for w in warnings:
        logger.warning(w)
    return warnings


def module_tensors(name: str, cfg: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One uniform linear's tensors in compressed-tensors' pack-quantized layout."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from calm_kernels.packing import unpack_codes

    bits = cfg["bits"]
    n, k = cfg["out_features"], cfg["in_features"]
    offset = 1 << (bits - 1)
    codes = unpack_codes(state[f"{name}.qweight"], bits, k).to(torch.int16)  # stored column order
    scales = state[f"{name}.scales"]
    zeros = (torch.full(scales.shape, offset, dtype=torch.int16) if cfg["symmetric"]
             else state[f"{name}.zeros"].to(torch.int16))
    out = {}
    out[f"{name}.weight_packed"] = pack_to_int32((codes - offset).to(torch.int8), bits)
    out[f"{name}.weight_scale"] = scales.clone()
    out[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    if not cfg["symmetric"]:
        zp = zeros - offset
        if int(zp.min()) < -offset or int(zp.max()) >= offset:
            raise CalmUsageError(f"{name}: a zero point lies outside the {bits}-bit range, which the format cannot "
                                 f"hold")
        out[f"{name}.weight_zero_point"] = pack_to_int32(zp.to(torch.int8), bits, packed_dim=0)
    if f"{name}.bias" in state:
        out[f"{name}.bias"] = state[f"{name}.bias"]
    return out


def export_compressed_tensors(model_dir: str | Path, out: str | Path) -> dict:
    """Write `out` (a Hugging Face folder in compressed-tensors' pack-quantized format) from the calm model folder
    `model_dir`; returns what was exported (config groups, warnings)."""
    from transformers import AutoConfig

    src, out = Path(model_dir), Path(out)
    manifest = read_manifest(src)
    config = AutoConfig.from_pretrained(str(src))
    check_exportable(manifest, config)
    if out.exists() and any(out.iterdir()):
        raise CalmUsageError(f"{out} is not empty: pass a new folder for the export")
    qconfig = quantization_config(manifest)
    warnings = warn_vllm_limits(manifest)
    modules = manifest["modules"]
    owned = {f"{name}.{suffix}": name for name in modules
             for suffix in ("qweight", "scales", "zeros", "input_perm", "bias")}
    tied = {alias: source for alias, source in manifest.get("tied", [])}
    writer = ShardedWriter(out, file_format="pt")
    try:
        from safetensors.torch import load_file

        for file in _weight_files(src):
            state = load_file(str(file))
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
