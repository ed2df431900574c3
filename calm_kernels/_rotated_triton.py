"""Triton kernels of calm_kernels.rotated (contract, numerics and test status are documented there).

Imported only by the launchers in rotated.py once `use_triton` said yes, so `import calm_kernels` never
imports triton. Every config list here is a guess: no GPU has run these kernels yet.

Weight unpacking, tried and not kept: int8-lane (SWAR) unpacking in plain Triton (one mask + bias add + XOR
turning four offset-binary fields into four int8 lanes of one int32, then a byte shift and truncation per
code, and a 32-bit funnel shift for 3-bit instead of int64 pairs) compiled for sm90 to more instructions than
the shift pairs below (SASS of the decode config BLOCK 16x64x256, 4 warps: 4-bit 412 LOP3 + 265 SHF +
158 VIADD vs 283 LOP3 + 265 SHF; 3-bit and 2-bit also larger), because the byte extraction still costs a
shift per code and the tile then goes through the same register-to-shared layout conversion. The gain
needs the four bytes to land in one mma operand register (Marlin's lop3/prmt), which Triton's layouts do
not expose; position-dependent inline PTX on packed elements would rely on an unverified register order.
Also tried: 3-bit as planes within each 32-code group (two 2-bit words and a sign word, as the dequant-GEMM
does): 12.0 SASS instructions per weight against the int64 pairs' 10.0 (sm90, best decode config,
bench/sass_count.py), because the code index is split across threads here, so the word choice and the shifts
are not constants per register.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from calm_kernels._dispatch import interpreter_enabled

# 3-bit codes j = 0..31 of a 32-code group span three int32 words. Codes 0..10 lie in the 64-bit pair
# (w0, w1) at bit 3j, codes 11..31 in (w1, w2) at bit 3j - 32; XOR with the field top bits turns
# offset-binary fields into two's complement ones, which a left then arithmetic right shift sign-extends.
_LO3_TOP_BITS = tl.constexpr(sum(1 << (3 * j + 2) for j in range(11)))
_HI3_TOP_BITS = tl.constexpr(sum(1 << (3 * j - 30) for j in range(11, 32)) - (1 << 64))
_TOP_BITS_2 = tl.constexpr(0xAAAAAAAA - (1 << 32))
_TOP_BITS_4 = tl.constexpr(0x88888888 - (1 << 32))
# 1.5 * 2^23: adding it leaves a float32 in [2^23, 2^24), where the spacing is 1, so the add itself rounds
# to the nearest integer with ties to even; subtracting it back is exact. Valid for |v| < 2^22.
_ROUNDING_MAGIC = tl.constexpr(12582912.0)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _bucket(n: int) -> int:
    # Autotune key: one tuning per power-of-two range of the token count, capped where configs stop changing.
    return min(_next_pow2(max(n, 1)), 4096)


@triton.jit
def _round_half_to_even(v):
    """Same rule as rotated.round_half_to_even (torch.round); the caller clamps v to the code range."""
    return (v + _ROUNDING_MAGIC) - _ROUNDING_MAGIC


@triton.jit
def _pow2_normalizer(amax):
    """Powers of two (f, 1/f) with amax * f in [0.5, 1), built from the exponent bits: exact, no log2."""
    exponent = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    f_field = tl.maximum(253 - exponent, 1)
    f = (f_field << 23).to(tl.float32, bitcast=True)
    inv = ((254 - f_field) << 23).to(tl.float32, bitcast=True)
    return f, inv


@triton.jit
def _quantize(y, safe_scale, QMIN: tl.constexpr, QMAX: tl.constexpr):
    v = tl.math.div_rn(y, safe_scale)
    v = tl.minimum(tl.maximum(v, QMIN * 1.0), QMAX * 1.0)
    return _round_half_to_even(v).to(tl.int8)


@triton.jit
def _row_codes(x, f_ptr, scale_mult, norm, HAS_FACTOR: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
               BLOCK_T: tl.constexpr, D: tl.constexpr):
    """Tokens as the rows of x (BLOCK_T, D), transformed by one factor F (D, D) when HAS_FACTOR, then quantized
    per row: (codes, scales)."""
    inv = tl.full((BLOCK_T,), 1.0, tl.float32)
    if HAS_FACTOR:
        cols = tl.arange(0, D)
        f, inv = _pow2_normalizer(tl.max(tl.abs(x), axis=1))
        factor = tl.load(f_ptr + cols[:, None] * D + cols[None, :])
        x = tl.dot((x * f[:, None]).to(tl.float16), factor)
    scale = tl.max(tl.abs(x), axis=1) * scale_mult
    safe = tl.where(scale > 0, scale, 1.0)
    codes = _quantize(x, tl.broadcast_to(safe[:, None], (BLOCK_T, D)), QMIN, QMAX)
    return codes, scale * inv * norm


@triton.jit
def _kron2_codes(x, f1_t, f2, scale_mult, norm, RESCALE: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                 D1: tl.constexpr, D2: tl.constexpr):
    """One token as a (D1, D2) matrix X: x (F1 kron F2) = F1^T X F2 by two tensor-core dots, the first's
    accumulator feeding the second as its left operand, then quantized as one row: (codes, scale)."""
    f, inv = _pow2_normalizer(tl.max(tl.max(tl.abs(x), axis=1), axis=0))
    z = tl.dot(f1_t, (x * f).to(tl.float16))
    if RESCALE:  # learned factors: keep the fp16 operand of the second dot in range
        g, inv_g = _pow2_normalizer(tl.max(tl.max(tl.abs(z), axis=1), axis=0))
        z = z * g
        inv = inv * inv_g
    y = tl.dot(z.to(tl.float16), f2)
    scale = tl.max(tl.max(tl.abs(y), axis=1), axis=0) * scale_mult
    safe = tl.where(scale > 0, scale, 1.0)
    codes = _quantize(y, tl.full((D1, D2), 1.0, tl.float32) * safe, QMIN, QMAX)
    return codes, scale * inv * norm


@triton.jit
def _scaled_store(acc, a_scale, w_scale, bias_ptr, rn, n_mask, out_ptrs, out_mask, HAS_BIAS: tl.constexpr):
    """The GEMMs' epilogue: int32 accumulator times the row and column scales, plus the bias, stored."""
    y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=out_mask)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, f_ptr, codes_ptr, scales_ptr,
    T, K, stride_xt, stride_ct, norm, scale_mult, T_BUCKET,
    HAS_FACTOR: tl.constexpr, D: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Tokens as rows: no transform, or one factor of order K <= 128 (x (BLOCK_T, D) @ F (D, D))."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, D)
    row_mask = rows < T
    mask = row_mask[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    codes, scales = _row_codes(x, f_ptr, scale_mult, norm, HAS_FACTOR, QMIN, QMAX, BLOCK_T, D)
    tl.store(codes_ptr + rows[:, None] * stride_ct + cols[None, :], codes, mask=mask)
    tl.store(scales_ptr + rows, scales, mask=row_mask)


@triton.jit
def _kron2_quantize_kernel(
    x_ptr, f1_ptr, f2_ptr, codes_ptr, scales_ptr,
    T, stride_xt, stride_ct, norm, scale_mult, T_BUCKET,
    d1: tl.constexpr, d2: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, RESCALE: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, TOKENS_PER_PROG: tl.constexpr,
):
    """Each token row is a (d1, d2) matrix X, transformed and quantized by _kron2_codes."""
    pid = tl.program_id(0)
    r1 = tl.arange(0, D1)
    r2 = tl.arange(0, D2)
    offs = r1[:, None] * d2 + r2[None, :]
    f1_t = tl.load(f1_ptr + r1[None, :] * D1 + r1[:, None])  # F1^T, fp16, zero-padded
    f2 = tl.load(f2_ptr + r2[:, None] * D2 + r2[None, :])
    for i in range(TOKENS_PER_PROG):
        t64 = pid.to(tl.int64) * TOKENS_PER_PROG + i
        live = t64 < T
        # The token's liveness enters the 2-D mask through a comparison, not `mask & live`: Triton 3.9's
        # interpreter turns a tensor & scalar of int1 into int32, which tl.load then refuses.
        tile_mask = (r1 < tl.where(live, d1, 0))[:, None] & (r2 < d2)[None, :]
        x = tl.load(x_ptr + t64 * stride_xt + offs, mask=tile_mask, other=0.0).to(tl.float32)
        codes, scale = _kron2_codes(x, f1_t, f2, scale_mult, norm, RESCALE, QMIN, QMAX, D1, D2)
        tl.store(codes_ptr + t64 * stride_ct + offs, codes, mask=tile_mask)
        tl.store(scales_ptr + t64, scale, mask=live)


@triton.jit
def _mix_chunks_kernel(
    x_ptr, f_ptr, y_ptr, stride_xt, stride_yt, T_BUCKET,
    m: tl.constexpr, P: tl.constexpr, M1: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
):
    """Chunked transform, pass 1: the token row as an (m, P) matrix X (chunk i = row i); Y = F1^T X on the
    tensor cores, one (M1, BJ) column block per program, written in float32. Each column is normalized by its
    own power of two before the fp16 cast (a column's outputs depend on that column only)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BJ + tl.arange(0, BJ)
    col_mask = cols < P
    out_rows = tl.arange(0, M1)
    x_tok = x_ptr + t * stride_xt
    amax = tl.zeros((BJ,), dtype=tl.float32)
    for i0 in tl.static_range(0, M1, BI):
        ri = i0 + tl.arange(0, BI)
        mask = (ri < m)[:, None] & col_mask[None, :]
        v = tl.load(x_tok + ri[:, None] * P + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=0))
    f, inv = _pow2_normalizer(amax)
    acc = tl.zeros((M1, BJ), dtype=tl.float32)
    for i0 in tl.static_range(0, M1, BI):
        ri = i0 + tl.arange(0, BI)
        mask = (ri < m)[:, None] & col_mask[None, :]
        v = tl.load(x_tok + ri[:, None] * P + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        f1_t = tl.load(f_ptr + ri[None, :] * M1 + out_rows[:, None])  # F1^T[:, ri], fp16, zero-padded
        acc = tl.dot(f1_t, (v * f[None, :]).to(tl.float16), acc)
    out_mask = (out_rows < m)[:, None] & col_mask[None, :]
    tl.store(y_ptr + t * stride_yt + out_rows[:, None] * P + cols[None, :], acc * inv[None, :], mask=out_mask)


@triton.jit
def _chunk_transform_kernel(
    y_ptr, f2_ptr, f3_ptr, amax_ptr, stride_yt, T_BUCKET,
    m: tl.constexpr, d2: tl.constexpr, d3: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    RESCALE: tl.constexpr,
):
    """Chunked transform, pass 2: each chunk C (d2, d3) of the mixed row becomes F2^T C F3 in place (two
    tensor-core dots, as `_kron2_quantize_kernel`), and its max |value| goes to amax[t, chunk]."""
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    r2 = tl.arange(0, D2)
    r3 = tl.arange(0, D3)
    mask = (r2 < d2)[:, None] & (r3 < d3)[None, :]
    ptrs = y_ptr + t * stride_yt + chunk * (d2 * d3) + r2[:, None] * d3 + r3[None, :]
    c = tl.load(ptrs, mask=mask, other=0.0)
    f, inv = _pow2_normalizer(tl.max(tl.max(tl.abs(c), axis=1), axis=0))
    f2_t = tl.load(f2_ptr + r2[None, :] * D2 + r2[:, None])
    f3 = tl.load(f3_ptr + r3[:, None] * D3 + r3[None, :])
    z = tl.dot(f2_t, (c * f).to(tl.float16))
    if RESCALE:
        g, inv_g = _pow2_normalizer(tl.max(tl.max(tl.abs(z), axis=1), axis=0))
        z = z * g
        inv = inv * inv_g
    w = tl.dot(z.to(tl.float16), f3) * inv
    tl.store(ptrs, w, mask=mask)
    tl.store(amax_ptr + t * m + chunk, tl.max(tl.max(tl.abs(w), axis=1), axis=0))


@triton.jit
def _quantize_chunked_kernel(
    y_ptr, amax_ptr, codes_ptr, scales_ptr, stride_yt, stride_ct, norm, scale_mult, T_BUCKET,
    K: tl.constexpr, m: tl.constexpr, MP: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Chunked transform, pass 3: the token's scale from its chunk maxima, then codes for BLOCK elements."""
    t = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    chunks = tl.arange(0, MP)
    amax = tl.max(tl.load(amax_ptr + t * m + chunks, mask=chunks < m, other=0.0), axis=0)
    scale = amax * scale_mult
    safe = tl.where(scale > 0, scale, 1.0)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    y = tl.load(y_ptr + t * stride_yt + offs, mask=mask, other=0.0)
    codes = _quantize(y, tl.full((BLOCK,), 1.0, tl.float32) * safe, QMIN, QMAX)
    tl.store(codes_ptr + t * stride_ct + offs, codes, mask=mask)
    tl.store(scales_ptr + t, scale * norm, mask=blk == 0)


def _rows_configs(d: int, has_factor: bool) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_T": 16}, num_warps=4)]
    lo = 16 if has_factor else 1
    sizes = [bt for bt in (1, 2, 4, 8, 16, 32, 64) if bt >= lo and bt * d <= 16384] or [lo]
    # With a factor, 4 warps spill past 4096 elements (sm90 ptxas: 96 bytes at 64 x 128; 8 warps: none).
    return [triton.Config({"BLOCK_T": bt}, num_warps=w) for bt in sizes for w in (4, 8)
            if w == 8 or not has_factor or bt * d <= 4096]


def _kron2_configs(d1: int, d2: int) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"TOKENS_PER_PROG": 2}, num_warps=4)]
    # Past 4096 elements a program takes 8 warps: 16 warps cap the registers at 128 and spilled 168-440 stack
    # bytes on sm100 at 112 x 128.
    warps = (4, 8) if d1 * d2 <= 4096 else (8,)
    return [triton.Config({"TOKENS_PER_PROG": tpp}, num_warps=w, num_stages=s)
            for tpp in (1, 2, 4, 8) for w in warps for s in (1, 2)]


