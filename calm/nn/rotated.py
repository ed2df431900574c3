"""RotatedQuantLinear: weights and activations both quantized (W3A3, W4A4, W4A8), behind an online transform.

y = Q_a(x R) Q_w(W R^-T)^T + b, kernels in calm_kernels/rotated.py. What it stores, per (out_features N,
in_features K) weight:
- `qweight` (N, K_pad * w_bits / 32) int32: signed per-output-channel symmetric codes as offset binary;
- `w_scales` (N,) float32: one scale per output row;
- the transform R = norm * (F_1 kron F_2): `transform_factor{0,1}` (float32, unnormalized so a Hadamard keeps
  its +-1 entries) and `transform_norm` (float32 scalar). Learned (affine) factors are information and are
  saved and counted, once per linear since each linear stores its own. A normalized Hadamard is rebuilt from
  K (`hadamard` in the config): its factors and norm are non-persistent, neither saved nor counted. With no
  transform there are no factors and the unused norm is not saved either;
- `bias` (N,) float, optional, not counted in `effective_bits` (see calm.nn.base).

Activations are quantized per token at run time: nothing about them is stored.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from calm.nn.base import QuantizedLinear, register

# calm_kernels.rotated imports torch only; triton loads inside its launchers.
from calm_kernels import packing
from calm_kernels import rotated as _rotated
from calm_kernels._dispatch import use_triton as _use_triton


@functools.cache
def _hadamard(n: int):
    """calm_kernels.rotated.hadamard_transform(n), built once per size (callers copy its factors)."""
    return _rotated.hadamard_transform(n)


def _is_hadamard(t, n: int) -> bool:
    """True when `t` is exactly the normalized Hadamard that `hadamard_transform(n)` builds."""
    if t is None or not t.orthogonal:
        return False
    try:
        h = _hadamard(n)
    except ValueError:
        return False
    same_norm = torch.equal(torch.tensor(h.norm, dtype=torch.float32, device="cpu"),
                            torch.tensor(t.norm, dtype=torch.float32, device="cpu"))
    return (h.orders == t.orders and same_norm
            and all(torch.equal(a, b.detach().to("cpu", a.dtype)) for a, b in zip(h.factors, t.factors)))


def _resolve_transform(transform, in_features: int):
    """'hadamard' | 'none' | None | (P1, P2) Kronecker factors | a KroneckerTransform -> KroneckerTransform or None."""
    if transform is None or (isinstance(transform, str) and transform == "none"):
        return None
    if isinstance(transform, str):
        if transform != "hadamard":
            raise ValueError(f"transform must be 'hadamard', 'none', Kronecker factors (P1, P2) or a "
                             f"KroneckerTransform, got {transform!r}")
        return _rotated.hadamard_transform(in_features)
    if isinstance(transform, _rotated.KroneckerTransform):
        t = transform
    elif isinstance(transform, (tuple, list)) and all(isinstance(f, torch.Tensor) for f in transform):
        t = _rotated.kronecker_transform(*transform)
    else:
        raise TypeError(f"transform must be 'hadamard', 'none', a tuple of factor tensors or a KroneckerTransform, "
                        f"got {type(transform).__name__}")
    if t.size != in_features:
        raise ValueError(f"transform of size {t.size} (factor orders {t.orders}) does not match in_features "
                         f"{in_features}")
    return t


@register
class RotatedQuantLinear(QuantizedLinear):
    """y = Q_a(x R) Q_w(W R^-T)^T + b: online transform R and per-token activation quantization (a_bits), then
    an integer GEMM against per-output-channel symmetric w_bits weights (calm_kernels.rotated).

    R is a normalized Hadamard ('hadamard'), learned Kronecker factors (P1, P2), or the identity ('none').
    On CUDA (or under TRITON_INTERPRET=1) a forward is one fused transform+quantize launch and one GEMM
    launch; on the CPU it runs the references. Buffers: see the module docstring; with `hadamard` the
    transform's buffers are rebuilt from in_features rather than saved.
    """

    kind = "rotated"
    _CACHES = ("_dense_cache", "_transform", "_kernel_factors")

    def __init__(self, in_features: int, out_features: int, w_bits: int, a_bits: int,
                 transform_orders: tuple[int, ...] = (), orthogonal: bool = True, clip_ratio: float = 1.0,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, hadamard: bool = False) -> None:
        super().__init__()
        _rotated._check_weight_bits(w_bits)
        _rotated._check_activation_bits(a_bits)
        _rotated._check_clip(clip_ratio)
        orders = tuple(int(d) for d in transform_orders)
        h = _hadamard(in_features) if hadamard else None
        if h is not None and (orders not in ((), h.orders) or not orthogonal):
            raise ValueError(f"the Hadamard of {in_features} has factor orders {h.orders} and is orthogonal; got "
                             f"orders {orders}, orthogonal={orthogonal}")
        orders = h.orders if h is not None else orders
        if orders and math.prod(orders) != in_features:
            raise ValueError(f"transform factor orders {orders} multiply to {math.prod(orders)}, not in_features "
                             f"{in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.clip_ratio = float(clip_ratio)
        self.transform_orders = orders
        self.orthogonal = bool(orthogonal)
        self.hadamard = h is not None
        self.register_buffer("qweight", torch.zeros(out_features, packing.packed_words(in_features, w_bits),
                                                    dtype=torch.int32, device=device))
        self.register_buffer("w_scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        # A Hadamard is rebuilt here from in_features and not saved; without a transform the norm is unused.
        for i, d in enumerate(orders):
            f = h.factors[i].clone() if h is not None else torch.eye(d, dtype=torch.float32, device=device)
            self.register_buffer(f"transform_factor{i}", f.to(device), persistent=h is None)
        self.register_buffer("transform_norm", torch.tensor(h.norm if h is not None else 1.0, dtype=torch.float32,
                                                            device=device), persistent=h is None and bool(orders))
        self._dense_cache: torch.Tensor | None = None  # signed weight codes as float32, CPU path only
        self._transform = None
        self._kernel_factors = None

    # Construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int, transform="hadamard", clip_ratio: float = 1.0,
                   weight_clip_ratio: float = 1.0, weight_codes: torch.Tensor | None = None,
                   weight_scales: torch.Tensor | None = None) -> RotatedQuantLinear:
        """Quantize a float Linear for rotated W{w_bits}A{a_bits} inference.

        Args:
            transform: 'hadamard' (normalized Hadamard of in_features), 'none', Kronecker factors (P1, P2)
                with x' = x (P1 kron P2), or a calm_kernels.rotated.KroneckerTransform.
            clip_ratio: activation clip ratio in (0, 1].
            weight_clip_ratio: RTN weight clip ratio (ignored when weight_codes are given).
            weight_codes, weight_scales: already-quantized weights in the transformed basis (GPTQ, affine
                training): signed codes (out, in) in [-2^(w_bits-1), 2^(w_bits-1) - 1] and per-row scales
                (out,), so that W R^-T ~= codes * scales[:, None]. Get the basis from
                `transform.fold_into_weight(W)` and `transform.apply(X)` (see calm_kernels.rotated).
                With calm.grid's symmetric per-channel grid the signed codes are `codes - zero`.
        """
        w = linear.weight.detach()
        n, k = w.shape
        t = _resolve_transform(transform, k)
        if weight_codes is None:
            if weight_scales is not None:
                raise ValueError("weight_scales given without weight_codes")
            w_t = t.fold_into_weight(w) if t is not None else w.to(torch.float32)
            codes, scales = _rotated.quantize_weights_rtn(w_t, w_bits, weight_clip_ratio)
        else:
            if weight_scales is None:
                raise ValueError("weight_codes given without weight_scales (one per output row)")
            if tuple(weight_codes.shape) != (n, k) or tuple(weight_scales.shape) != (n,):
                raise ValueError(f"weight_codes must be ({n}, {k}) and weight_scales ({n},), got "
                                 f"{tuple(weight_codes.shape)} and {tuple(weight_scales.shape)}")
            codes, scales = weight_codes, weight_scales
        bias = linear.bias
        m = cls(k, n, w_bits, a_bits, t.orders if t is not None else (), t.orthogonal if t is not None else True,
                clip_ratio, bias=bias is not None, dtype=bias.dtype if bias is not None else torch.float32,
                device=w.device, hadamard=_is_hadamard(t, k))
        m.qweight.copy_(_rotated.pack_weight_codes(codes.to(w.device), w_bits))
        m.w_scales.copy_(scales.to(torch.float32))
        if bias is not None:
            m.bias.copy_(bias.detach())
        if t is not None and not m.hadamard:
            for i, f in enumerate(t.factors):
                getattr(m, f"transform_factor{i}").copy_(f)
            m.transform_norm.fill_(t.norm)
        return m

    # Inference ---------------------------------------------------------------------------------------------
    @property
    def transform(self):
        """The module's KroneckerTransform (None for 'none'), rebuilt from the buffers when they change."""
        if self._transform is None and self.transform_orders:
            factors = tuple(getattr(self, f"transform_factor{i}") for i in range(len(self.transform_orders)))
            self._transform = _rotated.KroneckerTransform(factors, float(self.transform_norm), self.orthogonal)
        return self._transform

    def weight_codes(self) -> torch.Tensor:
        """Signed int8 weight codes (out, in) in the transformed basis."""
        return _rotated.unpack_weight_codes(self.qweight, self.w_bits, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W R^-T as stored: codes * scales (out, in), in the transformed basis."""
        return (self.weight_codes().to(torch.float32) * self.w_scales.unsqueeze(1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if _use_triton(x2, self.qweight):
            x2 = x2.contiguous()
            t = self.transform
            if t is not None and (self._kernel_factors is None or self._kernel_factors[0][0].device != x2.device):
                self._kernel_factors = _rotated.kernel_factors(t, x2.device)
            y = _rotated.rotated_linear(x2, self.a_bits, self.clip_ratio, t, self.qweight, self.w_scales, self.w_bits,
                                        self.bias, self._kernel_factors)
        else:
            # CPU reference: the same arithmetic as rotated_matmul_reference, with the unpacked codes kept.
            codes, scales = _rotated.transform_quantize_reference(x2, self.a_bits, self.clip_ratio, self.transform)
            if self._dense_cache is None:
                self._dense_cache = self.weight_codes().to(torch.float32)
            y = (codes.to(torch.float32) @ self._dense_cache.T) * scales.unsqueeze(1) * self.w_scales.unsqueeze(0)
            if self.bias is not None:
                y = y + self.bias.to(torch.float32)
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _derived_entries(self) -> dict[str, torch.Tensor]:
        if self.hadamard:
            names = [f"transform_factor{i}" for i in range(len(self.transform_orders))] + ["transform_norm"]
        else:
            names = [] if self.transform_orders else ["transform_norm"]
        return {name: getattr(self, name) for name in names}

    # Description -------------------------------------------------------------------------------------------
    def quant_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "w_bits": self.w_bits, "a_bits": self.a_bits, "clip_ratio": self.clip_ratio,
                "transform_orders": list(self.transform_orders), "orthogonal": self.orthogonal,
                "hadamard": self.hadamard, "bias": self.bias is not None}

    @classmethod
    def from_quant_config(cls, cfg: dict[str, Any]) -> RotatedQuantLinear:
        return cls(cfg["in_features"], cfg["out_features"], cfg["w_bits"], cfg["a_bits"],
                   tuple(cfg["transform_orders"]), cfg["orthogonal"], cfg["clip_ratio"], bias=cfg["bias"],
                   hadamard=cfg.get("hadamard", False))  # configs saved before it was a flag store the factors

    def extra_repr(self) -> str:
        kind = ("none" if not self.transform_orders else "hadamard" if self.hadamard else
                f"{'orthogonal' if self.orthogonal else 'affine'}{list(self.transform_orders)}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}, clip_ratio={self.clip_ratio}, transform={kind}")
