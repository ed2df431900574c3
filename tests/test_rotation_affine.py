"""Activation/KV-quantized candidates on tiny LLaMA blocks: rotation (Hadamard folded into the weights), the
no-rotation rtn/gptq baselines at A<16, KV-cache quantization, the kurtosis rule and the learned affine
transforms. All fast and CPU-only."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from calm import algorithms
from calm.config import CalmUsageError, CandidateSpec, QuantSpec
from calm.io import load_block_state, save_block_state
from calm.model import block_linears, capture_block_inputs, decoder_blocks, run_block
from calm.nn import KVQuantLinear, RotatedQuantLinear, fake_quantize_kv, model_effective_bits
from calm_kernels import rotated as R
from conftest import tiny_llama


def _inputs(model, seed: int = 0):
    windows = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(seed))
    return capture_block_inputs(model, windows, 2)


def _real_like_block(model, index: int = 0):
    """A tiny block with the outlier structure of real LLM blocks: a few norm-weight channels tens of times
    larger (outlier input channels of q/k/v and gate/up), massive MLP intermediate channels (down_proj's
    input) and large V channels (o_proj's input)."""
    block = decoder_blocks(model)[index]
    with torch.no_grad():
        block.input_layernorm.weight[[3, 17, 40]] *= 30
        block.post_attention_layernorm.weight[[5, 9]] *= 30
        block.mlp.up_proj.weight[[7, 70, 100]] *= 20
        block.self_attn.v_proj.weight[[2, 20]] *= 20
    return block


def _rel_err(outs, ref) -> float:
    num = sum(float((o - r).square().sum()) for o, r in zip(outs, ref))
    den = sum(float(r.square().sum()) for r in ref)
    return (num / den) ** 0.5


def _delta(outs, inputs):
    """What the block adds to the residual stream (the outliers of the stream itself would hide the error)."""
    return [o - h for o, h in zip(outs, inputs.hidden)]


def _quantize(block, inputs, scheme: str, candidate: str):
    spec = QuantSpec.from_scheme(scheme)
    cand = CandidateSpec.parse(candidate)
    algorithms.validate_candidate(cand, spec)
    return algorithms.quantize_block(cand, copy.deepcopy(block), inputs, spec)


class _FoldedLinear(nn.Module):
    """Float y = (x R)(W R^-T)^T + b: the transform without any quantization."""

    def __init__(self, linear: nn.Linear, transform) -> None:
        super().__init__()
        self.t = transform
        self.w = transform.fold_into_weight(linear.weight.detach())
        self.b = linear.bias

    def forward(self, x):
        return nn.functional.linear(self.t.apply(x), self.w, self.b)


# ---- Rotation ------------------------------------------------------------------------------------------

def test_hadamard_folding_leaves_the_fp_block_output_unchanged():
    model = tiny_llama()
    inputs = _inputs(model)
    block = decoder_blocks(model)[1]
    ref = run_block(block, inputs)
    rotated_block = copy.deepcopy(block)
    for name, linear in block_linears(rotated_block).items():
        algorithms.replace_module(rotated_block, name, _FoldedLinear(linear, R.hadamard_transform(linear.in_features)))
    assert _rel_err(run_block(rotated_block, inputs), ref) < 1e-5


@pytest.mark.parametrize("weights", ["rtn", "gptq"])
def test_rotation_lowers_w4a4_block_error_against_no_rotation(weights):
    model = tiny_llama()
    inputs = _inputs(model)
    block = _real_like_block(model)
    ref = _delta(run_block(block, inputs), inputs)
    plain = _rel_err(_delta(run_block(_quantize(block, inputs, "W4A4", weights), inputs), inputs), ref)
    rot = _rel_err(_delta(run_block(_quantize(block, inputs, "W4A4", f"rotation:weights={weights}"), inputs),
                          inputs), ref)
    assert rot < 0.8 * plain, (rot, plain)


def test_activation_schemes_produce_rotated_modules_and_keep_weight_only_behaviour():
    model = tiny_llama()
    inputs = _inputs(model)
    block = decoder_blocks(model)[0]
    for cand in ("rtn", "gptq"):
        q = _quantize(block, inputs, "W4A4", cand)
        mods = block_linears(q)
        assert all(isinstance(m, RotatedQuantLinear) and m.transform is None for m in mods.values())
        assert all(m.a_bits == 4 and m.w_bits == 4 for m in mods.values())
        weight_only = _quantize(block, inputs, "W4A16G32", cand)
        assert all(type(m).__name__ == "UniformQuantLinear" for m in block_linears(weight_only).values())
    q = _quantize(block, inputs, "W3A3", "rotation")
    assert all(m.transform is not None and m.transform.orthogonal for m in block_linears(q).values())


@pytest.mark.parametrize("scheme,candidate,clip", [
    ("W3A3", "rotation", 0.8), ("W4A4", "rotation", 0.9), ("W4A8", "rotation", 1.0),
    ("W4A4", "rotation:clip_ratio=0.7", 0.7), ("W4A4", "rtn", 1.0),
    ("W3A3", "kurtosis:threshold=100,inlier=rotation", 0.8),
])
def test_transform_candidates_clip_activations_by_their_bits_unless_told(scheme, candidate, clip):
    model = tiny_llama()
    inputs = _inputs(model)
    q = _quantize(decoder_blocks(model)[0], inputs, scheme, candidate)
    assert [m.clip_ratio for m in block_linears(q).values()] == pytest.approx([clip] * 7)


def test_gptq_at_a4_beats_rtn_at_a4():
    model = tiny_llama()
    inputs = _inputs(model)
    block = _real_like_block(model)
    ref = _delta(run_block(block, inputs), inputs)
    errs = {c: _rel_err(_delta(run_block(_quantize(block, inputs, "W3A8", c), inputs), inputs), ref)
            for c in ("rtn", "gptq")}
    assert errs["gptq"] < errs["rtn"], errs


# ---- KV cache ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group", [(2, 16), (3, 8), (4, 4), (8, 16)])
def test_kv_quantizer_values_lie_on_a_per_head_group_grid(bits, group):
    head_dim = 16
    y = torch.randn(3, 5, 2 * head_dim, generator=torch.Generator().manual_seed(bits)) * 3 + 1
    q = fake_quantize_kv(y, bits, head_dim, group)
    assert q.shape == y.shape and q.dtype == y.dtype
    yg = y.reshape(3, 5, -1, group)
    qg = q.reshape(3, 5, -1, group)
    lo, hi = yg.amin(-1, keepdim=True), yg.amax(-1, keepdim=True)
    scale = (hi - lo) / ((1 << bits) - 1)
    steps = qg / scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # on the grid: integer multiples of the scale
    levels = [len(torch.unique(g.round(decimals=4))) for g in qg.reshape(-1, group)]
    assert max(levels) <= 1 << bits
    assert ((qg - yg).abs() <= scale * 0.5 + 1e-5).all()
    const = torch.full((2, 32), 0.7)
    assert torch.equal(fake_quantize_kv(const, bits, head_dim, group), const)


def test_kv_quantization_wraps_k_and_v_and_survives_save_and_load(tmp_path):
    model = tiny_llama()
    inputs = _inputs(model)
    block = decoder_blocks(model)[0]
    q = _quantize(block, inputs, "W3A3K2V2", "rotation")
    for name in ("self_attn.k_proj", "self_attn.v_proj"):
        m = q.get_submodule(name)
        assert isinstance(m, KVQuantLinear) and m.bits == 2 and m.head_dim == 16 and m.group_size == 16
    assert not isinstance(q.self_attn.q_proj, KVQuantLinear)
    assert set(block_linears(q)) == set(block_linears(block))  # the wrapper's inner linear is not a layer
    assert model_effective_bits([q]) == pytest.approx(3 + 32 / 64, rel=0.05)
    path = tmp_path / "b.safetensors"
    save_block_state(path, q)
    loaded = load_block_state(path, block)
    assert all(torch.equal(a, b) for a, b in zip(run_block(loaded, inputs), run_block(q, inputs)))
    # 2-bit K/V costs accuracy beyond the W3A3 error
    no_kv = _quantize(block, inputs, "W3A3", "rotation")
    ref = run_block(block, inputs)
    assert _rel_err(run_block(q, inputs), ref) > _rel_err(run_block(no_kv, inputs), ref)


# ---- Bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,candidate,message", [
    ("W4A16", "rotation", "keeps activations in floating point"),
    ("W4A4G64", "gptq", "drop the G"),
    ("W8A4", "rtn", "weights must be 2, 3 or 4"),
    ("W4A2", "rotation", "not supported"),
    ("W4A4", "rotation:weights=awq", "weights must be one of"),
    ("W4A4", "rotation:clip_ratio=0", "clip_ratio must be"),
    ("W4A4", "gptq:clip_ratio=1.5", "clip_ratio must be"),
    ("W4A4", "rotation:act_order=random", "act_order must be"),
    ("W4A4", "rotation:steps=3", "has no option"),
])
def test_bad_options_are_usage_errors(scheme, candidate, message):
    model = tiny_llama()
    with pytest.raises(CalmUsageError, match=message):
        _quantize(decoder_blocks(model)[0], _inputs(model), scheme, candidate)