def _mix_configs(m1: int) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BI": 16, "BJ": 16}, num_warps=4)]
    # The (M1, BJ) float32 accumulator at most 64 registers per thread: ptxas (sm90) spills 340 bytes at
    # M1 = 256, BJ = 64 with 4 warps (128 per thread) and none at 64.
    return [triton.Config({"BI": bi, "BJ": bj}, num_warps=w, num_stages=s)
            for bi in (16, 32, 64) for bj in (16, 32, 64, 128) if bi <= m1
            for w in (4, 8) if m1 * bj <= 64 * 32 * w for s in (1, 2)]


def _chunk_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (2, 4, 8)]


def _quant_chunked_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK": 256}, num_warps=4)]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8)]


@functools.cache
def _mix_kernel(m1: int):
    return triton.autotune(_mix_configs(m1), key=["T_BUCKET", "m", "P"])(_mix_chunks_kernel)


@functools.cache
def _chunk_kernel():
    # In place: every trial must start from the mixed rows again.
    return triton.autotune(_chunk_configs(), key=["T_BUCKET", "m", "d2", "d3", "RESCALE"],
                           restore_value=["y_ptr"])(_chunk_transform_kernel)


@functools.cache
def _quant_chunked_kernel():
    return triton.autotune(_quant_chunked_configs(), key=["T_BUCKET", "K", "m"])(_quantize_chunked_kernel)


