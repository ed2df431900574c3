"""Every family calm walks (calm.arch), on tiny random-init models built from the transformers config classes.

Per family: the function-preserving transforms (AWQ/SmoothQuant scale folding, the affine candidate's fold, the
residual rotation) leave the float logits equal; every candidate of the pool that supports the family runs
through the search; a hybrid mixing candidates across blocks saves and reloads with identical logits; what a
family cannot take is refused with one line. Adding a family: one `Layout` in calm.arch and one row in FAMILIES.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from calm import arch
from calm.algorithms import scaling
from calm.config import CalmUsageError, QuantSpec, SearchConfig, parse_pool
from calm.io import load_quantized, save_quantized
from calm.residual_rotation import rotate_residual
from calm.search import calm_search, install_blocks

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=256, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, tie_word_embeddings=False)
# family -> extra config; every family of calm.arch has a row (test_every_family_has_a_row).
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {"sliding_window": 16, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
               "query_pre_attn_scalar": 16},
    "gemma3_text": {"sliding_window": 16, "query_pre_attn_scalar": 16,
                    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]},
    "phi3": {},
    "olmo2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                  "decoder_sparse_step": 1, "mlp_only_layers": []},
}
NO_RESIDUAL_ROTATION = {"gemma2", "gemma3_text", "olmo2"}  # norms after the writers (sandwich / post norms)
NO_SMOOTHQUANT = {"olmo2"}  # no norm in front of q/k/v and gate/up


def tiny(family: str, seed: int = 0) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **SMALL, **FAMILIES[family])
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norm gains, so folding through them is tested (their init is all 1 or 0)
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.config.use_cache = False
    arch.unfuse_experts(model)
    return model


def windows(n: int = 4, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_family_has_a_row():
    assert set(FAMILIES) == set(arch.SUPPORTED_FAMILIES) - {"gemma3"}  # gemma3: the text model of gemma3_text


@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_experts_and_layout_keep_the_function(family):
    """The model as calm walks it (MoE experts one linear each) computes what transformers' own does, and the
    layout names modules that exist."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny(family)
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **SMALL, **FAMILIES[family])
    config._attn_implementation = "eager"
    fused = AutoModelForCausalLM.from_config(config).eval()
    block = arch.decoder_blocks(model)[0]
    layout = arch.layout_of(block)
    names = dict(block.named_modules())
    groups = arch.sequential_groups(block)
    assert sum(len(g) for g in groups) == len([n for n, m in names.items() if isinstance(m, nn.Linear)])
    for site in layout.norm_sites:
        assert site.norm in names and site.loss_module in names and arch.expand(block, site.readers)
    if layout.moe is None:
        fused.load_state_dict(model.state_dict())
    else:  # the same weights, fused: the experts' weights copied into the 3-D parameters
        for b_ours, b_fused in zip(arch.decoder_blocks(model), arch.decoder_blocks(fused)):
            experts = b_ours.get_submodule(layout.moe.experts)
            target = b_fused.get_submodule(layout.moe.experts)
            g, u, d = layout.moe.expert_linears
            with torch.no_grad():
                for e in range(experts.num_experts):
                    ex = experts.get_submodule(str(e))
                    target.gate_up_proj[e].copy_(torch.cat([getattr(ex, g).weight, getattr(ex, u).weight]))
                    target.down_proj[e].copy_(getattr(ex, d).weight)
        fused.load_state_dict({k: v for k, v in model.state_dict().items() if ".experts." not in k}, strict=False)
    assert rel(logits(model, windows()), logits(fused, windows())) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_folding_keeps_the_float_function(family):
    """AWQ/SmoothQuant's fold (through RMSNorm, Gemma's 1 + w, a fused producer's rows, an MoE router) with
    random scales changes no float output."""
    model = tiny(family)
    ids = windows()
    before = logits(model, ids)
    g = torch.Generator().manual_seed(3)
    for block in arch.decoder_blocks(model):
        for group in scaling.scale_groups(block):
            n = block.get_submodule(group.linears[0]).in_features
            scaling.fold_scales(block, group, torch.rand(n, generator=g) + 0.5)
    assert rel(logits(model, ids), before) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_rotation_keeps_the_float_function_or_refuses(family):
    model = tiny(family)
    ids = windows()
    before = logits(model, ids)
    if family in NO_RESIDUAL_ROTATION:
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(CalmUsageError, match="drop --residual-rotation"):
            rotate_residual(model, "hadamard")
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # refused: untouched
        return
    rotate_residual(model, "hadamard")
    assert rel(logits(model, ids), before) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_affine_fold_keeps_the_float_function(family):
    from calm.algorithms.affine import fold_into_block, norm_sites

    model = tiny(family)
    ids = windows()
    before = logits(model, ids)
    for block in arch.decoder_blocks(model):
        scales = {norm: nn.Parameter(0.3 * torch.randn(block.get_submodule(names[0]).in_features))
                  for norm, names in norm_sites(block).items()}
        fold_into_block(block, scales)
    assert rel(logits(model, ids), before) < 1e-5


