"""Triton kernels of calm_kernels.qgemm (contract, numerics and test status are documented there).

Imported only by the launchers in qgemm.py once `use_triton` said yes, so `import calm_kernels` never imports
triton. Every config list here is a guess: no GPU has run these kernels yet.

One kernel serves both formats. A weight is a list of up to five slabs (uniform: one slab of `bits`;
codebook: one slab per width), each walked in BLOCK_K-column tiles. A tile's packed words are loaded as
contiguous rows and expanded in registers by broadcast shifts; that puts the tile's codes in an order of
their own (`_tile_columns`), and the activation tile follows it: loaded contiguously and permuted in registers,
or, with a column permutation (codebook slabs, act-order), gathered in that order. The reduction over K does
not care about order.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from calm_kernels._dispatch import interpreter_enabled

MAX_SLABS = 5
DECODE_MAX_M = 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _bucket(m: int) -> int:
    # Autotune key: one tuning per power-of-two range of M, capped where configs stop changing.
    return min(_next_pow2(max(m, 1)), 4096)


@triton.jit
def _tile_columns(BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Local column of every position of an expanded tile: position a * B + b holds column b * A + a."""
    A: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    B: tl.constexpr = BLOCK_K // A
    i = tl.arange(0, BLOCK_K)
    return (i % B) * A + i // B