def test_kv_group_that_does_not_divide_the_head_is_refused():
    model = tiny_llama()
    spec = QuantSpec.from_scheme("W4A4K4V4", kv_group_size=5)
    with pytest.raises(CalmUsageError, match="does not divide head_dim"):
        algorithms.quantize_block(CandidateSpec("rtn"), copy.deepcopy(decoder_blocks(model)[0]), _inputs(model),
                                  spec)


# ---- Kurtosis rule -------------------------------------------------------------------------------------

def test_weight_kurtosis_and_robust_z_on_constructed_weights():
    from calm.algorithms.kurtosis import robust_z, weight_kurtosis

    g = torch.Generator().manual_seed(0)
    assert weight_kurtosis(torch.randn(400, 400, generator=g)) == pytest.approx(3.0, abs=0.05)
    assert weight_kurtosis(torch.rand(400, 400, generator=g)) == pytest.approx(1.8, abs=0.02)  # uniform: 9/5
    spiky = torch.randn(400, 400, generator=g)
    spiky[0, :20] = 60.0
    assert weight_kurtosis(spiky) > 20
    kappas = torch.tensor([3.0, 3.2, 2.8, 3.1, 2.9, 3.0, 12.0], dtype=torch.float64)
    z = robust_z(kappas)  # median 3.0, MAD 0.1
    assert z[-1].item() == pytest.approx(0.6745 * 9.0 / 0.1)
    assert z[0].item() == 0.0 and z[1].item() == pytest.approx(0.6745 * 2.0)
    assert robust_z(torch.tensor([5.0, 5.0, 5.0, 7.0]))[-1].item() == float("inf")


