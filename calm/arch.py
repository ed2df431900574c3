"""Decoder architectures: one `Layout` per family says where everything of a decoder block is.

Every algorithm, transform and the residual rotation reads the block's layout from here (`layout_of(block)`,
found by the block's class, so a deep copy or a block read back from the search state finds it too); no other
file names a projection. A layout gives:
- the linears in true-sequential groups (GPTQ's order: each group calibrated on the outputs of the groups
  quantized before it), fused modules (Phi-3's `qkv_proj`, `gate_up_proj`) included, MoE experts as patterns;
- the pre-norms (`NormSite`): the norm, the linears that read it (its scale folds into their input columns),
  float readers (an MoE router: folded into, never quantized), and the module whose output AWQ compares;
- linear -> linear folds (v -> o, up -> down), with the rows of a fused producer when it is fused;
- the norm kind (`norm_offset`: 0 for RMSNorm `w * x / rms(x)`, 1 for Gemma's `(1 + w) * x / rms(x)`);
- post-norms (Gemma 2/3 sandwich norms, OLMo 2's norms after attention and MLP): a per-channel gain between a
  writer of the residual stream and the stream, which no rotation of the stream commutes with;
- the K and V projections (KV-cache quantization), the linears AWQ does not clip, the MoE experts and router,
  the final logit soft-cap.

Adding a family means adding one `Layout` to `LAYOUTS` and its row to the family tests (tests/test_arch.py).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path

import torch
from torch import nn

from calm.config import CalmUsageError

ATTENTION = "self_attn"
MLP = "mlp"


@dataclasses.dataclass(frozen=True)
class NormSite:
    """A norm in front of linears: its scale folds into their input columns (exact in float)."""
    norm: str
    readers: tuple[str, ...]  # quantized linears reading the norm's output (patterns allowed: experts)
    loss_module: str  # the module whose input is the norm's output and whose output AWQ compares
    float_readers: tuple[str, ...] = ()  # read the norm but stay float (an MoE router)


@dataclasses.dataclass(frozen=True)
class LinearFold:
    """A linear whose output rows are exactly the next linear's inputs, so a scale folds through it."""
    name: str
    prev: str
    linears: tuple[str, ...]
    prev_rows: str = "all"  # "all", or the part of a fused producer: "qkv:v" (last kv rows), "gate_up:up" (second half)


@dataclasses.dataclass(frozen=True)
class MoE:
    """A sparse MoE MLP: the router stays float; each expert's linears are quantized on its routed tokens."""
    experts: str  # the experts' container inside the block
    router: str
    expert_linears: tuple[str, str, str]  # the names of (gate, up, down) inside one expert
    checkpoint_prefix: str = ""  # where the checkpoint keeps the MoE module when it is not `mlp` (Mixtral)


@dataclasses.dataclass(frozen=True)
class Layout:
    families: tuple[str, ...]  # config.model_type values
    layer_classes: tuple[str, ...]  # the decoder layer's class names in transformers
    sequential: tuple[tuple[str, ...], ...]
    norm_sites: tuple[NormSite, ...]
    linear_folds: tuple[LinearFold, ...]
    writers: tuple[str, ...]  # linears that write to the residual stream
    norm_offset: float = 0.0
    post_norms: tuple[str, ...] = ()
    k_proj: str | None = f"{ATTENTION}.k_proj"
    v_proj: str | None = f"{ATTENTION}.v_proj"
    no_clip: tuple[str, ...] = (f"{ATTENTION}.q_proj", f"{ATTENTION}.k_proj")
    moe: MoE | None = None
    logit_softcap: str | None = None  # the config field of a final logit soft-cap (Gemma 2)

    def readers_of(self, norm: str) -> tuple[str, ...]:
        return next(s.readers for s in self.norm_sites if s.norm == norm)


QKV = (f"{ATTENTION}.q_proj", f"{ATTENTION}.k_proj", f"{ATTENTION}.v_proj")
O_PROJ = f"{ATTENTION}.o_proj"
GATE_UP = (f"{MLP}.gate_proj", f"{MLP}.up_proj")
DOWN = f"{MLP}.down_proj"
DENSE_SEQUENTIAL = (QKV, (O_PROJ,), GATE_UP, (DOWN,))
DENSE_FOLDS = (LinearFold("o", QKV[2], (O_PROJ,)), LinearFold("down", GATE_UP[1], (DOWN,)))


def _dense(families, classes, mlp_norm="post_attention_layernorm", **kw) -> Layout:
    return Layout(families, classes, DENSE_SEQUENTIAL,
                  (NormSite("input_layernorm", QKV, ATTENTION), NormSite(mlp_norm, GATE_UP, MLP)),
                  DENSE_FOLDS, (O_PROJ, DOWN), **kw)


