"""Triton kernels of calm_kernels.qgemm (contract, numerics and test status are documented there).

Imported only by the launchers in qgemm.py once `use_triton` said yes, so `import calm_kernels` never imports
triton. Every config list here is a guess: no GPU has run these kernels yet.

A weight is a list of up to five slabs (uniform: one slab of `bits`; codebook: one slab per width), each walked in
BLOCK_K-column tiles. The words come from the kernel-ready copy (`qgemm.KernelWeight`): a 3-bit slab is a 2-bit
plane followed by a 1-bit plane, so every load is an aligned 32-bit word. A tile's words are loaded as
(NW, BLOCK_N) rows and expanded by broadcast shifts into an (A, NW, BLOCK_N) tensor, A codes per word (16 for
3-bit, whose planes both expand in the 2-bit plane's order); element (a, b) is local column b * A + a. The
activations were permuted once by the launcher (act-order, codebook slabs), so they are read contiguously.

Dequantization without int-to-float conversion (uniform): the code is placed at the top of a float32 mantissa
under the exponent of 1.0 (`(code << (23 - BITS)) | 0x3F800000` read as float32 is 1 + code / 2^BITS), then one
FMA with a per-group scale' = scale * 2^BITS and offset' = -(2^BITS + zero) * scale gives (code - zero) * scale.
Every intermediate is an integer of at most 9 bits times a float16 scale, so the FMA is exact: the weights are
bit-identical to the reference's float32 dequantization (Marlin and FasterTransformer do the same in half
precision, where the offset is rounded; float32 keeps it exact and needs no conversion before a float32 FMA).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from calm_kernels._dispatch import interpreter_enabled

MAX_SLABS = 5
GEMV_MAX_M = 4    # M <= 4: CUDA-core GEMV with register partial sums (BLOCK_M = next power of two of M)
DECODE_MAX_M = 16  # M in 5..16: one 16-row tensor-core tile, split-K allowed
MIN_BLOCK_N = 16   # smallest BLOCK_N of any config: sizes the split-K tile counters


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def bucket(m: int) -> int:
    """Autotune key for M: one tuning per power-of-two range, capped where configs stop changing."""
    return min(_next_pow2(max(m, 1)), 4096)


@triton.jit
def _move_field(x, src, dst):
    """x's bits at position src moved to position dst (one shift; src and dst are constants per register where
    the code position a is, so the select folds away)."""
    return tl.where(dst >= src, x << tl.maximum(dst - src, 0).to(tl.uint32),
                    x >> tl.maximum(src - dst, 0).to(tl.uint32))


@triton.jit
def _tile_codes(w_ptr, row_off, nmask, t, word_start, cols,
                BITS: tl.constexpr, A: tl.constexpr, NW: tl.constexpr, BLOCK_K: tl.constexpr, DST: tl.constexpr):
    """Codes of tile t of a slab as uint32 (A, NW, BLOCK_N), element (a, b) local column t*BLOCK_K + b*A + a,
    each code's bits at bit DST (and 0 elsewhere): DST = 0 gives the codes, DST = 23 - BITS the mantissa of
    1 + code / 2^BITS. Moving each field straight to DST takes a shift and a mask per code (a shift, a mask, a
    second shift and an OR when extracted first and placed after: sm90 SASS, bench/sass_count.py)."""
    a = tl.arange(0, A)
    b = tl.arange(0, NW)
    if BITS == 3:
        # 2-bit plane (16 codes a word) then 1-bit plane (32 a word); word b of the 2-bit plane holds the low
        # bits of columns 16b..16b+15, whose high bits are bits 16*(b%2).. of 1-bit word b//2.
        lo_words = tl.cdiv(cols, 32) * 2
        hi_start = word_start + lo_words
        lo_idx = t * (BLOCK_K // 16) + b
        hi_idx = t * (BLOCK_K // 32) + b // 2
        lo_m = (lo_idx < lo_words)[:, None] & nmask[None, :]
        hi_m = (hi_idx < lo_words // 2)[:, None] & nmask[None, :]
        lo = tl.load(w_ptr + row_off[None, :] + (word_start + lo_idx)[:, None], mask=lo_m, other=0)
        hi = tl.load(w_ptr + row_off[None, :] + (hi_start + hi_idx)[:, None], mask=hi_m, other=0)
        lo = lo.to(tl.uint32, bitcast=True)
        # The half of the 1-bit word that belongs to this 2-bit word moves down once per word, so every code's
        # shifts depend only on its position a (a constant per register).
        hi = hi.to(tl.uint32, bitcast=True) >> ((b % 2) * 16).to(tl.uint32)[:, None]
        a3 = a[:, None, None]
        codes = ((_move_field(lo[None, :, :], 2 * a3, DST) & (3 << DST))
                 | (_move_field(hi[None, :, :], a3, DST + 2) & (4 << DST)))
    else:
        nwords = tl.cdiv(cols, 32) * BITS
        idx = t * NW + b
        m = (idx < nwords)[:, None] & nmask[None, :]
        words = tl.load(w_ptr + row_off[None, :] + (word_start + idx)[:, None], mask=m, other=0)
        words = words.to(tl.uint32, bitcast=True)
        codes = _move_field(words[None, :, :], (a * BITS)[:, None, None], DST) & (((1 << BITS) - 1) << DST)
    return codes


@triton.jit
def _tile_weights(w_ptr, meta0_ptr, meta1_ptr, offs_n, nmask, row_off, stride_sn, t, cols, col_start, word_start,
                  cb_start, BITS: tl.constexpr, MODE: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Float32 weights of tile t of a slab, (A, NW, BLOCK_N), and the tile's local columns (A, NW)."""
    A: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    NW: tl.constexpr = BLOCK_K // A
    local = t * BLOCK_K + tl.arange(0, NW)[None, :] * A + tl.arange(0, A)[:, None]
    if MODE == 0:
        # Exponent trick: 1 + code / 2^BITS without a conversion, then one exact FMA (module docstring).
        f = (_tile_codes(w_ptr, row_off, nmask, t, word_start, cols, BITS, A, NW, BLOCK_K, 23 - BITS)
             | 0x3F800000).to(tl.float32, bitcast=True)
        if GROUP % BLOCK_K == 0:
            g = (col_start + t * BLOCK_K) // GROUP
            s = tl.load(meta0_ptr + offs_n.to(tl.int64) * stride_sn + g, mask=nmask, other=0.0).to(tl.float32)
            z = tl.load(meta1_ptr + offs_n.to(tl.int64) * stride_sn + g, mask=nmask, other=0).to(tl.float32)
            scale = s * (1 << BITS)
            offset = -(z + (1 << BITS)) * s
            w = f * scale[None, None, :] + offset[None, None, :]
        elif GROUP % A == 0:
            # Several groups per tile (e.g. 64 in a 128-column tile): all A codes of a word share a group, so
            # scale and offset are per (word, row) and broadcast over the codes.
            first = col_start + t * BLOCK_K + tl.arange(0, NW) * A
            off = offs_n.to(tl.int64)[None, :] * stride_sn + (first // GROUP)[:, None]
            gm = (first - col_start < cols)[:, None] & nmask[None, :]
            s = tl.load(meta0_ptr + off, mask=gm, other=0.0).to(tl.float32)
            z = tl.load(meta1_ptr + off, mask=gm, other=0).to(tl.float32)
            scale = s * (1 << BITS)
            offset = -(z + (1 << BITS)) * s
            w = f * scale[None, :, :] + offset[None, :, :]
        else:
            # Groups that straddle words (sizes not a multiple of 32): scale and zero per element.
            off = offs_n.to(tl.int64)[None, None, :] * stride_sn + ((col_start + local) // GROUP)[:, :, None]
            lm = (local < cols)[:, :, None] & nmask[None, None, :]
            s = tl.load(meta0_ptr + off, mask=lm, other=0.0).to(tl.float32)
            z = tl.load(meta1_ptr + off, mask=lm, other=0).to(tl.float32)
            w = f * (s * (1 << BITS)) - (z + (1 << BITS)) * s
    else:
        # Codebook: the float32 table of local column j starts at cb_start + j * 2^BITS (L1-resident gathers).
        # No load mask: a column past the slab reads its last column's table (x is 0 there) and a row past N
        # has code 0 (its words load as 0), so every gather stays in the slab's tables; with the index in int32
        # this took the 3-bit GEMV from 15.8 to 12.6 SASS instructions per weight (best configs, sm90,
        # bench/sass_count.py).
        codes = _tile_codes(w_ptr, row_off, nmask, t, word_start, cols, BITS, A, NW, BLOCK_K, 0)
        entry = cb_start + (tl.minimum(local, cols - 1) << BITS)
        w = tl.load(meta0_ptr + (entry[:, :, None] + codes.to(tl.int32)))
    return w, local


@triton.jit
def _slab_accumulate(acc, x_ptr, w_ptr, meta0_ptr, meta1_ptr, offs_m, mmask, offs_n, nmask, stride_xm, stride_wn,
                     stride_sn, cols, col_start, word_start, cb_start, pid_k,
                     BITS: tl.constexpr, MODE: tl.constexpr, GROUP: tl.constexpr, GEMV: tl.constexpr,
                     SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) += x[:, slab] @ dequant(slab)^T over this program's share of the slab's tiles."""
    A: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    NW: tl.constexpr = BLOCK_K // A
    n_tiles = tl.cdiv(cols, BLOCK_K)
    row_off = offs_n.to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    if GEMV:
        # Partial sums stay 4-D in registers (one FMA per weight and row); one reduction after the loop.
        part = tl.zeros((BLOCK_M, A, NW, BLOCK_N), dtype=tl.float32)
        for t in range(pid_k, n_tiles, SPLIT_K):
            w, local = _tile_weights(w_ptr, meta0_ptr, meta1_ptr, offs_n, nmask, row_off, stride_sn, t, cols,
                                     col_start, word_start, cb_start, BITS, MODE, GROUP, BLOCK_K)
            xm = mmask[:, None, None] & (local < cols)[None, :, :]
            xt = tl.load(x_rows[:, None, None] + (col_start + local)[None, :, :], mask=xm, other=0.0)
            part += xt.to(tl.float32)[:, :, :, None] * w[None, :, :, :]
        acc += tl.sum(tl.sum(part, axis=2), axis=1)
    else:
        for t in range(pid_k, n_tiles, SPLIT_K):
            w, local = _tile_weights(w_ptr, meta0_ptr, meta1_ptr, offs_n, nmask, row_off, stride_sn, t, cols,
                                     col_start, word_start, cb_start, BITS, MODE, GROUP, BLOCK_K)
            # Contiguous activation load, then the tile order by a register permute: natural column b * A + a
            # is element (b, a) of a (NW, A) view and must land at position a * NW + b.
            natural = t * BLOCK_K + tl.arange(0, BLOCK_K)
            xt = tl.load(x_rows[:, None] + (col_start + natural)[None, :],
                         mask=mmask[:, None] & (natural < cols)[None, :], other=0.0)
            xt = tl.reshape(tl.permute(tl.reshape(xt, (BLOCK_M, NW, A)), (0, 2, 1)), (BLOCK_M, BLOCK_K))
            w2 = tl.reshape(w, (BLOCK_K, BLOCK_N)).to(xt.dtype)
            acc += tl.dot(xt, w2, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _qgemm_kernel(
    x_ptr, w_ptr, meta0_ptr, meta1_ptr, bias_ptr, rowptr_ptr, ocol_ptr, odelta_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, M_BUCKET, TUNE_BITS,
    stride_xm, stride_wn, stride_sn, stride_ym,
    C0, CS0, WS0, CB0, C1, CS1, WS1, CB1, C2, CS2, WS2, CB2, C3, CS3, WS3, CB3, C4, CS4, WS4, CB4,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, B4: tl.constexpr,
    MODE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    GEMV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[M, N] = x[M, K] @ dequant(W)^T (+ outliers) (+ bias), x already in stored column order.

    SPLIT_K > 1: every program adds its fp32 partial into ws atomically and takes a ticket on its tile's counter;
    the last one reads the sum back while zeroing ws (atomic exchange), writes y and resets the counter, so the
    workspace is clean after every launch and needs no zero-fill or copy launches.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles share each weight tile while it is in L2.
    width = GROUP_M * grid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if B0 > 0:
        acc = _slab_accumulate(acc, x_ptr, w_ptr, meta0_ptr, meta1_ptr, offs_m, mmask, offs_n, nmask, stride_xm,
                               stride_wn, stride_sn, C0, CS0, WS0, CB0, pid_k, B0, MODE, GROUP, GEMV, SPLIT_K,
                               BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    if B1 > 0:
        acc = _slab_accumulate(acc, x_ptr, w_ptr, meta0_ptr, meta1_ptr, offs_m, mmask, offs_n, nmask, stride_xm,
                               stride_wn, stride_sn, C1, CS1, WS1, CB1, pid_k, B1, MODE, GROUP, GEMV, SPLIT_K,
                               BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    if B2 > 0:
        acc = _slab_accumulate(acc, x_ptr, w_ptr, meta0_ptr, meta1_ptr, offs_m, mmask, offs_n, nmask, stride_xm,
                               stride_wn, stride_sn, C2, CS2, WS2, CB2, pid_k, B2, MODE, GROUP, GEMV, SPLIT_K,
                               BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    if B3 > 0:
        acc = _slab_accumulate(acc, x_ptr, w_ptr, meta0_ptr, meta1_ptr, offs_m, mmask, offs_n, nmask, stride_xm,
                               stride_wn, stride_sn, C3, CS3, WS3, CB3, pid_k, B3, MODE, GROUP, GEMV, SPLIT_K,
                               BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    if B4 > 0:
        acc = _slab_accumulate(acc, x_ptr, w_ptr, meta0_ptr, meta1_ptr, offs_m, mmask, offs_n, nmask, stride_xm,
                               stride_wn, stride_sn, C4, CS4, WS4, CB4, pid_k, B4, MODE, GROUP, GEMV, SPLIT_K,
                               BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)

    if pid_k == 0:
        if HAS_OUTLIERS:
            # Sparse correction rows: y[:, n] += x[:, col] * (value - codebook value), col in stored order.
            start = tl.load(rowptr_ptr + offs_n, mask=nmask, other=0)
            count = tl.load(rowptr_ptr + offs_n + 1, mask=nmask, other=0) - start
            longest = tl.max(count, axis=0)
            for e in range(0, longest):
                live = (count > e) & nmask
                col = tl.load(ocol_ptr + start + e, mask=live, other=0).to(tl.int64)
                d = tl.load(odelta_ptr + start + e, mask=live, other=0.0)
                xv = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + col[None, :],
                             mask=mmask[:, None] & live[None, :], other=0.0)
                acc += xv.to(tl.float32) * d[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]

    omask = mmask[:, None] & nmask[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        ws_ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=omask, sem="release")
        tl.debug_barrier()  # every thread's partial is issued before the ticket
        ticket = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            tl.debug_barrier()
            # The exchange runs on the int32 view of the words (float exchange is the same bits; the interpreter
            # exchanges integers only).
            bits = tl.atomic_xchg(ws_ptrs.to(tl.pointer_type(tl.int32)), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32),
                                  mask=omask, sem="acquire")
            total = tl.where(omask, bits.to(tl.float32, bitcast=True), 0.0)  # masked lanes return no value
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")


@triton.jit
def _dequant_kernel(
    w_ptr, meta0_ptr, meta1_ptr, out_ptr, N, K, stride_wn, stride_sn,
    C0, CS0, WS0, CB0, C1, CS1, WS1, CB1, C2, CS2, WS2, CB2, C3, CS3, WS3, CB3, C4, CS4, WS4, CB4,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, B4: tl.constexpr,
    MODE: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[N, K] (x's dtype, stored column order) = dequant(W): program (n tile, tile index over all slabs)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    row_off = offs_n.to(tl.int64) * stride_wn
    out_rows = out_ptr + offs_n.to(tl.int64) * K
    t = tl.program_id(1)
    if B0 > 0:
        t = _dequant_slab_tile(w_ptr, meta0_ptr, meta1_ptr, out_rows, offs_n, nmask, row_off, stride_sn, t,
                               C0, CS0, WS0, CB0, B0, MODE, GROUP, BLOCK_K)
    if B1 > 0:
        t = _dequant_slab_tile(w_ptr, meta0_ptr, meta1_ptr, out_rows, offs_n, nmask, row_off, stride_sn, t,
                               C1, CS1, WS1, CB1, B1, MODE, GROUP, BLOCK_K)
    if B2 > 0:
        t = _dequant_slab_tile(w_ptr, meta0_ptr, meta1_ptr, out_rows, offs_n, nmask, row_off, stride_sn, t,
                               C2, CS2, WS2, CB2, B2, MODE, GROUP, BLOCK_K)
    if B3 > 0:
        t = _dequant_slab_tile(w_ptr, meta0_ptr, meta1_ptr, out_rows, offs_n, nmask, row_off, stride_sn, t,
                               C3, CS3, WS3, CB3, B3, MODE, GROUP, BLOCK_K)
    if B4 > 0:
        t = _dequant_slab_tile(w_ptr, meta0_ptr, meta1_ptr, out_rows, offs_n, nmask, row_off, stride_sn, t,
                               C4, CS4, WS4, CB4, B4, MODE, GROUP, BLOCK_K)


@triton.jit
def _dequant_slab_tile(w_ptr, meta0_ptr, meta1_ptr, out_rows, offs_n, nmask, row_off, stride_sn, t, cols, col_start,
                       word_start, cb_start, BITS: tl.constexpr, MODE: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Write tile t of this slab if t falls in it; return t less this slab's tile count."""
    n_tiles = tl.cdiv(cols, BLOCK_K)
    if (t >= 0) & (t < n_tiles):
        w, local = _tile_weights(w_ptr, meta0_ptr, meta1_ptr, offs_n, nmask, row_off, stride_sn, t, cols,
                                 col_start, word_start, cb_start, BITS, MODE, GROUP, BLOCK_K)
        # (BLOCK_N, NW, A): consecutive elements are consecutive columns of a row, so the stores coalesce.
        w = tl.permute(w, (2, 1, 0))
        local = tl.permute(local, (1, 0))
        m = nmask[:, None, None] & (local < cols)[None, :, :]
        tl.store(out_rows[:, None, None] + (col_start + local)[None, :, :],
                 w.to(out_rows.dtype.element_ty), mask=m)
    return t - n_tiles


# Configs ------------------------------------------------------------------------------------------------------
# The autotune key is (M bucket, N, K, format, bits, group, outliers) and the dtypes: the CLAQ slab widths
# of a layer are not in it, so the layers of one shape share one tuning (and the first call of a shape tunes).
_KEY = ["M_BUCKET", "N", "K", "MODE", "TUNE_BITS", "GROUP", "HAS_OUTLIERS"]


def gemv_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "GROUP_M": 1})]
    out = []
    # Weights are read once: narrow column tiles (more programs) against split-K (more programs for small N
    # and long K, paid with one fp32 atomic per output element and program).
    for bn, bk, sk, warps in [(32, 128, 1, 4), (64, 128, 1, 4), (16, 256, 1, 4), (64, 64, 1, 4),
                              (32, 128, 2, 4), (64, 128, 2, 4), (32, 256, 2, 8), (32, 128, 4, 4),
                              (64, 64, 4, 4), (16, 128, 8, 2), (32, 64, 8, 4)]:
        for stages in (2, 4):
            out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": 1},
                                     num_warps=warps, num_stages=stages))
    return out


