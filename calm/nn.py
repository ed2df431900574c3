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
from calm_kernels._dispatch import use_triton as _use_triton
from calm_kernels.kmeans import kmeans_columns
from calm_kernels.qgemm import codebook_matmul, uniform_matmul


def _dense_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CPU reference forward of a packed linear. Dequantizing once and keeping the dense copy makes
    repeated forwards (search, evaluation) cost a plain matmul; the packed buffers stay the source of truth
    (`release_caches` and `_apply` drop the copy)."""
    if module._dense_cache is None or module._dense_cache.dtype != x.dtype:
        module._dense_cache = module.dequantized_weight(x.dtype)
    return nn.functional.linear(x, module._dense_cache, module.bias)


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
        if _use_triton(x, self.qweight):
            shape = x.shape
            y = uniform_matmul(x.reshape(-1, shape[-1]), self.qweight, self.scales, self.zeros, self.bits,
                               self.group_size, self.in_features, self.bias, self.input_perm)
            return y.reshape(*shape[:-1], self.out_features)
        return _dense_forward(self, x)

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


class CodebookQuantLinear(nn.Module):
    """y = x @ W^T + b with W[n, j] = codebook_j[code[n, j]]: one float16 lookup table per input column, widths
    per column in {1, 2, 3, 4, 8}, columns permuted into slabs of equal width, optional sparse float16 outliers
    (format in calm_kernels.packing). Buffers: `qweight`, `codebooks`, `perm`, `outlier_rowptr`,
    `outlier_cols`, `outlier_vals` (the last three only with outliers), `bias`.
    """

    kind = "codebook"

    def __init__(self, in_features: int, out_features: int, slabs, outliers: int | None = None,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        layout = packing.CodebookLayout(tuple((int(b), int(c)) for b, c in slabs))
        if layout.in_features != in_features:
            raise ValueError(f"slabs {list(layout.slabs)} hold {layout.in_features} columns, not in_features "
                             f"{in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.layout = layout
        self.register_buffer("qweight", torch.zeros(out_features, layout.total_words, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("codebooks", torch.zeros(layout.codebook_length, dtype=torch.float16, device=device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device))
        has_outliers = outliers is not None
        nnz = int(outliers or 0)
        self.register_buffer("outlier_rowptr", torch.zeros(out_features + 1, dtype=torch.int32, device=device)
                             if has_outliers else None)
        self.register_buffer("outlier_cols", torch.zeros(nnz, dtype=packing.outlier_col_dtype(in_features),
                                                         device=device) if has_outliers else None)
        self.register_buffer("outlier_vals", torch.zeros(nnz, dtype=torch.float16, device=device)
                             if has_outliers else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._dense_cache: torch.Tensor | None = None
        self._delta_cache: torch.Tensor | None = None

    # Construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, codes: torch.Tensor, centroids: torch.Tensor, column_bits: torch.Tensor,
                   outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   bias: torch.Tensor | None = None) -> "CodebookQuantLinear":
        """From codes (out, in) where codes[:, j] index centroids[j, :2**column_bits[j]].

        Args:
            codes: (out_features, in_features) integer codes.
            centroids: (in_features, >= 2**max(column_bits)) float; stored as float16.
            column_bits: (in_features,) widths in {1, 2, 3, 4, 8}.
            outliers: optional (rows, cols, values): the weight at each position is the value (float16),
                whatever its code says.
            bias: optional (out_features,).
        """
        packed = packing.pack_codebook(codes, centroids, column_bits, outliers)
        out_features, in_features = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        nnz = None if packed.outlier_cols is None else packed.outlier_cols.numel()
        m = cls(in_features, out_features, packed.layout.slabs, nnz, bias=bias is not None, dtype=dtype,
                device=codes.device)
        m.qweight.copy_(packed.qweight)
        m.codebooks.copy_(packed.codebooks)
        m.perm.copy_(packed.perm)
        if nnz is not None:
            m.outlier_rowptr.copy_(packed.outlier_rowptr)
            m.outlier_cols.copy_(packed.outlier_cols)
            m.outlier_vals.copy_(packed.outlier_vals)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int | torch.Tensor = 4, iters: int = 25) -> "CodebookQuantLinear":
        """Per-column K-means (calm_kernels.kmeans, no calibration data) of a float Linear; `bits` an int or a
        width per column, 1-4 (8-bit codebooks come through `from_parts`)."""
        w = linear.weight.detach().to(torch.float32)
        k = w.shape[1]
        column_bits = (torch.full((k,), int(bits), dtype=torch.int64) if not isinstance(bits, torch.Tensor)
                       else bits.to(torch.int64).cpu())
        max_bits = int(column_bits.max())
        codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
        centroids = torch.zeros(k, 1 << max_bits, device=w.device)
        for b in column_bits.unique().tolist():
            cols = (column_bits == b).nonzero().flatten().to(w.device)
            c, cent = kmeans_columns(w[:, cols], b, iters=iters)
            codes[:, cols] = c
            centroids[cols, :1 << b] = cent
        return cls.from_parts(codes, centroids, column_bits, None, linear.bias)

    # Inference ---------------------------------------------------------------------------------------------
    def packed(self) -> packing.PackedCodebook:
        return packing.PackedCodebook(self.layout, self.qweight, self.codebooks, self.perm, self.outlier_rowptr,
                                      self.outlier_cols, self.outlier_vals)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense (out, in) weight in the original column order, outliers applied."""
        return packing.dequantize_codebook(self.packed(), dtype)

    def column_bits(self) -> torch.Tensor:
        """Width of every original input column (in_features,)."""
        bits = torch.empty(self.in_features, dtype=torch.int64)
        bits[self.perm.to(torch.int64).cpu()] = self.layout.column_bits()
        return bits

    def _outliers(self):
        if self.outlier_rowptr is None or self.outlier_cols.numel() == 0:
            return None
        if self._delta_cache is None:
            self._delta_cache = packing.codebook_outlier_deltas(self.qweight, self.codebooks, self.perm,
                                                                self.layout, self.outlier_rowptr,
                                                                self.outlier_cols, self.outlier_vals)
        return self.outlier_rowptr, self.outlier_cols, self._delta_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_triton(x, self.qweight):
            shape = x.shape
            y = codebook_matmul(x.reshape(-1, shape[-1]), self.qweight, self.codebooks, self.perm, self.layout,
                                self.bias, self._outliers())
            return y.reshape(*shape[:-1], self.out_features)
        return _dense_forward(self, x)

    def _apply(self, fn, recurse=True):
        self._dense_cache = None
        self._delta_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense_cache = None
        self._delta_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    # Description -------------------------------------------------------------------------------------------
    @property
    def num_outliers(self) -> int:
        return 0 if self.outlier_cols is None else self.outlier_cols.numel()

    @property
    def effective_bits(self) -> float:
        """Codes (slab padding included), float16 codebooks, the permutation and the outliers, per weight."""
        return packing.codebook_effective_bits(self.layout, self.out_features, self.num_outliers,
                                               self.outlier_rowptr is not None)

    @property
    def bits(self) -> float:
        """Mean code width per column."""
        return sum(b * c for b, c in self.layout.slabs) / self.in_features

    def quant_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "slabs": [list(s) for s in self.layout.slabs],
                "outliers": None if self.outlier_rowptr is None else self.num_outliers,
                "bias": self.bias is not None}

    @classmethod
    def from_quant_config(cls, cfg: dict[str, Any]) -> "CodebookQuantLinear":
        return cls(cfg["in_features"], cfg["out_features"], [tuple(s) for s in cfg["slabs"]], cfg["outliers"],
                   bias=cfg["bias"])

    def extra_repr(self) -> str:
        slabs = ", ".join(f"{c}x{b}b" for b, c in self.layout.slabs)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits:.3f}, "
                f"slabs=[{slabs}], outliers={self.num_outliers}, effective_bits={self.effective_bits:.3f}")


