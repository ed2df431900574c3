"""Learned affine transforms (FlatQuant, arXiv 2410.09426, in a CPU-bounded form).

Per linear of the block, an invertible Kronecker transform P = P1 (x) P2 (initialized at the normalized
Hadamard factors of calm_kernels.rotated, so training starts from the rotation candidate) acts online on the
input, x -> x P, and P^-1 is folded into the weight, W -> W P^-T: exact in floating point. Beside it:
- a per-channel scale s for the inputs that come from an RMSNorm (q/k/v share input_layernorm, gate/up share
  post_attention_layernorm): x -> x / s, W -> W diag(s), folded into the norm's weight (exact). o_proj and
  down_proj have no scale (their inputs come from attention and the SwiGLU product; only P transforms them);
- learnable weight clipping (a ratio per output row) and activation clipping (one ratio per linear), both
  sigmoid-parameterized; weight clips start at 0.982, activation clips at min(0.982, `clip_init`) ("auto":
  actquant.AUTO_CLIP by activation bits).
Training: per block, AdamW on the mean squared error between the block's output with every linear
fake-quantized (straight-through rounding; K/V fake-quantized too when the scheme quantizes them) and the
float block's output on the same inputs (the inputs the search hands the block). `steps` optimizer steps,
each on `batch_tokens` tokens (a prefix of one calibration window), cosine-decayed `lr`. FlatQuant trains 15
epochs on 128 x 2048 tokens on a GPU; the defaults here are far smaller so that a 2-core CPU quantizes a
135M model in minutes: expect less than the paper's gain.
Deployment: RotatedQuantLinear with the learned factors (non-orthogonal Kronecker path of the rotated
kernel) and the learned activation clip; weights by RTN with the learned row clips (`weights=rtn`, as
trained) or by GPTQ on W P^-T with the Hessian of x P (`weights=gptq`).

`mode_for(name, linear)` lets a caller (the kurtosis rule) train only some linears: 'learned' (P trained),
'hadamard' (P fixed at the Hadamard, clips still learned) or 'none' (no transform, clips learned).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from calm import arch, distributed
from calm.algorithms import actquant, register, replace_module
from calm.algorithms.gptq_core import single_thread
from calm.algorithms.options import AlgorithmOptions, option
from calm.algorithms.rotation import WEIGHT_METHODS, quantize_linears
from calm.config import QuantSpec
from calm.model import BlockInputs, block_linears
from calm.nn import fake_quantize_kv
from calm_kernels import rotated

MODES = ("learned", "hadamard", "none")
CLIP_INIT = 4.0  # sigmoid(4) = 0.982: start just below no clipping, with a usable gradient

ModeChoice = Callable[[str, nn.Module], str]


def _kron_apply(x: torch.Tensor, factors) -> torch.Tensor:
    """x (.., K) times kron(factors) along the last dim (differentiable)."""
    shape = x.shape
    orders = [f.shape[0] for f in factors]
    z = x.reshape(-1, *orders)
    for axis, f in enumerate(factors, start=1):
        z = torch.movedim(torch.tensordot(z, f, dims=([axis], [0])), -1, axis)
    return z.reshape(shape)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _fake_quant_symmetric(x: torch.Tensor, bits: int, clip: torch.Tensor) -> torch.Tensor:
    """Per-row (last dim) symmetric quantize-dequantize with a clip ratio, straight-through rounding."""
    qmin, qmax = rotated.code_range(bits)
    scale = (x.abs().amax(dim=-1, keepdim=True) * clip / qmax).clamp(min=1e-8)
    return torch.clamp(_round_ste(x / scale), qmin, qmax) * scale


def _fake_quant_kv(y: torch.Tensor, bits: int, head_dim: int, group: int) -> torch.Tensor:
    """calm.nn.fake_quantize_kv with a straight-through gradient."""
    return y + (fake_quantize_kv(y.detach(), bits, head_dim, group) - y).detach()


class _TrainableLinear(nn.Module):
    def __init__(self, linear: nn.Module, spec: QuantSpec, mode: str, scale: nn.Parameter | None,
                 kv: tuple[int, int, int] | None, a_clip_init: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.float32).clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.float32))
        self.w_bits, self.a_bits = spec.w_bits, spec.a_bits
        self.mode = mode
        self.log_scale = scale  # shared by the linears of one norm site; None elsewhere
        self.kv = kv
        self.quantize = True
        factors: list[torch.Tensor] = []
        if mode != "none":
            t = rotated.hadamard_transform(linear.in_features)
            factors = [f * (1.0 / math.sqrt(f.shape[0])) for f in t.factors]
        if mode == "learned":
            self.factors = nn.ParameterList([nn.Parameter(f.clone()) for f in factors])
        else:
            self.factors = [f.clone() for f in factors]
        self.w_clip = nn.Parameter(torch.full((linear.out_features, 1), CLIP_INIT,
                                                     device=linear.weight.device))
        self.a_clip = nn.Parameter(torch.tensor(min(CLIP_INIT, math.log(a_clip_init / (1.0 - a_clip_init)))
                                                if a_clip_init < 1.0 else CLIP_INIT, device=linear.weight.device))

    def folded_weight(self) -> torch.Tensor:
        w = self.weight
        if self.log_scale is not None:
            w = w * self.log_scale.exp()
        if len(self.factors):
            w = _kron_apply(w, [torch.linalg.inv(f).T for f in self.factors])
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.log_scale is not None:
            x = x / self.log_scale.exp()
        if len(self.factors):
            x = _kron_apply(x, list(self.factors))
        w = self.folded_weight()
        if self.quantize:
            x = _fake_quant_symmetric(x, self.a_bits, torch.sigmoid(self.a_clip))
            w = _fake_quant_symmetric(w, self.w_bits, torch.sigmoid(self.w_clip))
        y = nn.functional.linear(x, w, self.bias)
        if self.quantize and self.kv is not None:
            y = _fake_quant_kv(y, *self.kv)
        return y


def norm_sites(block: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each pre-norm of the block (calm.arch) and the quantized linears that read it."""
    return {site.norm: arch.expand(block, site.readers) for site in arch.layout_of(block).norm_sites}