def search(model: nn.Module, pool: str, scheme: str, state_dir=None):
    spec = QuantSpec.from_scheme(scheme)
    config = SearchConfig(pool=parse_pool(pool), batch_windows=4)
    return calm_search(model, windows(8, 32, seed=5), spec, config, state_dir=state_dir, log=lambda line: None)


# (pool, scheme) per family: weight-only candidates at W4A16G16, activation candidates at W4A8 / W4A4.
WEIGHT_ONLY = "rtn;gptq;awq;claq:fit_columns=64,kmeans_iters=5"
ACTIVATION = "rtn;gptq;rotation;affine:steps=2;kurtosis:steps=2"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_candidate_runs_and_a_hybrid_saves_and_reloads(family, tmp_path):
    model = tiny(family)
    ids = windows(2, 20, seed=9)
    reference = logits(model, ids)
    outcome = search(copy.deepcopy(model), WEIGHT_ONLY, "W4A16G16")
    names = [c.name for c in parse_pool(WEIGHT_ONLY)]
    assert all(outcome.candidate_blocks[n][i] is not None for n in names for i in range(3))
    # A hybrid that mixes candidates across blocks (rtn, gptq, awq), whatever the scores chose.
    hybrid = copy.deepcopy(model)
    install_blocks(hybrid, [outcome.block(n, i).float() for i, n in enumerate(("rtn", "gptq", "awq"))])
    out = logits(hybrid, ids)
    assert torch.isfinite(out).all() and rel(out, reference) < 0.5
    save_quantized(hybrid, None, tmp_path / "hybrid")
    loaded, _ = load_quantized(tmp_path / "hybrid")
    loaded.set_attn_implementation("eager")  # what the tiny model runs (a fresh one defaults to sdpa)
    assert torch.equal(logits(loaded, ids), out)

    act = search(copy.deepcopy(model), ACTIVATION, "W4A8")
    assert all(act.candidate_blocks[c.name][i] is not None for c in parse_pool(ACTIVATION) for i in range(3))
    if family not in NO_SMOOTHQUANT:
        sq = search(copy.deepcopy(model), "smoothquant", "W4A8")
        assert all(b is not None for b in sq.candidate_blocks["smoothquant"])
    if family != "phi3":  # K/V-cache quantization wraps the separate k/v projections
        kv = search(copy.deepcopy(model), "rtn;gptq", "W4A16K4V4G16")
        assert all(b is not None for b in kv.candidate_blocks["gptq"])