def _transform_quantize_chunked(x, qmin: int, qmax: int, scale_mult: float, orders: tuple[int, int, int],
                                padded: tuple[torch.Tensor, ...], norm: float, rescale: bool,
                                codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Three launches over a float32 scratch row per token: mix the chunks (F1), transform inside each chunk
    (F2, F3) with per-chunk maxima, quantize with the token's scale."""
    t, k = x.shape
    m, d2, d3 = orders
    p = d2 * d3
    m1 = padded[0].shape[0]
    scratch = torch.empty((t, k), dtype=torch.float32, device=x.device)
    chunk_amax = torch.empty((t, m), dtype=torch.float32, device=x.device)
    bucket = _bucket(t)
    _mix_kernel(m1)[lambda meta: (t, triton.cdiv(p, meta["BJ"]))](
        x, padded[0], scratch, x.stride(0), scratch.stride(0), bucket, m=m, P=p, M1=m1)
    _chunk_kernel()[(t, m)](scratch, padded[1], padded[2], chunk_amax, scratch.stride(0), bucket, m=m, d2=d2,
                            d3=d3, D2=padded[1].shape[0], D3=padded[2].shape[0], RESCALE=rescale)
    _quant_chunked_kernel()[lambda meta: (t, triton.cdiv(k, meta["BLOCK"]))](
        scratch, chunk_amax, codes, scales, scratch.stride(0), codes.stride(0), norm, scale_mult, bucket,
        K=k, m=m, MP=_next_pow2(m), QMIN=qmin, QMAX=qmax)


@functools.cache
def _rows_kernel(d: int, has_factor: bool):
    return triton.autotune(_rows_configs(d, has_factor), key=["T_BUCKET", "K"])(_quantize_rows_kernel)


@functools.cache
def _kron2_kernel(d1: int, d2: int):
    return triton.autotune(_kron2_configs(d1, d2), key=["T_BUCKET", "d1", "d2", "RESCALE"])(_kron2_quantize_kernel)


def transform_quantize(x: torch.Tensor, bits: int, scale_mult: float, orders: tuple[int, ...],
                       factors: tuple[tuple[torch.Tensor, ...], float] | None, rescale: bool,
                       codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t, k = x.shape
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if t == 0:
        return codes, scales
    padded, norm = factors if factors is not None else ((), 1.0)
    for f in padded:
        if f.device != x.device or f.dtype != torch.float16 or not f.is_contiguous():
            raise ValueError("kernel factors must be contiguous float16 on the activations' device "
                             "(build them with rotated.kernel_factors(transform, device))")
    if len(orders) == 3:
        _transform_quantize_chunked(x, qmin, qmax, scale_mult, orders, padded, norm, rescale, codes, scales)
    elif len(orders) == 2:
        d1, d2 = orders
        kernel = _kron2_kernel(padded[0].shape[0], padded[1].shape[0])
        grid = lambda meta: (triton.cdiv(t, meta["TOKENS_PER_PROG"]),)  # noqa: E731
        kernel[grid](x, padded[0], padded[1], codes, scales, t, x.stride(0), codes.stride(0), norm, scale_mult,
                     _bucket(t), d1=d1, d2=d2, D1=padded[0].shape[0], D2=padded[1].shape[0], RESCALE=rescale,
                     QMIN=qmin, QMAX=qmax)
    else:
        has_factor = len(orders) == 1
        d = padded[0].shape[0] if has_factor else max(16, _next_pow2(k))
        kernel = _rows_kernel(d, has_factor)
        grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]),)  # noqa: E731
        kernel[grid](x, padded[0] if has_factor else x, codes, scales, t, k, x.stride(0), codes.stride(0), norm,
                     scale_mult, _bucket(t), HAS_FACTOR=has_factor, D=d, QMIN=qmin, QMAX=qmax)
    return codes, scales