@triton.jit
def _unpack_tile(w_ptr, row_off, nmask, word0, word_end, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Codes of one (BLOCK_K, BLOCK_N) tile, in `_tile_columns` order, as int32.

    row_off: (BLOCK_N,) offsets of the rows; word0: the tile's first word in a row; word_end: one past the
    slab's last word (words beyond it are not loaded).
    """
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 3:
        # 32 codes span three words; code j sits at bit 3j of the 96-bit group: codes 0..10 within the 64-bit
        # pair (w0, w1), codes 11..31 within (w1, w2) at bit 3j - 32.
        G: tl.constexpr = BLOCK_K // 32
        g = tl.arange(0, G)
        base = word0 + g * 3
        m = (base < word_end)[:, None] & nmask[None, :]
        ptr = w_ptr + row_off[None, :] + base[:, None]
        w0 = tl.load(ptr, mask=m, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        w1 = tl.load(ptr + 1, mask=m, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        w2 = tl.load(ptr + 2, mask=m, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        lo = w0 | (w1 << 32)
        hi = w1 | (w2 << 32)
        j = tl.arange(0, 32)
        sh_lo = (j * 3).to(tl.uint64)[:, None, None]
        sh_hi = tl.maximum(j * 3 - 32, 0).to(tl.uint64)[:, None, None]
        first = (j <= 10)[:, None, None]
        codes = tl.where(first, lo[None, :, :] >> sh_lo, hi[None, :, :] >> sh_hi) & MASK
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
    else:
        A: tl.constexpr = 32 // BITS
        NW: tl.constexpr = BLOCK_K // A
        wi = word0 + tl.arange(0, NW)
        m = (wi < word_end)[:, None] & nmask[None, :]
        words = tl.load(w_ptr + row_off[None, :] + wi[:, None], mask=m, other=0).to(tl.uint32, bitcast=True)
        sh = (tl.arange(0, A) * BITS).to(tl.uint32)[:, None, None]
        codes = (words[None, :, :] >> sh) & MASK
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
    return codes.to(tl.int32)


@triton.jit
def _slab_accumulate(acc, x_ptr, w_ptr, meta0_ptr, meta1_ptr, perm_ptr, offs_m, mmask, offs_n, nmask,
                     stride_xm, stride_wn, stride_sn, cols, col_start, word_start, cb_start, pid_k,
                     BITS: tl.constexpr, MODE: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr,
                     SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += x[:, slab columns] @ dequant(slab)^T over this program's share of the slab's K tiles."""
    n_tiles = tl.cdiv(cols, BLOCK_K)
    slab_words = tl.cdiv(cols, 32) * BITS
    word_end = word_start + slab_words
    tcol = _tile_columns(BITS, BLOCK_K)
    A: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    row_off = offs_n.to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    for t in range(pid_k, n_tiles, SPLIT_K):
        local = t * BLOCK_K + tcol
        kmask = local < cols
        stored = col_start + local
        if HAS_PERM:
            xcol = tl.load(perm_ptr + stored, mask=kmask, other=0)
            xt = tl.load(x_rows + xcol[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        else:
            # Contiguous load, then the tile order by a register permute: natural column b * A + a is
            # element (b, a) of a (B, A) view and must land at position a * B + b.
            natural = t * BLOCK_K + tl.arange(0, BLOCK_K)
            xt = tl.load(x_rows + (col_start + natural)[None, :], mask=mmask[:, None] & (natural < cols)[None, :],
                         other=0.0)
            xt = tl.reshape(tl.permute(tl.reshape(xt, (BLOCK_M, BLOCK_K // A, A)), (0, 2, 1)), (BLOCK_M, BLOCK_K))
        codes = _unpack_tile(w_ptr, row_off, nmask, word_start + t * (BLOCK_K * BITS // 32), word_end,
                             BITS, BLOCK_K, BLOCK_N)
        wmask = kmask[:, None] & nmask[None, :]
        if MODE == 0:
            # Uniform: w = (code - zero) * scale with the group of each column.
            if GROUP % BLOCK_K == 0:
                g = (t * BLOCK_K) // GROUP
                s = tl.load(meta0_ptr + offs_n.to(tl.int64) * stride_sn + g, mask=nmask, other=0.0)
                z = tl.load(meta1_ptr + offs_n.to(tl.int64) * stride_sn + g, mask=nmask, other=0)
                w = (codes.to(tl.float32) - z.to(tl.float32)[None, :]) * s.to(tl.float32)[None, :]
            else:
                off = offs_n.to(tl.int64)[None, :] * stride_sn + (stored // GROUP)[:, None]
                s = tl.load(meta0_ptr + off, mask=wmask, other=0.0)
                z = tl.load(meta1_ptr + off, mask=wmask, other=0)
                w = (codes.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)
        else:
            # Codebook: the column's table starts at cb_start + local * 2^BITS; masked lanes read nothing.
            w = tl.load(meta0_ptr + cb_start + (local << BITS)[:, None] + codes, mask=wmask, other=0.0)
        w = w.to(xt.dtype)
        if BLOCK_M >= 16:
            acc += tl.dot(xt, w, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(xt.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _qgemm_kernel(
    x_ptr, w_ptr, meta0_ptr, meta1_ptr, perm_ptr, bias_ptr, rowptr_ptr, ocol_ptr, odelta_ptr, y_ptr, ws_ptr,
    M, N, M_BUCKET,
    stride_xm, stride_wn, stride_sn, stride_ym,
    C0, CS0, WS0, CB0, C1, CS1, WS1, CB1, C2, CS2, WS2, CB2, C3, CS3, WS3, CB3, C4, CS4, WS4, CB4,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, B4: tl.constexpr,
    MODE: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[M, N] = x[M, K] @ dequant(W)^T (+ outliers) (+ bias); SPLIT_K > 1 adds fp32 partials into ws."""
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
        acc = _slab_accumulate(acc, x_ptr, w_ptr, meta0_ptr, meta1_ptr, perm_ptr, offs_m, mmask, offs_n, nmask,
                               stride_xm, stride_wn, stride_sn, C0, CS0, WS0, CB0, pid_k, B0, MODE, GROUP,
                               HAS_PERM, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    if B1 > 0:
        acc = _slab_accumulate(acc, x_ptr, w_ptr, meta0_ptr, meta1_ptr, perm_ptr, offs_m, mmask, offs_n, nmask,
                               stride_xm, stride_wn, stride_sn, C1, CS1, WS1, CB1, pid_k, B1, MODE, GROUP,
                               HAS_PERM, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    if B2 > 0:
        acc = _slab_accumulate(acc, x_ptr, w_ptr, meta0_ptr, meta1_ptr, perm_ptr, offs_m, mmask, offs_n, nmask,
                               stride_xm, stride_wn, stride_sn, C2, CS2, WS2, CB2, pid_k, B2, MODE, GROUP,
                               HAS_PERM, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    if B3 > 0:
        acc = _slab_accumulate(acc, x_ptr, w_ptr, meta0_ptr, meta1_ptr, perm_ptr, offs_m, mmask, offs_n, nmask,
                               stride_xm, stride_wn, stride_sn, C3, CS3, WS3, CB3, pid_k, B3, MODE, GROUP,
                               HAS_PERM, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    if B4 > 0:
        acc = _slab_accumulate(acc, x_ptr, w_ptr, meta0_ptr, meta1_ptr, perm_ptr, offs_m, mmask, offs_n, nmask,
                               stride_xm, stride_wn, stride_sn, C4, CS4, WS4, CB4, pid_k, B4, MODE, GROUP,
                               HAS_PERM, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)

    if pid_k == 0:
        if HAS_OUTLIERS:
            # Sparse correction rows: y[:, n] += x[:, col] * (value - codebook value) for each outlier of row n.
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
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc, mask=omask)


def _zero_ws(nargs):
    nargs["ws_ptr"].zero_()


def _decode_configs():
    if interpreter_enabled():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "GROUP_M": 1}, pre_hook=_zero_ws)]
    out = []
    # Weights are read once at M <= 16: the configs trade narrow column tiles (more programs) against split-K
    # (more programs for small N and long K, paid with fp32 atomics and one cast).
    for bn, bk, sk, warps in [(32, 128, 1, 4), (64, 128, 1, 4), (16, 256, 1, 2), (32, 256, 1, 4),
                              (32, 128, 2, 4), (64, 128, 2, 4), (64, 256, 2, 4), (32, 128, 4, 4),
                              (64, 128, 4, 4), (128, 128, 4, 8), (64, 64, 8, 4), (128, 64, 8, 4)]:
        for stages in (2, 4):
            out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": 1},
                                     num_warps=warps, num_stages=stages, pre_hook=_zero_ws if sk > 1 else None))
    return out


def _prefill_configs():
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 4})]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "GROUP_M": 8},
                          num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
                                     (128, 64, 64, 4, 4), (128, 256, 64, 8, 3), (64, 64, 128, 4, 3),
                                     (32, 128, 128, 4, 4), (128, 128, 128, 8, 3)]]


_KEY = ["M_BUCKET", "N", "C0", "C1", "C2", "C3", "C4", "B0", "B1", "B2", "B3", "B4", "MODE", "GROUP",
        "HAS_OUTLIERS"]


@functools.cache
def _decode_kernel():
    return triton.autotune(configs=_decode_configs(), key=_KEY, reset_to_zero=["ws_ptr"])(_qgemm_kernel)


@functools.cache
def _prefill_kernel():
    return triton.autotune(configs=_prefill_configs(), key=_KEY)(_qgemm_kernel)


def qgemm(x: torch.Tensor, qweight: torch.Tensor, meta0: torch.Tensor, meta1: torch.Tensor | None,
          perm: torch.Tensor | None, slabs: list[tuple[int, int, int, int, int]], mode: int, group: int,
          bias: torch.Tensor | None, outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
          out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Launch on checked, contiguous inputs. slabs: (bits, cols, col_start, word_start, codebook_start) each.

    `config` pins the meta-parameters (tests use it to reach both paths and split-K under the interpreter).
    """
    m = x.shape[0]
    n = qweight.shape[0]
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    decode = m <= DECODE_MAX_M
    ws = torch.empty(m, n, dtype=torch.float32, device=x.device) if decode else y
    slab_args, bits_args = [], {}
    for i in range(MAX_SLABS):
        b, c, cs, wst, cb = slabs[i] if i < len(slabs) else (0, 0, 0, 0, 0)
        slab_args += [c, cs, wst, cb]
        bits_args[f"B{i}"] = b
    has_out = outliers is not None and outliers[1].numel() > 0
    rowptr, ocols, odelta = outliers if has_out else (qweight, qweight, qweight)
    args = (x, qweight, meta0, meta1 if meta1 is not None else meta0, perm if perm is not None else qweight,
            bias if bias is not None else qweight, rowptr, ocols, odelta, y, ws,
            m, n, _bucket(m), x.stride(0), qweight.stride(0), meta0.stride(0) if mode == 0 else 0, y.stride(0),
            *slab_args)
    meta = dict(**bits_args, MODE=mode, GROUP=group, HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
                HAS_OUTLIERS=has_out, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    if decode:
        meta["BLOCK_M"] = 1 if m == 1 else 16

    def grid(kw):
        return (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]), kw["SPLIT_K"])

    if config is not None:
        cfg = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        launch = {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}
        if decode:
            cfg["BLOCK_M"] = meta.pop("BLOCK_M")
        if cfg["SPLIT_K"] > 1:
            ws.zero_()
        _qgemm_kernel[grid({**meta, **cfg})](*args, **meta, **cfg, **launch)
        split = cfg["SPLIT_K"]
    else:
        kernel = _decode_kernel() if decode else _prefill_kernel()
        kernel[grid](*args, **meta)
        split = kernel.best_config.kwargs["SPLIT_K"]
    if split > 1:
        y.copy_(ws)
    return y
