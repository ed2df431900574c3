"""Model-wide residual rotation (QuaRot's offline step), applied once before the search.

The residual stream is re-expressed in an orthogonal basis Q (a randomized Hadamard matrix of the hidden size,
or a random orthogonal matrix), folded into the weights, so the float model computes the same function:
- each RMS norm's weight is folded into the linears that read its output (q/k/v, gate/up, lm_head) and set to
  1: RMS(x Q) = RMS(x) for orthogonal Q, but a per-channel weight does not commute with Q;
- embeddings E <- E Q; linears that read the stream W <- W Q; linears that write to it (o_proj, down_proj)
  W <- Q^T W and b <- b Q; lm_head W <- W diag(g) Q, untied from the embedding.

Why: Q spreads the residual stream's massive-activation channels over all channels, so the inputs of
q/k/v/gate/up quantize per token with less error for every candidate of the search, including RTN and GPTQ
without a layer-local rotation. The inputs of o_proj (the heads' values) and down_proj (the MLP's hidden
state) are not in the residual basis and are left alone: layer-local candidates (`rotation`, `affine`) still
transform them, and on q/k/v/gate/up they apply their own transform on top of Q.
The cost is the folding: the activation quantizer then sees the normalized stream without the norm's weight,
and on SmolLM2, whose massive-activation channel has a small norm weight, that made the rotation and affine
candidates worse at W4A4 (README, "Model-wide residual rotation"), so it is off by default.
"""
from __future__ import annotations

import torch
from torch import nn

from calm.config import CalmUsageError
from calm.model import decoder_blocks
from calm_kernels.rotated import hadamard_matrix

KINDS = ("none", "hadamard", "random")
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def rotation_matrix(kind: str, n: int, seed: int) -> torch.Tensor:
    """An (n, n) float64 orthogonal matrix: H D / sqrt(n) with random signs D ("hadamard"), or the Q of a
    Gaussian matrix's QR ("random").

    The signs go between H and whatever follows: a layer-local candidate applies its own Hadamard R on top
    (x Q R), and with D H instead, Q R = D H R / sqrt(n) is close to a signed permutation (exactly D for a
    symmetric H of the same order), which would undo the spreading. H D R is as incoherent as a random
    rotation."""
    g = torch.Generator().manual_seed(seed)
    if kind == "hadamard":
        try:
            h = hadamard_matrix(n).to(torch.float64)
        except ValueError as exc:
            raise CalmUsageError(f"--residual-rotation hadamard: {exc}; use --residual-rotation random") from exc
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        return h * signs[None, :] / n ** 0.5
    if kind == "random":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    raise CalmUsageError(f"unknown residual rotation {kind!r}; choose one of {', '.join(KINDS)}")


def _rms_weight(norm: nn.Module, where: str) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    if w is None or getattr(norm, "bias", None) is not None or "gemma" in type(norm).__name__.lower():
        raise CalmUsageError(f"{where} ({type(norm).__name__}) is not a plain RMS norm y = w * x / rms(x): the "
                             "residual rotation supports LLaMA/Qwen2/Mistral-style models; drop --residual-rotation")
    return w.detach().to(torch.float64)


def _float_linear(block: nn.Module, name: str) -> nn.Linear:
    linear = block.get_submodule(name)
    if type(linear) is not nn.Linear:
        raise CalmUsageError(f"{name} is a {type(linear).__name__}: rotate the residual stream of the float model, "
                             "before quantizing")
    return linear


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


def rotate_residual(model: nn.Module, kind: str = "hadamard", seed: int = 0) -> torch.Tensor | None:
    """Rotate `model`'s residual stream in place (float model only); returns Q, or None for kind "none"."""
    if kind == "none":
        return None
    q = rotation_matrix(kind, model.config.hidden_size, seed)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise CalmUsageError("the residual rotation needs a bias-free lm_head; drop --residual-rotation")
    final_norm = model.model.norm
    # Everything is checked before anything changes, so a refused model is left as it was.
    final_g = _rms_weight(final_norm, "model.norm")
    blocks = []
    for i, block in enumerate(decoder_blocks(model)):
        readers = [(block.get_submodule(n), _rms_weight(block.get_submodule(n), f"block {i} {n}"),
                    [_float_linear(block, r) for r in rs]) for n, rs in READERS.items()]
        blocks.append((readers, [_float_linear(block, w) for w in WRITERS]))

    head_weight = head.weight.detach().to(torch.float64) * final_g[None, :]
    if head.weight is embed.weight:  # tied: the head gets its own copy with the final norm folded in
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    _set(head.weight, head_weight @ q)
    _set(embed.weight, embed.weight.detach().to(torch.float64) @ q)
    final_norm.weight.data.fill_(1.0)
    for readers, writers in blocks:
        for norm, g, linears in readers:
            for linear in linears:
                _set(linear.weight, linear.weight.detach().to(torch.float64) * g[None, :] @ q)
            norm.weight.data.fill_(1.0)
        for linear in writers:
            _set(linear.weight, q.T @ linear.weight.detach().to(torch.float64))
            if linear.bias is not None:
                _set(linear.bias, linear.bias.detach().to(torch.float64) @ q)
    return q