def small_m_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "GROUP_M": 1})]
    out = []
    for bn, bk, sk, warps in [(32, 128, 1, 4), (64, 128, 1, 4), (64, 128, 2, 4), (32, 128, 4, 4),
                              (64, 64, 4, 4), (128, 64, 4, 4), (64, 64, 8, 4)]:
        for stages in (2, 4):
            out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": 1},
                                     num_warps=warps, num_stages=stages))
    return out


def prefill_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 4})]
    # The dequantized (BLOCK_K, BLOCK_N) float32 tile lives in registers beside the accumulator: larger tiles
    # spill on sm90 (`python -m calm_kernels.compile_check --module qgemm --full`), so the list stops at
    # 128 x 128 x 64 on 8 warps.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "GROUP_M": 8},
                          num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 8, 3),
                                     (64, 64, 64, 4, 4), (128, 128, 32, 8, 4), (64, 128, 32, 4, 4),
                                     (32, 64, 128, 4, 3)]]


DEQUANT_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4}


def _prune_prefill(configs, named_args, **meta):
    """Codebook tiles hold gathered float32 tables and the outlier loop: above 64 x 64 x 64 they spill on sm90."""
    if meta.get("MODE") != 1:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= 64 and c.kwargs["BLOCK_K"] <= 64]
    return kept or configs


