"""Triton kernels of calm_kernels.kmeans (the algorithm, its numerics and its contract are documented there).

Imported only by the launchers in kmeans.py once `use_triton` said yes, so `import calm_kernels` never
imports triton.

K-means kernel: one program owns BLOCK_C whole columns as a (BLOCK_R, BLOCK_C) register tile (BLOCK_R = the
row count padded to a power of two). W and the importance are read once, codes and centroids written once;
everything in between (quantile init, every Lloyd iteration, the final sort and assignment) stays on chip.
- Weighted-quantile init without sorting the column: the float32 values are mapped to order-preserving int32
  keys and, per centroid, a 32-step bisection over the key range finds the smallest key whose cumulative
  weight (sum of weights of values <= key) reaches the target. That key is always one of the column's values,
  so the init equals the reference's sort-and-cumsum result (exactly when the weight sums are exact, e.g.
  unit weights; float32 weight sums can move a quantile that sits on a boundary to its neighbour).
- Lloyd: K passes of (subtract, abs, compare, select) for the assignment and K masked weighted sums for the
  update per iteration. Work per column is O(rows * K * (iters + 32)): at K = 16 this is compute bound,
  not memory bound.
- Centroids live in a (BLOCK_C, K) tile; centroid j is read out with a masked row sum (no register
  indexing in Triton).

Assignment kernel: elementwise over (BLOCK_R, BLOCK_C) tiles of W; the centroids of a column are loaded as K
vectors; strict `<` keeps ties at the lower index, as the reference does.

Config lists are guesses: no GPU has run these kernels yet (interpreter only).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from calm_kernels._dispatch import interpreter_enabled
from calm_kernels.kmeans import MAX_KERNEL_ROWS as MAX_ROWS  # a taller column tile would not fit one program

_TILE_ELEMS = 16384  # BLOCK_R * BLOCK_C cap: ~5 live fp32/int32 tiles of 16k values across <= 32 warps


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@triton.jit
def _orderable_key(v):
    """float32 -> int32 with the same order (negatives: flip the magnitude bits). Involution on its image."""
    bits = v.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key_to_float(key):
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _column_of(tile, kk, j):
    """Column j of a (BLOCK_C, K) tile as a (BLOCK_C,) vector."""
    return tl.sum(tl.where(kk[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def _assign_tile(w, cent, kk, K: tl.constexpr):
    """Nearest centroid per value of a (BLOCK_R, BLOCK_C) tile; ties to the lower index."""
    best = tl.abs(w - _column_of(cent, kk, 0)[None, :])
    code = tl.zeros(w.shape, dtype=tl.int32)
    for j in tl.static_range(1, K):
        d = tl.abs(w - _column_of(cent, kk, j)[None, :])
        closer = d < best
        best = tl.where(closer, d, best)
        code = tl.where(closer, j, code)
    return code


@triton.jit
def _kmeans_kernel(
    w_ptr, imp_ptr, codes_ptr, cent_ptr,
    rows, cols, iters,
    stride_wr, stride_wc, stride_ir, stride_ic, stride_qr, stride_qc, stride_cc,
    K: tl.constexpr, HAS_IMP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    cc = pid * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    kk = tl.arange(0, K)
    row_ok = rr < rows
    col_ok = cc < cols
    mask = row_ok[:, None] & col_ok[None, :]

    w = tl.load(w_ptr + rr[:, None] * stride_wr + cc[None, :] * stride_wc, mask=mask, other=0.0).to(tl.float32)
    ones = tl.where(mask, 1.0, 0.0)
    if HAS_IMP:
        imp = tl.load(imp_ptr + rr[:, None] * stride_ir + cc[None, :] * stride_ic, mask=mask, other=0.0)
        total = tl.sum(imp, axis=0)
        # A column without weight is fitted with unit weights (the reference does the same).
        imp = tl.where(total[None, :] == 0.0, ones, imp)
    else:
        imp = ones
    total = tl.sum(imp, axis=0)

    # --- init: weighted quantiles by bisection over order-preserving integer keys -----------------------
    key = _orderable_key(w)
    # The bisection bounds are int64 (hi - lo can reach 2^32); every midpoint lies in [lo, hi], so the
    # comparison against the int32 keys is done in int32.
    key_lo = tl.min(tl.where(mask, key, 2147483647), axis=0).to(tl.int64)
    key_hi = tl.max(tl.where(mask, key, -2147483647 - 1), axis=0).to(tl.int64)
    cent = tl.zeros((BLOCK_C, K), dtype=tl.float32)
    for j in tl.static_range(K):
        target = total * ((j + 0.5) / K)
        lo = key_lo
        hi = key_hi
        for _ in range(32):  # the key range spans < 2^32 values
            mid = lo + ((hi - lo) >> 1)
            reached = tl.sum(tl.where(key <= mid.to(tl.int32)[None, :], imp, 0.0), axis=0) >= target
            hi = tl.where(reached, mid, hi)
            lo = tl.where(reached, lo, mid + 1)
        cent = tl.where(kk[None, :] == j, _key_to_float(hi.to(tl.int32))[:, None], cent)

    # --- Lloyd iterations --------------------------------------------------------------------------------
    wimp = w * imp
    for _ in range(iters):
        code = _assign_tile(w, cent, kk, K)
        for j in tl.static_range(K):
            mine = code == j
            mass = tl.sum(tl.where(mine, imp, 0.0), axis=0)
            moment = tl.sum(tl.where(mine, wimp, 0.0), axis=0)
            old = _column_of(cent, kk, j)
            new = tl.where(mass > 0.0, tl.math.div_rn(moment, tl.where(mass > 0.0, mass, 1.0)), old)
            cent = tl.where(kk[None, :] == j, new[:, None], cent)

    cent = tl.sort(cent, dim=1)
    code = _assign_tile(w, cent, kk, K)
    tl.store(codes_ptr + rr[:, None] * stride_qr + cc[None, :] * stride_qc, code.to(tl.uint8), mask=mask)
    tl.store(cent_ptr + cc[:, None] * stride_cc + kk[None, :], cent, mask=col_ok[:, None] & (kk[None, :] < K))


@triton.jit
def _assign_kernel(
    w_ptr, cent_ptr, codes_ptr,
    rows, cols,
    stride_wr, stride_wc, stride_cc, stride_ck, stride_qr, stride_qc,
    K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    col_ok = cc < cols
    mask = (rr < rows)[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + rr[:, None] * stride_wr + cc[None, :] * stride_wc, mask=mask, other=0.0).to(tl.float32)
    best = tl.abs(w - tl.load(cent_ptr + cc * stride_cc, mask=col_ok, other=0.0).to(tl.float32)[None, :])
    code = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
    for j in tl.static_range(1, K):
        c = tl.load(cent_ptr + cc * stride_cc + j * stride_ck, mask=col_ok, other=0.0).to(tl.float32)
        d = tl.abs(w - c[None, :])
        closer = d < best
        best = tl.where(closer, d, best)
        code = tl.where(closer, j, code)
    tl.store(codes_ptr + rr[:, None] * stride_qr + cc[None, :] * stride_qc, code.to(tl.uint8), mask=mask)


def _kmeans_configs(block_r: int) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_C": 2}, num_warps=4)]
    # 16 or 32 values of each live tile per thread; each variant compiles in 4-12 s (K = 16 unrolls 16 x 32
    # bisection steps), so the list stays short.
    out = []
    for bc in (1, 2, 4):
        elems = block_r * bc
        if elems > _TILE_ELEMS and bc > 1:
            continue
        for per_thread in (16, 32):
            nw = min(max(elems // (32 * per_thread), 4), 32)
            if triton.Config({"BLOCK_C": bc}, num_warps=nw) not in out:
                out.append(triton.Config({"BLOCK_C": bc}, num_warps=nw))
    return out


@functools.cache
def _kmeans_tuned(block_r: int):
    return triton.autotune(_kmeans_configs(block_r), key=["BLOCK_R", "K", "HAS_IMP"])(_kmeans_kernel)


def _assign_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_R": 32, "BLOCK_C": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_R": br, "BLOCK_C": bc}, num_warps=nw)
            for br, bc in ((64, 64), (32, 128), (128, 32), (16, 256)) for nw in (4, 8)]


@functools.cache
def _assign_tuned():
    return triton.autotune(_assign_configs(), key=["K", "cols"])(_assign_kernel)


def kmeans_columns(w: torch.Tensor, k: int, importance: torch.Tensor | None, iters: int,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher; inputs already validated by kmeans.kmeans_columns (importance float32 (rows, cols|1)).

    `out` (codes uint8 (rows, cols), centroids float32 contiguous (cols, k)) lets tests pass poisoned buffers."""
    rows, cols = w.shape
    if rows > MAX_ROWS:
        raise ValueError(f"the K-means kernel keeps a column on chip and takes at most {MAX_ROWS} rows, got "
                         f"{rows}; transpose the problem or set CALM_FORCE_REFERENCE=1")
    if w.dtype == torch.float64:
        w = w.to(torch.float32)
    if out is None:
        out = (torch.empty((rows, cols), dtype=torch.uint8, device=w.device),
               torch.empty((cols, k), dtype=torch.float32, device=w.device))
    codes, cent = out
    if importance is not None:
        imp_stride = (importance.stride(0), importance.stride(1) if importance.shape[1] == cols else 0)
    else:
        imp_stride = (0, 0)
    block_r = _next_pow2(rows)
    grid = lambda meta: (triton.cdiv(cols, meta["BLOCK_C"]),)  # noqa: E731
    _kmeans_tuned(block_r)[grid](
        w, importance if importance is not None else w, codes, cent,
        rows, cols, iters,
        w.stride(0), w.stride(1), imp_stride[0], imp_stride[1], codes.stride(0), codes.stride(1), cent.stride(0),
        K=k, HAS_IMP=importance is not None, BLOCK_R=block_r,
    )
    return codes, cent


def assign_columns(w: torch.Tensor, centroids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher; inputs already validated by kmeans.assign_columns (`out`: uint8 (rows, cols), for tests)."""
    rows, cols = w.shape
    if w.dtype == torch.float64:
        w = w.to(torch.float32)
    if centroids.dtype != torch.float32:
        centroids = centroids.to(torch.float32)
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=w.device) if out is None else out
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(cols, meta["BLOCK_C"]))  # noqa: E731
    _assign_tuned()[grid](
        w, centroids, codes, rows, cols,
        w.stride(0), w.stride(1), centroids.stride(0), centroids.stride(1), codes.stride(0), codes.stride(1),
        K=centroids.shape[1],
    )
    return codes
