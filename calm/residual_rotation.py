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

from calm import arch
from calm.arch import decoder_blocks, layout_of
from calm.config import CalmUsageError
from calm_kernels.rotated import hadamard_matrix

KINDS = ("none", "hadamard", "random")


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


def _check_rms(norm: nn.Module, where: str) -> None:
    if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is not None:
        raise CalmUsageError(f"{where} ({type(norm).__name__}) is not an RMS norm y = g * x / rms(x): the residual "
                             "rotation cannot fold it; drop --residual-rotation")


def _float_linear(block: nn.Module, name: str) -> nn.Module:
    linear = block.get_submodule(name)
    if type(linear) is not nn.Linear and not _is_router(block, name):
        raise CalmUsageError(f"{name} is a {type(linear).__name__}: rotate the residual stream of the float model, "
                             "before quantizing")
    return linear


def _is_router(block: nn.Module, name: str) -> bool:
    moe = layout_of(block).moe
    return moe is not None and name == moe.router


def _readers(block: nn.Module, site: arch.NormSite) -> tuple[str, ...]:
    return arch.expand(block, site.readers + site.float_readers)


def check_rotatable(model: nn.Module) -> None:
    """Refuse, before anything changes, a model whose residual stream cannot be rotated exactly (checks module
    types only, so it works on a skeleton whose weights are not loaded)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise CalmUsageError("the residual rotation needs a bias-free lm_head; drop --residual-rotation")
    _check_rms(arch.final_norm(model), "the final norm")
    for i, block in enumerate(decoder_blocks(model)):
        layout = layout_of(block)
        if layout.post_norms:
            raise CalmUsageError(f"{layout.families[0]} normalizes what its blocks write to the residual stream "
                                 f"({', '.join(layout.post_norms)}): a per-channel gain there does not commute with a "
                                 f"rotation of the stream; drop --residual-rotation (the layer-local rotation and "
                                 f"affine candidates still work)")
        for site in layout.norm_sites:
            _check_rms(block.get_submodule(site.norm), f"block {i} {site.norm}")
            for r in _readers(block, site):
                _float_linear(block, r)
        for w in arch.expand(block, layout.writers):
            _float_linear(block, w)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def rotate_embedding(embed: nn.Module, q: torch.Tensor) -> None:
    _set(embed.weight, _f64(embed.weight) @ q.to(embed.weight.device))


def rotate_block(block: nn.Module, q: torch.Tensor) -> None:
    """Fold the block's norms into the linears that read them and rotate its reads and writes of the stream."""
    q = q.to(next(block.parameters()).device)
    layout = layout_of(block)
    for site in layout.norm_sites:
        norm = block.get_submodule(site.norm)
        g = arch.norm_gain(block, norm)
        for name in _readers(block, site):
            linear = _float_linear(block, name)
            _set(linear.weight, _f64(linear.weight) * g[None, :] @ q)
        arch.set_norm_gain(block, norm, torch.ones_like(g))
    for name in arch.expand(block, layout.writers):
        linear = _float_linear(block, name)
        _set(linear.weight, q.T @ _f64(linear.weight))
        if linear.bias is not None:
            _set(linear.bias, _f64(linear.bias) @ q)


def rotate_head(final_norm: nn.Module, head: nn.Module, q: torch.Tensor) -> None:
    """lm_head W <- W diag(g) Q with the final norm's weight g, which becomes 1 (the families the rotation
    takes have plain RMS norms: Gemma's 1 + w norms come with sandwich norms, which it refuses)."""
    g = _f64(final_norm.weight)
    _set(head.weight, _f64(head.weight) * g[None, :] @ q.to(head.weight.device))
    final_norm.weight.data.fill_(1.0)


def rotate_residual(model: nn.Module, kind: str = "hadamard", seed: int = 0) -> torch.Tensor | None:
    """Rotate `model`'s residual stream in place (float model in memory only); returns Q, or None for "none"."""
    if kind == "none":
        return None
    q = rotation_matrix(kind, model.config.hidden_size, seed)
    check_rotatable(model)  # everything is checked before anything changes: a refused model is left as it was
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is embed.weight:  # tied: the head gets its own copy with the final norm folded in
        head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    rotate_head(arch.final_norm(model), head, q)
    rotate_embedding(embed, q)
    for block in decoder_blocks(model):
        rotate_block(block, q)
    return q


class RotationOnLoad:
    """A `calm.streaming` load hook: rotates every piece of a streamed model as it is loaded, so that the
    rotated float model never exists whole (the pieces are re-read and re-rotated at each load)."""

    def __init__(self, model: nn.Module, kind: str, seed: int) -> None:
        check_rotatable(model)
        self.q = rotation_matrix(kind, model.config.hidden_size, seed)
        model.config.tie_word_embeddings = False

    def __call__(self, kind: str, index: int | None, module: nn.Module) -> None:
        if kind == "embed":
            rotate_embedding(module, self.q)
        elif kind == "block":
            rotate_block(module, self.q)
        elif kind == "head":
            rotate_head(module[0], module[1], self.q)
        elif kind == "norm":
            module.weight.data.fill_(1.0)