@functools.cache
def _autotuned(path: str):
    configs = {"gemv": gemv_configs, "small": small_m_configs, "prefill": prefill_configs}[path]()
    prune = {"early_config_prune": _prune_prefill} if path == "prefill" else None
    return triton.autotune(configs=configs, key=_KEY, prune_configs_by=prune)(_qgemm_kernel)


# Split-K workspace: one clean (M, N) float32 buffer and one int32 counter per output tile, per device and shape,
# zeroed once when made; every launch leaves them zero again (see _qgemm_kernel).
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def split_k_workspace(m: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), m, n)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.zeros(m, n, dtype=torch.float32, device=device),
                            torch.zeros(m * triton.cdiv(n, MIN_BLOCK_N), dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def _slab_args(slabs) -> tuple[list[int], dict[str, int]]:
    args, bits = [], {}
    for i in range(MAX_SLABS):
        b, c, cs, wst, cb = slabs[i] if i < len(slabs) else (0, 0, 0, 0, 0)
        args += [c, cs, wst, cb]
        bits[f"B{i}"] = b
    return args, bits


def qgemm(xs: torch.Tensor, weight, bias: torch.Tensor | None, y: torch.Tensor, path: str,
          config: dict | None = None) -> torch.Tensor:
    """Launch on a checked, contiguous x in stored column order into y (M, N); `weight` a qgemm.KernelWeight,
    `path` one of gemv / small / prefill. `config` pins the meta-parameters instead of autotuning."""
    m, n = xs.shape[0], weight.n
    ws, cnt = split_k_workspace(m, n, xs.device) if path != "prefill" else (y, y)
    slab_args, bits_args = _slab_args(weight.slabs)
    meta1 = weight.meta1 if weight.meta1 is not None else weight.meta0
    has_out = weight.outlier_deltas is not None
    rowptr, ocols, odelta = ((weight.outlier_rowptr, weight.outlier_scols, weight.outlier_deltas) if has_out
                             else (weight.words,) * 3)
    args = (xs, weight.words, weight.meta0, meta1, bias if bias is not None else weight.words, rowptr, ocols,
            odelta, y, ws, cnt, m, n, weight.k, bucket(m), weight.tune_bits,
            xs.stride(0), weight.words.stride(0), weight.meta0.stride(0) if weight.mode == 0 else 0, y.stride(0),
            *slab_args)
    meta = dict(**bits_args, MODE=weight.mode, GROUP=weight.group, HAS_BIAS=bias is not None,
                HAS_OUTLIERS=has_out, GEMV=path == "gemv",
                DOT_PRECISION="ieee" if xs.dtype == torch.float32 else "tf32")
    if path != "prefill":
        meta["BLOCK_M"] = _next_pow2(m) if path == "gemv" else 16

    def grid(kw):
        return (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]), kw["SPLIT_K"])

    if config is not None:
        cfg = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        launch = {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}
        if "BLOCK_M" in meta:
            cfg["BLOCK_M"] = meta.pop("BLOCK_M")
        if path == "prefill" and cfg.get("SPLIT_K", 1) != 1:
            raise ValueError("the prefill path has no split-K: SPLIT_K must be 1")
        _qgemm_kernel[grid({**meta, **cfg})](*args, **meta, **cfg, **launch)
    else:
        _autotuned(path)[grid](*args, **meta)
    return y


