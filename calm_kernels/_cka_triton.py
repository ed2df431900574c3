"""Triton kernels of calm_kernels.cka (contract and numerics are documented there).

Imported only by the launchers in cka.py once `use_triton` said yes, so `import calm_kernels` never imports
triton.

Feature-space Gram kernel (`_gram_kernel`): one program owns a (BLOCK, BLOCK) tile of A_c^T B_c and walks the
tokens in BLOCK_K chunks. Centering is fused: the column shift is subtracted while a tile is loaded (masked
rows become exact zeros after the subtraction), so no centered copy exists. Two epilogues:
- SQUARED_SUM: the fp32 tile is widened to float64, squared and summed; one float64 partial per program
  (a symmetric Gram computes only the tiles on and above the diagonal and counts the others twice). The
  Gram itself is never written.
- ACCUMULATE: the tile is added to a float64 (da, db) co-moment state (streaming over batches); a symmetric
  Gram computes the upper tiles and writes each off-diagonal tile to its mirror position too.
Token split (small d): with few Gram tiles (d=576 has 5 x 5 tiles of 128, 15 of them on or above the
diagonal, for 132 SMs) the tokens are also split across programs: grid axis 2 walks `split_len`-token
ranges and each program writes its float32 partial tile (and, symmetric, its mirror) into its own slice of a
(splits, da, db) workspace (PARTIAL epilogue). The partials are then summed over the split axis in float64
by one torch reduction (no atomics: the order is fixed, so the result is deterministic run to run), and
squared-summed or added to the state. `token_splits` picks the count: enough programs for about two waves
of the device's SMs, at least MIN_SPLIT_TOKENS tokens each.
Sample-space kernel (`_sample_kernel`): one program owns a (BLOCK, BLOCK) tile of both n x n Grams
K = Xc Xc^T and L = Yc Yc^T (upper tiles only), built over the features of X and of Y, and reduces
<K, L>, <K, K> and <L, L> of the tile in float64.

Dot operands: fp16/bf16 inputs of one dtype multiply as that dtype after centering in float32 (one rounding
of the centered value, relative 2^-11 / 2^-8); anything else multiplies float32 operands with
input_precision="tf32x3" (about float32 accuracy on tensor cores). Accumulation is float32 within a
program's token loop, float64 across programs and batches.

Config lists are guesses: no GPU has run these kernels yet (interpreter only). Every config compiles for sm90
and sm100 without a GPU (`compile_specs`, calm_kernels/compile_check.py): the squared-sum and split (PARTIAL)
epilogues spill nothing; the float64 read-modify-write of ACCUMULATE spills about 500 stack bytes at BLOCK 128
(none at 64). The sample-space kernel has its own spill-free configs (`_sample_configs`).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from calm_kernels._dispatch import interpreter_enabled

_HALF = (torch.float16, torch.bfloat16)


@triton.jit
def _centered_tile(ptr, rows, cols, stride_r, stride_c, shift_ptr, n, d, OP_DTYPE: tl.constexpr):
    """Load ptr[rows, cols] minus shift[cols] in float32, zero outside (n, d), cast to the dot dtype."""
    mask = (rows[:, None] < n) & (cols[None, :] < d)
    v = tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(shift_ptr + cols, mask=cols < d, other=0.0)
    return tl.where(mask, v - s[None, :], 0.0).to(OP_DTYPE)


@triton.jit
def _dot(a, b, acc, OP_DTYPE: tl.constexpr):
    if OP_DTYPE == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


@triton.jit
def _gram_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, out_ptr,
    n, da, db,
    stride_an, stride_ad, stride_bn, stride_bd, stride_or, stride_oc, N_BUCKET,
    split_len, stride_os,
    SYMMETRIC: tl.constexpr, ACCUMULATE: tl.constexpr, PARTIAL: tl.constexpr, OP_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid = pid_m * tl.num_programs(1) + pid_n
    # Token range of this program: all n tokens unless the launcher split them (PARTIAL).
    tok_start = tl.program_id(2).to(tl.int64) * split_len
    tok_end = tl.minimum(tok_start + split_len, n)
    # A symmetric Gram's tiles below the diagonal are skipped (counted twice / mirrored by their twin).
    skip = pid_m > pid_n
    if not SYMMETRIC:
        skip = False
    if skip:
        if not ACCUMULATE and not PARTIAL:
            tl.store(out_ptr + pid, 0.0)
    else:
        ri = pid_m.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        rj = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        kk = tl.arange(0, BLOCK_K).to(tl.int64)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(tok_start, tok_end, BLOCK_K):
            tok = k0 + kk
            # (BLOCK_K, BLOCK) tiles; tokens past this program's range load as zeros
            a = _centered_tile(a_ptr, tok, ri, stride_an, stride_ad, sa_ptr, tok_end, da, OP_DTYPE)
            b = _centered_tile(b_ptr, tok, rj, stride_bn, stride_bd, sb_ptr, tok_end, db, OP_DTYPE)
            acc = _dot(tl.trans(a), b, acc, OP_DTYPE)
        if PARTIAL:
            # int32 offsets inside one (da, db) slice (the launcher keeps da * db < 2^31): int64 pointer tiles
            # of 128 x 128 cost sm90 about 100 bytes of spills per program
            i32 = pid_m * BLOCK + tl.arange(0, BLOCK)
            j32 = pid_n * BLOCK + tl.arange(0, BLOCK)
            base = out_ptr + tl.program_id(2).to(tl.int64) * stride_os
            tl.store(base + (i32[:, None] * stride_or + j32[None, :]), acc,
                     mask=(i32[:, None] < da) & (j32[None, :] < db))
            if SYMMETRIC:
                if pid_m < pid_n:  # the mirror tile, row by row from the transposed accumulator
                    tl.store(base + (j32[:, None] * stride_or + i32[None, :]), tl.trans(acc),
                             mask=(j32[:, None] < db) & (i32[None, :] < da))
        elif ACCUMULATE:
            # int32 offsets (the launcher checks they fit) and the mirror from the transposed tile, as PARTIAL
            i32 = pid_m * BLOCK + tl.arange(0, BLOCK)
            j32 = pid_n * BLOCK + tl.arange(0, BLOCK)
            mask = (i32[:, None] < da) & (j32[None, :] < db)
            ptrs = out_ptr + (i32[:, None] * stride_or + j32[None, :] * stride_oc)
            tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc.to(tl.float64), mask=mask)
            mirrored = pid_m < pid_n
            if not SYMMETRIC:
                mirrored = False
            if mirrored:
                mirror = out_ptr + (j32[:, None] * stride_or + i32[None, :] * stride_oc)
                mirror_mask = (j32[:, None] < db) & (i32[None, :] < da)
                tl.store(mirror, tl.load(mirror, mask=mirror_mask, other=0.0) + tl.trans(acc).to(tl.float64),
                         mask=mirror_mask)
        else:
            acc64 = acc.to(tl.float64)
            part = tl.sum(tl.sum(acc64 * acc64, axis=1), axis=0)
            if SYMMETRIC:
                part = part * tl.where(pid_m < pid_n, 2.0, 1.0)
            tl.store(out_ptr + pid, part)


@triton.jit
def _sample_kernel(
    x_ptr, y_ptr, sx_ptr, sy_ptr, part_ptr,
    n, dx, dy,
    stride_xn, stride_xd, stride_yn, stride_yd, N_BUCKET,
    OP_DTYPE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid = pid_m * tl.num_programs(1) + pid_n
    if pid_m > pid_n:
        tl.store(part_ptr + 3 * pid, 0.0)
        tl.store(part_ptr + 3 * pid + 1, 0.0)
        tl.store(part_ptr + 3 * pid + 2, 0.0)
    else:
        ra = pid_m.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        rb = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        kk = tl.arange(0, BLOCK_K).to(tl.int64)
        kx = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, dx, BLOCK_K):
            f = k0 + kk
            xa = _centered_tile(x_ptr, ra, f, stride_xn, stride_xd, sx_ptr, n, dx, OP_DTYPE)  # (BLOCK, BLOCK_K)
            xb = _centered_tile(x_ptr, rb, f, stride_xn, stride_xd, sx_ptr, n, dx, OP_DTYPE)
            kx = _dot(xa, tl.trans(xb), kx, OP_DTYPE)
        ky = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, dy, BLOCK_K):
            f = k0 + kk
            ya = _centered_tile(y_ptr, ra, f, stride_yn, stride_yd, sy_ptr, n, dy, OP_DTYPE)
            yb = _centered_tile(y_ptr, rb, f, stride_yn, stride_yd, sy_ptr, n, dy, OP_DTYPE)
            ky = _dot(ya, tl.trans(yb), ky, OP_DTYPE)
        k64 = kx.to(tl.float64)
        l64 = ky.to(tl.float64)
        weight = tl.where(pid_m < pid_n, 2.0, 1.0)  # off-diagonal tiles stand for their mirror too
        tl.store(part_ptr + 3 * pid, weight * tl.sum(tl.sum(k64 * l64, axis=1), axis=0))
        tl.store(part_ptr + 3 * pid + 1, weight * tl.sum(tl.sum(k64 * k64, axis=1), axis=0))
        tl.store(part_ptr + 3 * pid + 2, weight * tl.sum(tl.sum(l64 * l64, axis=1), axis=0))


def _configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK": 32, "BLOCK_K": 32}, num_warps=4)]
    # Spill-free on sm90 and sm100 but for ACCUMULATE's float64 epilogue at BLOCK 128 (calm_kernels/compile_check.py):
    # a 128 x 128 float32 accumulator on 4 warps spilled 1008 bytes, 64 x 32 on 4 warps 16 on sm100.
    return [triton.Config({"BLOCK": b, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for b, k, w, s in ((128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 4), (64, 64, 8, 4), (64, 32, 8, 5))]


@functools.cache
def _gram_tuned():
    # ACCUMULATE read-modify-writes its output, so autotuning must restore it between trials.
    return triton.autotune(_configs(), key=["da", "db", "N_BUCKET", "SYMMETRIC", "ACCUMULATE", "PARTIAL",
                                                "OP_DTYPE"],
                           restore_value=["out_ptr"])(_gram_kernel)


def _sample_configs() -> list[triton.Config]:
    # Two (BLOCK, BLOCK) float32 accumulators live at once: ptxas (sm90) spills 2480 bytes at 128 x 64 with 8
    # warps, 1536 with 16, and 1040 at 64 x 64 with 4; the configs below spill nothing (64 x 64 / 8 warps: 243
    # registers, 64 x 32 / 8 warps: 138, 64 x 32 / 4 warps: 255).
    if interpreter_enabled():
        return [triton.Config({"BLOCK": 32, "BLOCK_K": 32}, num_warps=4)]
    return [triton.Config({"BLOCK": b, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for b, k, w, s in ((64, 64, 8, 3), (64, 32, 8, 4), (64, 32, 4, 4))]


@functools.cache
def _sample_tuned():
    return triton.autotune(_sample_configs(), key=["dx", "dy", "N_BUCKET", "OP_DTYPE"])(_sample_kernel)


def _bucket(n: int) -> int:
    return min(1 << max(0, (n - 1).bit_length()), 1 << 20)


def _op_dtype(*tensors: torch.Tensor):
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and next(iter(dtypes)) in _HALF:
        return tl.float16 if next(iter(dtypes)) == torch.float16 else tl.bfloat16
    return tl.float32


def _ready(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32) if t.dtype == torch.float64 else t


MIN_SPLIT_TOKENS = 4096  # below this a split's partial tile costs more to write and reduce than it saves
SPLIT_ALIGN = 64  # split lengths are a multiple of every config's BLOCK_K
PLANNING_BLOCK = 128  # the split count is planned for the largest tile of the config list
INTERPRETER_SMS = 132  # under TRITON_INTERPRET=1 plan as for an H100 SXM (only the split count depends on it)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def token_splits(n: int, da: int, db: int, symmetric: bool, device: torch.device) -> int:
    """How many token ranges a feature-space Gram is split into: enough (tile, range) programs for about two
    waves of the SMs, each range at least MIN_SPLIT_TOKENS tokens; 1 when the tiles alone fill the device."""
    tm, tn = triton.cdiv(da, PLANNING_BLOCK), triton.cdiv(db, PLANNING_BLOCK)
    tiles = tm * (tm + 1) // 2 if symmetric else tm * tn
    if da * db >= 1 << 31:  # the partial tiles' int32 offsets; such Grams have tiles enough anyway
        return 1
    wanted = triton.cdiv(2 * _sm_count(device), tiles)
    return max(1, min(wanted, n // MIN_SPLIT_TOKENS))


def _split_len(n: int, splits: int) -> tuple[int, int]:
    """(tokens per range, ranges actually launched): ranges are SPLIT_ALIGN-aligned, the last one ragged."""
    length = triton.cdiv(triton.cdiv(max(n, 1), splits), SPLIT_ALIGN) * SPLIT_ALIGN
    return length, triton.cdiv(max(n, 1), length)


def _prepare(a, b, shift_a, shift_b):
    a = _ready(a)
    symmetric = b is None
    b, shift_b = (a, shift_a) if symmetric else (_ready(b), shift_b)
    return a, b, shift_b, symmetric


def _split_gram(a, b, shift_a, shift_b, symmetric: bool, splits: int) -> torch.Tensor:
    """(A - shift_a)^T (B - shift_b) as a float64 (da, db) matrix from `splits` token ranges: float32 partial
    tiles in a workspace, summed over the ranges in a fixed order (deterministic, no atomics)."""
    n, da = a.shape
    db = b.shape[1]
    length, ranges = _split_len(n, splits)
    work = torch.empty((ranges, da, db), dtype=torch.float32, device=a.device)  # contiguous: the kernel's
    # PARTIAL epilogue indexes a slice with int32 row * stride + column offsets

    def grid(meta):
        return (triton.cdiv(da, meta["BLOCK"]), triton.cdiv(db, meta["BLOCK"]), ranges)

    _gram_tuned()[grid](a, b, shift_a, shift_b, work, n, da, db,
                        a.stride(0), a.stride(1), b.stride(0), b.stride(1), work.stride(1), work.stride(2),
                        _bucket(length), length, work.stride(0),
                        SYMMETRIC=symmetric, ACCUMULATE=False, PARTIAL=True, OP_DTYPE=_op_dtype(a, b))
    return work.sum(0, dtype=torch.float64)


def gram_squared_sum(a: torch.Tensor, b: torch.Tensor | None, shift_a: torch.Tensor,
                     shift_b: torch.Tensor | None = None, splits: int | None = None) -> float:
    """||(A - shift_a)^T (B - shift_b)||_F^2 in float64; B None means B = A. `splits`: token ranges (None:
    `token_splits`); with one range the Gram is never written, with more its partials are (see module doc)."""
    a, b, shift_b, symmetric = _prepare(a, b, shift_a, shift_b)
    n, da = a.shape
    db = b.shape[1]
    splits = token_splits(n, da, db, symmetric, a.device) if splits is None or da * db >= 1 << 31 else splits
    if _split_len(n, splits)[1] > 1:
        return float(_split_gram(a, b, shift_a, shift_b, symmetric, splits).square().sum())
    op = _op_dtype(a, b)

    def grid(meta):
        return (triton.cdiv(da, meta["BLOCK"]), triton.cdiv(db, meta["BLOCK"]), 1)

    # NaN-filled and sized for the smallest tile of the config list: every program of the launched grid must
    # write its slot (skipped tiles write 0), and only the launched grid's slots are summed.
    parts = torch.full((triton.cdiv(da, 32) * triton.cdiv(db, 32),), float("nan"), dtype=torch.float64,
                       device=a.device)
    kernel = _gram_tuned()
    kernel[grid](a, b, shift_a, shift_b, parts, n, da, db,
                 a.stride(0), a.stride(1), b.stride(0), b.stride(1), 0, 0, _bucket(n), n, 0,
                 SYMMETRIC=symmetric, ACCUMULATE=False, PARTIAL=False, OP_DTYPE=op)
    block = kernel.best_config.kwargs["BLOCK"]
    return float(parts[: triton.cdiv(da, block) * triton.cdiv(db, block)].sum())


def gram_accumulate(state: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, shift_a: torch.Tensor,
                    shift_b: torch.Tensor | None = None, splits: int | None = None) -> None:
    """state (da, db) float64 += (A - shift_a)^T (B - shift_b); B None means B = A (upper tiles, mirrored).
    `splits` as in gram_squared_sum."""
    a, b, shift_b, symmetric = _prepare(a, b, shift_a, shift_b)
    n, da = a.shape
    db = b.shape[1]
    splits = token_splits(n, da, db, symmetric, a.device) if splits is None or da * db >= 1 << 31 else splits
    if _split_len(n, splits)[1] > 1:
        state += _split_gram(a, b, shift_a, shift_b, symmetric, splits)
        return
    if (da - 1) * state.stride(0) + (db - 1) * state.stride(1) >= 1 << 31:
        raise ValueError(f"a ({da}, {db}) co-moment state with strides {state.stride()} is past the kernel's int32 "
                         f"offsets; pass a contiguous state of fewer than 2^31 elements")

    def grid(meta):
        return (triton.cdiv(da, meta["BLOCK"]), triton.cdiv(db, meta["BLOCK"]), 1)

    _gram_tuned()[grid](a, b, shift_a, shift_b, state, n, da, db,
                        a.stride(0), a.stride(1), b.stride(0), b.stride(1), state.stride(0), state.stride(1),
                        _bucket(n), n, 0, SYMMETRIC=symmetric, ACCUMULATE=True, PARTIAL=False,
                        OP_DTYPE=_op_dtype(a, b))


def sample_space_terms(x: torch.Tensor, y: torch.Tensor, shift_x: torch.Tensor, shift_y: torch.Tensor
                       ) -> tuple[float, float, float]:
    """(<K, L>, <K, K>, <L, L>) of the centered n x n Grams in float64, Grams never written."""
    x = _ready(x)
    y = _ready(y)
    n, dx = x.shape
    dy = y.shape[1]

    def grid(meta):
        t = triton.cdiv(n, meta["BLOCK"])
        return (t, t)

    parts = torch.full((triton.cdiv(n, 32) ** 2 * 3,), float("nan"), dtype=torch.float64, device=x.device)
    kernel = _sample_tuned()
    kernel[grid](x, y, shift_x, shift_y, parts, n, dx, dy,
                          x.stride(0), x.stride(1), y.stride(0), y.stride(1), _bucket(n),
                          OP_DTYPE=_op_dtype(x, y))
    tiles = triton.cdiv(n, kernel.best_config.kwargs["BLOCK"]) ** 2
    xy, xx, yy = parts[: 3 * tiles].view(-1, 3).sum(0).tolist()
    return xy, xx, yy


# The float64 read-modify-write of the (BLOCK, BLOCK) state tile beside the float32 accumulator: the search's
# CKA accumulates once per calibration batch, so a spilled epilogue costs little against the token loop.
ACCUMULATE_SPILL = "float64 state tile read-modify-write in the epilogue (once per launch)"


def compile_specs(full: bool = False):
    """The no-GPU compile check's specs (calm_kernels/compile_check.py): the Gram kernel in its three epilogues
    (split partials, squared sum, float64 accumulate) and the sample-space kernel, bf16 operands, at every
    autotune config when `full`, else the largest only."""
    from calm_kernels.compile_check import spec

    configs = _configs() if full else [max(_configs(), key=lambda c: (c.kwargs["BLOCK"] * c.kwargs["BLOCK_K"],
                                                                      c.num_stages))]
    specs = []
    for cfg in configs:
        for symmetric, accumulate, partial in ((True, False, True), (False, False, False), (True, True, False)):
            sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "sa_ptr": "*fp32", "sb_ptr": "*fp32",
                   "out_ptr": "*fp32" if partial else "*fp64"}
            specs.append(spec(f"gram[sym={symmetric} acc={accumulate} partial={partial}]", _gram_kernel, sig,
                              {"SYMMETRIC": symmetric, "ACCUMULATE": accumulate, "PARTIAL": partial,
                               "OP_DTYPE": tl.bfloat16}, cfg,
                              may_spill=ACCUMULATE_SPILL if accumulate and cfg.kwargs["BLOCK"] == 128 else ""))
    sample_sig = {"x_ptr": "*bf16", "y_ptr": "*bf16", "sx_ptr": "*fp32", "sy_ptr": "*fp32", "part_ptr": "*fp64"}
    for cfg in _sample_configs() if full else _sample_configs()[:1]:
        specs.append(spec("sample", _sample_kernel, sample_sig, {"OP_DTYPE": tl.bfloat16}, cfg))
    return specs
