"""The dequant-GEMM kernel (calm_kernels/_qgemm_triton.py) under TRITON_INTERPRET=1 against its references.

Run in its own process: TRITON_INTERPRET=1 python -m pytest -q tests/kernels/test_qgemm.py
Every path (gemv, small, prefill, dense) is reached by M or forced with `path=`; split-K by pinned configs.
The sm90/sm100 compile check is tests/kernels/test_compile.py (calm_kernels/compile_check.py).
Oracle: x @ W^T in float64 with W the dequantized weight rounded to x's dtype (what both the kernel and
PyTorch multiply). The kernel's relative error may be at most twice PyTorch's in the same dtype, plus a floor
at the dtype's accumulation noise.
"""

import pytest
import torch

from calm.nn import CodebookQuantLinear, UniformQuantLinear
from calm_kernels import packing, qgemm

DECODE = {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 1}
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3}


@pytest.fixture
def check(rel_err, assert_rel_close):
    """`check(y, x, w, bias, dtype)`: y (kernel) vs the float64 oracle; w is the dense float32 weight (K in x's
    column order). The kernel's relative error may be at most twice PyTorch's plus the dtype's floor."""
    def run(y, x, w, bias, dtype):
        wq = w.to(dtype)
        oracle = x.double() @ wq.double().T
        if bias is not None:
            oracle += bias.to(dtype).double()
        torch_y = torch.nn.functional.linear(x, wq, None if bias is None else bias.to(dtype))
        torch_err = rel_err(torch_y, oracle)
        assert_rel_close(y, oracle, 2 * torch_err + FLOOR[dtype], f"kernel vs float64 (PyTorch {torch_err:.3g})")
    return run


def _uniform(g, n, k, bits, group, symmetric):
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    groups = k // group
    scales = (torch.rand(n, groups, generator=g) * 0.05 + 0.01).to(torch.float16)
    if symmetric:
        zeros = torch.full((n, groups), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 1 << bits, (n, groups), generator=g).to(torch.uint8)
    return packing.pack_codes(codes.to(torch.uint8), bits), scales, zeros


# (bits, group, K, M, symmetric): every width, groups 32/64/128 and per channel (K not a multiple of the tile),
# decode GEMV (M=1), decode tensor-core tile (M in 2..16), prefill (M > 16), ragged N.
UNIFORM_CASES = [
    (2, 32, 160, 1, False), (2, 128, 256, 19, True), (2, 77, 77, 6, False),
    (3, 64, 192, 1, True), (3, 32, 96, 7, False), (3, 131, 131, 33, False), (3, 128, 384, 2, True),
    (4, 128, 256, 1, False), (4, 64, 320, 16, True), (4, 32, 96, 40, False), (4, 257, 257, 3, True),
    (8, 64, 128, 1, False), (8, 32, 224, 9, True), (8, 96, 96, 21, False),
]


@pytest.mark.parametrize("bits,group,k,m,symmetric", UNIFORM_CASES)
def test_uniform_matches_reference(bits, group, k, m, symmetric, gen, poisoned, check):
    n = 37
    packed, scales, zeros = _uniform(gen(bits * 100 + k + m), n, k, bits, group, symmetric)
    g = gen(m)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if m % 2 else None
    y = qgemm.uniform_matmul(x, packed, scales, zeros, bits, group, k, bias, out=poisoned((m, n), x.dtype))
    w = packing.dequantize_uniform(packed, scales, zeros, bits, group, k)
    check(y, x, w, bias, torch.float32)


@pytest.mark.parametrize("m", [1, 4, 45])
def test_uniform_float16_and_input_perm(m, gen, poisoned, check):
    n, k, bits, group = 50, 192, 3, 64
    packed, scales, zeros = _uniform(gen(m), n, k, bits, group, False)
    g = gen(m + 1)
    perm = torch.randperm(k, generator=g)
    x = torch.randn(m, k, generator=g).to(torch.float16)
    bias = torch.randn(n, generator=g)
    y = qgemm.uniform_matmul(x, packed, scales, zeros, bits, group, k, bias, perm, out=poisoned((m, n), x.dtype))
    assert y.dtype == torch.float16
    w = packing.dequantize_uniform(packed, scales, zeros, bits, group, k)
    w_orig = torch.empty_like(w)
    w_orig[:, perm] = w  # stored column s meets x[:, perm[s]]
    check(y, x, w_orig, bias, torch.float16)