@pytest.mark.parametrize("family", ["phi3", "olmo2"])
def test_refusals_name_the_family_and_the_fix(family):
    model = tiny(family)
    if family == "phi3":
        with pytest.raises(CalmUsageError, match="phi3 computes K and V inside one fused projection"):
            search(model, "rtn", "W4A16K4V4G16")
    else:
        with pytest.raises(CalmUsageError, match="olmo2 has none"):
            search(model, "smoothquant", "W4A8")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_experts_are_quantized_on_their_routed_tokens_with_a_counted_fallback(family, monkeypatch):
    """Each expert's Hessian comes from the tokens routed to it; an expert below the threshold gets the
    no-calibration fallback, and the decision records it."""
    from calm.algorithms import gptq_core

    model = tiny(family)
    layout = arch.layout_of(arch.decoder_blocks(model)[0])
    monkeypatch.setattr(gptq_core, "MIN_EXPERT_TOKENS", 10 ** 6)  # every expert falls back
    outcome = search(copy.deepcopy(model), "gptq", "W4A16G16")
    fallbacks = outcome.decisions[0].scores["gptq"].fallbacks
    experts = arch.expand(arch.decoder_blocks(model)[0], (f"{layout.moe.experts}.*.*",))
    expert_linears = [n for n in experts if isinstance(arch.decoder_blocks(model)[0].get_submodule(n), nn.Linear)]
    assert set(fallbacks) == set(expert_linears)
    # Tokens routed per expert add up to top_k times the tokens (gate/up of every expert see their own tokens).
    gate = [n for n in fallbacks if n.endswith("." + layout.moe.expert_linears[0])]
    top_k = FAMILIES[family]["num_experts_per_tok"]
    assert sum(fallbacks[n] for n in gate) == top_k * 8 * 32
    monkeypatch.setattr(gptq_core, "MIN_EXPERT_TOKENS", 0)
    outcome = search(copy.deepcopy(model), "gptq", "W4A16G16")
    assert outcome.decisions[0].scores["gptq"].fallbacks is None


def test_per_layer_attention_arguments_follow_the_layer():
    """Gemma 3 mixes sliding-window and full attention: each block gets its own mask and rotary tables, so the
    streamed (block by block) evaluation equals the model's own forward."""
    from calm.evaluate import streamed_window_nll, token_nll
    from calm.streaming import MemorySource

    model = tiny("gemma3_text")
    ids = windows(4, 40, seed=2)  # longer than the sliding window (16)
    want = token_nll(logits(model, ids).float(), ids).mean(1)
    got = streamed_window_nll(MemorySource(model, None, "cpu", torch.float32), ids, batch_windows=2)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gemma2_softcap_is_applied_in_the_streamed_head():
    from calm.evaluate import streamed_window_nll, token_nll
    from calm.streaming import MemorySource

    model = tiny("gemma2")
    ids = windows(2, 24, seed=4)
    want = token_nll(logits(model, ids).float(), ids).mean(1)
    got = streamed_window_nll(MemorySource(model, None, "cpu", torch.float32), ids, batch_windows=2)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(got.mean()))


