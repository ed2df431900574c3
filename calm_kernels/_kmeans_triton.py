"""Triton kernels of calm_kernels.kmeans (the algorithm, its numerics and its contract are documented there).

Imported only by the launchers in kmeans.py once `use_triton` said yes, so `import calm_kernels` never
imports triton.

Lloyd on sorted columns. 1-D K-means with sorted centroids assigns each cluster a contiguous range of the
sorted column, so a Lloyd step needs only the K-1 range boundaries and prefix sums:
- The launcher sorts every column once with torch.sort (values in (cols, rows) order, the importance gathered
  into the same order).
- `_kmeans_sorted_kernel`, one program per BLOCK_C columns:
  1. prefix sums over the sorted column, tiled over BLOCK_R rows with a carry: moment sum(imp * v) in
     float64 (a cluster's moment is a difference of two prefix sums: float32 would cancel catastrophically
     at 32768 rows), and with importance the mass sum(imp) in float64 and the count of nonzero weights in
     int32 (an exact test for "this cluster has no weight": two float prefix sums over a run of zero weights
     can round differently). Without importance the mass is the index itself. Written to scratch in global
     memory (L2-resident per program), then a barrier.
  2. weighted-quantile init: per centroid, a binary search for the first sorted position whose cumulative
     mass reaches (j + 1/2) T / K.
  3. `iters` Lloyd steps: boundary j (1..K-1) is the first sorted position whose value is strictly closer to
     centroid j than to centroid j-1 (the reference's float32 |v - c| comparison, so ties stay with the lower
     index), found by binary search, then a suffix minimum (an exactly repeated centroid owns nothing, as
     with the reference's ties to the lower index); each centroid moves to (moment difference) / (mass
     difference) rounded from float64 (with importance, clamped into its range's values: a range holding a
     tiny fraction of the column's weight loses digits to cancellation), or keeps its value when its range
     holds no weight.
  4. sort the centroids and store them.
  Work per column: O(rows) once for the prefix sums, then O(K log rows) loads per step (plus O(K^2) register
  selects to shift lanes), all on (BLOCK_C, K) lane tiles: the register footprint does not depend on the
  column height (no spills at any height).
- The final codes come from `_assign_kernel` on the unsorted W, so they are exactly the nearest centroids of
  the returned ones.

Assignment kernel: elementwise over (BLOCK_R, BLOCK_C) tiles of W; the centroids of a column are loaded as K
vectors; strict `<` keeps ties at the lower index, as the reference does.

Config lists are guesses: no GPU has run these kernels yet (interpreter, and compiled for sm90/sm100 by
calm_kernels/compile_check.py).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from calm_kernels._dispatch import interpreter_enabled


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _mass_at(pw_ptr, col_base, idx, lane_ok, HAS_IMP: tl.constexpr):
    """Cumulative mass of the first idx sorted values of each lane's column, float64."""
    if HAS_IMP:
        return tl.load(pw_ptr + col_base + idx, mask=lane_ok, other=0.0)
    return idx.to(tl.float64)


