"""Benchmark: greedy-decode tokens/s of the default model (SmolLM2-135M) and of a Llama-2-7B-shaped model of random
weights, float bf16 against calm's drop-in quantized modules (W4, W3 and a W4/W3 per-block hybrid), with CUDA
graphs over a static KV cache and eagerly.

    python bench/generate.py                  # needs a CUDA device; writes bench/results/generate-<device>.json
    python bench/generate.py --models default --variants bf16 w4 --new-tokens 64
    python bench/generate.py --smoke          # a tiny random Llama on the CPU: plumbing only, timings mean nothing

What is built: the float model in bf16 on the device; every decoder linear replaced by
`calm.nn.UniformQuantLinear.from_float` (calm's round-to-nearest on calm's grid, asymmetric, groups of 128, or
64 for the default model whose width 576 is not a multiple of 128): `w4`, `w3`, and `hybrid` (even blocks W4,
odd blocks W3: the shape of a search's per-block choice at ~3.5 bits). These are the modules `calm.load` builds
from a saved model, run the way users run them (their forward, Triton qgemm on CUDA).

What is timed, per model and variant, after a prompt of --prompt-tokens is prefilled into a transformers
StaticCache:
- cuda-graph: one decode step (embedding -> logits -> argmax -> next input, cache position advanced, all on the
  device) captured once in a CUDA graph and replayed --new-tokens times back to back; the time per token is the
  median over 4 chunks of replays, each between two CUDA events.
- eager: the same step called from Python --eager-tokens times (launch overhead included, no host sync per
  token).
- `<variant>:generate()`: `model.generate(max_new_tokens=--eager-tokens, do_sample=False)` with its default
  dynamic cache, wall time including the prefill (what a plain transformers user gets).
Each record: tokens_per_s, median_us (per token), roofline_us (bytes every token must read: weights of every
linear and the head, one embedding row, the KV cache at the mean position; over the copy bandwidth measured in
the same run), and the checks `matches_eager_tokens` (graph tokens == eager tokens) and `leading_match_generate`
(how many leading tokens the static path shares with generate()).

The 7B-shaped model runs all 32 blocks when the device has the memory for bf16 + W4 + W3 copies (~21 GB);
otherwise --layers-7b N runs N blocks and scales the per-token time by 32/N (recorded as `scaled_from_layers`;
an upper bound, since the embedding and head do not scale).
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _common as B  # noqa: E402
from bench._timing import capture_cuda_graph  # noqa: E402

VARIANTS = ("bf16", "w4", "w3", "hybrid")
MODELS = ("default", "llama7b")
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5)
PROMPT = "The history of the city begins with a small settlement on the river, where"
CHUNKS = 4


@dataclass
class Built:
    name: str
    model: torch.nn.Module
    prompt: torch.Tensor  # (1, P) token ids on the device
    group_size: int
    layers_run: int
    layers_full: int


# ---- models ---------------------------------------------------------------------------------------------

def build_default(device: str, dtype: torch.dtype, prompt_tokens: int) -> Built:
    from calm.model import load_model

    model, tokenizer = load_model(None, dtype=dtype)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    ids = ids.repeat(1, -(-prompt_tokens // ids.shape[1]))[:, :prompt_tokens]
    n = model.config.num_hidden_layers
    return Built("SmolLM2-135M", model.to(device), ids.to(device), 64, n, n)


def build_random_llama(name: str, shape: dict, layers: int, device: str, dtype: torch.dtype, prompt_tokens: int,
                       group_size: int) -> Built:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**shape, "num_hidden_layers": layers}, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    prompt = torch.randint(0, shape["vocab_size"], (1, prompt_tokens), generator=torch.Generator().manual_seed(1))
    return Built(name, model, prompt.to(device), group_size, layers, shape["num_hidden_layers"])


def layers_for_7b(requested: int | None, device: str) -> int:
    """All 32 blocks when bf16 + W4 + W3 copies fit (about 0.66 GB per block plus the 0.5 GB head), else fewer."""
    if requested:
        return requested
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 0
    return int(max(2, min(32, (free * 0.8 - 1.5e9) // 0.66e9)))


# ---- calm's modules -------------------------------------------------------------------------------------

def quantized_linears(model: torch.nn.Module, bits: int, group_size: int) -> list[dict[str, torch.nn.Module]]:
    """Per decoder block, every linear as a calm UniformQuantLinear (round to nearest, asymmetric)."""
    from calm.arch import decoder_blocks
    from calm.model import block_linears
    from calm.nn import UniformQuantLinear

    out = []
    for block in decoder_blocks(model):
        out.append({name: UniformQuantLinear.from_float(lin, bits, group_size).to(lin.weight.device)
                    for name, lin in block_linears(block).items()})
    return out


def install(model: torch.nn.Module, per_block: list[dict[str, torch.nn.Module]]) -> None:
    from calm.arch import decoder_blocks

    for block, modules in zip(decoder_blocks(model), per_block):
        for name, module in modules.items():
            block.set_submodule(name, module)


def effective_bits(model: torch.nn.Module) -> float:
    from calm.arch import decoder_blocks
    from calm.nn import model_effective_bits

    return model_effective_bits(list(decoder_blocks(model)))


def bytes_per_token(model: torch.nn.Module, cache_positions: float) -> float:
    """Bytes one decode step must read: every parameter and buffer (of the input embedding one row, unless the head
    shares it), plus the K and V cache up to the mean position."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if head is None or head.weight is not emb:  # a tied head (SmolLM2) reads the whole matrix anyway
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * cache_positions * emb.element_size()
    return total + kv


