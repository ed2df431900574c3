"""Linear CKA kernels under the Triton interpreter (run with TRITON_INTERPRET=1, own process).

The float64 reference is the oracle. fp32 inputs: relative error below 1e-6 on the CKA value and on each
Frobenius term, including columns whose mean is 1000x their spread. fp16 inputs: the kernel rounds each
centered operand to fp16 once (relative 2^-11), so the terms agree to about 1e-3.
"""
from __future__ import annotations

import pytest
import torch

from calm_kernels import cka as C


def _pair(g: torch.Generator, n: int, dx: int, dy: int, big_mean: bool = True, dtype=torch.float32):
    """Y is a noisy linear map of X (CKA well inside (0, 1)); some columns carry means 1000x their spread."""
    x = torch.randn(n, dx, generator=g)
    y = x @ torch.randn(dx, dy, generator=g) / dx ** 0.5 + 0.3 * torch.randn(n, dy, generator=g)
    if big_mean:
        x[:, ::3] += 1000.0
        y[:, 1::4] -= 1000.0
    return x.to(dtype), y.to(dtype)


@pytest.fixture
def assert_cka_close(assert_rel_close):
    """Relative agreement of the CKA value and of each Frobenius term."""
    def check(got: C.CKAResult, ref: C.CKAResult, tol: float) -> None:
        for name in ("cka", "hsic_xy", "hsic_xx", "hsic_yy"):
            assert_rel_close(getattr(got, name), getattr(ref, name), tol, name)
    return check


@pytest.mark.parametrize("n,dx,dy,form", [
    (37, 19, 23, "feature"),   # ragged everywhere, n > d
    (131, 7, 45, "feature"),   # tokens span several BLOCK_K chunks
    (29, 67, 41, "sample"),    # n < d: several token tiles, ragged features
    (45, 33, 33, "sample"),    # forced sample space although n > d
    (100, 40, 24, "auto"),
    (12, 70, 50, "auto"),
])
@pytest.mark.parametrize("big_mean", [False, True])
def test_one_shot_matches_float64_reference_fp32(n, dx, dy, form, big_mean, gen, assert_cka_close):
    x, y = _pair(gen(n + dx + dy), n, dx, dy, big_mean=big_mean)
    assert_cka_close(C.linear_cka_kernel(x, y, form), C.linear_cka_reference(x, y), 1e-6)


def test_auto_form_picks_the_cheaper_side():
    assert C._cka_form(10_000, 64, 64) == "feature"
    assert C._cka_form(64, 4096, 4096) == "sample"


def test_public_linear_cka_dispatches_to_the_kernel_and_flattens_leading_dims(gen, assert_cka_close):
    x, y = _pair(gen(5), 2 * 17, 24, 24)
    got = C.linear_cka(x.reshape(2, 17, 24), y.reshape(2, 17, 24))
    assert got == C.linear_cka_kernel(x, y)
    assert_cka_close(got, C.linear_cka_reference(x, y), 1e-6)


def test_fp16_inputs_within_half_precision_rounding(gen, assert_cka_close):
    x, y = _pair(gen(7), 50, 30, 20, dtype=torch.float16)
    ref = C.linear_cka_reference(x, y)  # float64 of the same fp16 values
    for form in ("feature", "sample"):
        got = C.linear_cka_kernel(x, y, form)
        assert_cka_close(got, ref, 3e-3)
        assert abs(got.cka - ref.cka) < 1e-3


def test_identical_inputs_score_one(gen):
    x, _ = _pair(gen(8), 40, 21, 21)
    assert abs(C.linear_cka_kernel(x, x, "feature").cka - 1.0) < 1e-6
    assert abs(C.linear_cka_kernel(x, x, "sample").cka - 1.0) < 1e-6


def test_streaming_equals_one_shot_and_self_term_reuse(gen, assert_rel_close, assert_cka_close):
    x, y = _pair(gen(9), 150, 26, 35)
    cuts = [0, 1, 41, 41, 100, 150]  # a one-token batch and an empty batch among ragged ones
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:])]
    acc = C.CKAAccumulator()
    for bx, by in batches:
        acc.update(bx, by)
    streamed = acc.compute()
    assert acc.tokens == 150
    assert_cka_close(streamed, C.linear_cka_kernel(x, y, "feature"), 1e-6)
    assert_cka_close(streamed, C.linear_cka_reference(x, y), 1e-6)

    self_term = C.CKAAccumulator.reference(bx for bx, _ in batches)
    assert_rel_close(self_term, streamed.hsic_xx, 1e-9, "reference self term")
    reuse = C.CKAAccumulator(reference_self_term=self_term)
    for bx, by in batches:
        reuse.update(bx, by)
    assert_cka_close(reuse.compute(), streamed, 1e-12)