# ----------------------------------------------------------------------------------------------------------
# int8 x packed-weight GEMM
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _signed_weight_tile(w_ptr, rn64, n_mask, stride_wn, k0, words_per_row,
                        W_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Signed int8 codes (BLOCK_N, BLOCK_K) of columns k0..k0+BLOCK_K from the packed bit stream."""
    rows = w_ptr + rn64[:, None] * stride_wn
    if W_BITS == 3:
        GROUPS: tl.constexpr = BLOCK_K // 32
        g = k0 // 32 + tl.arange(0, GROUPS)
        mask = n_mask[:, None] & (g < words_per_row // 3)[None, :]
        word = rows + g[None, :] * 3
        w0 = tl.load(word, mask=mask, other=0).to(tl.uint32).to(tl.int64)
        w1 = tl.load(word + 1, mask=mask, other=0).to(tl.uint32).to(tl.int64)
        w2 = tl.load(word + 2, mask=mask, other=0).to(tl.uint32).to(tl.int64)
        lo = (w0 | (w1 << 32)) ^ _LO3_TOP_BITS
        hi = (w1 | (w2 << 32)) ^ _HI3_TOP_BITS
        j = tl.arange(0, 32)
        pair = tl.where((j < 11)[None, None, :], lo[:, :, None], hi[:, :, None])
        shift = tl.where(j < 11, 61 - 3 * j, 93 - 3 * j).to(tl.int64)
        q = (pair << shift[None, None, :]) >> 61
    else:
        PER_WORD: tl.constexpr = 32 // W_BITS
        WORDS: tl.constexpr = BLOCK_K // PER_WORD
        wi = k0 // PER_WORD + tl.arange(0, WORDS)
        mask = n_mask[:, None] & (wi < words_per_row)[None, :]
        w = tl.load(rows + wi[None, :], mask=mask, other=0)
        if W_BITS == 4:
            w = w ^ _TOP_BITS_4
        else:
            w = w ^ _TOP_BITS_2
        j = tl.arange(0, PER_WORD)
        q = (w[:, :, None] << (32 - W_BITS - W_BITS * j)[None, None, :]) >> (32 - W_BITS)
    return tl.reshape(q.to(tl.int8), (BLOCK_N, BLOCK_K))


@triton.jit
def _int_dot_step(acc, a_rows, m_mask, w_ptr, rn, n_mask, stride_wn, k0, rk, K: tl.constexpr,
                  WORDS_PER_ROW: tl.constexpr, W_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + the int8 codes of K columns k0.. times the sign-extended weight tile, in int32."""
    kk = k0 + rk
    a = tl.load(a_rows + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :], other=0)
    w = _signed_weight_tile(w_ptr, rn, n_mask, stride_wn, k0, WORDS_PER_ROW, W_BITS, BLOCK_N, BLOCK_K)
    return tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)