def dequantize(weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense (N, K) weight in `dtype`, stored column order (the large-M path feeds it to cuBLAS)."""
    w = out if out is not None else torch.empty(weight.n, weight.k, dtype=dtype, device=weight.words.device)
    slab_args, bits_args = _slab_args(weight.slabs)
    bk, bn = DEQUANT_CONFIG["BLOCK_K"], DEQUANT_CONFIG["BLOCK_N"]
    tiles = sum(triton.cdiv(c, bk) for _, c, _, _, _ in weight.slabs)
    meta1 = weight.meta1 if weight.meta1 is not None else weight.meta0
    _dequant_kernel[(triton.cdiv(weight.n, bn), tiles)](
        weight.words, weight.meta0, meta1, w, weight.n, weight.k, weight.words.stride(0),
        weight.meta0.stride(0) if weight.mode == 0 else 0, *slab_args, **bits_args, MODE=weight.mode,
        GROUP=weight.group, BLOCK_N=bn, BLOCK_K=bk, num_warps=DEQUANT_CONFIG["num_warps"])
    return w


# No-GPU compile check ----------------------------------------------------------------------------------------

def _qgemm_pointer_types(x_dtype: str, mode: int) -> dict[str, str]:
    """Pointer arguments of `_qgemm_kernel` (x_dtype: fp16 / bf16 / fp32; mode 0 uniform, 1 codebook)."""
    return {"x_ptr": f"*{x_dtype}", "w_ptr": "*i32", "meta0_ptr": "*fp16" if mode == 0 else "*fp32",
            "meta1_ptr": "*u8" if mode == 0 else "*fp32", "bias_ptr": f"*{x_dtype}", "rowptr_ptr": "*i32",
            "ocol_ptr": "*i32", "odelta_ptr": "*fp32", "y_ptr": f"*{x_dtype}", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}


def compile_specs(full: bool = False):
    """The no-GPU compile check's specs (calm_kernels/compile_check.py). Without `full`: one variant per path
    (GEMV, small M, prefill, dequantize) and format (uniform 3-bit with split-K, codebook 1/2/3/4/8 with
    outliers). With `full`: every autotune config of every path at uniform 3 and 4 bits, and with codebooks
    where the autotuner may run them (prefill prunes the codebook tiles that spill), plus the other dtypes,
    group shapes (scales per element / per word) and 8-bit. None may spill (beyond compile_check's few bytes)."""
    from calm_kernels.compile_check import spec

    def widths(bits: tuple[int, ...]) -> dict[str, int]:
        return {f"B{i}": (bits[i] if i < len(bits) else 0) for i in range(5)}

    def qg(label, path, cfg, bits, mode, x_dtype, group=128, outliers=False, bias=True, block_m=None):
        block_m = block_m or {"gemv": 1, "small": 16}.get(path)
        kw = {**cfg.kwargs, **({"BLOCK_M": block_m} if block_m else {})}
        cfg = triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return spec(f"{path} {label}", _qgemm_kernel, _qgemm_pointer_types(x_dtype, mode),
                    dict(widths(bits), MODE=mode, GROUP=group if mode == 0 else 1, HAS_BIAS=bias,
                         HAS_OUTLIERS=outliers, GEMV=path == "gemv", DOT_PRECISION="ieee" if x_dtype == "fp32"
                         else "tf32"), cfg)

    gemv, small, prefill = gemv_configs(), small_m_configs(), prefill_configs()

    def first(configs, split_k):
        return next(c for c in configs if c.kwargs["SPLIT_K"] == split_k)

    specs = [
        qg("u3 bf16 group 64 split-K 2", "gemv", first(gemv, 2), (3,), 0, "bf16", group=64),
        qg("codebook 1/2/3/4/8 + outliers bf16", "gemv", gemv[0], (1, 2, 3, 4, 8), 1, "bf16", outliers=True),
        qg("u4 bf16 split-K 4", "small", first(small, 4), (4,), 0, "bf16"),
        qg("u3 bf16", "prefill", prefill[0], (3,), 0, "bf16"),
        qg("codebook 3/4 + outliers bf16", "prefill", _prune_prefill(prefill, {}, MODE=1)[0], (3, 4), 1, "bf16",
           outliers=True),
        qg("M=4 u2 bf16", "gemv", triton.Config({**gemv[0].kwargs, "BLOCK_K": 64}, num_warps=gemv[0].num_warps,
                                                 num_stages=gemv[0].num_stages), (2,), 0, "bf16", block_m=4),
    ]
    if full:
        specs += [qg("u4 fp16 no bias", "gemv", gemv[0], (4,), 0, "fp16", bias=False),
                  qg("u4 bf16 group 100 (scales per element)", "gemv", gemv[0], (4,), 0, "bf16", group=100),
                  qg("u8 bf16 group 96 (scales per word)", "gemv", gemv[0], (8,), 0, "bf16", group=96),
                  qg("codebook 3/4 fp16", "small", small[0], (3, 4), 1, "fp16")]
        for path, configs in (("gemv", gemv), ("small", small), ("prefill", prefill)):
            codebook = _prune_prefill(configs, {}, MODE=1) if path == "prefill" else configs
            for i, cfg in enumerate(configs):
                specs += [qg(f"[{i}] u{bits} bf16", path, cfg, (bits,), 0, "bf16") for bits in (3, 4)]
                if cfg in codebook:
                    specs.append(qg(f"[{i}] codebook 3/4 + outliers bf16", path, cfg, (3, 4), 1, "bf16",
                                    outliers=True))
    dq = triton.Config({"BLOCK_N": DEQUANT_CONFIG["BLOCK_N"], "BLOCK_K": DEQUANT_CONFIG["BLOCK_K"]},
                        num_warps=DEQUANT_CONFIG["num_warps"])
    for bits, mode in (((3,), 0), ((2, 3, 4), 1)) + ((((4,), 0), ((8,), 0)) if full else ()):
        pointers = {k: v for k, v in _qgemm_pointer_types("bf16", mode).items()
                    if k in ("w_ptr", "meta0_ptr", "meta1_ptr")}
        specs.append(spec(f"dequantize {'u' if mode == 0 else 'codebook '}{'/'.join(map(str, bits))} bf16",
                          _dequant_kernel, {**pointers, "out_ptr": "*bf16"},
                          dict(widths(bits), MODE=mode, GROUP=128 if mode == 0 else 1), dq))
    return specs