def test_unsupported_family_is_refused_from_config_json_before_loading(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    from calm.model import checkpoint_folder

    with pytest.raises(CalmUsageError, match="model type 'gpt2' is not supported; calm walks these families: llama"):
        checkpoint_folder(tmp_path)


def save_family(family: str, folder) -> None:
    """A tiny model of `family` as a checkpoint folder (safetensors as transformers writes them, so a MoE's
    experts are stored one by one under the family's own names) with a character-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **SMALL, **FAMILIES[family])
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    vocab = {chr(i): i - 29 for i in range(32, 127)}
    vocab["<unk>"] = 98
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(folder))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_command_line_runs_on_a_checkpoint_of_every_family(family, tmp_path):
    """`python -m calm.run --model DIR` streams the checkpoint (skeleton on meta, each block read from the
    safetensors files under the family's names), and its float perplexity is the transformers model's own."""
    import json

    from transformers import AutoModelForCausalLM

    from calm.config import RunConfig
    from calm.data import load_corpus
    from calm.evaluate import perplexity
    from calm.run import main

    save_family(family, tmp_path / "ckpt")
    text = tmp_path / "text.txt"
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a jumbo vortex".split()
    text.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(50)) for i in range(50)))
    out = tmp_path / "out"
    # With the residual rotation where the family takes it: applied to each piece as it is streamed.
    rotation = [] if family in NO_RESIDUAL_ROTATION else ["--residual-rotation", "hadamard"]
    assert main(["--model", str(tmp_path / "ckpt"), "--text", str(text), "--output", str(out), "--scheme",
                 "W4A16G16", "--pool", "rtn,gptq", "--calib-windows", "4", "--calib-seqlen", "32", "--eval-seqlen",
                 "32", "--eval-tokens", "256", "--batch-windows", "2", "-q", *rotation]) == 0
    results = json.loads((out / "results.json").read_text())
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32).eval()
    loaded, tokenizer = load_quantized(out / "model")
    corpus = load_corpus(tokenizer, RunConfig.from_dict(results["config"]).data)
    assert perplexity(reference, corpus.evaluation) == pytest.approx(results["perplexity"]["fp"], rel=1e-4)
    assert perplexity(loaded, corpus.evaluation) == pytest.approx(results["perplexity"]["calm"], rel=1e-4)
    assert all(math.isfinite(v) for v in results["perplexity"].values())
    assert set(results["expert_fallbacks"]) == {"rtn", "gptq"} and results["expert_fallbacks"]["rtn"] == 0


@pytest.mark.slow
def test_gemma3_multimodal_checkpoint_quantizes_its_language_model(tmp_path):
    """A gemma3 (image-text) checkpoint: calm streams its language model from the `language_model.` tensors and
    saves that model (gemma3_text); the float perplexity is the multimodal model's own on text."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from calm.config import RunConfig
    from calm.data import load_corpus
    from calm.evaluate import perplexity
    from calm.run import main

    save_family("gemma3_text", tmp_path / "text-only")  # for its tokenizer and text config
    text_config = AutoConfig.from_pretrained(str(tmp_path / "text-only")).to_dict()
    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16}
    config = AutoConfig.for_model("gemma3", text_config=text_config, vision_config=vision, mm_tokens_per_image=4)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(str(ckpt))
    for f in (tmp_path / "text-only").glob("tokenizer*"):
        (ckpt / f.name).write_bytes(f.read_bytes())
    text = tmp_path / "text.txt"
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a jumbo vortex".split()
    text.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(50)) for i in range(50)))
    out = tmp_path / "out"
    assert main(["--model", str(ckpt), "--text", str(text), "--output", str(out), "--scheme", "W4A16G16",
                 "--pool", "rtn,gptq", "--calib-windows", "4", "--calib-seqlen", "32", "--eval-seqlen", "32",
                 "--eval-tokens", "256", "--batch-windows", "2", "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    loaded, tokenizer = load_quantized(out / "model")
    assert loaded.config.model_type == "gemma3_text"
    corpus = load_corpus(tokenizer, RunConfig.from_dict(results["config"]).data)
    assert perplexity(model, corpus.evaluation) == pytest.approx(results["perplexity"]["fp"], rel=1e-4)
    assert perplexity(loaded, corpus.evaluation) == pytest.approx(results["perplexity"]["calm"], rel=1e-4)


def test_readme_holds_the_family_matrix():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert arch.family_matrix() in readme, "README's family table is stale: paste `python -m calm.arch`'s output"


def test_unsupported_gguf_is_refused_from_its_metadata_before_any_conversion(tmp_path, monkeypatch):
    import gguf
    import numpy as np

    from calm.model import checkpoint_folder

    monkeypatch.setenv("CALM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")  # writes general.architecture = gpt2
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CalmUsageError, match="GGUF architecture 'gpt2' is not supported; calm walks these families"):
        checkpoint_folder(path)
    assert not (tmp_path / "cache").exists()  # nothing converted
