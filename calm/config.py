"""Typed configuration: quantization scheme, search pool, run settings. Every dataclass round-trips to JSON."""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any


class CalmUsageError(ValueError):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


class NumericalError(ArithmeticError):
    """A quantization broke down numerically (e.g. a Hessian that is not positive definite even after damping).
    In a search the candidate that raised it is recorded as failed and the others still compete."""


WEIGHT_BITS = (2, 3, 4, 8)
_WIDTH = re.compile(r"^(?P<bits>\d+)?(?:g(?P<group>\d+))?$")  # a candidate's `3`, `3g128` or `g128` after '@'
SCHEME_PATTERN = re.compile(r"^W(?P<w>\d+)(?:A(?P<a>\d+))?(?:K(?P<k>\d+)V(?P<v>\d+))?(?:G(?P<g>\d+))?$")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What a candidate must produce.

    Args:
        w_bits: weight bits (2, 3, 4 or 8).
        group_size: input columns sharing one scale/zero; 0 means one group per output channel.
        symmetric: symmetric grid (zero point fixed at 2^(b-1)) instead of a fitted integer zero point.
        a_bits: activation bits; 16 means activations stay in floating point.
        k_bits, v_bits: KV-cache bits; 16 means no KV quantization.
        kv_group_size: channels of a head sharing one KV scale/zero per token; 0 means the whole head.
    """
    w_bits: int = 3
    group_size: int = 64
    symmetric: bool = False
    a_bits: int = 16
    k_bits: int = 16
    v_bits: int = 16
    kv_group_size: int = 0

    def __post_init__(self) -> None:
        if self.w_bits not in WEIGHT_BITS:
            raise CalmUsageError(f"weight bits must be 2, 3, 4 or 8, got {self.w_bits}")
        if self.group_size < 0:
            raise CalmUsageError(f"group size must be positive (or 0 for per-channel), got {self.group_size}")
        for name in ("a_bits", "k_bits", "v_bits"):
            if getattr(self, name) not in (2, 3, 4, 8, 16):
                raise CalmUsageError(f"{name} must be 2, 3, 4, 8 or 16, got {getattr(self, name)}")
        if self.kv_group_size < 0:
            raise CalmUsageError(f"KV group size must be positive (or 0 for one group per head), got "
                                 f"{self.kv_group_size}")

    @classmethod
    def from_scheme(cls, scheme: str, symmetric: bool = False, kv_group_size: int = 0) -> "QuantSpec":
        """Parse `W3A16G64`, `W4A16` (per-channel), `W4A8`, `W3A3K2V2`, ..."""
        m = SCHEME_PATTERN.match(scheme.strip().upper())
        if not m:
            raise CalmUsageError(f"unknown scheme {scheme!r}: write it like W3A16G64 (weights 3 bits, activations "
                                 f"16, groups of 64), W4A16 (per-channel) or W3A3K2V2")
        a = int(m["a"]) if m["a"] else 16
        k = int(m["k"]) if m["k"] else 16
        v = int(m["v"]) if m["v"] else 16
        g = int(m["g"]) if m["g"] else 0
        return cls(w_bits=int(m["w"]), group_size=g, symmetric=symmetric, a_bits=a, k_bits=k, v_bits=v,
                   kv_group_size=kv_group_size)

    @property
    def scheme(self) -> str:
        s = f"W{self.w_bits}A{self.a_bits}"
        if self.k_bits != 16 or self.v_bits != 16:
            s += f"K{self.k_bits}V{self.v_bits}"
        if self.group_size:
            s += f"G{self.group_size}"
        return s

    def group_for(self, in_features: int) -> int:
        """The group size for a layer with `in_features` inputs (per-channel: the whole row)."""
        g = self.group_size or in_features
        if in_features % g:
            divisors = [d for d in (32, 64, 96, 128, 192, 256) if in_features % d == 0]
            raise CalmUsageError(f"group size {g} does not divide a layer's input size {in_features}; "
                                 f"use one that does (e.g. {divisors or [in_features]}) or per-channel (no G)")
        return g


@dataclasses.dataclass(frozen=True)
class CandidateSpec:
    """One member of the search pool: a registered algorithm, its weight bits and its options. `name` labels it
    in results.

    `bits` None: the scheme's weight bits; else this candidate's (`gptq@2`), the rest of the scheme unchanged.
    `group_size` None: the scheme's group size; else this candidate's (`gptq@3g128`; `g0`: per output channel),
    so that a bit budget can also trade group sizes."""
    algorithm: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    label: str = ""
    bits: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits is not None and self.bits not in WEIGHT_BITS:
            raise CalmUsageError(f"candidate {self.algorithm}@{self.bits}: weight bits after '@' must be one of "
                                 f"{', '.join(map(str, WEIGHT_BITS))}, e.g. {self.algorithm}@3")
        if self.group_size is not None and self.group_size < 0:
            raise CalmUsageError(f"candidate {self.algorithm}: group size must be positive (or g0 for per-channel), "
                                 f"got {self.group_size}")

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        base = self.algorithm
        if self.bits is not None or self.group_size is not None:
            base += "@" + ("" if self.bits is None else str(self.bits)) + (
                "" if self.group_size is None else f"g{self.group_size}")
        if not self.options:
            return base
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{base}[{opts}]"

    def spec_for(self, spec: "QuantSpec") -> "QuantSpec":
        """The scheme this candidate quantizes to: `spec` with its own weight bits and group size where it names
        them."""
        changes = {k: v for k, v in (("w_bits", self.bits), ("group_size", self.group_size)) if v is not None}
        return dataclasses.replace(spec, **changes) if changes else spec

    @classmethod
    def parse(cls, text: str) -> "CandidateSpec":
        """`gptq`, `gptq@3` (3-bit weights whatever the scheme says), `gptq@3g128` (and groups of 128),
        `gptq@g128` or `gptq@4:act_order=static,damp=0.02` (values parsed as JSON where they can be)."""
        head, _, rest = text.strip().partition(":")
        algo, at, width = head.partition("@")
        bits = group = None
        if at:
            m = _WIDTH.match(width.strip().lower())
            if not m or not (m["bits"] or m["group"]):
                raise CalmUsageError(f"candidate {text.strip()!r}: write the weight bits after '@' as a number, "
                                     f"one of {', '.join(map(str, WEIGHT_BITS))}, optionally with a group size "
                                     f"(e.g. {algo.strip() or 'gptq'}@3 or {algo.strip() or 'gptq'}@3g128)")
            bits = int(m["bits"]) if m["bits"] else None
            group = int(m["group"]) if m["group"] else None
        options: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise CalmUsageError(f"candidate option {item!r} in {text!r} must read key=value")
            try:
                options[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                options[key.strip()] = value.strip()
        return cls(algorithm=algo.strip().lower(), options=options, bits=bits, group_size=group)


def parse_pool(text: str) -> tuple[CandidateSpec, ...]:
    """`rtn,gptq` or `rtn;gptq:act_order=static,damp=0.02` (use ';' between candidates that carry options)."""
    if ";" in text:
        parts = [p for p in text.split(";") if p.strip()]
    else:
        # Comma-separated: an item with '=' and no ':' is one more option of the candidate before it, so
        # `kurtosis:steps=5,lr=0.01` stays one candidate (algorithm names never contain '=').
        parts = []
        for item in filter(None, (p.strip() for p in text.split(","))):
            if parts and "=" in item and ":" not in item and ":" in parts[-1]:
                parts[-1] += "," + item
            else:
                parts.append(item)
    if not parts:
        raise CalmUsageError("the pool is empty: name at least one algorithm, e.g. --pool rtn,gptq")
    pool = tuple(CandidateSpec.parse(p) for p in parts)
    names = [c.name for c in pool]
    if len(set(names)) != len(names):
        raise CalmUsageError(f"the pool names a candidate twice: {names}")
    return pool


SCORES = ("cka", "cka-normed", "cka-rms", "cka-final", "nll")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How the CALM search runs.

    Args:
        propagation: `greedy` (block l+1 sees the chosen quantized blocks' outputs) or `independent` (FP inputs).
        tie_tolerance: CKA (or NLL) values closer than this count as a tie, broken by lower MSE.
        batch_windows: calibration windows per forward pass (memory vs speed).
        debiased_cka: the unbiased-HSIC CKA estimator instead of the plain one.
        score: what CKA compares: `cka` the raw block outputs, `cka-normed` the outputs as the next RMS norm
            (with its weight) sees them, `cka-rms` the same without the weight (`calm.search.score_features`),
            `cka-final` the model's last normalized hidden state (what the LM head reads) when the float blocks
            after this one run on its output (costs a pass through the rest of the model per candidate); `nll`
            the same pass through the LM head: the next-token NLL on the scoring windows, lowest wins (not CKA:
            the quantity perplexity measures; use it with `DataConfig.score_windows`).
        bits_budget: effective bits per weight (every stored bit of the decoder linears over their weights) the
            model may use at most: each block gets the pool candidate (algorithm and bits) a Lagrangian
            allocation picks (`calm.search.budget`); None: the usual per-block best at the candidates' bits.
    """
    pool: tuple[CandidateSpec, ...] = (CandidateSpec("rtn"), CandidateSpec("gptq"))
    propagation: str = "greedy"
    tie_tolerance: float = 1e-7
    batch_windows: int = 8
    debiased_cka: bool = False
    score: str = "cka"
    bits_budget: float | None = None

    def __post_init__(self) -> None:
        if self.bits_budget is not None and not 0 < self.bits_budget <= 16:
            raise CalmUsageError(f"the bit budget is in effective bits per weight, above 0 and at most 16, got "
                                 f"{self.bits_budget}")
        if self.score not in SCORES:
            raise CalmUsageError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.propagation not in ("greedy", "independent"):
            raise CalmUsageError(f"propagation must be 'greedy' or 'independent', got {self.propagation!r}")
        if self.batch_windows < 1:
            raise CalmUsageError("batch_windows must be at least 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Calibration and evaluation text.

    Args:
        text: None for the embedded Wikipedia extract (gensim wheel), or a local UTF-8 text file.
        dataset: instead of `text`, a dataset read with the `datasets` package: a local .json/.jsonl/.parquet/
            .csv/.txt file or a folder of them, a hub name with `dataset_config`, or a preset (`wikitext`,
            `c4`, `pile-val`; online). `text_column` holds the text; with `calib_split` and `eval_split` the
            two sides come from those splits, otherwise the records of one split alternate between them.
        calib_windows, calib_seqlen: calibration windows drawn with `seed` from the calibration half.
        score_windows: further windows of the calibration half, drawn after those (same seed) where they share
            no token with them or each other, on which the search scores candidates instead of on the windows
            they were fitted on; 0 scores on the fitting windows.
        eval_seqlen: T of the GPTQ perplexity protocol (non-overlapping windows of T tokens).
        eval_tokens: held-out tokens evaluated (rounded down to whole windows); 0 means the whole held-out half.
    """
    text: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    text_column: str = "text"
    calib_split: str | None = None
    eval_split: str | None = None
    calib_windows: int = 16
    calib_seqlen: int = 512
    eval_seqlen: int = 512
    eval_tokens: int = 16384
    seed: int = 0
    score_windows: int = 0

    def __post_init__(self) -> None:
        if self.score_windows < 0:
            raise CalmUsageError(f"score_windows must be >= 0 (0 = score on the fitting windows), "
                                 f"got {self.score_windows}")
        for name in ("calib_windows", "calib_seqlen", "eval_seqlen"):
            if getattr(self, name) < 1:
                raise CalmUsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_tokens < 0:
            raise CalmUsageError("eval_tokens must be >= 0 (0 = the whole held-out half)")
        if self.text is not None and self.dataset is not None:
            raise CalmUsageError("--text and --dataset both name the text: pass one of them")
        if self.calib_split is not None and self.calib_split == self.eval_split:
            raise CalmUsageError(f"--calib-split and --eval-split are both {self.calib_split!r}: calibration and "
                                 f"evaluation would share text; name two splits, or neither (the records of one "
                                 f"split then alternate between them)")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PARALLEL_MODES = ("auto", "data", "candidates")  # calm.distributed


# Zero-shot evaluation (calm.zero_shot): the six standard lm-eval tasks, which also have offline data.
DEFAULT_ZERO_SHOT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq")
ZERO_SHOT_SOURCES = ("offline", "hub")


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    """Which lm-eval tasks to run (none: no zero-shot), at most `limit` documents each (None: all of the split),
    where their documents come from, lm-eval's batch size, and on which of the run's models (`models`, names as
    in results.json's `perplexity`; empty: every model)."""
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    source: str = "offline"
    batch_size: int = 8
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "models", tuple(self.models))
        if self.models and not self.tasks:
            raise CalmUsageError("--zero-shot-models chooses models for --zero-shot: give the tasks too")
        if self.source not in ZERO_SHOT_SOURCES:
            raise CalmUsageError(f"unknown --zero-shot-source {self.source!r}: use one of "
                                 f"{', '.join(ZERO_SHOT_SOURCES)}")
        if self.limit is not None and self.limit < 1:
            raise CalmUsageError(f"--zero-shot-limit is a number of documents per task (>= 1), got {self.limit}")
        if self.batch_size < 1:
            raise CalmUsageError(f"the zero-shot batch size is >= 1, got {self.batch_size}")
        if len(set(self.tasks)) != len(self.tasks):
            raise CalmUsageError(f"--zero-shot names a task twice: {','.join(self.tasks)}")
        if self.source == "offline":
            unknown = [t for t in self.tasks if t not in DEFAULT_ZERO_SHOT_TASKS]
            if unknown:
                raise CalmUsageError(f"no offline data for zero-shot task(s) {', '.join(unknown)}: the offline tasks "
                                     f"are {', '.join(DEFAULT_ZERO_SHOT_TASKS)}; other lm-eval tasks need "
                                     f"--zero-shot-source hub (online)")

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def wants(self, model: str) -> bool:
        """Whether `model` (a results.json model name) is evaluated zero-shot."""
        return self.enabled and (not self.models or model in self.models)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str | None = None
    scheme: str = "W3A16G64"
    symmetric: bool = False
    kv_group_size: int = 0
    # "hadamard" / "random": rotate the float model's residual stream before the search (calm.residual_rotation)
    residual_rotation: str = "none"
    search: SearchConfig = SearchConfig()
    data: DataConfig = DataConfig()
    baselines: bool = True
    # True: each pool member's uniform baseline gets its own sequential pass (block l+1 calibrated on that
    # member's quantized blocks, the published protocol); False: baselines reuse the candidate blocks the
    # search made on the hybrid's inputs (no extra quantization; exact for calibration-free members like RTN).
    exact_baselines: bool = False
    # With scoring windows and baselines: keep the hybrid only if its whole-model NLL on the scoring windows is
    # no higher than every uniform member's, else save that member (per-block choices cannot see how errors
    # compound across blocks; the uniform models are also points of the search space). Off by default: the
    # scoring windows also made the per-block choices, and on the default model the check's verdict went
    # against the held-out evaluation in 3 of 5 runs (bench/QUALITY.md).
    final_check: bool = False
    output: str = "outputs/default"
    # Where every step runs: "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    # Compute dtype: "auto" (bfloat16 on CUDA, float32 on the CPU, where bfloat16 is slow), or a dtype name.
    dtype: str = "auto"
    # GiB of calibration activations the search keeps on the device (beyond, they live in pinned CPU memory);
    # None: a share of the device's free memory when the search starts (calm.streaming.ACTIVATION_SHARE).
    activation_budget_gb: float | None = None
    # How a torchrun job splits the search (calm.distributed): "auto", "data" or "candidates"; one process
    # alone ignores it.
    parallel: str = "auto"
    # lm-eval zero-shot tasks evaluated on every model after the perplexities (calm.zero_shot); none by default.
    zero_shot: ZeroShotConfig = ZeroShotConfig()

    def __post_init__(self) -> None:
        if self.parallel not in PARALLEL_MODES:
            raise CalmUsageError(f"unknown --parallel {self.parallel!r}: use one of {', '.join(PARALLEL_MODES)}")
        if not DEVICE_PATTERN.match(self.device):
            raise CalmUsageError(f"unknown device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.dtype not in DTYPES:
            raise CalmUsageError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.activation_budget_gb is not None and self.activation_budget_gb < 0:
            raise CalmUsageError(f"the activation budget is in GiB and >= 0 (0 keeps every activation in CPU "
                                 f"memory), got {self.activation_budget_gb}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec.from_scheme(self.scheme, symmetric=self.symmetric, kv_group_size=self.kv_group_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        search = dict(d.get("search", {}))
        if "pool" in search:
            search["pool"] = tuple(CandidateSpec(**c) for c in search["pool"])
        return cls(**{**d, "search": SearchConfig(**search), "data": DataConfig(**d.get("data", {})),
                      "zero_shot": ZeroShotConfig(**d.get("zero_shot", {}))})

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        return cls.from_dict(json.loads(text))