def test_streaming_state_is_the_centered_co_moment(gen):
    x, y = _pair(gen(10), 70, 9, 13)
    m = C.ShiftedCoMoment()
    m.update(x[:30], y[:30])
    m.update(x[30:], y[30:])
    x64, y64 = x.double(), y.double()
    want = (x64 - x64.mean(0)).T @ (y64 - y64.mean(0))
    assert torch.allclose(m.centered(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    s = C.ShiftedCoMoment(symmetric=True)
    s.update(x[:30])
    s.update(x[30:])
    want_xx = (x64 - x64.mean(0)).T @ (x64 - x64.mean(0))
    assert torch.allclose(s.centered(), want_xx, rtol=1e-6, atol=1e-6 * float(want_xx.abs().max()))


def test_bad_input(gen):
    x, y = _pair(gen(11), 20, 8, 8)
    with pytest.raises(ValueError, match="form"):
        C.linear_cka_kernel(x, y, "gram")
    with pytest.raises(ValueError, match="same tokens"):
        C.linear_cka_kernel(x, y[:-1])
    acc = C.CKAAccumulator()
    acc.update(x, y)
    with pytest.raises(ValueError, match="same path"):
        acc.update(x.double(), y.double())  # float64 runs the reference; one accumulator cannot mix them


@pytest.mark.parametrize("n,dx,dy,splits", [
    (300, 19, 23, 3),   # three ranges (128, 128, 44 tokens), ragged features
    (200, 40, 40, 5),   # asks for 5, alignment gives 4 ranges (64 tokens each, the last 8)
    (65, 33, 7, 2),     # a one-token last range
])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 3e-3)])
def test_token_split_matches_reference_and_unsplit(n, dx, dy, splits, dtype, tol, gen, assert_cka_close):
    x, y = _pair(gen(n + splits), n, dx, dy, big_mean=dtype == torch.float32, dtype=dtype)
    split = C.linear_cka_kernel(x, y, "feature", splits=splits)
    assert_cka_close(split, C.linear_cka_reference(x, y), tol)
    # float32 partial sums round differently from one running sum: agreement to float32 accumulation level
    assert_cka_close(split, C.linear_cka_kernel(x, y, "feature", splits=1), 1e-5 if dtype == torch.float16 else 1e-7)


def test_token_split_is_deterministic_and_accumulates(gen):
    from calm_kernels import _cka_triton as K

    x, y = _pair(gen(21), 260, 30, 20)
    mx, my = C._column_mean32(x), C._column_mean32(y)
    first = K.gram_squared_sum(x, y, mx, my, splits=4)
    assert all(K.gram_squared_sum(x, y, mx, my, splits=4) == first for _ in range(2))
    # the streaming state gets the same co-moment split or not (symmetric mirrors included)
    for b, sb in ((y, my), (None, None)):
        whole = torch.zeros(30, 20 if b is not None else 30, dtype=torch.float64)
        parts = torch.full_like(whole, 0.0)
        K.gram_accumulate(whole, x, b, mx, sb, splits=1)
        K.gram_accumulate(parts, x, b, mx, sb, splits=4)
        assert torch.allclose(parts, whole, rtol=1e-6, atol=1e-6 * float(whole.abs().max()))


def test_token_split_plan():
    from calm_kernels import _cka_triton as K

    cpu = torch.device("cpu")  # plans as for INTERPRETER_SMS (an H100's 132)
    # d = 576: 5 x 5 tiles of 128, 15 on or above the diagonal -> 18 ranges for ~2 waves; capped by length
    assert K.token_splits(262144, 576, 576, True, cpu) == 18
    assert K.token_splits(262144, 576, 576, False, cpu) == 11
    assert K.token_splits(8192, 576, 576, True, cpu) == 2
    assert K.token_splits(1000, 576, 576, True, cpu) == 1
    # d = 4096: 1024 tiles already fill the device
    assert K.token_splits(262144, 4096, 4096, False, cpu) == 1
    assert K._split_len(300, 3) == (128, 3)
    with pytest.raises(ValueError, match="splits"):
        C.linear_cka_kernel(torch.zeros(8, 4), torch.zeros(8, 4), splits=0)