# ---- decoding -------------------------------------------------------------------------------------------

class StaticDecoder:
    """Greedy decoding over a transformers StaticCache with every per-token tensor in a fixed buffer, so one step is
    capturable in a CUDA graph: the step reads `ids`, `pos` and `mask`, writes the next token into `ids` and `out`,
    and advances `pos` and `mask` on the device."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor, max_new: int) -> None:
        from transformers import StaticCache

        self.model = model
        self.prompt_len = prompt.shape[1]
        max_len = self.prompt_len + max_new
        device = prompt.device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.mask = torch.zeros(1, max_len, dtype=torch.long, device=device)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros(max_new, dtype=torch.long, device=device)
        self.prompt = prompt
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns); use what this version takes
        params = inspect.signature(type(model).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def prefill(self) -> None:
        p = self.prompt_len
        self.mask[:, :p] = 1
        positions = torch.arange(p, device=self.prompt.device)
        logits = self.model(input_ids=self.prompt, attention_mask=self.mask, cache_position=positions,
                            use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache}).logits
        self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.pos.fill_(p)

    def step(self) -> None:
        self.out.index_copy_(0, self.pos - self.prompt_len, self.ids[0])  # the token this step consumes
        self.mask.index_fill_(1, self.pos, 1)
        logits = self.model(input_ids=self.ids, attention_mask=self.mask, cache_position=self.pos,
                            use_cache=True, **{self.cache_kw: self.cache}).logits
        self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(1)

    def tokens(self, n: int) -> list[int]:
        return self.out[:n].tolist()


def _elapsed_s(fn, device: str) -> float:
    if device == "cpu":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


def time_steps(run_step, tokens: int, device: str) -> float:
    """Median seconds per token over CHUNKS chunks of back-to-back steps."""
    per_chunk = max(1, tokens // CHUNKS)

    def chunk():
        for _ in range(per_chunk):
            run_step()
    return statistics.median(_elapsed_s(chunk, device) / per_chunk for _ in range(CHUNKS))


def decode_eager(model, prompt, tokens: int, device: str) -> tuple[float, list[int]]:
    dec = StaticDecoder(model, prompt, tokens + 2 + CHUNKS)
    dec.prefill()
    for _ in range(2):
        dec.step()
    s = time_steps(dec.step, tokens, device)
    return s, dec.tokens(tokens)


def decode_graph(model, prompt, tokens: int, device: str) -> tuple[float, list[int]]:
    """Warm steps on a side stream, one step captured, then replays. On the CPU (smoke) the step is called
    directly: the capture cannot run there."""
    dec = StaticDecoder(model, prompt, tokens + 3 + CHUNKS)
    dec.prefill()
    if device == "cpu":
        for _ in range(2):
            dec.step()
        return time_steps(dec.step, tokens, device), dec.tokens(tokens)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            dec.step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = capture_cuda_graph(dec.step)
    s = time_steps(graph.replay, tokens, device)
    return s, dec.tokens(tokens)


def generate_reference(model, prompt, tokens: int, device: str) -> tuple[float, list[int]]:
    def run():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                              do_sample=False, use_cache=True, pad_token_id=0)
    run()  # warm-up (autotuning, lazy caches)
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = run()
    if device != "cpu":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / tokens, out[0, prompt.shape[1]:].tolist()


def leading_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---- one model ------------------------------------------------------------------------------------------

def bench_model(built: Built, variants: list[str], args, device: str, ceilings: dict, deadline: float,
                notes: list[str]) -> list[dict]:
    model = built.model
    cfg = model.config
    shape = {"layers": built.layers_full, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
             "vocab": cfg.vocab_size, "prompt": built.prompt.shape[1], "new_tokens": args.new_tokens}
    scale = built.layers_full / built.layers_run
    float_linears = quantized = None
    records: list[dict] = []
    for variant in variants:
        base = {"kernel": "generate", "model": built.name, "provider": "bf16" if variant == "bf16" else
                f"calm-{variant}", "shape": shape, "dtype": str(next(model.parameters()).dtype).split(".")[-1]}
        if scale != 1:
            base["scaled_from_layers"] = built.layers_run
        if time.monotonic() > deadline:
            records.append({**base, "timing": None, "median_us": None, "error": "not run: time budget spent"})
            continue
        try:
            if variant != "bf16":
                if float_linears is None:
                    from calm.arch import decoder_blocks
                    from calm.model import block_linears

                    float_linears = [dict(block_linears(b)) for b in decoder_blocks(model)]
                    quantized = {bits: quantized_linears(model, bits, built.group_size) for bits in (4, 3)
                                 if any(v in variants for v in ({4: ("w4", "hybrid"), 3: ("w3", "hybrid")}[bits]))}
                per_block = {"w4": quantized.get(4), "w3": quantized.get(3)}.get(variant) or \
                    [quantized[4][i] if i % 2 == 0 else quantized[3][i] for i in range(len(float_linears))]
                install(model, per_block)
            elif float_linears is not None:
                install(model, float_linears)
            base["bits"] = {"bf16": 16, "w4": 4, "w3": 3}.get(variant)  # the hybrid mixes: see effective_bits
            base["effective_bits"] = effective_bits(model)
            roof_s = bytes_per_token(model, built.prompt.shape[1] + args.new_tokens / 2) / ceilings["bandwidth"]
            with torch.no_grad():
                records += measure_variant(model, built, base, args, device, roof_s, scale, notes)
        except Exception as exc:  # one variant failing must not stop the others
            records.append({**base, "timing": None, "median_us": None,
                            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"})
            if device != "cpu":
                torch.cuda.empty_cache()
    return records


def measure_variant(model, built: Built, base: dict, args, device: str, roof_s: float, scale: float,
                    notes: list[str]) -> list[dict]:
    out = []

    def add(timing: str, provider: str, sec: float, extra: dict) -> None:
        sec *= scale
        out.append({**base, "provider": provider, "timing": timing, "median_us": sec * 1e6,
                    "tokens_per_s": 1.0 / sec, "roofline_us": roof_s * 1e6 * scale, **extra})

    eager_s, eager_tokens = decode_eager(model, built.prompt, args.eager_tokens, device)
    add("eager", base["provider"], eager_s, {"tokens_timed": args.eager_tokens})
    try:
        graph_s, graph_tokens = decode_graph(model, built.prompt, args.new_tokens, device)
        n = min(len(graph_tokens), len(eager_tokens))
        add("cuda-graph", base["provider"], graph_s, {"tokens_timed": args.new_tokens,
                                                      "matches_eager_tokens": graph_tokens[:n] == eager_tokens[:n]})
    except Exception as exc:
        out.append({**base, "timing": "cuda-graph", "median_us": None,
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"})
        if device != "cpu":
            torch.cuda.synchronize()
    if args.generate_reference:
        gen_s, gen_tokens = generate_reference(model, built.prompt, args.eager_tokens, device)
        add("eager", f"{base['provider']}:generate()", gen_s,
            {"tokens_timed": args.eager_tokens, "includes_prefill": True,
             "leading_match_generate": leading_match(eager_tokens, gen_tokens)})
        out[0]["leading_match_generate"] = leading_match(eager_tokens, gen_tokens)
    return out


# ---- report ---------------------------------------------------------------------------------------------

def print_table(records: list[dict]) -> None:
    print(f"{'model':14} {'provider':22} {'timing':10} {'eff bits':>8} {'tokens/s':>10} {'us/token':>10} "
          f"{'roofline':>9} {'/roof':>6} {'x bf16':>7}")
    bf16 = {(r["model"], r["timing"], r["provider"].endswith(":generate()")): r["median_us"] for r in records
            if r.get("median_us") and r["provider"].startswith("bf16")}
    for r in records:
        if not r.get("median_us"):
            print(f"{str(r.get('model')):14} {str(r.get('provider')):22} {str(r.get('timing')):10} "
                  f"{r.get('error', '')}")
            continue
        ref = bf16.get((r["model"], r["timing"], r["provider"].endswith(":generate()")))
        x = f"{ref / r['median_us']:7.2f}" if ref else "      -"
        print(f"{r['model']:14} {r['provider']:22} {r['timing']:10} {r.get('effective_bits', 16):8.3f} "
              f"{r['tokens_per_s']:10.1f} {r['median_us']:10.1f} {r['roofline_us']:9.1f} "
              f"{r['median_us'] / r['roofline_us']:6.2f} {x}")


def goal_lines(records: list[dict]) -> list[str]:
    idx = {(r["model"], r["provider"], r["timing"]): r for r in records if r.get("median_us")}
    lines = []
    bf16 = idx.get(("llama-2-7b-shaped", "bf16", "cuda-graph"))
    for variant in ("calm-w4", "calm-w3", "calm-hybrid"):
        ours = idx.get(("llama-2-7b-shaped", variant, "cuda-graph"))
        if bf16 and ours:
            x = ours["tokens_per_s"] / bf16["tokens_per_s"]
            goal = " (goal >= 2x: " + ("met)" if x >= 2 else "NOT met)") if variant == "calm-w4" else ""
            lines.append(f"7B-shaped decode, CUDA graphs: {variant} {x:.2f}x bf16 tokens/s{goal}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny random Llama on the CPU: plumbing check")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens timed under CUDA graphs")
    ap.add_argument("--eager-tokens", type=int, default=32, help="tokens timed eagerly and with generate()")
    ap.add_argument("--layers-7b", type=int, default=None,
                    help="blocks of the 7B-shaped model to run (default: all 32 when memory allows)")
    ap.add_argument("--generate-reference", action=argparse.BooleanOptionalAction, default=True,
                    help="also time model.generate() (dynamic cache) and compare its tokens")
    ap.add_argument("--budget", type=float, default=None, help="seconds; variants reached later are recorded as "
                                                               "not run")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/generate-<device>.json;"
                                                           " smoke runs write to a temp folder)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("generate: no CUDA device; this benchmark needs a GPU (use --smoke for a CPU plumbing check)")
        return 2
    for name in ("prompt_tokens", "new_tokens", "eager_tokens"):
        if getattr(args, name) < CHUNKS:
            ap.error(f"--{name.replace('_', '-')} must be at least {CHUNKS}")
    deadline = time.monotonic() + (args.budget if args.budget is not None else float("inf"))
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16  # bf16 on the CPU is an emulation
    name = B.device_name(args.smoke)
    triton_version, _ = B.triton_version(True, "generate")
    print(f"device: {name}; torch {torch.__version__}; triton {triton_version}"
          + ("; smoke run on the CPU (tiny random Llama), timings mean nothing" if args.smoke else ""))
    ceilings = B.measure_ceilings(device, B.make_timer(args.smoke), args.smoke, peaks=())
    print(f"measured: copy bandwidth {ceilings['bandwidth'] / 1e9:.1f} GB/s")
    records, notes = [], []
    for which in args.models:
        if time.monotonic() > deadline:
            records.append({"kernel": "generate", "model": which, "provider": None, "timing": None,
                            "median_us": None, "error": "not run: time budget spent"})
            continue
        try:
            if args.smoke:
                # The second smoke model runs 1 of its 2 blocks: the per-layer scaling path runs too.
                layers = TINY["num_hidden_layers"] if which == "default" else (args.layers_7b or 1)
                built = build_random_llama(f"tiny-{which}", TINY, layers, device, dtype, args.prompt_tokens, 64)
            elif which == "default":
                built = build_default(device, dtype, args.prompt_tokens)
            else:
                built = build_random_llama("llama-2-7b-shaped", LLAMA7B, layers_for_7b(args.layers_7b, device),
                                           device, dtype, args.prompt_tokens, 128)
        except Exception as exc:
            records.append({"kernel": "generate", "model": which, "provider": None, "timing": None,
                            "median_us": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
            continue
        if built.layers_run != built.layers_full:
            notes.append(f"{built.name}: ran {built.layers_run} of {built.layers_full} blocks (device memory); "
                         f"per-token times scaled by {built.layers_full / built.layers_run:.2f}")
        records += bench_model(built, args.variants, args, device, ceilings, deadline, notes)
        del built
        if device == "cuda":
            torch.cuda.empty_cache()
    return B.finish(records, notes, kernel="generate", name=name, triton=triton_version,
                    ceilings_meta={"bandwidth_GBps": ceilings["bandwidth"] / 1e9}, smoke=args.smoke, out=args.out,
                    print_table=print_table, goal_lines=goal_lines)


if __name__ == "__main__":
    sys.exit(main())
