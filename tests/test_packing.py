"""Packed formats (calm_kernels.packing) and the modules that hold them: exact round trips, sizes, save/reload."""
import pytest
import torch
from torch import nn

from calm.io import load_quantized, save_quantized
from calm.model import block_linears, decoder_blocks
from calm.nn import CodebookQuantLinear, UniformQuantLinear, build_quantized_linear, model_effective_bits
from calm_kernels import packing


@pytest.mark.parametrize("bits", packing.CODEBOOK_BITS)
@pytest.mark.parametrize("k", [1, 31, 32, 33, 97, 256])
def test_unpack_is_exact_for_every_width(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 1 << bits, (5, k), generator=g).to(torch.uint8)
    packed = packing.pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, packing.packed_words(k, bits))
    assert torch.equal(packing.unpack_codes(packed, bits, k), codes)


def test_three_bit_rows_are_dense_and_straddle_words():
    codes = torch.full((1, 32), 7, dtype=torch.uint8)
    packed = packing.pack_codes(codes, 3)
    assert packed.shape[1] == 3  # 32 codes * 3 bits = 96 bits, no waste
    assert torch.equal(packed, torch.full((1, 3), -1, dtype=torch.int32))
    one = torch.zeros(1, 32, dtype=torch.uint8)
    one[0, 10] = 5  # bits 30..32: straddles words 0 and 1
    p = packing.pack_codes(one, 3)
    assert int(p[0, 0]) & 0xFFFFFFFF == (5 & 3) << 30 and int(p[0, 1]) == 5 >> 2


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of range"):
        packing.pack_codes(torch.full((1, 4), 4), 2)
    with pytest.raises(ValueError, match="unsupported bit width"):
        packing.pack_codes(torch.zeros(1, 4), 5)