@triton.jit
def _rotated_matmul_kernel(
    a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, stride_am, stride_wn, stride_om, M_BUCKET,
    K: tl.constexpr, W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """SPLIT_K > 1 (decode: more programs when N alone gives too few): program (tile, k) sums every SPLIT_K-th
    K block; the int32 partials meet in the (M, N) workspace by integer atomics (exact and order-free, so the
    result is bit for bit the unsplit one), and the tile's last program (ticket counter) takes the sum back
    while zeroing the workspace, runs the epilogue and resets the counter: the workspace is clean after every
    launch, with no zero-fill or copy launches."""
    # K is a compile-time constant (one per layer shape): static trip count for the software pipeliner, and
    # Triton 3.6's interpreter cannot take a runtime loop bound under numpy >= 2.4.
    WORDS_PER_ROW: tl.constexpr = (K + 31) // 32 * W_BITS
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles walk the same weight columns together, so weight tiles hit in L2.
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    a_rows = a_ptr + rm[:, None] * stride_am
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if SPLIT_K == 1:  # a static trip count: the software pipeliner keeps its registers (ptxas: a runtime start
        # spilled 344 bytes at 128 x 128 x 64, 3 bits)
        for k0 in range(0, K, BLOCK_K):
            acc = _int_dot_step(acc, a_rows, m_mask, w_ptr, rn, n_mask, stride_wn, k0, rk, K, WORDS_PER_ROW,
                                W_BITS, BLOCK_N, BLOCK_K)
    else:
        for k0 in range(tl.program_id(1) * BLOCK_K, K, SPLIT_K * BLOCK_K):
            acc = _int_dot_step(acc, a_rows, m_mask, w_ptr, rn, n_mask, stride_wn, k0, rk, K, WORDS_PER_ROW,
                                W_BITS, BLOCK_N, BLOCK_K)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    last = True
    if SPLIT_K > 1:
        ws_ptrs = ws_ptr + rm[:, None] * N + rn[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=out_mask, sem="release")
        tl.debug_barrier()  # every thread's partial is issued before the ticket
        ticket = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        last = ticket == SPLIT_K - 1
        if last:
            tl.debug_barrier()
            acc = tl.where(out_mask, tl.atomic_xchg(ws_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32),
                                                    mask=out_mask, sem="acquire"), 0)
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")
    if last:
        if OUT_INT32:
            tl.store(out_ptrs, acc, mask=out_mask)
        else:
            a_scale = tl.load(a_scale_ptr + rm, mask=m_mask, other=0.0)
            w_scale = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)
            _scaled_store(acc, a_scale, w_scale, bias_ptr, rn, n_mask, out_ptrs, out_mask, HAS_BIAS)