@pytest.mark.parametrize("config", [
    dict(DECODE, SPLIT_K=1), dict(DECODE, SPLIT_K=3), dict(DECODE, BLOCK_K=32, SPLIT_K=2),
    dict(DECODE, BLOCK_N=16, BLOCK_K=128, SPLIT_K=4),
])
@pytest.mark.parametrize("m", [1, 11])
def test_decode_split_k(config, m, gen, poisoned, check):
    n, k, bits, group = 29, 448, 4, 64
    packed, scales, zeros = _uniform(gen(m), n, k, bits, group, False)
    x = torch.randn(m, k, generator=gen(2))
    bias = torch.randn(n, generator=gen(3))
    y = qgemm.uniform_matmul(x, packed, scales, zeros, bits, group, k, bias, out=poisoned((m, n), x.dtype),
                             config=config)
    check(y, x, packing.dequantize_uniform(packed, scales, zeros, bits, group, k), bias, torch.float32)


@pytest.mark.parametrize("config", [
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 2},
    {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 1, "GROUP_M": 1},
])
def test_prefill_tiles(config, gen, poisoned, check):
    m, n, k, bits, group = 70, 45, 320, 2, 64  # group % BLOCK_K == 0 with BLOCK_K 32, per column with 128
    packed, scales, zeros = _uniform(gen(5), n, k, bits, group, True)
    x = torch.randn(m, k, generator=gen(6))
    y = qgemm.uniform_matmul(x, packed, scales, zeros, bits, group, k, out=poisoned((m, n), x.dtype), config=config)
    check(y, x, packing.dequantize_uniform(packed, scales, zeros, bits, group, k), None, torch.float32)


