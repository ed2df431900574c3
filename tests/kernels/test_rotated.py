"""Rotated W/A-quantized matmul kernels under the Triton interpreter (run with TRITON_INTERPRET=1, own process).

Codes and integer sums compare exactly; where the kernel's fp16 stage operands make the transform inexact
(float inputs), codes may differ by one only next to a rounding tie of the float64 reference.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from calm_kernels import rotated as R


@pytest.fixture
def quant_out(poisoned):
    """`quant_out(t, k)`: poisoned (codes, scales) outputs of transform_quantize (int8 -128, NaN)."""
    def make(t: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return poisoned((t, k), torch.int8), poisoned(t, torch.float32)
    return make


def _learned(orders: tuple[int, ...], seed: int) -> R.KroneckerTransform:
    """Invertible small-integer factors (exact in fp16 after the power-of-two prescale): identity plus noise."""
    g = torch.Generator().manual_seed(seed)
    return R.kronecker_transform(*[torch.eye(d) * 4 + torch.randint(-1, 2, (d, d), generator=g).float()
                                   for d in orders])


TRANSFORMS = {
    "hadamard-36x16": lambda: R.hadamard_transform(576),
    "hadamard-28x32": lambda: R.hadamard_transform(896),
    "hadamard-12x20-padded": lambda: R.hadamard_transform(240),
    "hadamard-96-one-factor": lambda: R.hadamard_transform(96),
    "hadamard-12-one-factor": lambda: R.hadamard_transform(12),
    "hartley-23x16": lambda: R.hadamard_transform(368),  # no Hadamard of order 368 here: Hartley_23 x H_16
    "learned-12x20": lambda: _learned((12, 20), 1),
    "learned-24-one-factor": lambda: _learned((24,), 2),
    "none": lambda: None,
}
# chunked (three factors: mix the chunks, then two dots inside each chunk), small enough for the interpreter;
# slower there (one program per chunk), so tested on fewer bit widths below
CHUNKED = {
    "chunked-hadamard-12x4x4": lambda: _chunked_hadamard(12, 4, 4),
    "chunked-hadamard-20x1x8": lambda: _chunked_hadamard(20, 1, 8),
    "chunked-learned-12x4x4": lambda: _learned((12, 4, 4), 3),
    "chunked-hartley-43x4x4": lambda: R.KroneckerTransform((R._orthogonal_factor(43), R._orthogonal_factor(4),
                                                            R._orthogonal_factor(4)), 1 / math.sqrt(688), True),
}


def _chunked_hadamard(m: int, a: int, b: int) -> R.KroneckerTransform:
    """H_m kron H_a kron H_b: the structure hadamard_transform builds for widths like 18944 and 28672."""
    return R.KroneckerTransform(tuple(R.hadamard_matrix(d).float() for d in (m, a, b)), 1 / math.sqrt(m * a * b),
                                orthogonal=True)


def _size(name: str, transform) -> int:
    return transform.size if transform is not None else 131


# Hartley factors are not integers: their codes are checked on float inputs only (next to rounding ties).
EXACT = [n for n in TRANSFORMS if "hartley" not in n]
EXACT_CHUNKED = [n for n in CHUNKED if "hartley" not in n]


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("bits,clip", [(3, 1.0), (4, 0.9), (8, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_codes_exact_on_integer_inputs(name, bits, clip, dtype, gen, quant_out):
    _check_integer_codes(TRANSFORMS[name](), bits, clip, dtype, gen, quant_out)


def _check_integer_codes(transform, bits, clip, dtype, gen, quant_out):
    k = transform.size if transform is not None else 131
    t = 7
    x = torch.randint(-3, 4, (t, k), generator=gen(k + bits)).to(dtype)
    x[3] = 0  # an all-zero token: scale 0, codes 0
    x[5, :] = 0
    x[5, k // 2] = 5  # a one-hot token: the transform spreads it evenly
    codes, scales = R.transform_quantize(x, bits, clip, transform, out=quant_out(t, k))
    ref_codes, ref_scales = R.transform_quantize_reference(x, bits, clip, transform)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales)
    assert scales[3] == 0 and not codes[3].any()


@pytest.mark.parametrize("name", EXACT_CHUNKED)
@pytest.mark.parametrize("bits,clip,dtype", [(3, 1.0, torch.float16), (8, 0.9, torch.float32)])
def test_chunked_codes_exact_on_integer_inputs(name, bits, clip, dtype, gen, quant_out):
    _check_integer_codes(CHUNKED[name](), bits, clip, dtype, gen, quant_out)


@pytest.mark.parametrize("name,bits,dtype", [
    *[(n, b, d) for n in ["hadamard-36x16", "hadamard-12x20-padded", "hadamard-96-one-factor", "learned-12x20",
                          "hartley-23x16", "none"] for b in (4, 8) for d in (torch.float16, torch.float32)],
    ("chunked-hadamard-12x4x4", 8, torch.float16), ("chunked-learned-12x4x4", 4, torch.float32),
    ("chunked-hartley-43x4x4", 8, torch.float16), ("chunked-hartley-43x4x4", 4, torch.float32)])
def test_codes_on_float_inputs_differ_only_at_ties(name, bits, dtype, gen, quant_out):
    transform = {**TRANSFORMS, **CHUNKED}[name]()
    k = _size(name, transform)
    t = 9
    g = gen(bits * 1000 + k)
    x = (torch.randn(t, k, generator=g) * torch.rand(t, 1, generator=g) * 8).to(dtype)
    x[:, 3] *= 40  # an outlier channel, the case rotations are for
    codes, scales = R.transform_quantize(x, bits, 1.0, transform, out=quant_out(t, k))
    # float64 oracle of the exact values the codes round
    z = x.double() if transform is None else x.double() @ (transform.matrix() / transform.norm)
    amax = z.abs().amax(1, keepdim=True)
    v = z / (amax / R.code_range(bits)[1])
    ref = torch.round(v)
    assert torch.allclose(scales.double(), (amax.squeeze(1) / R.code_range(bits)[1]) *
                          (transform.norm if transform is not None else 1.0), rtol=2e-3, atol=0)
    diff = codes.to(torch.int32) - ref.to(torch.int32)
    assert diff.abs().max() <= 1
    tie_distance = (v - v.floor() - 0.5).abs()
    # fp16 stage operands err by about 2^-12 of each element: well under 1e-3 of the code range
    # (measured at most 0.055 code units at 8 bits, 0.002 at 4 bits)
    assert (tie_distance[diff != 0] < 6e-4 * R.code_range(bits)[1]).all()
    assert (diff != 0).float().mean() < 0.02


def test_huge_and_tiny_tokens_stay_in_range(gen, quant_out):
    # fp16 would overflow on x H for |x| ~ 1e6 without the per-token power-of-two normalization
    transform = R.hadamard_transform(576)
    x = torch.randint(-3, 4, (4, 576), generator=gen(3)).float()
    x[0] *= 2.0 ** 40
    x[1] *= 2.0 ** -60
    x[2] *= 2.0 ** 16  # beyond the fp16 range itself
    codes, scales = R.transform_quantize(x, 4, 1.0, transform, out=quant_out(4, 576))
    ref_codes, ref_scales = R.transform_quantize_reference(x, 4, 1.0, transform)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n,k", [(7, 131, 257), (1, 33, 64), (20, 17, 96), (3, 40, 31)])
def test_int_matmul_exact(bits, m, n, k, gen, poisoned):
    g = gen(m * n * k + bits)
    qmin, qmax = R.code_range(bits)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    q = torch.randint(qmin, qmax + 1, (n, k), generator=g).to(torch.int8)
    q[0] = qmin  # extreme codes exercise the sign extension
    q[-1] = qmax
    a[0] = -128
    packed = R.pack_weight_codes(q, bits)
    from calm_kernels import _rotated_triton

    out = poisoned((m, n), torch.int32)  # -2^31
    _rotated_triton.rotated_matmul(a, None, packed, None, bits, None, out)
    expect = a.to(torch.int64) @ q.to(torch.int64).T
    assert torch.equal(out.to(torch.int64), expect)
    assert torch.equal(R.int_matmul(a, packed, bits), R.int_matmul_reference(a, packed, bits))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rotated_matmul_epilogue(bits, out_dtype, with_bias, gen, poisoned, assert_rel_close):
    m, n, k = 7, 131, 257
    g = gen(bits)
    qmin, qmax = R.code_range(bits)
    a = torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int8)
    q = torch.randint(qmin, qmax + 1, (n, k), generator=g).to(torch.int8)
    a_scales = torch.rand(m, generator=g) * 0.1 + 0.01
    w_scales = torch.rand(n, generator=g) * 0.05 + 0.01
    bias = torch.randn(n, generator=g).to(out_dtype) if with_bias else None
    packed = R.pack_weight_codes(q, bits)
    y = R.rotated_matmul(a, a_scales, packed, w_scales, bits, bias, out_dtype, out=poisoned((m, n), out_dtype))
    expect = (a.double() @ q.double().T) * a_scales.double()[:, None] * w_scales.double()[None, :]
    if bias is not None:
        expect = expect + bias.double()
    assert y.dtype == out_dtype
    tol = 1e-3 if out_dtype == torch.float16 else 1e-6  # fp16 output rounding vs float32 epilogue
    assert_rel_close(y, expect, tol, "epilogue vs float64")
    # the float32 reference rounds in the same places: the fp32 output agrees almost bit for bit
    ref = R.rotated_matmul_reference(a, a_scales, packed, w_scales, bits, bias, out_dtype)
    assert torch.allclose(y.double(), ref.double(), rtol=2e-3 if out_dtype == torch.float16 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("transform", ["hadamard", "none", "learned"])
@pytest.mark.parametrize("w_bits,a_bits", [(3, 3), (4, 4), (4, 8)])
def test_module_triton_path_matches_reference_path(transform, w_bits, a_bits, monkeypatch):
    from calm.nn import RotatedQuantLinear

    torch.manual_seed(w_bits * 10 + a_bits)
    lin = nn.Linear(240, 37, bias=True)
    spec = {"hadamard": "hadamard", "none": "none",
            "learned": _learned((12, 20), 5).factors}[transform]
    layer = RotatedQuantLinear.from_float(lin, w_bits, a_bits, transform=spec, clip_ratio=0.95)
    x = torch.randint(-4, 5, (2, 3, 240)).to(torch.float16)  # exact transform: codes agree exactly
    y = layer(x)
    assert y.shape == (2, 3, 37) and y.dtype == torch.float16
    monkeypatch.setenv("CALM_FORCE_REFERENCE", "1")
    y_ref = layer(x)
    assert torch.allclose(y.float(), y_ref.float(), rtol=2e-3, atol=2e-3)


def test_launcher_errors(rng):
    x = torch.randn(3, 576, generator=rng)
    with pytest.raises(ValueError, match="transform has size"):
        R.transform_quantize(x, 4, 1.0, R.hadamard_transform(512))
    with pytest.raises(ValueError, match="activation bits"):
        R.transform_quantize(x, 5, 1.0, None)
    with pytest.raises(ValueError, match="contiguous"):
        R.transform_quantize(torch.randn(576, 3, generator=rng).T, 4, 1.0, R.hadamard_transform(576))
    packed = R.pack_weight_codes(torch.zeros(4, 64, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="words per row"):
        R.int_matmul(torch.zeros(2, 65, dtype=torch.int8), packed, 4)
    with pytest.raises(TypeError, match="int8"):
        R.int_matmul(torch.zeros(2, 64), packed, 4)
    assert math.isclose(R.hadamard_transform(576).norm, 1 / 24)


def test_chunked_path_with_a_dense_factor_past_128(gen, quant_out):
    # 148 (Paley II, the dense factor of 18944 = 148 x 8 x 16) pads to 256 rows in the mixing kernel
    transform = _chunked_hadamard(148, 2, 2)
    x = torch.randint(-1, 2, (2, transform.size), generator=gen(148)).to(torch.float16)
    codes, scales = R.transform_quantize(x, 4, 1.0, transform, out=quant_out(2, transform.size))
    ref_codes, ref_scales = R.transform_quantize_reference(x, 4, 1.0, transform)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)


@pytest.mark.slow
@pytest.mark.parametrize("n", [18944, 28672])
def test_llm_mlp_widths_take_the_chunked_path(n, gen, quant_out):
    transform = R.hadamard_transform(n)
    assert transform.chunked
    x = torch.randn(1, n, generator=gen(n)).to(torch.float16)
    x[0, 5] = 300.0
    codes, scales = R.transform_quantize(x, 4, 1.0, transform, out=quant_out(1, n))
    ref_codes, ref_scales = R.transform_quantize_reference(x, 4, 1.0, transform)
    assert (codes.to(torch.int32) - ref_codes.to(torch.int32)).abs().max() <= 1
    assert (codes != ref_codes).float().mean() < 0.01
    assert torch.allclose(scales, ref_scales, rtol=2e-3)


@pytest.mark.parametrize("m", [1, 20])
def test_llama2_mlp_width_11008_takes_a_hartley_factor(m, gen, poisoned):
    """11008 = 86 x 128 with 86 = Hartley_43 kron H_2 (no Hadamard of order 172 here): the decode (fused) and
    prefill (two-launch) paths agree with the reference up to codes next to a rounding tie."""
    transform = R.hadamard_transform(11008)
    assert transform.orders == (86, 128) and not transform.chunked
    k, n, w_bits, a_bits = 11008, 24, 4, 4
    g = gen(11008 + m)
    x = torch.randn(m, k, generator=g).to(torch.float16)
    x[:, 17] = 200.0  # an outlier channel
    w_codes, w_scales = R.quantize_weights_rtn(transform.fold_into_weight(torch.randn(n, k, generator=g)), w_bits)
    packed = R.pack_weight_codes(w_codes, w_bits)
    out = R.rotated_linear(x, a_bits, 1.0, transform, packed, w_scales, w_bits, None)
    ref_codes, ref_scales = R.transform_quantize_reference(x, a_bits, 1.0, transform)
    ref = R.rotated_matmul_reference(ref_codes, ref_scales, packed, w_scales, w_bits, None, torch.float16)
    codes, scales = R.transform_quantize(x, a_bits, 1.0, transform, out=(poisoned((m, k), torch.int8),
                                                                          poisoned(m)))
    assert (codes.to(torch.int32) - ref_codes.to(torch.int32)).abs().max() <= 1
    assert (codes != ref_codes).float().mean() < 0.01
    assert torch.allclose(scales, ref_scales, rtol=2e-3)
    # a code off by one near a tie moves an output by one weight step: small against the row's norm
    err = (out.float() - ref.float()).norm(dim=1) / ref.float().norm(dim=1)
    assert err.max() < 2e-2, err


@pytest.mark.parametrize("name", ["hadamard-36x16", "hadamard-12x20-padded", "hadamard-96-one-factor",
                                  "learned-12x20"])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("w_bits,a_bits", [(3, 3), (4, 4)])
def test_fused_decode_equals_transform_then_gemm(name, m, w_bits, a_bits, gen, poisoned):
    """M <= 16: one launch (transform + quantize in the prologue, then the GEMM) gives the two-launch result:
    codes and scales bit for bit (integer inputs), outputs to the output dtype's rounding."""
    from calm_kernels import _rotated_triton

    transform = TRANSFORMS[name]()
    k, n = transform.size, 37
    g = gen(m * k + w_bits)
    x = torch.randint(-3, 4, (m, k), generator=g).to(torch.float16)
    w_codes, w_scales = R.quantize_weights_rtn(transform.fold_into_weight(torch.randn(n, k, generator=g)), w_bits)
    packed = R.pack_weight_codes(w_codes, w_bits)
    bias = torch.randn(n, generator=g).to(torch.float16)
    codes, scales, out = poisoned((m, k), torch.int8), poisoned(m), poisoned((m, n), torch.float16)
    _rotated_triton.fused_decode(x, a_bits, float(R._scale_multiplier(a_bits, 0.9)), transform.orders,
                                 R.kernel_factors(transform), not transform.orthogonal, packed, w_scales, w_bits,
                                 bias, out, codes, scales)
    ref_codes, ref_scales = R.transform_quantize_reference(x, a_bits, 0.9, transform)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    ref = R.rotated_matmul_reference(ref_codes, ref_scales, packed, w_scales, w_bits, bias, torch.float16)
    assert torch.allclose(out.float(), ref.float(), rtol=1e-3, atol=1e-3)
    # the public entry point routes M <= 16 here and larger M through the two launches
    assert torch.allclose(R.rotated_linear(x, a_bits, 0.9, transform, packed, w_scales, w_bits, bias).float(),
                          ref.float(), rtol=1e-3, atol=1e-3)


def test_rotated_linear_two_launch_paths(gen):
    """Past 16 tokens, with no transform and with a chunked one, rotated_linear takes transform_quantize +
    rotated_matmul: same result as the references."""
    g = gen(99)
    for transform, m in ((R.hadamard_transform(240), 20), (None, 3), (_chunked_hadamard(12, 4, 4), 2)):
        k = 240 if transform is None or not transform.chunked else transform.size
        x = torch.randint(-3, 4, (m, k), generator=g).to(torch.float32)
        w_codes = torch.randint(-4, 4, (9, k), generator=g).to(torch.int8)
        w_scales = torch.rand(9, generator=g) + 0.1
        packed = R.pack_weight_codes(w_codes, 3)
        y = R.rotated_linear(x, 4, 1.0, transform, packed, w_scales, 3)
        c, s = R.transform_quantize_reference(x, 4, 1.0, transform)
        assert torch.allclose(y, R.rotated_matmul_reference(c, s, packed, w_scales, 3), rtol=1e-6, atol=1e-6)