def _crop(inputs: BlockInputs, batch: int, row: int, tokens: int) -> tuple[torch.Tensor, dict]:
    """`tokens` tokens of calibration batch `batch` from window `row` on: the window's prefix when tokens < T,
    else tokens // T whole windows; keyword arguments cropped to match (causal attention: a prefix is a
    valid shorter sequence)."""
    h = inputs.batch(batch)
    t = min(tokens, h.shape[1])
    rows = max(1, min(tokens // h.shape[1], h.shape[0]))
    row = min(row, h.shape[0] - rows)

    def cut(v):
        if isinstance(v, torch.Tensor):
            r = slice(row, row + rows) if v.dim() and v.shape[0] > 1 else slice(0, 1)
            if v.dim() == 4:  # attention mask (b, 1, T, T)
                return v[r, :, :t, :t]
            if v.dim() >= 2 and v.shape[1] == h.shape[1]:  # position ids / rotary tables (b, T, ...)
                return v[r, :t]
            return v
        if isinstance(v, tuple):
            return tuple(cut(e) for e in v)
        return v

    return h[row:row + rows, :t], {k: cut(v) for k, v in inputs.kwargs[batch].items()}


def _block_out(block: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = block(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def train_transforms(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, mode_for: ModeChoice, *,
                     steps: int, lr: float, batch_tokens: int, seed: int = 0, a_clip_init: float = 1.0
                     ) -> tuple[nn.Module, dict]:
    """A copy of `block` whose linears are _TrainableLinear, trained; returns it and the norm-site scales."""
    work = copy.deepcopy(block)
    for p in work.parameters():
        p.requires_grad_(False)
    linears = block_linears(work)
    modes = {n: mode_for(n, m) for n, m in linears.items()}
    scales: dict[str, nn.Parameter] = {}
    sites = norm_sites(work)
    for norm, names in sites.items():
        if any(modes.get(n) == "learned" for n in names):
            scales[norm] = nn.Parameter(torch.zeros(linears[names[0]].in_features,
                                                    device=linears[names[0]].weight.device))
    site_of = {n: norm for norm, names in sites.items() for n in names if norm in scales}
    head_dim = actquant.head_dim_of(work) if spec.k_bits != 16 or spec.v_bits != 16 else 0
    for name, linear in linears.items():
        kv = None
        field = actquant.kv_field(work, name)
        if field is not None and getattr(spec, field) != 16:
            kv = (getattr(spec, field), head_dim, spec.kv_group_size or head_dim)
        replace_module(work, name, _TrainableLinear(linear, spec, modes[name], scales.get(site_of.get(name)), kv,
                                                    a_clip_init))
    params = [p for p in work.parameters() if p.requires_grad]
    with single_thread():
        _optimize(block, work, inputs, params, steps, lr, batch_tokens, seed)
    return work, scales


def _optimize(block: nn.Module, work: nn.Module, inputs: BlockInputs, params: list[nn.Parameter], steps: int,
              lr: float, batch_tokens: int, seed: int) -> None:
    if steps > 0 and params:
        world = distributed.current()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            batch = int(torch.randint(len(inputs), (1,), generator=gen, device="cpu"))
            row = int(torch.randint(inputs.hidden[batch].shape[0], (1,), generator=gen, device="cpu"))
            h, kw = _crop(inputs, batch, row, batch_tokens)
            with torch.no_grad():
                target = _block_out(block, h, kw)
            loss = nn.functional.mse_loss(_block_out(work, h, kw), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world.data:  # each process drew its batch from its shard: average the gradients (as DDP does)
                for p in params:
                    world.sum_(p.grad if p.grad is not None else p.new_zeros(p.shape)).div_(world.size)
            opt.step()
            sched.step()


def fold_into_block(block: nn.Module, scales: dict[str, nn.Parameter]) -> None:
    """Fold the learned per-channel scales into `block` in place (norm weight / s, linear weight * s): the
    float block computes the same function afterwards."""
    float_readers = {site.norm: arch.expand(block, site.float_readers) for site in arch.layout_of(block).norm_sites}
    with torch.no_grad():
        for norm, s in scales.items():
            factor = s.detach().exp()
            module = block.get_submodule(norm)
            arch.set_norm_gain(block, module, arch.norm_gain(block, module) / factor.to(torch.float64))
            for name in norm_sites(block)[norm] + float_readers[norm]:
                lin = block.get_submodule(name)
                lin.weight.mul_(factor.to(lin.weight.dtype))


def transform_of(module: _TrainableLinear):
    if module.mode == "none":
        return None
    if module.mode == "hadamard":
        return rotated.hadamard_transform(module.weight.shape[1])
    return rotated.kronecker_transform(*[f.detach() for f in module.factors])


def _rtn_row_clipped(w: torch.Tensor, bits: int, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qmin, qmax = rotated.code_range(bits)
    scale = (w.abs().amax(dim=1) * clip.reshape(-1) / qmax).to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = rotated.round_half_to_even(torch.clamp(w / safe.unsqueeze(1), qmin, qmax)).to(torch.int8)
    return codes, scale


def quantize_with_transforms(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, mode_for: ModeChoice, *,
                             weights: str, steps: int, lr: float, batch_tokens: int, damp: float = 0.01,
                             act_order: str = "none", a_clip_init: float = 1.0) -> nn.Module:
    """Train, fold, and replace every linear of `block` (in place) by a RotatedQuantLinear."""
    trained, scales = train_transforms(block, inputs, spec, mode_for, steps=steps, lr=lr, batch_tokens=batch_tokens,
                                       a_clip_init=a_clip_init)
    fold_into_block(block, scales)
    tl = {name: trained.get_submodule(name) for name in block_linears(block)}
    if weights == "gptq":
        return quantize_linears(block, inputs, spec, lambda name, linear: transform_of(tl[name]), weights="gptq",
                                clip_ratio=lambda name: float(torch.sigmoid(tl[name].a_clip.detach())),
                                act_order=act_order, damp=damp)
    for name, linear in block_linears(block).items():
        t = transform_of(tl[name])
        w = t.fold_into_weight(linear.weight.detach()) if t is not None else linear.weight.detach().float()
        codes, row_scales = _rtn_row_clipped(w, spec.w_bits, torch.sigmoid(tl[name].w_clip.detach()))
        a_clip = float(torch.sigmoid(tl[name].a_clip.detach()))
        q = actquant.activation_linear(linear, spec, t, a_clip, codes, row_scales)
        replace_module(block, name, actquant.with_kv_quantization(block, name, q, spec))
    return block


@dataclasses.dataclass(frozen=True)
class TrainingOptions(AlgorithmOptions):
    """Options of the learned transforms, shared by affine and the kurtosis rule."""
    weights: str = option("gptq", "how the transformed weights are quantized", choices=WEIGHT_METHODS)
    steps: int = option(40, "optimizer steps per block", low=0)
    lr: float = option(5e-3, "AdamW learning rate (cosine-decayed)", low=0.0, low_open=True)
    batch_tokens: int = option(256, "tokens per optimizer step (a prefix of one calibration window)", low=2)


@dataclasses.dataclass(frozen=True)
class AffineOptions(TrainingOptions):
    damp: float = option(0.01, "GPTQ damping (weights=gptq), as a fraction of mean(diag H)", low=0.0,
                         low_open=True)
    clip_init: float | str = option("auto", "where the learned activation clip starts, in (0, 1], or auto (by "
                                    "activation bits)", choices=("auto",), low=0.0, high=1.0, low_open=True)


@register("affine", AffineOptions,
          check_spec=actquant.transform_spec_check("affine", "learns transforms of the activations it quantizes"))
def quantize_block(block: nn.Module, inputs: BlockInputs, spec: QuantSpec, options: AffineOptions,
                   context: dict) -> nn.Module:
    for linear in block_linears(block).values():
        actquant.transform_for(linear.in_features, True, "affine")
    with torch.enable_grad():
        return quantize_with_transforms(block, inputs, spec, lambda name, linear: "learned", weights=options.weights,
                                        steps=options.steps, lr=options.lr, batch_tokens=options.batch_tokens,
                                        damp=options.damp,
                                        a_clip_init=actquant.resolve_clip(options.clip_init, spec.a_bits))