def test_kurtosis_rule_sends_heavy_tailed_linears_to_the_outlier_transform():
    from calm.algorithms.kurtosis import choose_transforms

    model = tiny_llama()
    block = decoder_blocks(model)[0]
    with torch.no_grad():
        block.mlp.down_proj.weight[0, :8] = 5.0  # a few huge weights: very heavy tails
    chosen = choose_transforms(block, 3.5, "upper", "rotation", "none", None)
    assert chosen["mlp.down_proj"][1] == "rotation" and chosen["mlp.down_proj"][0] > 3.5
    assert all(t == "none" for n, (_, t) in chosen.items() if n != "mlp.down_proj")
    q = _quantize(block, _inputs(model), "W4A4", "kurtosis:scope=block,outlier=rotation,inlier=none")
    assert q.mlp.down_proj.transform is not None and q.self_attn.q_proj.transform is None


def test_kurtosis_population_comes_from_the_whole_model_through_prepare():
    model = tiny_llama()
    spec = QuantSpec.from_scheme("W4A4")
    cand = CandidateSpec.parse("kurtosis:outlier=rotation,inlier=none")
    context = algorithms.prepare(cand, list(decoder_blocks(model)), spec)
    assert context["population"]["count"] == 14
    with pytest.raises(CalmUsageError, match="has no option"):
        algorithms.validate_candidate(CandidateSpec("kurtosis", {"_population": {}}), spec)


