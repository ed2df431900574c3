"""Compile the CKA Triton kernels for sm90 (H100/H200) on a machine without a GPU (every kernel, with every
autotune config and sm100 too: tests/kernels/test_compile_sm90.py).

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
