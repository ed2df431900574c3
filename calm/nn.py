"""Drop-in quantized Linear modules holding packed integer weights (formats in calm_kernels/packing.py).

Plain buffers only (no tensor subclasses), so `state_dict` / safetensors carry everything. Each module
describes itself with `quant_config()` (a JSON-able dict) and is rebuilt empty from it by
`build_quantized_linear(config)` before its state is loaded: that is how `calm.load` restores a model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from calm.grid import quantize_groups
from calm_kernels import packing
from calm_kernels.qgemm import uniform_matmul


class UniformQuantLinear(nn.Module):
    """y = x @ dequant(W)^T + b with W stored as packed b-bit codes, float16 scales and uint8 zero points per group.

    `input_perm` (optional) reorders the input features first: GPTQ's full act-order quantizes columns in
    that order and groups follow it.
    """

    kind = "uniform"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool = False, has_input_perm: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        packing.check_bits(bits)
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, packing.packed_words(in_features, bits),
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_perm", torch.arange(in_features, device=device) if has_input_perm else None)
        self._dense_cache: torch.Tensor | None = None

    # Construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, symmetric: bool, bias: torch.Tensor | None = None,
                   input_perm: torch.Tensor | None = None) -> "UniformQuantLinear":
        """From codes (out, in) on the grid, scales and zeros (out, in/group) — what RTN/GPTQ/AWQ produce."""
        out_features, in_features = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(in_features, out_features, bits, group_size, symmetric, bias=bias is not None,
                has_input_perm=input_perm is not None, dtype=dtype, device=codes.device)
        m.qweight.copy_(packing.pack_codes(codes.to(torch.uint8), bits))
        m.scales.copy_(scales.to(torch.float16))
        m.zeros.copy_(zeros.round().to(torch.uint8))
        if bias is not None:
            m.bias.copy_(bias.detach())
        if input_perm is not None:
            m.input_perm.copy_(input_perm)
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool = False
                   ) -> "UniformQuantLinear":
        """Round-to-nearest quantization of a float Linear."""
        w = linear.weight.detach()
        codes, scales, zeros = quantize_groups(w, bits, group_size or w.shape[1], symmetric)
        return cls.from_codes(codes, scales, zeros, bits, group_size or w.shape[1], symmetric, linear.bias)

    # Inference ---------------------------------------------------------------------------------------------
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense (out, in) weight in the module's input order (the inverse of `input_perm` applied)."""
        w = packing.dequantize_uniform(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                       self.in_features, dtype=dtype)
        if self.input_perm is not None:
            w = w[:, torch.argsort(self.input_perm)]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            if self.input_perm is not None:
                x = x.index_select(-1, self.input_perm)
            shape = x.shape
            y = uniform_matmul(x.reshape(-1, shape[-1]), self.qweight, self.scales, self.zeros, self.bits,
                               self.group_size, self.in_features, self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        # CPU: the reference path. Dequantizing once and keeping the dense copy makes repeated forwards
        # (search, evaluation) cost a plain matmul; the packed buffers stay the source of truth.
        if self._dense_cache is None or self._dense_cache.dtype != x.dtype:
            self._dense_cache = self.dequantized_weight(x.dtype)
        return nn.functional.linear(x, self._dense_cache, self.bias)

    def _apply(self, fn, recurse=True):
        self._dense_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    # Description -------------------------------------------------------------------------------------------
    @property
    def effective_bits(self) -> float:
        return packing.uniform_effective_bits(self.bits, self.group_size, self.symmetric)

    def quant_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "bias": self.bias is not None, "input_perm": self.input_perm is not None}

    @classmethod
    def from_quant_config(cls, cfg: dict[str, Any]) -> "UniformQuantLinear":
        return cls(cfg["in_features"], cfg["out_features"], cfg["bits"], cfg["group_size"], cfg["symmetric"],
                   bias=cfg["bias"], has_input_perm=cfg["input_perm"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, "
                f"effective_bits={self.effective_bits:.3f}")


QUANTIZED_LINEARS: dict[str, type[nn.Module]] = {UniformQuantLinear.kind: UniformQuantLinear}


def is_quantized_linear(module: nn.Module) -> bool:
    return isinstance(module, tuple(QUANTIZED_LINEARS.values()))


def build_quantized_linear(cfg: dict[str, Any]) -> nn.Module:
    """An empty module of the kind `cfg` describes, ready for `load_state_dict`."""
    kind = cfg.get("kind")
    if kind not in QUANTIZED_LINEARS:
        raise ValueError(f"unknown quantized module kind {kind!r}; known: {sorted(QUANTIZED_LINEARS)}")
    return QUANTIZED_LINEARS[kind].from_quant_config(cfg)


def weight_bits(module: nn.Module) -> tuple[float, int]:
    """(stored bits, weights) of a linear: quantized modules by their effective bits, float ones at 16."""
    if is_quantized_linear(module):
        n = module.in_features * module.out_features
        return module.effective_bits * n, n
    n = module.weight.numel()
    return 16.0 * n, n


def release_caches(module: nn.Module) -> None:
    """Drop the dense weights that CPU forwards keep, so idle quantized blocks take their packed size only."""
    for m in module.modules():
        if hasattr(m, "_dense_cache"):
            m._dense_cache = None


def model_effective_bits(blocks: list[nn.Module]) -> float:
    """Bits per weight over every linear of the given decoder blocks (embeddings and head are not counted)."""
    bits = weights = 0.0
    for block in blocks:
        for m in top_level_linears(block).values():
            b, n = weight_bits(m)
            bits += b
            weights += n
    return bits / weights if weights else 16.0


# ----------------------------------------------------------------------------------------------------------
# Rotated weight-and-activation quantized Linear (W3A3, W4A4, W4A8): kernels in calm_kernels/rotated.py
# ----------------------------------------------------------------------------------------------------------
import math  # noqa: E402

from calm_kernels import rotated as _rotated  # noqa: E402  (torch only; triton loads inside the launchers)
from calm_kernels._dispatch import use_triton as _use_triton  # noqa: E402


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


class RotatedQuantLinear(nn.Module):
    """y = Q_a(x R) Q_w(W R^-T)^T + b: online transform R and per-token activation quantization (a_bits), then
    an integer GEMM against per-output-channel symmetric w_bits weights (calm_kernels.rotated).

    R is a normalized Hadamard ('hadamard'), learned Kronecker factors (P1, P2), or the identity ('none').
    On CUDA (or under TRITON_INTERPRET=1) a forward is one fused transform+quantize launch and one GEMM
    launch; on the CPU it runs the references. Buffers: `qweight` (packed offset-binary codes, format of
    calm_kernels.packing), `w_scales` (out,) float32, optional `bias`, the transform's factors
    `transform_factor{0,1}` (float32) and `transform_norm`.
    """

    kind = "rotated"

    def __init__(self, in_features: int, out_features: int, w_bits: int, a_bits: int,
                 transform_orders: tuple[int, ...] = (), orthogonal: bool = True, clip_ratio: float = 1.0,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        _rotated._check_weight_bits(w_bits)
        _rotated._check_activation_bits(a_bits)
        _rotated._check_clip(clip_ratio)
        orders = tuple(int(d) for d in transform_orders)
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
        self.register_buffer("qweight", torch.zeros(out_features, packing.packed_words(in_features, w_bits),
                                                    dtype=torch.int32, device=device))
        self.register_buffer("w_scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        for i, d in enumerate(orders):
            self.register_buffer(f"transform_factor{i}", torch.eye(d, dtype=torch.float32, device=device))
        self.register_buffer("transform_norm", torch.ones((), dtype=torch.float32, device=device))
        self._dense_cache: torch.Tensor | None = None  # signed weight codes as float32, CPU path only
        self._transform = None
        self._kernel_factors = None

    # Construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int, transform="hadamard", clip_ratio: float = 1.0,
                   weight_clip_ratio: float = 1.0, weight_codes: torch.Tensor | None = None,
                   weight_scales: torch.Tensor | None = None) -> "RotatedQuantLinear":
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
                device=w.device)
        m.qweight.copy_(_rotated.pack_weight_codes(codes.to(w.device), w_bits))
        m.w_scales.copy_(scales.to(torch.float32))
        if bias is not None:
            m.bias.copy_(bias.detach())
        if t is not None:
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
            codes, scales = _rotated.transform_quantize(x2, self.a_bits, self.clip_ratio, t, self._kernel_factors)
            y = _rotated.rotated_matmul(codes, scales, self.qweight, self.w_scales, self.w_bits, self.bias, x.dtype)
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

    def _drop_caches(self) -> None:
        self._dense_cache = None
        self._transform = None
        self._kernel_factors = None

    def _apply(self, fn, recurse=True):
        self._drop_caches()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_caches()
        return super()._load_from_state_dict(*args, **kwargs)

    # Description -------------------------------------------------------------------------------------------
    @property
    def effective_bits(self) -> float:
        """Code bits plus one float32 scale per output row (the transform's factors are shared, not counted)."""
        return self.w_bits + 32 / self.in_features

    def quant_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "w_bits": self.w_bits, "a_bits": self.a_bits, "clip_ratio": self.clip_ratio,
                "transform_orders": list(self.transform_orders), "orthogonal": self.orthogonal,
                "bias": self.bias is not None}

    @classmethod
    def from_quant_config(cls, cfg: dict[str, Any]) -> "RotatedQuantLinear":
        return cls(cfg["in_features"], cfg["out_features"], cfg["w_bits"], cfg["a_bits"],
                   tuple(cfg["transform_orders"]), cfg["orthogonal"], cfg["clip_ratio"], bias=cfg["bias"])

    def extra_repr(self) -> str:
        kind = ("none" if not self.transform_orders else
                f"{'orthogonal' if self.orthogonal else 'affine'}{list(self.transform_orders)}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}, clip_ratio={self.clip_ratio}, transform={kind}")