@pytest.mark.parametrize("candidate,message", [
    ("kurtosis:side=lower", "side must be"),
    ("kurtosis:outlier=spin", "outlier must be"),
    ("kurtosis:threshold=-1", "threshold must be"),
    ("kurtosis:scope=layer", "scope must be"),
    ("affine:steps=-2", "steps must be"),
    ("affine:lr=0", "lr must be"),
    ("affine:weights=awq", "weights must be"),
    ("affine:batch_tokens=1", "batch_tokens must be"),
    ("affine:clip_init=1.5", "clip_init must be"),
])
def test_bad_kurtosis_and_affine_options_are_usage_errors(candidate, message):
    model = tiny_llama()
    with pytest.raises(CalmUsageError, match=message):
        _quantize(decoder_blocks(model)[0], _inputs(model), "W4A4", candidate)


# ---- Learned affine ------------------------------------------------------------------------------------

def test_trained_affine_transforms_are_exactly_inverted_in_the_fp_block():
    from calm.algorithms import affine

    model = tiny_llama()
    inputs = _inputs(model)
    block = _real_like_block(model)
    ref = run_block(block, inputs)
    spec = QuantSpec.from_scheme("W4A4")
    trained, scales = affine.train_transforms(block, inputs, spec, lambda n, m: "learned", steps=3, lr=0.05,
                                              batch_tokens=16)
    assert set(scales) == {"input_layernorm", "post_attention_layernorm"}
    assert all(s.detach().abs().max() > 0 for s in scales.values())  # training moved the scales
    # the training module without quantization is the float block
    for m in trained.modules():
        if isinstance(m, affine._TrainableLinear):
            m.quantize = False
    with torch.no_grad():
        assert _rel_err(run_block(trained, inputs), ref) < 1e-5
    # the deployed form: scales folded into norms and weights, P^-1 folded into the weights, P online
    folded = copy.deepcopy(block)
    affine.fold_into_block(folded, scales)
    for name, linear in block_linears(folded).items():
        t = affine.transform_of(trained.get_submodule(name))
        assert t is not None and not t.orthogonal
        algorithms.replace_module(folded, name, _FoldedLinear(linear, t))
    assert _rel_err(run_block(folded, inputs), ref) < 1e-5


def test_affine_block_with_folded_norm_scales_survives_save_and_load(tmp_path):
    model = tiny_llama()
    inputs = _inputs(model)
    block = _real_like_block(model)
    q = _quantize(block, inputs, "W3A3K2V2", "affine:steps=2,weights=rtn,batch_tokens=16")
    assert not torch.equal(q.input_layernorm.weight, block.input_layernorm.weight)  # scales were folded in
    path = tmp_path / "affine.safetensors"
    save_block_state(path, q)
    loaded = load_block_state(path, block)
    assert all(torch.equal(a, b) for a, b in zip(run_block(loaded, inputs), run_block(q, inputs)))


def test_affine_training_lowers_w4a4_error_below_its_start_and_runs_through_the_kronecker_path():
    model = tiny_llama()
    inputs = _inputs(model)
    block = _real_like_block(model)
    ref = _delta(run_block(block, inputs), inputs)
    errs = {}
    for steps in (0, 20):
        q = _quantize(block, inputs, "W4A4", f"affine:steps={steps},weights=rtn,lr=0.01,batch_tokens=96")
        errs[steps] = _rel_err(_delta(run_block(q, inputs), inputs), ref)
    assert errs[20] < 0.8 * errs[0], errs  # measured: 0.32 -> 0.21
    mods = block_linears(q)
    assert all(isinstance(m, RotatedQuantLinear) and not m.orthogonal for m in mods.values())
    assert q.input_layernorm.weight.shape == block.input_layernorm.weight.shape
