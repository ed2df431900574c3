"""python -m calm.export MODEL_DIR OUT --format gguf: a calm model as one GGUF file (llama.cpp, transformers'
`gguf_file=`), written with the `gguf` package's `GGUFWriter`, tensor names from its `TensorNameMap`, and the
block layouts its `gguf.quants` dequantizers read.

Exact cases (calm's codes and float16 scales copied, nothing re-quantized; tested against gguf's dequantizer and
transformers' loader):
- symmetric 4-bit groups that are multiples of 32 -> Q4_0 (w = d (q - 8): calm's zero point is 8);
- symmetric 8-bit groups that are multiples of 32 -> Q8_0 (w = d q, q = code - 128);
- asymmetric 4-bit groups that are multiples of 32 -> Q4_1 (w = d q + m, m = -scale * zero) when every m is a
  float16 number. Q4_1 stores m in float16 and scale * zero needs up to 15 significant bits, so most models
  have groups where it is not: those layers are not exact (see below).
- float tensors (embeddings, norms, head, biases) in their own float type.
Everything else is refused with one line naming the layers, unless `--requantize TYPE` is given: then those
layers are written as TYPE (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) from calm's dequantized weights by gguf's own
quantizer, except asymmetric 4-bit layers under Q4_1, which keep their codes and round m to float16, and the
error this adds to each layer (relative Frobenius norm and max |difference| against calm's weight) is reported
and saved in `OUT/gguf_export.json`. Never exported (refused even with --requantize, since GGUF holds weights
only): activation quantization and online transforms (rotated layers, W8A8), KV-cache quantization (llama.cpp
sets that at run time: `--cache-type-k`), MoE models.

Families: llama (q/k rows permuted as llama.cpp's converter does and transformers undoes), qwen2, qwen3, with
plain RoPE. The tokenizer goes in when it is a byte-level BPE tokenizer.json (gguf.vocab.BpeVocab and
SpecialVocab); llama.cpp wants `tokenizer.ggml.pre`, which calm cannot know, so it is left out (llama.cpp uses
its default pre-tokenizer and warns).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calm.config import CalmUsageError
from calm.io import _weight_files, atomic_write_json, without_guard
from calm.progress import get_logger

logger = get_logger("calm.export")

GGUF_FILE = "model.gguf"
REPORT_FILE = "gguf_export.json"
FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # model_type -> gguf architecture
PERMUTE_QK = {"llama"}  # llama.cpp's converter interleaves q/k rows for its RoPE; transformers undoes it
REQUANTIZE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
BLOCK = 32  # weights per block of Q4_0, Q4_1, Q5_*, Q8_0


@dataclasses.dataclass
class TensorPlan:
    """How one quantized linear goes into the file: `qtype` (a gguf type name) and whether it is exact."""

    name: str
    qtype: str | None
    exact: bool
    why: str


def _block_of(name: str) -> int | None:
    head, sep, rest = name.partition(".layers.")
    return int(rest.split(".", 1)[0]) if sep else None


def _fp16_exact_mins(scales: torch.Tensor, zeros: torch.Tensor) -> bool:
    m = -scales.to(torch.float32) * zeros.to(torch.float32)
    return bool(torch.equal(m.to(torch.float16).to(torch.float32), m))


def plan_module(name: str, cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> TensorPlan:
    """The exact GGUF type for one quantized linear, or why there is none."""
    kind = cfg["kind"]
    if kind in ("rotated", "act", "kv"):
        raise AssertionError("refused before planning")
    if kind == "codebook":
        return TensorPlan(name, None, False, "CLAQ codebooks (per-column lookup tables)")
    bits, group, symmetric = cfg["bits"], cfg["group_size"], cfg["symmetric"]
    if cfg.get("input_perm"):
        return TensorPlan(name, None, False, "GPTQ act_order=full (groups follow a column permutation)")
    if group % BLOCK:
        return TensorPlan(name, None, False, f"groups of {group} (GGUF blocks hold 32 columns)")
    if symmetric and bits == 4:
        return TensorPlan(name, "Q4_0", True, "")
    if symmetric and bits == 8:
        return TensorPlan(name, "Q8_0", True, "")
    if not symmetric and bits == 4:
        if _fp16_exact_mins(state[f"{name}.scales"], state[f"{name}.zeros"]):
            return TensorPlan(name, "Q4_1", True, "")
        return TensorPlan(name, None, False, "asymmetric 4-bit whose minimum -scale*zero is not a float16 number "
                                             "in some groups (Q4_1 stores it in float16)")
    return TensorPlan(name, None, False, f"{'symmetric' if symmetric else 'asymmetric'} {bits}-bit grid "
                                         f"(GGUF has no exact {bits}-bit block type for it)")


def refuse_unexportable(manifest: dict, config) -> None:
    """GGUF holds weights only: refuse activation/KV quantization and transforms, unsupported families, MoE."""
    family = getattr(config, "model_type", "?")
    if family not in FAMILIES:
        raise CalmUsageError(f"GGUF export supports the families {', '.join(FAMILIES)}; this model is {family!r} "
                             f"(use --format compressed-tensors, or calm.load / transformers with `import calm`)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise CalmUsageError(f"GGUF export writes plain RoPE only; this model uses rope_type "
                             f"{rope.get('rope_type')!r}")
    biased = [flag for flag in ("attention_bias", "mlp_bias") if getattr(config, flag, False)]
    if family == "llama" and biased:
        raise CalmUsageError(f"this llama model has {' and '.join(biased)}, which GGUF's llama architecture does not "
                             f"carry (transformers and llama.cpp would drop the biases)")
    if any(".experts." in name for name in manifest["modules"]):
        raise CalmUsageError("GGUF export of MoE models is not supported (calm stores the experts one by one)")
    from calm.export import blocks_and_candidates

    chosen = manifest.get("chosen") or []
    bad: dict[str, set[int]] = defaultdict(set)
    reasons = {"rotated": "rotated / affine / activation-quantized linears (W4A4, W3A3, W4A8)",
               "act": "activation-quantized linears (W8A8)", "kv": "KV-cache quantization"}
    for name, cfg in manifest["modules"].items():
        if cfg["kind"] in reasons:
            bad[cfg["kind"]].add(_block_of(name))
    if bad:
        raise CalmUsageError("GGUF holds weights only; this model has "
                             + blocks_and_candidates({reasons[k]: b for k, b in bad.items()}, chosen)
                             + ". Closest exportable "
                             "setting: a weight-only scheme without K/V bits (e.g. W4A16G32 --symmetric) with a "
                             "pool of rtn, gptq and awq (llama.cpp quantizes its KV cache at run time)")


# Block layouts (gguf.quants): Q4_0 = d f16, 16 bytes of nibbles (q[j] | q[j + 16] << 4);
# Q4_1 = d f16, m f16, the same nibbles; Q8_0 = d f16, 32 int8.
def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 16) -> (N, K/32, 16) uint8, GGUF's order within a block."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // BLOCK, 2, BLOCK // 2)
    return c[:, :, 0] | (c[:, :, 1] << 4)


def _per_block(values: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """(N, K/group) -> (N, K/32, 2) float16 bytes, one per block of 32 columns."""
    v = values.to(torch.float16).repeat_interleave(group // BLOCK, dim=1)
    return v.contiguous().view(torch.uint8).reshape(v.shape[0], k // BLOCK, 2)


def uniform_blocks(qtype: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group: int) -> np.ndarray:
    """calm's uniform codes as GGUF blocks (N, K/32 * bytes per block) uint8, codes and scales unchanged; for
    Q4_1 the minimum -scale * zero is rounded to float16 (exact when plan_module says so)."""
    n, k = codes.shape
    d = _per_block(scales, group, k)
    if qtype == "Q4_0":
        body = torch.cat([d, _nibbles(codes)], dim=2)
    elif qtype == "Q4_1":
        m = _per_block(-scales.to(torch.float32) * zeros.to(torch.float32), group, k)
        body = torch.cat([d, m, _nibbles(codes)], dim=2)
    elif qtype == "Q8_0":
        q = (codes.to(torch.int16) - 128).to(torch.int8).reshape(n, k // BLOCK, BLOCK).view(torch.uint8)
        body = torch.cat([d, q], dim=2)
    else:
        raise ValueError(f"no exact layout for {qtype}")
    return body.reshape(n, -1).numpy()


def dequantize_blocks(data: np.ndarray, qtype: str) -> torch.Tensor:
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).astype(np.float32))


def _permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k permutation (convert_hf_to_gguf's LlamaModel.permute) of a weight's rows or a bias."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _float_tensor(t: torch.Tensor) -> tuple[np.ndarray, Any]:
    """A float tensor in its own type: (array, raw_dtype for bfloat16)."""
    import gguf

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16
    if t.dtype in (torch.float16, torch.float32):
        return t.contiguous().numpy(), None
    raise ValueError(f"unexpected tensor dtype {t.dtype}")


def _write_metadata(writer, config, arch: str, name: str) -> None:
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer, src: Path) -> bool:
    """Byte-level BPE tokenizers (tokenizer.json) through gguf.vocab; False when the tokenizer is another kind."""
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(src)
    except (FileNotFoundError, ValueError, KeyError):
        return False
    tokens, scores, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_token_list([t.decode("utf-8") if isinstance(t, bytes) else t for t in tokens])
    writer.add_token_scores(list(scores))
    writer.add_token_types([int(t) for t in types])
    gguf.SpecialVocab(src, load_merges=True).add_to_gguf(writer, quiet=True)
    return True


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    diff = theirs - ours
    return float(diff.norm() / ours.norm().clamp_min(1e-30)), float(diff.abs().max())


def export_gguf(model_dir: str | Path, out: str | Path, requantize: str | None = None) -> dict:
    """Write `out/model.gguf` (and `out/gguf_export.json`) from the calm model folder `model_dir`; returns the
    report: the GGUF type of every quantized linear, and for re-quantized ones the error added."""
    import gguf
    from safetensors.torch import load_file

    from calm.export import TOKENIZER_FILES, open_export
    from calm.nn import build_quantized_linear

    if requantize is not None and requantize not in REQUANTIZE_TYPES:
        raise CalmUsageError(f"--requantize {requantize!r}: choose one of {', '.join(REQUANTIZE_TYPES)}")
    src, out, manifest, config = open_export(model_dir, out, refuse_unexportable)
    modules = manifest["modules"]
    owned = {f"{name}.{suffix}": name for name in modules for suffix in ("qweight", "scales", "zeros", "input_perm",
                                                                          "bias", "codebooks", "perm",
                                                                          "outlier_rowptr", "outlier_cols",
                                                                          "outlier_vals")}
    arch = FAMILIES[config.model_type]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    permute = arch in PERMUTE_QK
    kv_heads = config.num_key_value_heads

    def gguf_name(hf_name: str) -> str:
        base, _, suffix = hf_name.rpartition(".")
        mapped = name_map.get_name(base)
        if mapped is None:
            raise CalmUsageError(f"GGUF has no name for the tensor {hf_name} of this {config.model_type} model")
        return f"{mapped}.{suffix}"

    def rows_heads(hf_name: str) -> int | None:
        if not permute:
            return None
        if ".self_attn.q_proj." in hf_name:
            return config.num_attention_heads
        if ".self_attn.k_proj." in hf_name:
            return kv_heads
        return None

    tensors: list[tuple[str, np.ndarray, Any, list[int] | None]] = []
    report: dict[str, Any] = {"format": "gguf", "file": GGUF_FILE, "tensors": {}, "requantized": {}}
    inexact: list[TensorPlan] = []
    tied = {alias for alias, _ in manifest.get("tied", [])}
    for file in _weight_files(src):
        state = without_guard(load_file(str(file)), manifest)
        for key, t in state.items():
            if key in owned and not key.endswith(".bias"):
                continue
            if key in tied or (key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)):
                continue  # transformers and llama.cpp tie the head to token_embd when `output` is absent
            heads = rows_heads(key)
            t = _permute_rows(t, heads) if heads else t
            array, raw = _float_tensor(t)
            tensors.append((gguf_name(key), array, raw, None))
        for name in dict.fromkeys(owned[k] for k in state if k in owned):
            cfg = modules[name]
            plan = plan_module(name, cfg, state)
            heads = rows_heads(f"{name}.weight")
            if plan.exact:
                codes = _codes(cfg, state, name)
                data = uniform_blocks(plan.qtype, codes, state[f"{name}.scales"], state.get(f"{name}.zeros"),
                                      cfg["group_size"])
            else:
                inexact.append(plan)
                if requantize is None:
                    continue
                module = build_quantized_linear(cfg)
                module.load_state_dict({k.removeprefix(name + "."): v for k, v in state.items()
                                        if k.startswith(name + ".")})
                weight = module.dequantized_weight(torch.float32)
                if cfg["in_features"] % BLOCK:
                    raise CalmUsageError(f"{name}: in_features {cfg['in_features']} is not a multiple of 32, which "
                                         f"GGUF's block types need")
                keeps_codes = (requantize == "Q4_1" and cfg["kind"] == "uniform" and cfg["bits"] == 4
                               and not cfg["symmetric"] and not cfg.get("input_perm")
                               and cfg["group_size"] % BLOCK == 0)
                if keeps_codes:
                    data = uniform_blocks("Q4_1", _codes(cfg, state, name), state[f"{name}.scales"],
                                          state[f"{name}.zeros"], cfg["group_size"])
                else:
                    data = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[requantize])
                plan = dataclasses.replace(plan, qtype=requantize)
                rel, worst = _relative_error(weight, dequantize_blocks(data, requantize).reshape(weight.shape))
                report["requantized"][name] = {"from": plan.why, "to": requantize, "relative_error": rel,
                                               "max_abs_error": worst}
            if heads:
                n = data.shape[0]
                data = _permute_rows(torch.from_numpy(data), heads).numpy().reshape(n, -1)
            qtype = gguf.GGMLQuantizationType[plan.qtype]
            tensors.append((gguf_name(f"{name}.weight"), data, qtype, None))
            report["tensors"][name] = plan.qtype
    if inexact and requantize is None:
        reasons: dict[str, list[str]] = defaultdict(list)
        for p in inexact:
            reasons[p.why].append(p.name)
        parts = [f"{why}: {len(names)} layers ({names[0]}{', ...' if len(names) > 1 else ''})"
                 for why, names in reasons.items()]
        raise CalmUsageError("GGUF has no exact type for " + "; ".join(parts) + ". Exact: symmetric 4-bit (Q4_0) "
                             "or 8-bit (Q8_0) grids, or asymmetric 4-bit (Q4_1) with float16 minimums, groups of "
                             "32k; or pass --requantize Q4_1 (or Q4_0, Q5_0, Q5_1, Q8_0) to accept the error it "
                             "adds, which is reported")
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{GGUF_FILE}.", dir=out)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_metadata(writer, config, arch, src.resolve().parent.name or "calm")
        counts = defaultdict(int)
        for qtype in report["tensors"].values():
            counts[qtype] += 1
        main_type = max(counts, key=counts.get) if counts else "F32"
        writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{main_type}", gguf.LlamaFileType.ALL_F32))
        report["tokenizer"] = _write_tokenizer(writer, src)
        for name, array, raw, shape in tensors:
            writer.add_tensor(name, array, raw_shape=shape, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out / GGUF_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for f in TOKENIZER_FILES:
        if (src / f).is_file() and f != "generation_config.json":
            (out / f).write_bytes((src / f).read_bytes())
    report["types"] = dict(counts)
    atomic_write_json(out / REPORT_FILE, report)
    if report["requantized"]:
        worst = max(report["requantized"].items(), key=lambda kv: kv[1]["relative_error"])
        logger.warning(f"GGUF: {len(report['requantized'])} layers re-quantized to {requantize}; largest added "
                       f"error {worst[1]['relative_error']:.3g} (relative Frobenius, {worst[0]}); per layer in "
                       f"{out / REPORT_FILE}")
    if not report["tokenizer"]:
        logger.warning("GGUF: the tokenizer is not byte-level BPE, so it is not in the file (transformers loads the "
                       "weights; llama.cpp needs a tokenizer)")
    logger.info(f"exported {len(report['tensors'])} linears ({dict(counts)}) to {out / GGUF_FILE}")
    return report


def _codes(cfg: dict[str, Any], state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    from calm_kernels.packing import unpack_codes

    return unpack_codes(state[f"{name}.qweight"], cfg["bits"], cfg["in_features"])
