"""Compile the CKA and K-means Triton kernels for sm90 (H100/H200) on a machine without a GPU.

The interpreter runs kernels as NumPy and accepts code the GPU compiler refuses (type merges across a
dynamic `if`, shared memory beyond the device, ...). `triton.compile` with an explicit target runs the whole
pipeline down to a cubin with the ptxas shipped in the triton wheel, no device needed. Runs in the normal
pytest process: under TRITON_INTERPRET=1 the kernels are interpreter objects and cannot be compiled.
"""
from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.slow  # a few seconds per kernel variant on two cores


@pytest.fixture(autouse=True)
def _not_interpreted():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles real kernels: run without TRITON_INTERPRET")


def _compile(fn, signature: dict, constants: dict, num_warps: int, num_stages: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature, constants)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


_KMEANS_SIG = {"w_ptr": "*fp32", "imp_ptr": "*fp32", "codes_ptr": "*u8", "cent_ptr": "*fp32",
               "rows": "i32", "cols": "i32", "iters": "i32", "stride_wr": "i32", "stride_wc": "i32",
               "stride_ir": "i32", "stride_ic": "i32", "stride_qr": "i32", "stride_qc": "i32", "stride_cc": "i32",
               "K": "constexpr", "HAS_IMP": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}


@pytest.mark.parametrize("k,has_imp,block_r,block_c,warps", [(4, False, 4096, 2, 8), (16, True, 1024, 4, 4)])
def test_kmeans_kernel_compiles_for_sm90(k, has_imp, block_r, block_c, warps):
    from calm_kernels import _kmeans_triton as KT

    compiled = _compile(KT._kmeans_kernel, _KMEANS_SIG,
                        {"K": k, "HAS_IMP": has_imp, "BLOCK_R": block_r, "BLOCK_C": block_c}, warps, 1)
    assert compiled.asm["cubin"]


def test_assign_kernel_compiles_for_sm90():
    from calm_kernels import _kmeans_triton as KT

    sig = {"w_ptr": "*fp16", "cent_ptr": "*fp32", "codes_ptr": "*u8", "rows": "i32", "cols": "i32",
           "stride_wr": "i32", "stride_wc": "i32", "stride_cc": "i32", "stride_ck": "i32", "stride_qr": "i32",
           "stride_qc": "i32", "K": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
    assert _compile(KT._assign_kernel, sig, {"K": 8, "BLOCK_R": 64, "BLOCK_C": 64}, 4, 1).asm["cubin"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("symmetric,accumulate", [(False, False), (True, False), (True, True)])
def test_gram_kernel_compiles_for_sm90(dtype, symmetric, accumulate):
    import triton.language as tl

    from calm_kernels import _cka_triton as CT

    sig = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "out_ptr": "*fp64",
           "n": "i32", "da": "i32", "db": "i32", "stride_an": "i32", "stride_ad": "i32", "stride_bn": "i32",
           "stride_bd": "i32", "stride_or": "i32", "stride_oc": "i32", "N_BUCKET": "i32",
           "SYMMETRIC": "constexpr", "ACCUMULATE": "constexpr", "OP_DTYPE": "constexpr", "BLOCK": "constexpr",
           "BLOCK_K": "constexpr"}
    op = tl.bfloat16 if dtype == "bf16" else tl.float32
    compiled = _compile(CT._gram_kernel, sig, {"SYMMETRIC": symmetric, "ACCUMULATE": accumulate, "OP_DTYPE": op,
                                               "BLOCK": 64, "BLOCK_K": 32}, 4, 3)
    assert compiled.metadata.shared <= 227 * 1024  # fits an H100/H200 SM


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_sample_kernel_compiles_for_sm90(dtype):
    import triton.language as tl

    from calm_kernels import _cka_triton as CT

    sig = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "sx_ptr": "*fp32", "sy_ptr": "*fp32", "part_ptr": "*fp64",
           "n": "i32", "dx": "i32", "dy": "i32", "stride_xn": "i32", "stride_xd": "i32", "stride_yn": "i32",
           "stride_yd": "i32", "N_BUCKET": "i32", "OP_DTYPE": "constexpr", "BLOCK": "constexpr",
           "BLOCK_K": "constexpr"}
    op = tl.bfloat16 if dtype == "bf16" else tl.float32
    compiled = _compile(CT._sample_kernel, sig, {"OP_DTYPE": op, "BLOCK": 64, "BLOCK_K": 32}, 4, 3)
    assert compiled.metadata.shared <= 227 * 1024
