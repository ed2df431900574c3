"""Rotated W/A quantization on the CPU: Hadamard construction, transforms, quantizers, packing, the module,
and (slow) the rotation's benefit on a real layer of the default model."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from calm.nn import RotatedQuantLinear, build_quantized_linear
from calm_kernels import rotated as R


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- Hadamard matrices and transforms -------------------------------------------------------------------

def test_every_constructed_order_is_hadamard_in_integers():
    orders = R.hadamard_orders(128)
    # every multiple of 4 up to 128 except the Williamson-type 92 and 116
    assert [n for n in range(4, 129, 4) if n not in orders] == [92, 116]
    for n in orders + (164, 244, 252):  # and some larger Paley orders (GF(163), GF(3^5), Paley II over GF(5^3))
        h = R.hadamard_matrix(n)
        assert h.dtype == torch.int64 and set(h.unique().tolist()) <= {-1, 1}
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.int64)), n


@pytest.mark.parametrize("n", [3, 6, 92, 116, 130])
def test_unconstructible_orders_are_refused(n):
    with pytest.raises(ValueError, match="no Hadamard matrix"):
        R.hadamard_matrix(n)


def test_every_supported_size_up_to_16384_is_an_orthogonal_kronecker_product():
    supported = [n for n in range(1, 16385) if R.supported_hadamard_size(n)]
    assert {576, 896, 1536, 4864, 4096, 14336, 2048, 5632, 960, 11008}.issubset(supported)
    for n in supported:
        t = R.hadamard_transform(n)
        assert t.size == n and len(t.orders) <= 3 and t.padded_size <= R.MAX_PADDED_ROW
        hadamard = R._hadamard_split(n, R.MAX_FACTOR_ORDER) or R._hadamard_chunked_split(n)
        if t.chunked:  # only sizes the one/two-factor split cannot reach (a saved model's matrix never changes)
            assert R._hadamard_split(n, R.MAX_FACTOR_ORDER) is None
            assert t.orders[0] <= R.MAX_MIX_ORDER and all(d & (d - 1) == 0 for d in t.orders[1:])
        for f in t.factors:
            d = f.shape[0]
            if hadamard:  # every size a Hadamard reaches keeps +-1 factors
                fi = f.to(torch.int64)
                assert torch.equal(fi.to(torch.float32), f)
                assert torch.equal(fi @ fi.T, d * torch.eye(d, dtype=torch.int64))
            else:  # the others: Hartley kron Sylvester, orthogonal in float
                f64 = f.double()
                assert torch.allclose(f64 @ f64.T, d * torch.eye(d, dtype=torch.float64), atol=1e-4)
        assert math.isclose(t.norm, 1 / math.sqrt(n), rel_tol=1e-15)


@pytest.mark.parametrize("n", [12, 96, 240, 576, 896, 1536])
def test_dense_transform_is_orthogonal(n):
    r = R.hadamard_transform(n).matrix()
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n,orders", [(18944, (148, 8, 16)), (28672, (28, 32, 32)), (32768, (2, 128, 128)),
                                      (14336, (112, 128))])
def test_wide_llm_widths_are_dense_times_sylvester(n, orders):
    """QuaRot's decomposition n = m 2^k for widths past the two-factor split (Qwen2-7B 18944 = 148 (Paley II)
    x 2^7, 28672 = 28 (Paley I) x 2^10); sizes the two-factor split reaches keep their matrix (14336)."""
    t = R.hadamard_transform(n)
    assert t.orders == orders
    assert math.isclose(t.norm, 1 / math.sqrt(n), rel_tol=1e-15)
    for f in t.factors:
        fi = f.to(torch.int64)
        assert torch.equal(fi @ fi.T, f.shape[0] * torch.eye(f.shape[0], dtype=torch.int64))
    g = _gen(n)
    x = torch.randn(2, n, generator=g, dtype=torch.float64)
    # orthogonal: the transform keeps every row's norm
    assert torch.allclose(t.apply(x.float()).double().norm(dim=1), x.norm(dim=1), rtol=1e-5)


@pytest.mark.parametrize("n,orders", [(11008, (86, 128)), (368, (23, 16)), (5504, (43, 128)), (300, (75, 4)),
                                      (7, (7,)), (43 * 1024, (43, 32, 32))])
def test_sizes_without_a_hadamard_take_a_hartley_factor(n, orders):
    """LLaMA-2-7B's 11008 = 43 x 2^8 needs a Hadamard of order 172, which no construction here gives: the dense
    factor is then Hartley_m kron H_(2^j), orthogonal at every order, with entries at most sqrt(2 / n)."""
    t = R.hadamard_transform(n)
    assert R.supported_hadamard_size(n) and t.orders == orders and t.orthogonal
    h = R.hartley_matrix(43)
    assert torch.allclose(h, h.T) and torch.allclose(h @ h, 43 * torch.eye(43, dtype=torch.float64), atol=1e-10)
    dense = t.factors[0].double()
    assert torch.allclose(dense @ dense.T, orders[0] * torch.eye(orders[0], dtype=torch.float64), atol=1e-4)
    r = t.matrix() if n <= 11008 else None
    if r is not None:
        assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-5)
        assert r.abs().max() <= math.sqrt(2 / n) * (1 + 1e-6)
    g = _gen(n)
    x = torch.randn(2, n, generator=g)
    x[:, 3] = 300.0  # an outlier channel is spread over the row
    y = t.apply(x)
    assert torch.allclose(y.double().norm(dim=1), x.double().norm(dim=1), rtol=1e-5)
    assert y.abs().max() < (math.sqrt(2 / n) + 0.1) * x.abs().max()
    w = torch.randn(5, n, generator=g)
    assert torch.allclose(y @ t.fold_into_weight(w).T, x @ w.T, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("n", [131, 262, 257 * 4])
def test_unsupported_sizes_are_refused_with_the_reason(n):
    assert not R.supported_hadamard_size(n)
    with pytest.raises(ValueError, match="no online Hadamard of size"):
        R.hadamard_transform(n)


@pytest.mark.parametrize("orders", [(12,), (12, 20), (36, 16), (5, 7)])
def test_apply_is_x_times_the_kronecker_product(orders):
    g = _gen(sum(orders))
    t = R.kronecker_transform(*[torch.randn(d, d, generator=g) for d in orders])
    x = torch.randn(4, 3, t.size, generator=g)
    assert torch.allclose(t.apply(x).double(), x.double() @ t.matrix(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transform", ["hadamard", "learned"])
def test_folding_into_the_weight_preserves_the_linear_map(transform):
    g = _gen(7)
    t = (R.hadamard_transform(240) if transform == "hadamard" else
         R.kronecker_transform(torch.eye(12) + 0.1 * torch.randn(12, 12, generator=g),
                               torch.eye(20) + 0.1 * torch.randn(20, 20, generator=g)))
    w = torch.randn(30, 240, generator=g)
    x = torch.randn(5, 240, generator=g)
    assert torch.allclose(t.apply(x) @ t.fold_into_weight(w).T, x @ w.T, rtol=1e-4, atol=1e-4)


def test_kernel_factors_are_fp16_exact_power_of_two_scaled():
    t = R.kronecker_transform(torch.full((12, 12), 3.0), torch.eye(20) * 0.1)
    (f1, f2), norm = R.kernel_factors(t)
    assert f1.shape == (16, 16) and f2.shape == (32, 32) and f1.dtype == torch.float16
    assert f1[:12, :12].eq(0.75).all() and not f1[12:].any() and not f1[:, 12:].any()
    assert math.isclose(norm, 4.0 * 0.125)  # 3 = 0.75 * 4, 0.1 ~ 0.8 * 0.125
    with pytest.raises(ValueError, match="exceeds 128"):
        R.kronecker_transform(torch.eye(130))


# ---- Quantizers -----------------------------------------------------------------------------------------

def test_round_half_to_even_is_the_rounding_rule():
    v = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.4999, 2.5001])
    assert R.round_half_to_even(v).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 2.0, 3.0]


def test_per_token_codes_follow_the_formula_and_ties_go_to_even():
    # scale = 7 / 7 = 1 at 4 bits: the halves are exact ties
    x = torch.tensor([[7.0, 0.5, 1.5, 2.5, -3.5, -7.0, 0.0, 6.49]])
    codes, scale = R.quantize_per_token_reference(x, 4)
    assert scale.tolist() == [1.0]
    assert codes.tolist() == [[7, 0, 2, 2, -4, -7, 0, 6]]
    # a clip ratio saturates the largest values at the code range ends
    codes, scale = R.quantize_per_token_reference(torch.tensor([[-8.0, 8.0, 0.5]]), 3, clip_ratio=0.5)
    assert math.isclose(float(scale), 8 * 0.5 / 3, rel_tol=1e-6)
    assert codes.tolist() == [[-4, 3, 0]]
    codes, scale = R.quantize_per_token_reference(torch.zeros(2, 5), 8)
    assert not codes.any() and not scale.any()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_fake_quantize_activations_error_is_at_most_half_a_step(bits):
    x = torch.randn(3, 5, 64, generator=_gen(bits)).to(torch.float64)
    y = R.fake_quantize_activations(x, bits)
    assert y.shape == x.shape and y.dtype == x.dtype
    step = x.abs().amax(-1, keepdim=True) / R.code_range(bits)[1]
    assert ((y - x).abs() <= step / 2 + 1e-6).all()
    assert torch.allclose(R.fake_quantize_activations(y, bits), y, atol=1e-6)  # idempotent
    with pytest.raises(ValueError, match="activation bits"):
        R.fake_quantize_activations(x, 5)
    with pytest.raises(ValueError, match="clip_ratio"):
        R.fake_quantize_activations(x, 4, clip_ratio=0.0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weight_codes_pack_round_trip_and_range_check(bits):
    qmin, qmax = R.code_range(bits)
    q = torch.randint(qmin, qmax + 1, (9, 77), generator=_gen(bits)).to(torch.int8)
    packed = R.pack_weight_codes(q, bits)
    assert packed.shape == (9, (96 * bits) // 32)
    assert torch.equal(R.unpack_weight_codes(packed, bits, 77), q)
    with pytest.raises(ValueError, match="must lie in"):
        R.pack_weight_codes(q.to(torch.int32) + (1 << bits), bits)


def test_weight_rtn_is_per_output_channel_symmetric():
    w = torch.randn(6, 40, generator=_gen(0))
    codes, scales = R.quantize_weights_rtn(w, 4)
    assert torch.allclose(scales, w.abs().amax(1) / 7)
    assert codes.abs().max() <= 7 and (codes.abs().amax(1) == 7).all()


def test_int_matmul_reference_is_exact():
    g = _gen(1)
    a = torch.randint(-128, 128, (5, 100), generator=g, dtype=torch.int8)
    q = torch.randint(-4, 4, (7, 100), generator=g).to(torch.int8)
    out = R.int_matmul(a, R.pack_weight_codes(q, 3), 3)
    assert out.dtype == torch.int32 and torch.equal(out.to(torch.int64), a.to(torch.int64) @ q.to(torch.int64).T)


def test_transform_quantize_reference_applies_norm_to_the_scale_only():
    t = R.hadamard_transform(64)
    x = torch.randn(4, 64, generator=_gen(2))
    codes, scales = R.transform_quantize(x, 4, 1.0, t)
    c2, s2 = R.quantize_per_token_reference(t.apply_unnormalized(x), 4)
    assert torch.equal(codes, c2) and torch.allclose(scales, s2 / 8)
    deq = codes.float() * scales[:, None]
    assert torch.allclose(deq, R.fake_quantize_activations(t.apply(x), 4), atol=1e-5)


def test_importing_calm_does_not_import_triton():
    code = ("import sys, calm, calm.nn, calm_kernels.rotated\n"
            "import torch\n"
            "torch.manual_seed(0)\n"
            "m = calm.nn.RotatedQuantLinear.from_float(torch.nn.Linear(64, 8), 4, 4)\n"
            "m(torch.randn(2, 64))\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- Module ---------------------------------------------------------------------------------------------

def _fake_quant_reference(layer: RotatedQuantLinear, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    t = layer.transform
    xt = t.apply(x) if t is not None else x.float()
    xq = R.fake_quantize_activations(xt, layer.a_bits, layer.clip_ratio)
    y = xq @ layer.dequantized_weight().T
    return y + lin.bias.float() if lin.bias is not None else y


@pytest.mark.parametrize("transform", ["hadamard", "none", "learned"])
@pytest.mark.parametrize("w_bits,a_bits", [(3, 3), (4, 4), (4, 8)])
def test_module_equals_fake_quantized_reference(transform, w_bits, a_bits):
    torch.manual_seed(0)
    lin = nn.Linear(576, 50, bias=True)
    spec = {"hadamard": "hadamard", "none": "none",
            "learned": (torch.eye(24) + 0.1 * torch.randn(24, 24), torch.eye(24) + 0.1 * torch.randn(24, 24))}
    layer = RotatedQuantLinear.from_float(lin, w_bits, a_bits, transform=spec[transform], clip_ratio=0.9)
    x = torch.randn(2, 7, 576)
    y = layer(x)
    assert y.shape == (2, 7, 50) and y.dtype == torch.float32
    expect = _fake_quant_reference(layer, lin, x)
    assert ((y - expect).norm() / expect.norm()) < 1e-5
    if transform != "learned":  # random learned factors are not meant to help; the others must approximate
        rel = ((y - lin(x)).norm() / lin(x).norm()).item()
        assert rel < {3: 0.6, 4: 0.35}[w_bits]


def test_module_keeps_the_input_dtype_and_leading_dims():
    torch.manual_seed(3)
    lin = nn.Linear(96, 20)
    layer = RotatedQuantLinear.from_float(lin, 4, 8)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(3, 2, 5, 96).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (3, 2, 5, 20)
    assert layer(torch.randn(0, 96)).shape == (0, 20)


@pytest.mark.parametrize("transform", ["hadamard", "none", "learned"])
def test_module_state_dict_round_trip(transform):
    torch.manual_seed(1)
    lin = nn.Linear(240, 33, bias=transform != "none")
    spec = {"hadamard": "hadamard", "none": "none", "learned": (torch.randn(12, 12), torch.randn(20, 20))}
    layer = RotatedQuantLinear.from_float(lin, 3, 4, transform=spec[transform], clip_ratio=0.8)
    fresh = build_quantized_linear(layer.quant_config())
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 240)
    assert torch.equal(fresh(x), layer(x))
    assert fresh.quant_config() == layer.quant_config()
    # Every stored byte counts: codes padded to 256 columns (32 codes per packed run), one float32 scale per row,
    # and the learned factors with their norm (a Hadamard is rebuilt from its size, not stored).
    expected = (3 * 256 + 32) / 240
    if transform == "learned":
        expected += ((12 * 12 + 20 * 20) * 32 + 32) / (240 * 33)
    assert math.isclose(layer.effective_bits, expected)


def test_module_with_a_chunked_hadamard_round_trips_and_matches_the_reference():
    """18944 inputs (Qwen2-7B down_proj): three non-persistent factors rebuilt from the size on load."""
    torch.manual_seed(4)
    lin = nn.Linear(18944, 6)
    layer = RotatedQuantLinear.from_float(lin, 4, 4)
    assert layer.hadamard and layer.transform_orders == (148, 8, 16)
    fresh = build_quantized_linear(layer.quant_config())
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 18944)
    assert torch.equal(fresh(x), layer(x))
    expect = _fake_quant_reference(layer, lin, x)
    assert ((layer(x) - expect).norm() / expect.norm()) < 1e-5


def test_module_takes_precomputed_weight_codes():
    torch.manual_seed(2)
    lin = nn.Linear(64, 10, bias=False)
    t = R.hadamard_transform(64)
    codes, scales = R.quantize_weights_rtn(t.fold_into_weight(lin.weight.detach()), 4, clip_ratio=0.9)
    codes[0, 0] = -8 if codes[0, 0] != -8 else 7  # differ from plain RTN
    layer = RotatedQuantLinear.from_float(lin, 4, 8, transform=t, weight_codes=codes, weight_scales=scales)
    assert torch.equal(layer.weight_codes(), codes)
    assert torch.equal(layer.w_scales, scales)
    with pytest.raises(ValueError, match="weight_scales"):
        RotatedQuantLinear.from_float(lin, 4, 8, weight_codes=codes)
    with pytest.raises(ValueError, match=r"must be \(10, 64\)"):
        RotatedQuantLinear.from_float(lin, 4, 8, weight_codes=codes[:, :32], weight_scales=scales)
    with pytest.raises(ValueError, match="must lie in"):
        RotatedQuantLinear.from_float(lin, 3, 8, weight_codes=codes, weight_scales=scales)


def test_module_rejects_bad_arguments():
    torch.manual_seed(4)
    lin = nn.Linear(64, 10)
    with pytest.raises(ValueError, match="transform must be"):
        RotatedQuantLinear.from_float(lin, 4, 4, transform="spin")
    with pytest.raises(ValueError, match="does not match in_features"):
        RotatedQuantLinear.from_float(lin, 4, 4, transform=(torch.eye(4), torch.eye(4)))
    with pytest.raises(ValueError, match="no online Hadamard"):
        RotatedQuantLinear.from_float(nn.Linear(131, 4), 4, 4)
    with pytest.raises(ValueError, match="weight bits"):
        RotatedQuantLinear.from_float(lin, 5, 4)
    with pytest.raises(ValueError, match="expects 64"):
        RotatedQuantLinear.from_float(lin, 4, 4)(torch.randn(2, 63))


# ---- The real model ------------------------------------------------------------------------------------

PARAGRAPH = (
    "The river rises in the hills north of the old market town and runs for about ninety miles before it "
    "reaches the sea. For most of its length it is slow and wide, and in the eighteenth century it carried "
    "barges loaded with coal, grain and timber between the mills and the harbour. When the railway arrived "
    "in 1840 the trade collapsed within a decade, and the locks fell into disrepair. A local society was "
    "founded in 1962 to restore them; by the end of the century volunteers had reopened eleven of the "
    "fourteen locks, and pleasure boats now travel the upper reaches during the summer months. The valley "
    "is also known for its limestone caves, some of which contain the bones of animals that lived there "
    "during the last ice age, including hyenas, bears and woolly rhinoceros. Excavations in the 1920s "
    "recovered flint tools that show people sheltered in the caves at least forty thousand years ago. "
    "Today the surrounding farmland is mostly pasture for sheep and dairy cattle, although orchards of "
    "apples and pears still line the southern slopes, where the soil is deeper and the frosts come later. "
    "The town holds a fair every autumn at which growers compete for prizes, and the cider made from the "
    "local varieties is sold in shops across the region. Visitors often walk the towpath from the town to "
    "the estuary, a journey of two days, staying overnight at an inn that has stood beside the water since "
    "the reign of Queen Anne and whose cellars once stored smuggled brandy and tea.")


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_rotation_lowers_w4a4_error_on_real_layers():
    from calm.model import decoder_blocks, load_model

    model, tokenizer = load_model(None)
    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids[:, :320]
    assert ids.shape[1] >= 250
    block = decoder_blocks(model)[len(decoder_blocks(model)) // 2]
    names = ("self_attn.q_proj", "mlp.down_proj")  # 576 = 36 x 16 and 1536 = 24 x 64 inputs
    captured = {}

    def grab(name):
        def hook(module, args, output):
            captured[name] = args[0].detach().reshape(-1, args[0].shape[-1])
        return hook

    def stop(module, args, output):
        raise _Stop

    handles = [block.get_submodule(n).register_forward_hook(grab(n)) for n in names]
    handles.append(block.register_forward_hook(stop))
    try:
        with torch.no_grad():
            model(ids)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    for name in names:
        lin, x = block.get_submodule(name), captured[name]
        with torch.no_grad():
            y = lin(x)
            err = {t: ((RotatedQuantLinear.from_float(lin, 4, 4, transform=t)(x) - y).norm() / y.norm()).item()
                   for t in ("hadamard", "none")}
        # measured on this paragraph: about 0.15-0.20 rotated vs 0.36-0.42 plain
        assert err["hadamard"] < 0.75 * err["none"], (name, err)


# ---- On a GPU (skipped without CUDA) ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m", [1, 16, 300, 2048])
@pytest.mark.parametrize("n,k,w_bits,a_bits", [(4096, 4096, 3, 3), (1000, 4864, 4, 4), (576, 1536, 4, 8)])
def test_cuda_kernels_match_the_references(m, n, k, w_bits, a_bits):
    g = _gen(m + n + k)
    torch.manual_seed(m + n + k)  # the bias keeps nn.Linear's initialization
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
    layer = RotatedQuantLinear.from_float(lin, w_bits, a_bits)
    x = torch.randn(m, k, generator=g)
    x[:, 7] *= 30
    codes_ref, scales_ref = R.transform_quantize_reference(x, a_bits, 1.0, layer.transform)
    gpu = layer.to("cuda")
    xc = x.cuda()
    codes, scales = R.transform_quantize(xc, a_bits, 1.0, gpu.transform)
    mismatch = (codes.cpu().int() - codes_ref.int()).abs()
    assert mismatch.max() <= 1 and (mismatch > 0).float().mean() < 0.02
    assert torch.allclose(scales.cpu(), scales_ref, rtol=2e-3)
    assert torch.equal(R.int_matmul(codes, gpu.qweight, w_bits).cpu(),
                       R.int_matmul_reference(codes.cpu(), gpu.qweight.cpu(), w_bits))
    for dtype in (torch.bfloat16, torch.float16):
        y = gpu(xc.to(dtype))  # the kernels are deterministic: the module sees the codes computed here
        codes_d, scales_d = R.transform_quantize(xc.to(dtype), a_bits, 1.0, gpu.transform)
        assert y.dtype == dtype
        expect = R.rotated_matmul_reference(codes_d.cpu(), scales_d.cpu(), gpu.qweight.cpu(), gpu.w_scales.cpu(),
                                            w_bits, lin.bias.detach(), torch.float32)
        assert ((y.float().cpu() - expect).norm() / expect.norm()) < 1e-2  # output rounding: 2^-9 at bf16