def _codebook(g, n, k, widths, n_outliers):
    column_bits = torch.tensor(widths)[torch.randint(0, len(widths), (k,), generator=g)]
    column_bits[: len(widths)] = torch.tensor(widths)  # every width present
    centroids = torch.randn(k, 1 << max(widths), generator=g) * 0.1
    codes = (torch.randint(0, 256, (n, k), generator=g) % (1 << column_bits)).to(torch.uint8)
    outliers = None
    if n_outliers:
        flat = torch.randperm(n * k, generator=g)[:n_outliers]
        outliers = (flat // k, flat % k, torch.randn(n_outliers, generator=g))
    return codes, centroids, column_bits, outliers


# (widths, K, M, outliers): one width, mixed slabs (3/4, 2/3/4, all five), decode and prefill, outliers.
CODEBOOK_CASES = [
    ((4,), 128, 1, 0), ((3,), 100, 18, 0), ((3, 4), 200, 1, 25), ((3, 4), 131, 5, 0), ((3, 4), 96, 33, 40),
    ((2, 3, 4), 250, 2, 30), ((2, 3, 4), 150, 40, 0), ((1, 2, 3, 4, 8), 300, 1, 50), ((1, 2, 3, 4, 8), 170, 24, 10),
]


@pytest.mark.parametrize("widths,k,m,n_outliers", CODEBOOK_CASES)
def test_codebook_matches_reference(widths, k, m, n_outliers, gen, poisoned, check):
    n = 41
    codes, centroids, column_bits, outliers = _codebook(gen(k + m), n, k, widths, n_outliers)
    packed = packing.pack_codebook(codes, centroids, column_bits, outliers)
    deltas = None
    if outliers is not None:
        d = packing.codebook_outlier_deltas(packed.qweight, packed.codebooks, packed.perm, packed.layout,
                                            packed.outlier_rowptr, packed.outlier_cols, packed.outlier_vals)
        deltas = (packed.outlier_rowptr, packed.outlier_cols, d)
    g = gen(m)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if m % 2 else None
    y = qgemm.codebook_matmul(x, packed.qweight, packed.codebooks, packed.perm, packed.layout, bias, deltas,
                              out=poisoned((m, n), x.dtype))
    check(y, x, packing.dequantize_codebook(packed), bias, torch.float32)


def test_codebook_float16_split_k_with_outliers(gen, poisoned, check):
    n, k, m = 33, 260, 3
    codes, centroids, column_bits, outliers = _codebook(gen(9), n, k, (3, 4), 60)
    lin = CodebookQuantLinear.from_parts(codes, centroids, column_bits, outliers, torch.randn(n, generator=gen(11)))
    x = torch.randn(m, k, generator=gen(10)).to(torch.float16)
    y = qgemm.codebook_matmul(x, lin.qweight, lin.codebooks, lin.perm, lin.layout, lin.bias, lin._outliers(),
                              out=poisoned((m, n), x.dtype), config=dict(DECODE, SPLIT_K=3))
    check(y, x, lin.dequantized_weight(), lin.bias, torch.float16)


def test_modules_forward_through_the_kernel(gen, check):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    x = torch.randn(2, 3, 96)
    u = UniformQuantLinear.from_float(lin, bits=3, group_size=32)
    check(u(x).reshape(6, 40), x.reshape(6, 96), u.dequantized_weight(), u.bias, torch.float32)
    codes, centroids, column_bits, outliers = _codebook(gen(1), 40, 96, (2, 4), 12)
    c = CodebookQuantLinear.from_parts(codes, centroids, column_bits, outliers, lin.bias.detach())
    check(c(x).reshape(6, 40), x.reshape(6, 96), c.dequantized_weight(), c.bias, torch.float32)


def test_empty_batch_and_bad_inputs(gen):
    packed, scales, zeros = _uniform(gen(0), 8, 64, 4, 32, True)
    assert qgemm.uniform_matmul(torch.zeros(0, 64), packed, scales, zeros, 4, 32, 64).shape == (0, 8)
    with pytest.raises(ValueError, match="features"):
        qgemm.uniform_matmul(torch.zeros(2, 63), packed, scales, zeros, 4, 32, 64)
    with pytest.raises(ValueError, match="packed weight must be int32"):
        qgemm.uniform_matmul(torch.zeros(2, 64), packed, scales, zeros, 3, 32, 64)
    with pytest.raises(ValueError, match="scales and zeros"):
        qgemm.uniform_matmul(torch.zeros(2, 64), packed, scales[:, :1], zeros, 4, 32, 64)
    with pytest.raises(ValueError, match="out must be"):
        qgemm.uniform_matmul(torch.zeros(2, 64), packed, scales, zeros, 4, 32, 64, out=torch.zeros(2, 9))


# Kernel-ready form, paths, workspace, caching, compile ------------------------------------------------------
@pytest.mark.parametrize("k", [32, 77, 160])
def test_3bit_planes_hold_the_same_codes(k, gen):
    codes = torch.randint(0, 8, (5, k), generator=gen(k)).to(torch.uint8)
    packed = packing.pack_codes(codes, 3)
    planes = packing.split_3bit_planes(packed, k, rows_per_chunk=2)
    assert planes.shape == packed.shape  # same words: the kernel-ready copy costs no extra bytes per weight
    lo_words = packing.packed_words(k, 2)
    lo = packing.unpack_codes(planes[:, :lo_words], 2, k)
    hi = packing.unpack_codes(planes[:, lo_words:], 1, k)
    assert torch.equal(lo | (hi << 2), codes)


def test_choose_path_thresholds():
    assert [qgemm.choose_path(m) for m in (1, 4, 5, 16, 17, qgemm.DENSE_MIN_M - 1, qgemm.DENSE_MIN_M)] == [
        "gemv", "gemv", "small", "small", "prefill", "prefill", "dense"]
    assert qgemm.choose_path(3, "dense") == "dense"
    with pytest.raises(ValueError, match="unknown qgemm path"):
        qgemm.choose_path(3, "fast")


# (path, bits (0: codebook 1/2/3/4/8 with outliers), M, dtype, act-order): every path on every format, forced.
PATH_CASES = [
    ("gemv", 3, 2, torch.float16, True), ("gemv", 0, 3, torch.float32, False),
    ("small", 2, 1, torch.float32, True), ("small", 0, 7, torch.float16, False),
    ("prefill", 8, 3, torch.float16, False), ("prefill", 0, 20, torch.float32, False),
    ("dense", 3, 5, torch.float32, True), ("dense", 4, 18, torch.float16, False), ("dense", 0, 2, torch.float16, False),
]


@pytest.mark.parametrize("path,bits,m,dtype,act_order", PATH_CASES)
def test_every_path_matches_reference(path, bits, m, dtype, act_order, gen, poisoned, check):
    n, k = 38, 224
    g = gen(m * 10 + bits)
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    out = poisoned((m, n), dtype)
    if bits:
        group = 32 if bits != 8 else 112  # 112: groups that do not align with the 64-column tile
        packed, scales, zeros = _uniform(g, n, k, bits, group, False)
        perm = torch.randperm(k, generator=g) if act_order else None
        y = qgemm.uniform_matmul(x, packed, scales, zeros, bits, group, k, bias, perm, out=out, path=path)
        w = packing.dequantize_uniform(packed, scales, zeros, bits, group, k)
        if perm is not None:
            w_orig = torch.empty_like(w)
            w_orig[:, perm] = w
            w = w_orig
    else:
        codes, centroids, column_bits, outliers = _codebook(g, n, k, (1, 2, 3, 4, 8), 40)
        lin = CodebookQuantLinear.from_parts(codes, centroids, column_bits, outliers)
        y = qgemm.codebook_matmul(x, lin.qweight, lin.codebooks, lin.perm, lin.layout, bias, lin._outliers(),
                                  out=out, path=path)
        w = lin.dequantized_weight()
    assert y.data_ptr() == out.data_ptr()
    check(y, x, w, bias, dtype)


@pytest.mark.parametrize("m,config", [(1, dict(DECODE, SPLIT_K=3)), (9, dict(DECODE, BLOCK_N=16, SPLIT_K=4))])
def test_split_k_leaves_the_workspace_clean(m, config, gen, poisoned, check):
    from calm_kernels import _qgemm_triton as T

    n, k, bits, group = 21, 512, 3, 128
    packed, scales, zeros = _uniform(gen(m), n, k, bits, group, True)
    w = packing.dequantize_uniform(packed, scales, zeros, bits, group, k)
    weight = qgemm.prepare_uniform(packed, scales, zeros, bits, group, k)
    for seed in (1, 2):  # the second launch relies on the first leaving sums and tickets at zero
        x = torch.randn(m, k, generator=gen(seed))
        y = qgemm.matmul_prepared(x, weight, None, poisoned((m, n), x.dtype), config=config)
        check(y, x, w, None, torch.float32)
        ws, tickets = T.split_k_workspace(m, n, x.device)
        assert not ws.any() and not tickets.any()


def test_modules_cache_the_kernel_weight_and_keep_the_stored_format(gen, check, tmp_path):
    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 24)
    u = UniformQuantLinear.from_float(lin, bits=3, group_size=32)
    stored = u.qweight.clone()
    x = torch.randn(3, 96)
    check(u(x), x, u.dequantized_weight(), u.bias, torch.float32)
    kernel_weight = u._kernel_cache
    assert kernel_weight is not None and not torch.equal(kernel_weight.words, stored)  # the 3-bit planes
    assert torch.equal(u.qweight, stored)  # what is saved keeps the documented format
    u(x)
    assert u._kernel_cache is kernel_weight  # prepared once
    torch.save(u.state_dict(), tmp_path / "u.pt")
    u.load_state_dict(torch.load(tmp_path / "u.pt"))
    assert u._kernel_cache is None  # loading drops the derived copy; the next forward rebuilds it
    check(u(x), x, u.dequantized_weight(), u.bias, torch.float32)


def test_autotune_key_leaves_out_slab_widths():
    from calm_kernels import _qgemm_triton as T

    assert not [name for name in T._KEY if name[0] in "BC" and name[1:].isdigit()]
    assert {"M_BUCKET", "N", "K", "TUNE_BITS"} <= set(T._KEY)