def _codebook_parts(n, k, widths, seed=0, outliers=0):
    g = torch.Generator().manual_seed(seed)
    column_bits = torch.tensor(widths, dtype=torch.int64)[torch.randint(0, len(widths), (k,), generator=g)]
    max_bits = int(column_bits.max())
    centroids = torch.randn(k, 1 << max_bits, generator=g)
    codes = (torch.randint(0, 256, (n, k), generator=g) % (1 << column_bits)).to(torch.uint8)
    out = None
    if outliers:
        flat = torch.randperm(n * k, generator=g)[:outliers]
        out = (flat // k, flat % k, 8 * torch.randn(outliers, generator=g))
    return codes, centroids, column_bits, out


def _expected_weight(codes, centroids, outliers):
    w = centroids.to(torch.float16).to(torch.float32)[torch.arange(codes.shape[1]).unsqueeze(0), codes.long()]
    if outliers is not None:
        rows, cols, vals = outliers
        w[rows, cols] = vals.to(torch.float16).to(torch.float32)
    return w


@pytest.mark.parametrize("widths", [(4,), (3,), (3, 4), (2, 3, 4), (1, 2, 3, 4, 8)])
def test_codebook_round_trip_with_slabs(widths):
    codes, centroids, column_bits, _ = _codebook_parts(19, 75, widths, seed=len(widths))
    packed = packing.pack_codebook(codes, centroids, column_bits)
    lay = packed.layout
    assert [b for b, _ in lay.slabs] == sorted(set(column_bits.tolist()))
    assert lay.in_features == 75 and sum(c for _, c in lay.slabs) == 75
    # Slabs are contiguous runs of equal width in stored order; the permutation maps them back.
    assert torch.equal(column_bits[packed.perm.long()], lay.column_bits())
    assert torch.equal(torch.sort(packed.perm.long()).values, torch.arange(75))
    assert packed.qweight.shape == (19, sum(packing.packed_words(c, b) for b, c in lay.slabs))
    assert packed.codebooks.dtype == torch.float16 and packed.codebooks.numel() == int((1 << column_bits).sum())
    assert torch.equal(packing.dequantize_codebook(packed), _expected_weight(codes, centroids, None))


def test_codebook_outliers_replace_the_weight():
    codes, centroids, column_bits, outliers = _codebook_parts(23, 70, (2, 4), seed=3, outliers=30)
    packed = packing.pack_codebook(codes, centroids, column_bits, outliers)
    assert packed.outlier_rowptr.shape == (24,) and int(packed.outlier_rowptr[-1]) == 30
    assert packed.outlier_cols.dtype == torch.int16
    w = packing.dequantize_codebook(packed)
    assert torch.equal(w, _expected_weight(codes, centroids, outliers))
    deltas = packing.codebook_outlier_deltas(packed.qweight, packed.codebooks, packed.perm, packed.layout,
                                             packed.outlier_rowptr, packed.outlier_cols, packed.outlier_vals)
    base = _expected_weight(codes, centroids, None)
    rows = packing.outlier_rows(packed.outlier_rowptr)
    assert torch.equal(base[rows, packed.outlier_cols.long()] + deltas, w[rows, packed.outlier_cols.long()])


def test_codebook_bad_inputs_say_what_is_wrong():
    codes, centroids, column_bits, _ = _codebook_parts(4, 8, (2,))
    with pytest.raises(ValueError, match="codes out of range"):
        packing.pack_codebook(torch.full_like(codes, 4), centroids, column_bits)
    with pytest.raises(ValueError, match="not supported"):
        packing.pack_codebook(codes, centroids, torch.full((8,), 5))
    with pytest.raises(ValueError, match="centroids must be"):
        packing.pack_codebook(codes, centroids[:, :2], column_bits)
    with pytest.raises(ValueError, match="repeat"):
        packing.pack_codebook(codes, centroids, column_bits,
                              (torch.tensor([1, 1]), torch.tensor([2, 2]), torch.tensor([1.0, 2.0])))
    with pytest.raises(ValueError, match="out of range"):
        packing.pack_codebook(codes, centroids, column_bits, (torch.tensor([4]), torch.tensor([0]), torch.ones(1)))


def test_effective_bits_count_every_stored_byte():
    assert packing.uniform_effective_bits(3, 64, symmetric=False) == 3 + 24 / 64
    # A symmetric grid's zero point (2^(b-1)) is not stored; rows pad to 32 codes; act-order adds an index per column.
    assert packing.uniform_effective_bits(3, 64, symmetric=True) == 3 + 16 / 64
    assert packing.uniform_effective_bits(4, 48, False, in_features=240) == 4 * 256 / 240 + 24 / 48
    assert packing.uniform_effective_bits(4, 48, False, 240, 10, input_perm=True) == pytest.approx(
        4 * 256 / 240 + 24 / 48 + 16 / 10)
    for symmetric in (False, True):
        u = UniformQuantLinear.from_float(nn.Linear(240, 10), 4, 48, symmetric)
        assert u.effective_bits == pytest.approx(packing.uniform_effective_bits(4, 48, symmetric, 240, 10))
    codes, centroids, column_bits, outliers = _codebook_parts(64, 96, (3, 4), seed=5, outliers=40)
    m = CodebookQuantLinear.from_parts(codes, centroids, column_bits, outliers)
    stored = sum(t.numel() * t.element_size() * 8 for name, t in m.state_dict().items() if name != "bias")
    assert m.effective_bits == pytest.approx(stored / (64 * 96))
    # Without outliers no CSR is stored or counted; a wider layer amortizes codebooks and permutation.
    m0 = CodebookQuantLinear.from_parts(codes, centroids, column_bits)
    assert "outlier_rowptr" not in m0.state_dict() and m0.effective_bits < m.effective_bits
    lay = packing.CodebookLayout(((3, 4096),))
    assert packing.codebook_effective_bits(lay, 4096) == pytest.approx(3 + (16 * 8 + 32) / 4096)


def test_codebook_module_forward_state_dict_and_config_round_trip():
    codes, centroids, column_bits, outliers = _codebook_parts(24, 67, (2, 3, 4), seed=7, outliers=12)
    bias = torch.randn(24)
    m = CodebookQuantLinear.from_parts(codes, centroids, column_bits, outliers, bias)
    x = torch.randn(2, 5, 67)
    w = _expected_weight(codes, centroids, outliers)
    assert torch.allclose(m(x), x @ w.T + bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(m.column_bits(), column_bits)
    fresh = build_quantized_linear(m.quant_config())
    assert isinstance(fresh, CodebookQuantLinear)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x), m(x))
    assert f"effective_bits={m.effective_bits:.3f}" in repr(m) and "bits=" in repr(m)


def test_uniform_module_state_dict_and_config_round_trip():
    lin = nn.Linear(96, 20)
    q = UniformQuantLinear.from_float(lin, bits=3, group_size=32, symmetric=False)
    fresh = build_quantized_linear(q.quant_config())
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(4, 96)
    assert torch.equal(fresh(x), q(x))


def test_codebook_from_float_fits_better_with_more_bits():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    err = {}
    for b in (2, 4):
        q = CodebookQuantLinear.from_float(lin, b)
        w = lin.weight.detach()
        err[b] = float((q.dequantized_weight() - w).pow(2).mean() / w.pow(2).mean())
    assert err[4] < err[2] / 4 and err[2] < 0.2


def test_mixed_model_saves_and_reloads_with_identical_logits(tiny_model, tmp_path):
    model = tiny_model
    for i, block in enumerate(decoder_blocks(model)):
        for name, lin in block_linears(block).items():
            if i == 0:
                k = lin.in_features
                q = CodebookQuantLinear.from_float(lin, torch.where(torch.arange(k) % 3 == 0, 4, 3), iters=5)
            else:
                q = UniformQuantLinear.from_float(lin, bits=4, group_size=32)
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, q)
    windows = torch.randint(0, 256, (2, 12))
    save_quantized(model, None, tmp_path / "m")
    reloaded, _ = load_quantized(tmp_path / "m")
    kinds = {type(m).__name__ for m in reloaded.modules()}
    assert {"CodebookQuantLinear", "UniformQuantLinear"} <= kinds
    with torch.no_grad():
        assert torch.equal(model(windows).logits, reloaded(windows).logits)
    assert model_effective_bits(decoder_blocks(reloaded)) == model_effective_bits(decoder_blocks(model))