def _moe(families, classes, moe: MoE) -> Layout:
    gate, up, down = (f"{moe.experts}.*.{n}" for n in moe.expert_linears)
    return Layout(families, classes, (QKV, (O_PROJ,), (gate, up), (down,)),
                  (NormSite("input_layernorm", QKV, ATTENTION),
                   NormSite("post_attention_layernorm", (gate, up), MLP, float_readers=(moe.router,))),
                  (LinearFold("o", QKV[2], (O_PROJ,)),), (O_PROJ, down), moe=moe)


PHI3_QKV, PHI3_GATE_UP = f"{ATTENTION}.qkv_proj", f"{MLP}.gate_up_proj"

LAYOUTS: tuple[Layout, ...] = (
    _dense(("llama",), ("LlamaDecoderLayer",)),
    _dense(("mistral",), ("MistralDecoderLayer",)),
    _dense(("qwen2",), ("Qwen2DecoderLayer",)),
    _dense(("qwen3",), ("Qwen3DecoderLayer",)),
    _dense(("gemma2",), ("Gemma2DecoderLayer",), mlp_norm="pre_feedforward_layernorm", norm_offset=1.0,
           post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
           logit_softcap="final_logit_softcapping"),
    _dense(("gemma3_text", "gemma3"), ("Gemma3DecoderLayer",), mlp_norm="pre_feedforward_layernorm",
           norm_offset=1.0, post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
           logit_softcap="final_logit_softcapping"),
    Layout(("phi3",), ("Phi3DecoderLayer",), ((PHI3_QKV,), (O_PROJ,), (PHI3_GATE_UP,), (DOWN,)),
           (NormSite("input_layernorm", (PHI3_QKV,), ATTENTION),
            NormSite("post_attention_layernorm", (PHI3_GATE_UP,), MLP)),
           (LinearFold("o", PHI3_QKV, (O_PROJ,), prev_rows="qkv:v"),
            LinearFold("down", PHI3_GATE_UP, (DOWN,), prev_rows="gate_up:up")),
           (O_PROJ, DOWN), k_proj=None, v_proj=None, no_clip=(PHI3_QKV,)),
    # OLMo 2 normalizes after attention and after the MLP, not before: q/k/v and gate/up read the raw stream,
    # so no scale folds in front of them.
    Layout(("olmo2",), ("Olmo2DecoderLayer",), DENSE_SEQUENTIAL, (), DENSE_FOLDS, (O_PROJ, DOWN),
           post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    _moe(("mixtral",), ("MixtralDecoderLayer",),
         MoE(f"{MLP}.experts", f"{MLP}.gate", ("w1", "w3", "w2"), checkpoint_prefix="block_sparse_moe")),
    _moe(("qwen3_moe",), ("Qwen3MoeDecoderLayer",),
         MoE(f"{MLP}.experts", f"{MLP}.gate", ("gate_proj", "up_proj", "down_proj"))),
)
BY_FAMILY = {f: layout for layout in LAYOUTS for f in layout.families}
BY_CLASS = {c: layout for layout in LAYOUTS for c in layout.layer_classes}
SUPPORTED_FAMILIES = tuple(BY_FAMILY)
# GGUF `general.architecture` names of the families above that transformers reads from GGUF.
GGUF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")
# Multimodal families whose language model calm quantizes alone: the config field holding its config, and the
# prefix the checkpoint gives its tensors. The saved model is that language model (gemma3 -> gemma3_text).
LANGUAGE_MODELS = {"gemma3": ("text_config", "language_model.")}


def check_family(model_type: str, where: str) -> None:
    """Refuse an unsupported family before any conversion or loading, with the supported ones listed."""
    if model_type not in BY_FAMILY:
        raise CalmUsageError(f"{where}: model type {model_type!r} is not supported; calm walks these families: "
                             f"{', '.join(SUPPORTED_FAMILIES)}")


def family_of_folder(folder: Path) -> str:
    return json.loads((Path(folder) / "config.json").read_text()).get("model_type", "?")


def layout_of(block: nn.Module) -> Layout:
    """The layout of a decoder block, by its class."""
    layout = BY_CLASS.get(type(block).__name__)
    if layout is None:
        raise CalmUsageError(f"{type(block).__name__} is not a decoder block calm knows; calm walks these "
                             f"families: {', '.join(SUPPORTED_FAMILIES)}")
    return layout


def language_config(config):
    """The config calm builds the model from: a multimodal family's language model's own config."""
    field = LANGUAGE_MODELS.get(getattr(config, "model_type", ""), (None,))[0]
    return getattr(config, field) if field else config


def checkpoint_prefix(config) -> str:
    """The prefix a multimodal checkpoint gives its language model's tensors ('' for a plain causal LM)."""
    return LANGUAGE_MODELS.get(getattr(config, "model_type", ""), (None, ""))[1]


def text_model(model: nn.Module) -> nn.Module:
    """The module holding embed_tokens, layers and norm (Gemma 3's multimodal model keeps it as language_model)."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    try:
        return text_model(model).layers
    except AttributeError as exc:
        raise CalmUsageError(f"{type(model).__name__} has no decoder layers where calm looks (model.layers); "
                             f"calm walks these families: {', '.join(SUPPORTED_FAMILIES)}") from exc


def final_norm(model: nn.Module) -> nn.Module:
    return text_model(model).norm


def text_config(config):
    return getattr(config, "text_config", None) or config


def layer_types(config) -> list[str] | None:
    """Per layer, its attention kind (full / sliding window), when the family mixes them."""
    return getattr(text_config(config), "layer_types", None)


def logit_softcap(model: nn.Module) -> float | None:
    layout = layout_of(decoder_blocks(model)[0])
    if layout.logit_softcap is None:
        return None
    return getattr(text_config(model.config), layout.logit_softcap, None)


def apply_softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's final logit soft-cap, cap * tanh(logits / cap), as its causal LM head applies it."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


# Names inside a block --------------------------------------------------------------------------------------
def expand(block: nn.Module, patterns: tuple[str, ...]) -> tuple[str, ...]:
    """The block's module names matching the patterns, in pattern order then module order (experts by index)."""
    names = [n for n, _ in block.named_modules()]
    out: list[str] = []
    for p in patterns:
        out.extend(n for n in names if (fnmatch.fnmatchcase(n, p) if "*" in p else n == p) and n not in out)
    return tuple(out)


def sequential_groups(block: nn.Module) -> list[tuple[str, ...]]:
    return [g for g in (expand(block, group) for group in layout_of(block).sequential) if g]


def is_expert_linear(block: nn.Module, name: str) -> bool:
    moe = layout_of(block).moe
    return moe is not None and name.startswith(moe.experts + ".")


# Norms -------------------------------------------------------------------------------------------------------
def norm_gain(block: nn.Module, norm: nn.Module) -> torch.Tensor:
    """The per-channel gain a norm multiplies by (w, or 1 + w for Gemma), float64."""
    return norm.weight.detach().to(torch.float64) + layout_of(block).norm_offset


def set_norm_gain(block: nn.Module, norm: nn.Module, gain: torch.Tensor) -> None:
    """Make the norm multiply by `gain` (float64 in, the norm's dtype stored)."""
    check_plain_norm(norm)
    value = gain.to(torch.float64) - layout_of(block).norm_offset
    norm.weight.data = value.to(norm.weight.dtype).to(norm.weight.device).contiguous()


def check_plain_norm(norm: nn.Module, where: str = "") -> None:
    if not isinstance(getattr(norm, "weight", None), torch.Tensor) or getattr(norm, "bias", None) is not None:
        raise CalmUsageError(f"{where or type(norm).__name__}: expected an RMS norm with a weight and no bias")


def fold_rows(block: nn.Module, fold: LinearFold) -> slice:
    """The output rows of `fold.prev` that are the next linears' inputs."""
    prev = block.get_submodule(fold.prev)
    if fold.prev_rows == "all":
        return slice(0, prev.out_features)
    if fold.prev_rows == "gate_up:up":
        return slice(prev.out_features // 2, prev.out_features)
    if fold.prev_rows == "qkv:v":
        attn = block.get_submodule(ATTENTION)
        kv = attn.config.num_key_value_heads * attn.head_dim
        return slice(prev.out_features - kv, prev.out_features)
    raise ValueError(f"unknown fused rows {fold.prev_rows!r}")


def head_dim_of(block: nn.Module) -> int:
    head_dim = getattr(getattr(block, ATTENTION, None), "head_dim", None)
    if head_dim is None:
        raise CalmUsageError(f"{type(block).__name__} has no {ATTENTION}.head_dim: calm cannot find its heads")
    return int(head_dim)


# MoE experts -------------------------------------------------------------------------------------------------
class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its three projections as separate linears."""

    def __init__(self, names: tuple[str, str, str], gate: nn.Linear, up: nn.Linear, down: nn.Linear, act) -> None:
        super().__init__()
        self.names = names
        for name, linear in zip(names, (gate, up, down)):
            setattr(self, name, linear)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.Module):
    """transformers' fused experts (3-D `gate_up_proj` and `down_proj` parameters) as one `ExpertMLP` per
    expert, computing the same routed sum. Why: calm quantizes each expert's linears separately, on the tokens
    routed to it, and its quantized modules replace `nn.Linear`s. The experts are the direct children `0, 1, ...`
    (state dict keys `experts.0.w1.weight`), as the families' checkpoints name them."""

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__()
        for i, expert in enumerate(experts):
            self.add_module(str(i), expert)
        self.num_experts = len(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            slot, token = torch.where(mask[e])
            y = self._modules[str(e)](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _expert_linear(n_in: int, n_out: int, like: torch.Tensor, weight: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(n_in, n_out, bias=False, device=like.device, dtype=like.dtype)
    if weight is not None:
        linear.weight.data = weight.detach().clone().contiguous()
    return linear


def unfuse_experts(model: nn.Module) -> None:
    """Replace every block's fused experts by `UnfusedExperts` (weights kept; on meta they stay on meta)."""
    for block in decoder_blocks(model):
        moe = layout_of(block).moe
        if moe is None:
            return
        fused = block.get_submodule(moe.experts)
        if isinstance(fused, UnfusedExperts):
            continue
        gate_up, down = fused.gate_up_proj, fused.down_proj
        n_experts, two_inter, hidden = gate_up.shape
        inter = two_inter // 2
        real = gate_up.device.type != "meta"
        experts = []
        for e in range(n_experts):
            experts.append(ExpertMLP(moe.expert_linears,
                                     _expert_linear(hidden, inter, gate_up, gate_up[e, :inter] if real else None),
                                     _expert_linear(hidden, inter, gate_up, gate_up[e, inter:] if real else None),
                                     _expert_linear(inter, hidden, down, down[e] if real else None),
                                     fused.act_fn))
        parent, _, child = moe.experts.rpartition(".")
        setattr(block.get_submodule(parent), child, UnfusedExperts(experts))


def checkpoint_name(model: nn.Module, name: str) -> str:
    """The name a float checkpoint of the family gives the model's tensor `name` (Mixtral keeps its MoE module
    as `block_sparse_moe`; transformers 5 calls it `mlp` in memory)."""
    blocks = decoder_blocks(model)
    if not len(blocks):
        return name
    moe = layout_of(blocks[0]).moe
    if moe is None or not moe.checkpoint_prefix or ".layers." not in name:
        return name
    head, _, rest = name.partition(".layers.")
    index, _, inner = rest.partition(".")
    if inner.startswith(MLP + "."):
        inner = moe.checkpoint_prefix + inner[len(MLP):]
    return f"{head}.layers.{index}.{inner}"


# The family matrix of the README (`python -m calm.arch`; tests/test_arch.py checks the README holds it) ------
ALWAYS = "rtn, gptq, claq, rotation, affine, kurtosis"


def family_row(layout: Layout) -> list[str]:
    awq_groups = [{"self_attn": "qkv", "mlp": "gate_up"}[s.loss_module] for s in layout.norm_sites]
    awq_groups += [f.name for f in layout.linear_folds if layout.moe is None or f.prev != layout.moe.experts]
    notes = []
    if layout.norm_offset:
        notes.append("norms scale by 1 + w")
    if layout.post_norms:
        notes.append("norms after attention and MLP" + (" (sandwich)" if layout.norm_sites else ""))
    if any(f.prev_rows != "all" for f in layout.linear_folds):
        notes.append("fused qkv_proj, gate_up_proj")
    if layout.moe is not None:
        notes.append("MoE: experts on their routed tokens, router float")
    if layout.logit_softcap:
        notes.append("final logit soft-cap when the config sets one")
    yes, no = "yes", "no"
    return [", ".join(f"`{f}`" for f in layout.families), ALWAYS,
            ("awq (" + ", ".join(awq_groups) + ")") if awq_groups else "awq (none)",
            yes if layout.norm_sites else no, no if layout.post_norms else yes,
            yes if layout.k_proj and layout.v_proj else no, "; ".join(notes) or "-"]


def family_matrix() -> str:
    header = ["family (`model_type`)", "candidates", "AWQ scale groups (o: without GQA)", "smoothquant",
              "--residual-rotation", "K/V quantization", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(family_row(layout)) + " |" for layout in LAYOUTS]
    return "\n".join(lines)


if __name__ == "__main__":
    print(family_matrix())
