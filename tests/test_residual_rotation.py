"""The model-wide residual rotation leaves the float model's function unchanged and rotates its stream."""
import pytest
import torch

from calm.config import CalmUsageError
from calm.model import decoder_blocks
from calm.residual_rotation import rotate_residual, rotation_matrix
from conftest import tiny_llama


def _with_norm_weights(model):
    """Trained-looking norms: per-channel weights far from 1 (a fresh model has all ones, which would hide a
    missing fold)."""
    g = torch.Generator().manual_seed(3)
    for name, m in model.named_modules():
        if name.endswith("norm"):
            m.weight.data = 0.2 + 2 * torch.rand(m.weight.shape, generator=g)
    return model


def _hidden(model, ids):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
    return out.logits, out.hidden_states


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotation_matrix_is_orthogonal(kind):
    q = rotation_matrix(kind, 72, seed=1)
    assert torch.allclose(q @ q.T, torch.eye(72, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(q, rotation_matrix(kind, 72, seed=2))


@pytest.mark.parametrize("n", [64, 72, 576])
def test_residual_rotation_composed_with_a_layer_local_hadamard_still_spreads(n):
    """x Q R (the residual rotation, then a `rotation` candidate's own Hadamard) must stay incoherent: no entry
    of Q R near 1, as for a random rotation. Signs on the wrong side of H make Q R a signed permutation."""
    from calm_kernels.rotated import hadamard_transform

    r = hadamard_transform(n).apply(torch.eye(n)).double()
    for seed in (0, 1):
        assert float((rotation_matrix("hadamard", n, seed) @ r).abs().max()) < 6 / n ** 0.5


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_logits_unchanged_and_stream_rotated(kind):
    model = _with_norm_weights(tiny_llama(layers=3))
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    logits, hidden = _hidden(model, ids)
    q = rotate_residual(model, kind, seed=5)
    logits_r, hidden_r = _hidden(model, ids)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert not model.config.tie_word_embeddings
    assert (logits_r - logits).norm() / logits.norm() < 1e-5
    # The stream between blocks is the old one in the new basis (hidden_states[0] is the embedding output).
    for h, h_r in zip(hidden[:-1], hidden_r[:-1]):
        assert (h_r.double() - h.double() @ q).norm() / h.norm() < 1e-5
        assert (h_r - h).norm() / h.norm() > 0.5
    for name, m in model.named_modules():
        if name.endswith("norm"):
            assert torch.equal(m.weight, torch.ones_like(m.weight))


def test_qwen2_biases_and_a_saved_model_reload(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from calm.io import load_quantized, save_quantized

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    model = _with_norm_weights(Qwen2ForCausalLM(cfg).eval())
    for block in decoder_blocks(model):
        for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
            proj.bias.data.normal_()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, _ = _hidden(model, ids)
    rotate_residual(model, "hadamard", seed=0)
    assert (_hidden(model, ids)[0] - logits).norm() / logits.norm() < 1e-5
    save_quantized(model, None, tmp_path / "m")
    reloaded, _ = load_quantized(tmp_path / "m")
    assert (_hidden(reloaded, ids)[0] - logits).norm() / logits.norm() < 1e-5


def test_refuses_a_quantized_model_and_unknown_kinds():
    from calm.nn import UniformQuantLinear

    model = tiny_llama()
    with pytest.raises(CalmUsageError, match="unknown residual rotation"):
        rotate_residual(model, "givens")
    with pytest.raises(CalmUsageError, match="use --residual-rotation random"):
        rotation_matrix("hadamard", 92, seed=0)
    block = decoder_blocks(model)[0]
    block.mlp.down_proj = UniformQuantLinear.from_float(block.mlp.down_proj, 4, 32, False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalmUsageError, match="before quantizing"):
        rotate_residual(model, "hadamard")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-rotated