QUANTIZED_LINEARS: dict[str, type[nn.Module]] = {UniformQuantLinear.kind: UniformQuantLinear,
                                                  CodebookQuantLinear.kind: CodebookQuantLinear}


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


class _WrappedQuantLinear(nn.Module):
    """A quantized linear `self.linear` with something done around it: shape, bits and weight are its."""

    linear: nn.Module

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


class KVQuantLinear(_WrappedQuantLinear):
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


class ActQuantLinear(_WrappedQuantLinear):
    """A quantized linear whose input is quantized per token first: the W8A8 path, where weights have 8 bits and
    the rotated integer GEMM (2-4-bit weights) does not apply. `linear` (any calm.nn quantized linear, here a
    per-channel 8-bit UniformQuantLinear) runs on the input quantized per token, symmetric, at `a_bits` with
    `clip_ratio` (calm_kernels.rotated.fake_quantize_activations, the rotated path's own quantizer). The
    forward dequantizes the activations; there is no fused int8 x int8 kernel behind it."""

    kind = "act"

    def __init__(self, linear: nn.Module, a_bits: int, clip_ratio: float = 1.0) -> None:
        super().__init__()
        if a_bits not in _rotated.ACTIVATION_BITS:
            raise ValueError(f"activation bits must be one of {_rotated.ACTIVATION_BITS}, got {a_bits}")
        _rotated._check_clip(clip_ratio)
        self.linear = linear
        self.a_bits = a_bits
        self.clip_ratio = float(clip_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(_rotated.fake_quantize_activations(x, self.a_bits, self.clip_ratio))

    def quant_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "a_bits": self.a_bits, "clip_ratio": self.clip_ratio,
                "linear": self.linear.quant_config()}

    @classmethod
    def from_quant_config(cls, cfg: dict[str, Any]) -> "ActQuantLinear":
        return cls(build_quantized_linear(cfg["linear"]), cfg["a_bits"], cfg["clip_ratio"])

    def extra_repr(self) -> str:
        return f"a_bits={self.a_bits}, clip_ratio={self.clip_ratio}"


QUANTIZED_LINEARS[ActQuantLinear.kind] = ActQuantLinear


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