@triton.jit
def _fused_decode_kernel(
    x_ptr, f1_ptr, f2_ptr, codes_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, stride_xm, stride_wn, stride_om, norm, scale_mult,
    K: tl.constexpr, FACTORS: tl.constexpr, d1: tl.constexpr, d2: tl.constexpr, D1: tl.constexpr,
    D2: tl.constexpr, RESCALE: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, W_BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode (M <= BLOCK_M = 16): the transform + quantization of all M tokens runs in every program's
    prologue, then the int8 GEMM of the program's BLOCK_N columns; one launch instead of two.

    Every program writes the same codes and scales to the (M, K) / (M,) buffers (identical bytes, so the
    overlapping writes are benign), passes a CTA barrier, and reads them back through L2 (.cg) for its dots.
    The redundant transform costs each program M * (d1 + d2) * K multiply-adds on the tensor cores."""
    WORDS_PER_ROW: tl.constexpr = (K + 31) // 32 * W_BITS
    if FACTORS == 2:
        r1 = tl.arange(0, D1)
        r2 = tl.arange(0, D2)
        offs = r1[:, None] * d2 + r2[None, :]
        tile_mask = (r1 < d1)[:, None] & (r2 < d2)[None, :]
        f1_t = tl.load(f1_ptr + r1[None, :] * D1 + r1[:, None])
        f2 = tl.load(f2_ptr + r2[:, None] * D2 + r2[None, :])
        for t in range(M):
            x = tl.load(x_ptr + t * stride_xm + offs, mask=tile_mask, other=0.0).to(tl.float32)
            codes, scale = _kron2_codes(x, f1_t, f2, scale_mult, norm, RESCALE, QMIN, QMAX, D1, D2)
            tl.store(codes_ptr + t * K + offs, codes, mask=tile_mask)
            tl.store(a_scale_ptr + t, scale)
    else:  # one factor of order K = d1: the tokens as rows of one (BLOCK_M, D1) tile
        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, D1)
        mask = (rows < M)[:, None] & (cols < d1)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        codes, scales = _row_codes(x, f1_ptr, scale_mult, norm, True, QMIN, QMAX, BLOCK_M, D1)
        tl.store(codes_ptr + rows[:, None] * K + cols[None, :], codes, mask=mask)
        tl.store(a_scale_ptr + rows, scales, mask=rows < M)
    tl.debug_barrier()  # this CTA's code writes are visible to all its threads from here on

    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(codes_ptr + rm[:, None] * K + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :], other=0,
                    cache_modifier=".cg")
        w = _signed_weight_tile(w_ptr, rn, n_mask, stride_wn, k0, WORDS_PER_ROW, W_BITS, BLOCK_N, BLOCK_K)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
    a_scale = tl.load(a_scale_ptr + rm, mask=m_mask, other=0.0, cache_modifier=".cg")
    w_scale = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)
    _scaled_store(acc, a_scale, w_scale, bias_ptr, rn, n_mask, out_ptr + rm[:, None] * stride_om + rn[None, :],
                  m_mask[:, None] & n_mask[None, :], HAS_BIAS)


FUSED_MAX_M = 16  # the fused decode kernel's BLOCK_M: all tokens of the call in one row tile


def _fused_configs(padded_tile: int) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4)]
    # The prologue holds a padded (D1, D2) float32 token tile: past 4096 elements 4 warps spill (ptxas, sm90:
    # 8 bytes at 128 x 128 with 4 warps, none with 8).
    warps = (4, 8) if padded_tile <= 4096 else (8,)
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn in (16, 32, 64) for bk in (128, 256) for w in warps for s in (3, 4)]


@functools.cache
def _fused_kernel(padded_tile: int):
    # Overwrites the codes/scales buffers with identical values on every trial: no restore needed.
    return triton.autotune(_fused_configs(padded_tile), key=["N", "K", "W_BITS", "FACTORS", "d1", "d2", "RESCALE"]
                           )(_fused_decode_kernel)


def fused_decode(x: torch.Tensor, bits: int, scale_mult: float, orders: tuple[int, ...],
                 factors: tuple[tuple[torch.Tensor, ...], float], rescale: bool, w_packed: torch.Tensor,
                 w_scales: torch.Tensor, w_bits: int, bias: torch.Tensor | None, out: torch.Tensor,
                 codes: torch.Tensor, a_scales: torch.Tensor) -> torch.Tensor:
    """One launch for M <= FUSED_MAX_M tokens: transform + quantize (into `codes`, `a_scales`) + GEMM."""
    m, k = x.shape
    n = w_packed.shape[0]
    padded, norm = factors
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    d1, d2 = (orders + (1,))[:2]
    f2 = padded[1] if len(orders) == 2 else padded[0]
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _fused_kernel(padded[0].shape[0] * f2.shape[0] if len(orders) == 2 else 16 * padded[0].shape[0])[grid](
        x, padded[0], f2, codes, a_scales, w_packed, w_scales, bias if bias is not None else w_scales, out,
        m, n, x.stride(0), w_packed.stride(0), out.stride(0), norm, scale_mult,
        K=k, FACTORS=len(orders), d1=d1, d2=d2, D1=padded[0].shape[0], D2=f2.shape[0], RESCALE=rescale,
        QMIN=qmin, QMAX=qmax, W_BITS=w_bits, HAS_BIAS=bias is not None)
    return out


def _gemm_configs(regime: str) -> list[triton.Config]:
    if interpreter_enabled():  # decode: split-K, so that the interpreter runs the workspace path
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4,
                               "SPLIT_K": 2 if regime == "decode" else 1}, num_warps=4)]
    c = lambda bm, bn, bk, w, s, sk=1: triton.Config(  # noqa: E731
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": sk}, num_warps=w, num_stages=s)
    if regime == "decode":  # weight-bandwidth bound: many narrow column tiles, long K steps
        # 2 warps spill a 64 x 256 weight tile (sm90 ptxas: 260 / 472 bytes at 3 / 4 bits); 4 warps do not.
        # Split-K adds programs where N gives few column tiles (N = 576: 9 tiles of 64 for 132 SMs).
        return ([c(16, bn, bk, w, s) for bn in (16, 32, 64) for bk in (128, 256) for w in (2, 4)
                 if w == 4 or bn * bk <= 8192 for s in (3, 4)]
                + [c(16, bn, bk, 4, 3, sk) for bn in (32, 64) for bk in (128, 256) for sk in (2, 4)])
    # medium and large: chosen by the sm90/sm100 register reports (calm_kernels/compile_check.py; K = 4096, bias,
    # bf16 out). The 32-bit word unpacking keeps BLOCK_N x BLOCK_K int32 temporaries live beside the int32
    # accumulator, so the earlier lists spilled in every large config (188 to 2956 bytes; 128x128x64 at 4 warps
    # 540). Spilling below (stack bytes): 64x128x128 at 3 bits (368 / 376 on sm90 / sm100); 128x256x32 at 3 bits
    # on sm90 (144) and at every width on sm100 (224). BLOCK_M = 256: 256x64x32 on 8 warps spills nothing at
    # 2/3/4 bits on either (212-243 registers); 256x128x32 spills (sm90 64-120, sm100 584-648; 16 warps cap the
    # registers at 128 and spill too) and is kept once for the prefill tuning to weigh on a GPU.
    if regime == "medium":
        return ([c(bm, bn, bk, 4, s) for bm, bn, bk in ((32, 64, 64), (32, 64, 128), (32, 128, 128), (64, 64, 64))
                 for s in (3, 4)] + [c(64, 128, 64, 8, s) for s in (3, 4)])
    return [c(128, 128, 64, 8, 3), c(128, 128, 64, 8, 4), c(64, 128, 64, 8, 3), c(64, 128, 128, 8, 3),
            c(128, 256, 32, 8, 3), c(256, 64, 32, 8, 3), c(256, 64, 32, 8, 4), c(256, 128, 32, 8, 3)]


# Split-K workspace of the decode GEMM: an (M, N) int32 buffer and an int32 counter per output tile (the
# smallest tiles, 16 x 16), per device and shape, zeroed once when made; every launch leaves them zero again.
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def split_k_workspace(m: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), m, n)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.zeros(m, n, dtype=torch.int32, device=device),
                            torch.zeros(triton.cdiv(m, 16) * triton.cdiv(n, 16), dtype=torch.int32, device=device))
    return _WORKSPACES[key]


@functools.cache
def _gemm_kernel(regime: str):
    return triton.autotune(_gemm_configs(regime), key=["M_BUCKET", "N", "K", "W_BITS", "OUT_INT32"]
                           )(_rotated_matmul_kernel)


def rotated_matmul(a_codes: torch.Tensor, a_scales: torch.Tensor | None, w_packed: torch.Tensor,
                   w_scales: torch.Tensor | None, w_bits: int, bias: torch.Tensor | None,
                   out: torch.Tensor) -> torch.Tensor:
    m, k = a_codes.shape
    n = w_packed.shape[0]
    out_dtype = out.dtype
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None or out_dtype == torch.int32 else out.copy_(bias.expand(m, n))
    int_out = out_dtype == torch.int32
    regime = "decode" if m <= 16 else "medium" if m <= 128 else "large"
    ws, cnt = split_k_workspace(m, n, a_codes.device) if regime == "decode" else (out, out)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),  # noqa: E731
                         meta["SPLIT_K"])
    _gemm_kernel(regime)[grid](
        a_codes, w_packed, a_codes if int_out else a_scales, a_codes if int_out else w_scales,
        bias if bias is not None else a_codes, out, ws, cnt,
        m, n, a_codes.stride(0), w_packed.stride(0), out.stride(0), _bucket(m),
        K=k, W_BITS=w_bits, HAS_BIAS=bias is not None and not int_out, OUT_INT32=int_out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Compile specs for the no-GPU sm90 check (tests/kernels/test_rotated.py compiles them in a process without
# TRITON_INTERPRET, so the config lists are the GPU ones)
# ----------------------------------------------------------------------------------------------------------

def _gemm_spill_note(regime: str, cfg: triton.Config, bits: int) -> str:
    """Why a GEMM config kept in the lists may spill (sm90/sm100 ptxas), or "" when it must not."""
    kw = cfg.kwargs
    if (kw["BLOCK_M"], kw["BLOCK_N"]) == (256, 128):
        return "256 x 128 prefill tile (256 x 64 does not spill): kept for the GPU tuning to weigh"
    if regime == "large" and (kw["BLOCK_N"], kw["BLOCK_K"]) == (256, 32):
        return "128 x 256 prefill tile: spills at 3 bits on sm90 and at every width on sm100"
    if regime == "large" and bits == 3 and (kw["BLOCK_N"], kw["BLOCK_K"]) == (128, 128):
        return "3-bit unpacking of a 128 x 128 weight tile (no spills at 2 and 4 bits)"
    return ""


def compile_specs(full: bool = False):
    """The no-GPU compile check's specs (calm_kernels/compile_check.py): every autotune config of every kernel
    when `full` (the GEMM at 2, 3 and 4 bits), else the largest config of each list (the likeliest to exceed
    shared memory) at 3 bits, the widest unpacking."""
    from calm_kernels.compile_check import spec

    def pick(configs: list[triton.Config]) -> list[triton.Config]:
        return configs if full else [max(configs, key=lambda c: (math.prod(v for v in c.kwargs.values()),
                                                                 c.kwargs.get("BLOCK_M", 0), c.num_stages))]

    bit_widths = (4, 3, 2) if full else (3,)
    specs = []
    gemm_sig = {"a_ptr": "*i8", "w_ptr": "*i32", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
                "bias_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*i32", "cnt_ptr": "*i32"}
    for regime in ("decode", "medium", "large"):
        configs = _gemm_configs(regime)
        # the split-K epilogue too: the largest split config beside the largest unsplit one
        split = [c for c in configs if c.kwargs["SPLIT_K"] > 1]
        for cfg in configs if full else pick([c for c in configs if c not in split]) + (pick(split) if split else []):
            for bits in bit_widths:
                specs.append(spec(f"rotated_matmul[{regime} w{bits}]", _rotated_matmul_kernel, gemm_sig,
                                  {"K": 4096, "W_BITS": bits, "HAS_BIAS": True, "OUT_INT32": False}, cfg,
                                  _gemm_spill_note(regime, cfg, bits)))
    fused_sig = {"x_ptr": "*bf16", "f1_ptr": "*fp16", "f2_ptr": "*fp16", "codes_ptr": "*i8", "a_scale_ptr": "*fp32",
                 "w_ptr": "*i32", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16", "norm": "fp32",
                 "scale_mult": "fp32"}
    for i, cfg in enumerate(pick(_fused_configs(64 * 64))):  # 4096 = 64 x 64 (the two-factor prologue)
        bits = bit_widths[i % len(bit_widths)]
        specs.append(spec(f"fused_decode[64x64 w{bits}]", _fused_decode_kernel, fused_sig,
                          {"K": 4096, "FACTORS": 2, "d1": 64, "d2": 64, "D1": 64, "D2": 64, "RESCALE": False,
                           "QMIN": -4, "QMAX": 3, "W_BITS": bits, "HAS_BIAS": True}, cfg))
    rows_sig = {"x_ptr": "*bf16", "f_ptr": "*fp16", "codes_ptr": "*i8", "scales_ptr": "*fp32", "norm": "fp32",
                "scale_mult": "fp32"}
    for cfg in pick(_rows_configs(128, True)):
        specs.append(spec("quantize_rows[128]", _quantize_rows_kernel, rows_sig,
                          {"HAS_FACTOR": True, "D": 128, "QMIN": -8, "QMAX": 7}, cfg))
    kron_sig = {"x_ptr": "*bf16", "f1_ptr": "*fp16", "f2_ptr": "*fp16", "codes_ptr": "*i8", "scales_ptr": "*fp32",
                "norm": "fp32", "scale_mult": "fp32"}
    for cfg in pick(_kron2_configs(112, 128)):
        specs.append(spec("kron2_quantize[112x128]", _kron2_quantize_kernel, kron_sig,
                          {"d1": 112, "d2": 128, "D1": 128, "D2": 128, "RESCALE": False, "QMIN": -8, "QMAX": 7}, cfg))
    mix_sig = {"x_ptr": "*bf16", "f_ptr": "*fp16", "y_ptr": "*fp32"}
    for cfg in pick(_mix_configs(256)):  # 18944 = 148 x 128: the dense factor pads to 256
        specs.append(spec("mix_chunks[148x128]", _mix_chunks_kernel, mix_sig, {"m": 148, "P": 128, "M1": 256}, cfg))
    chunk_sig = {"y_ptr": "*fp32", "f2_ptr": "*fp16", "f3_ptr": "*fp16", "amax_ptr": "*fp32"}
    for cfg in pick(_chunk_configs()):  # 28672 = 28 x 32 x 32
        specs.append(spec("chunk_transform[28x32x32]", _chunk_transform_kernel, chunk_sig,
                          {"m": 28, "d2": 32, "d3": 32, "D2": 32, "D3": 32, "RESCALE": False}, cfg))
    quant_sig = {"y_ptr": "*fp32", "amax_ptr": "*fp32", "codes_ptr": "*i8", "scales_ptr": "*fp32", "norm": "fp32",
                 "scale_mult": "fp32"}
    for cfg in pick(_quant_chunked_configs()):
        specs.append(spec("quantize_chunked[28672]", _quantize_chunked_kernel, quant_sig,
                          {"K": 28672, "m": 28, "MP": 32, "QMIN": -4, "QMAX": 3}, cfg))
    return specs