QUANTIZED_LINEARS[RotatedQuantLinear.kind] = RotatedQuantLinear


# ----------------------------------------------------------------------------------------------------------
# KV-cache quantization: the k_proj / v_proj outputs quantized per head, asymmetric, in groups
# ----------------------------------------------------------------------------------------------------------

def fake_quantize_kv(y: torch.Tensor, bits: int, head_dim: int, group_size: int) -> torch.Tensor:
    """Quantize-dequantize (..., heads * head_dim) per token, per head, in groups of `group_size` channels of
    the head: asymmetric min/max grid with 2^bits levels (scale = (max - min) / (2^bits - 1), integer zero
    point, round half to even), computed in float32 and returned in y's dtype. A constant group is exact."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"KV bits must be 2, 3, 4 or 8, got {bits}")
    if y.shape[-1] % head_dim or head_dim % group_size:
        raise ValueError(f"KV group size {group_size} must divide head_dim {head_dim}, which must divide the "
                         f"projection size {y.shape[-1]}")
    maxq = (1 << bits) - 1
    z = y.to(torch.float32).reshape(*y.shape[:-1], y.shape[-1] // group_size, group_size)
    lo = z.amin(dim=-1, keepdim=True)
    hi = z.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / maxq
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / safe)
    q = torch.clamp(torch.round(z / safe) + zero, 0, maxq)
    deq = torch.where(scale > 0, (q - zero) * safe, z)
    return deq.reshape(y.shape).to(y.dtype)


class KVQuantLinear(nn.Module):
    """A quantized k_proj or v_proj whose output is quantized as the KV cache stores it.

    What is quantized where: `linear` (any calm.nn quantized linear) computes K or V from the block input;
    its output (tokens, kv_heads * head_dim) is quantized per token and per head, asymmetric, in groups of
    `group_size` channels (`fake_quantize_kv`). For V this is exactly the cached tensor. For K it is the
    pre-RoPE key: the cache holds K before the rotary embedding and RoPE is applied when it is read
    (transformers' LlamaAttention/Qwen2Attention apply RoPE after k_proj, which is where this sits). Queries,
    attention scores and probabilities stay in floating point. The CPU forward dequantizes; there is no
    fused KV kernel.
    """

    kind = "kv"

    def __init__(self, linear: nn.Module, bits: int, head_dim: int, group_size: int = 0) -> None:
        super().__init__()
        group_size = group_size or head_dim
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"KV bits must be 2, 3, 4 or 8, got {bits}")
        if linear.out_features % head_dim or head_dim % group_size:
            raise ValueError(f"KV group size {group_size} must divide head_dim {head_dim}, which must divide "
                             f"out_features {linear.out_features}")
        self.linear = linear
        self.bits = bits
        self.head_dim = head_dim
        self.group_size = group_size

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def effective_bits(self) -> float:
        return self.linear.effective_bits

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.linear.dequantized_weight(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_kv(self.linear(x), self.bits, self.head_dim, self.group_size)

    def quant_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "bits": self.bits, "head_dim": self.head_dim, "group_size": self.group_size,
                "linear": self.linear.quant_config()}

    @classmethod
    def from_quant_config(cls, cfg: dict[str, Any]) -> "KVQuantLinear":
        return cls(build_quantized_linear(cfg["linear"]), cfg["bits"], cfg["head_dim"], cfg["group_size"])

    def extra_repr(self) -> str:
        return f"kv_bits={self.bits}, head_dim={self.head_dim}, group_size={self.group_size}"


QUANTIZED_LINEARS[KVQuantLinear.kind] = KVQuantLinear


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