@triton.jit
def _kmeans_sorted_kernel(
    vs_ptr, is_ptr, pm_ptr, pw_ptr, pn_ptr, cent_ptr,
    rows, cols, iters, search_steps,
    stride_vc, stride_ic, stride_cc,
    K: tl.constexpr, HAS_IMP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # The program's first column moves the base pointers (64-bit, once); the lanes' offsets within the
    # program's columns stay 32-bit (BLOCK_C * (rows + 1) < 2^31): half the address registers.
    col0 = tl.program_id(0).to(tl.int64) * BLOCK_C
    vs_ptr += col0 * stride_vc
    is_ptr += col0 * stride_ic
    pm_ptr += col0 * (rows + 1)  # prefix arrays: (cols, rows + 1), entry i sums the first i sorted values
    pw_ptr += col0 * (rows + 1)
    pn_ptr += col0 * (rows + 1)
    cent_ptr += col0 * stride_cc
    cl = tl.arange(0, BLOCK_C)
    col_ok = cl < cols - col0
    pre = cl * (rows + 1)

    # --- 1. prefix sums over the sorted column, BLOCK_R rows at a time ------------------------------------
    rr0 = tl.arange(0, BLOCK_R)
    zero64 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    tl.store(pm_ptr + pre, zero64, mask=col_ok)
    if HAS_IMP:
        tl.store(pw_ptr + pre, zero64, mask=col_ok)
        tl.store(pn_ptr + pre, tl.zeros((BLOCK_C,), dtype=tl.int32), mask=col_ok)
    carry_m = zero64
    carry_w = zero64
    carry_n = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for r0 in range(0, rows, BLOCK_R):
        rr = r0 + rr0
        mask = col_ok[:, None] & (rr < rows)[None, :]
        v = tl.load(vs_ptr + cl[:, None] * stride_vc + rr[None, :], mask=mask, other=0.0).to(tl.float64)
        if HAS_IMP:
            imp = tl.load(is_ptr + cl[:, None] * stride_ic + rr[None, :], mask=mask, other=0.0).to(tl.float64)
            cw = carry_w[:, None] + tl.cumsum(imp, axis=1)
            cn = carry_n[:, None] + tl.cumsum((imp != 0.0).to(tl.int32), axis=1)
            tl.store(pw_ptr + pre[:, None] + 1 + rr[None, :], cw, mask=mask)
            tl.store(pn_ptr + pre[:, None] + 1 + rr[None, :], cn, mask=mask)
            v = v * imp
        cm = carry_m[:, None] + tl.cumsum(v, axis=1)
        tl.store(pm_ptr + pre[:, None] + 1 + rr[None, :], cm, mask=mask)
        # The next tile continues from this tile's last valid entry (a row sum would round differently).
        is_last = rr0[None, :] == tl.minimum(rows - r0, BLOCK_R) - 1
        carry_m = tl.sum(tl.where(is_last, cm, 0.0), axis=1)
        if HAS_IMP:
            carry_w = tl.sum(tl.where(is_last, cw, 0.0), axis=1)
            carry_n = tl.sum(tl.where(is_last, cn, 0), axis=1)
    tl.debug_barrier()  # the searches below read prefix entries other threads wrote

    # --- 2. weighted-quantile init: first position whose cumulative mass reaches (j + 1/2) T / K ---------
    kk = tl.arange(0, K)
    lane_ok = col_ok[:, None] & (kk[None, :] < K)
    base = pre[:, None] + tl.zeros((BLOCK_C, K), dtype=tl.int32)
    vbase = cl[:, None] * stride_vc + tl.zeros((BLOCK_C, K), dtype=tl.int32)
    total = _mass_at(pw_ptr, base, tl.zeros((BLOCK_C, K), dtype=tl.int32) + rows, lane_ok, HAS_IMP)
    target = ((kk.to(tl.float64) + 0.5) / K)[None, :] * total
    lo = tl.zeros((BLOCK_C, K), dtype=tl.int32)
    hi = lo + (rows - 1)
    for _ in range(search_steps):
        active = lo < hi
        mid = (lo + hi) >> 1
        reached = _mass_at(pw_ptr, base, mid + 1, lane_ok & active, HAS_IMP) >= target
        hi = tl.where(active & reached, mid, hi)
        lo = tl.where(active & ~reached, mid + 1, lo)
    cent = tl.load(vs_ptr + vbase + lo, mask=lane_ok, other=0.0).to(tl.float32)

    # --- 3. Lloyd steps by binary-searched boundaries and prefix differences ----------------------------
    for _ in range(iters):
        # Lane shifts by K masked row sums: tl.gather made ptxas spill (sm90/sm100).
        c_prev = cent
        for j in tl.static_range(1, K):
            cj = tl.sum(tl.where(kk[None, :] == j - 1, cent, 0.0), axis=1)
            c_prev = tl.where(kk[None, :] == j, cj[:, None], c_prev)
        lo = tl.zeros((BLOCK_C, K), dtype=tl.int32)
        hi = lo + rows
        for _ in range(search_steps):
            active = lo < hi
            mid = (lo + hi) >> 1
            v = tl.load(vs_ptr + vbase + mid, mask=lane_ok & active, other=0.0).to(tl.float32)
            closer = tl.abs(v - cent) < tl.abs(v - c_prev)
            hi = tl.where(active & closer, mid, hi)
            lo = tl.where(active & ~closer, mid + 1, lo)
        start = tl.where(kk[None, :] == 0, 0, lo)
        start = tl.associative_scan(start, 1, _min_combine, reverse=True)
        end = start
        for j in tl.static_range(0, K - 1):
            sj = tl.sum(tl.where(kk[None, :] == j + 1, start, 0), axis=1)
            end = tl.where(kk[None, :] == j, sj[:, None], end)
        end = tl.where(kk[None, :] == K - 1, rows, end)
        moment = (tl.load(pm_ptr + base + end, mask=lane_ok, other=0.0)
                  - tl.load(pm_ptr + base + start, mask=lane_ok, other=0.0))
        mass = _mass_at(pw_ptr, base, end, lane_ok, HAS_IMP) - _mass_at(pw_ptr, base, start, lane_ok, HAS_IMP)
        if HAS_IMP:
            weighted = (tl.load(pn_ptr + base + end, mask=lane_ok, other=0)
                        - tl.load(pn_ptr + base + start, mask=lane_ok, other=0)) > 0
            has_mass = weighted & (mass > 0.0)
        else:
            has_mass = end > start
        mean = (moment / tl.where(has_mass, mass, 1.0)).to(tl.float32)
        if HAS_IMP:
            # The weighted mean lies within the cluster's values; a prefix difference can miss that when the
            # cluster holds a tiny fraction of the column's weight (cancellation), so clamp it there (a no-op
            # otherwise). Unit weights need no clamp: the mass is an exact count, the error ~1e-16 * rows.
            first = tl.load(vs_ptr + vbase + start, mask=lane_ok & has_mass, other=0.0)
            last = tl.load(vs_ptr + vbase + end - 1, mask=lane_ok & has_mass, other=0.0)
            mean = tl.minimum(tl.maximum(mean, first), last)
        cent = tl.where(has_mass, mean, cent)

    # --- 4. sorted centroids out (the launcher's assignment pass writes the codes) -----------------------
    cent = tl.sort(cent, dim=1)
    tl.store(cent_ptr + cl[:, None] * stride_cc + kk[None, :], cent, mask=lane_ok)


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


def kmeans_configs(k: int) -> list[triton.Config]:
    """Search lanes are (BLOCK_C, K): 1-2 lanes per thread, 64..256 lanes a program, so there are many
    programs per SM (the binary searches are load-latency bound: occupancy hides them); the prefix tile
    (BLOCK_C, BLOCK_R) holds 2 float64 values per thread. Every config here compiles without spills on sm90
    and sm100 (calm_kernels/compile_check.py); 4 values per thread, 1 or 8 warps spilled a few."""
    if interpreter_enabled():
        return [triton.Config({"BLOCK_C": 2, "BLOCK_R": 16}, num_warps=4)]
    out = []
    for lanes in (64, 128, 256):
        for nw in (2, 4):
            if 32 * nw <= lanes <= 64 * nw:
                bc = max(1, lanes // k)
                out.append(triton.Config({"BLOCK_C": bc, "BLOCK_R": max(8, 2 * 32 * nw // bc)}, num_warps=nw))
    return out


@functools.cache
def _kmeans_tuned(k: int):
    return triton.autotune(kmeans_configs(k), key=["K", "HAS_IMP", "search_steps"])(_kmeans_sorted_kernel)


def assign_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_R": 32, "BLOCK_C": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_R": br, "BLOCK_C": bc}, num_warps=nw)
            for br, bc in ((64, 64), (32, 128), (128, 32), (16, 256)) for nw in (4, 8)]


@functools.cache
def _assign_tuned():
    return triton.autotune(assign_configs(), key=["K", "cols"])(_assign_kernel)


def sort_columns(w: torch.Tensor, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every column of w sorted ascending as (cols, rows) float32 rows, and the importance in the same order.

    `importance`: float32 (rows, cols) or (rows, 1), with unit weights already put in zero-sum columns."""
    rows, cols = w.shape
    values, order = torch.sort(w.to(torch.float32).T, dim=1, stable=True)
    values = values.contiguous()
    if importance is None:
        return values, None
    return values, torch.gather(importance.expand(rows, cols).T, 1, order).contiguous()


def kmeans_columns(w: torch.Tensor, k: int, importance: torch.Tensor | None, iters: int,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher; inputs already validated by kmeans.kmeans_columns (importance float32 (rows, cols|1)).

    `out` (codes uint8 (rows, cols), centroids float32 contiguous (cols, k)) lets tests pass poisoned buffers."""
    from calm_kernels.kmeans import _unit_where_zero

    rows, cols = w.shape
    if w.dtype == torch.float64:
        w = w.to(torch.float32)
    if out is None:
        out = (torch.empty((rows, cols), dtype=torch.uint8, device=w.device),
               torch.empty((cols, k), dtype=torch.float32, device=w.device))
    codes, cent = out
    imp = None if importance is None else _unit_where_zero(importance, cols)
    values, imp_sorted = sort_columns(w, imp)
    prefix_moment = torch.empty((cols, rows + 1), dtype=torch.float64, device=w.device)
    if imp_sorted is not None:
        prefix_mass = torch.empty((cols, rows + 1), dtype=torch.float64, device=w.device)
        prefix_count = torch.empty((cols, rows + 1), dtype=torch.int32, device=w.device)
    else:
        prefix_mass, prefix_count = prefix_moment, prefix_moment  # never read without importance
    grid = lambda meta: (triton.cdiv(cols, meta["BLOCK_C"]),)  # noqa: E731
    _kmeans_tuned(k)[grid](
        values, imp_sorted if imp_sorted is not None else values, prefix_moment, prefix_mass, prefix_count, cent,
        rows, cols, iters, rows.bit_length(),
        values.stride(0), imp_sorted.stride(0) if imp_sorted is not None else 0, cent.stride(0),
        K=k, HAS_IMP=imp_sorted is not None,
    )
    assign_columns(w, cent, out=codes)
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


def compile_specs(full: bool = False):
    """The no-GPU compile check's specs (calm_kernels/compile_check.py): the Lloyd kernel at K = 16, 8, 4, 2 with
    and without importance (first config, or every config when `full`), which must not spill at any column
    height; the assignment kernel for fp16 / fp32 / bf16 weights."""
    from calm_kernels.compile_check import spec

    lloyd = {"vs_ptr": "*fp32", "is_ptr": "*fp32", "pm_ptr": "*fp64", "pw_ptr": "*fp64", "pn_ptr": "*i32",
             "cent_ptr": "*fp32"}
    specs = []
    for k, imp in ((16, True), (16, False), (8, True), (4, False), (2, True), (2, False)):
        configs = kmeans_configs(k)
        specs += [spec(f"kmeans_sorted[K={k} importance={imp}]", _kmeans_sorted_kernel, lloyd,
                       {"K": k, "HAS_IMP": imp}, cfg) for cfg in (configs if full else configs[:1])]
    for k, w_type in ((16, "*fp16"), (8, "*fp32"), (4, "*bf16")):
        configs = assign_configs()
        specs += [spec(f"assign[K={k} {w_type[1:]}]", _assign_kernel,
                       {"w_ptr": w_type, "cent_ptr": "*fp32", "codes_ptr": "*u8"}, {"K": k}, cfg)
                  for cfg in (configs if full else configs[:1])]
    return specs
