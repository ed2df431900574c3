"""Compile every Triton kernel of calm_kernels for sm90 (H100/H200) and sm100 (B200), with its autotune
configs, on a machine without a GPU; report registers and spills, fail on compile errors and on spills where a
kernel promises none.

The interpreter runs kernels as NumPy and accepts code the GPU compiler refuses (type merges across a dynamic
`if`, shared memory beyond the device, register spills, ...). `triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))` runs the whole pipeline down to a cubin with the ptxas shipped in the triton
wheel, no device needed. It cannot run in this process: under TRITON_INTERPRET=1 `@triton.jit` makes
interpreter objects without a compile path (ASTSource fails on them), and the config lists are the
interpreter's one config. So the tests run this file as a worker in a subprocess without the variable
(`python tests/kernels/test_compile_sm90.py --worker CASES_JSON`, one process for all cases of a test),
which compiles, reads the cubin's resource usage with the wheel's cuobjdump (STACK > 0: the kernel spills),
and prints one JSON line per case.

Fast suite: the first variant of every kernel with its first autotune config, for sm90, and the K-means fit on
sm100 (~40 s cold on two shared cores, seconds once ~/.triton/cache holds the cubins). Slow (~3 min cold):
every variant (first config) on sm90 and sm100, and every config of the kernels that promise no spills on sm90.
CALM_COMPILE_ALL=1: every variant x every config x {sm90, sm100} (~290 configs per arch, ~25 min cold).

How to add a kernel (or follow a changed signature): one `KernelSpec` in TABLE below.
- `kernel`: "module.function" inside calm_kernels (e.g. "_qgemm_triton._qgemm_kernel").
- `types`: the Triton type of each non-constexpr argument that is not an "i32" scalar: every pointer
  ("*fp16", "*bf16", "*fp32", "*fp64", "*i8", "*u8", "*i16", "*i32") and float scalars ("fp32"). Other
  arguments default to "i32"; constexpr arguments are found from the kernel itself.
- `variants`: label -> Variant(constexprs, configs=(config function in the module, *its args), types=...):
  representative dtypes / bit widths. `constexprs` holds the launcher's constexpr values that the autotune
  config does not set; a string "tl.bfloat16" means that triton.language attribute. The config function
  returns the module's autotune list (call it with the launcher's arguments); None means one config given
  by `Variant.config`.
- `no_spills=True` when the kernel's docs promise no register spills (any STACK bytes fail the test).
`test_every_kernel_is_in_the_table` fails when a module grows a `@triton.jit` function named `*_kernel`
that TABLE does not list. A module may instead list its own launch signatures in `compile_specs(full)`
(`_rotated_triton`, `_cka_triton`: compiled by tests/kernels/_sm90_compile.py from their own tests), and the
dequant-GEMM has its own helper (tests/kernels/qgemm_sm90.py, CHECKED_ELSEWHERE).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARCHS = {"sm90": 90, "sm100": 100}
SHARED_LIMIT = 227 * 1024  # usable shared memory per block on sm90 and sm100


@dataclass(frozen=True)
class Variant:
    constexprs: dict
    configs: tuple | None = None  # (config function name in the kernel's module, *args)
    types: dict = field(default_factory=dict)  # overrides of KernelSpec.types
    config: dict | None = None  # when configs is None: {"kwargs": {...}, "num_warps": w, "num_stages": s}


@dataclass(frozen=True)
class KernelSpec:
    kernel: str
    types: dict
    variants: dict
    no_spills: bool = False


_ROTATED_QUANT_TYPES = {"x_ptr": "*fp16", "f_ptr": "*fp16", "f1_ptr": "*fp16", "f2_ptr": "*fp16",
                        "codes_ptr": "*i8", "scales_ptr": "*fp32", "norm": "fp32", "scale_mult": "fp32"}
_W4A4 = {"QMIN": -8, "QMAX": 7}

# Kernels with a compile check of their own (same method: a worker without the interpreter, ptxas spill report),
# kept beside their tests; the coverage test counts them as listed.
CHECKED_ELSEWHERE = {
    "_qgemm_triton._qgemm_kernel": "tests/kernels/qgemm_sm90.py (test_qgemm.py::test_kernels_compile_for_sm90_*)",
    "_qgemm_triton._dequant_kernel": "tests/kernels/qgemm_sm90.py (test_qgemm.py::test_kernels_compile_for_sm90_*)",
}

TABLE: list[KernelSpec] = [
    KernelSpec(
        "_kmeans_triton._kmeans_sorted_kernel",
        {"vs_ptr": "*fp32", "is_ptr": "*fp32", "pm_ptr": "*fp64", "pw_ptr": "*fp64", "pn_ptr": "*i32",
         "cent_ptr": "*fp32"},
        {f"k{k}-{'imp' if imp else 'unit'}": Variant({"K": k, "HAS_IMP": imp}, ("kmeans_configs", k))
         for k, imp in ((16, True), (16, False), (8, True), (4, False), (2, True), (2, False))},
        no_spills=True),
    KernelSpec(
        "_kmeans_triton._assign_kernel",
        {"w_ptr": "*fp16", "cent_ptr": "*fp32", "codes_ptr": "*u8"},
        {"k16-fp16": Variant({"K": 16}, ("assign_configs",)),
         "k8-fp32": Variant({"K": 8}, ("assign_configs",), {"w_ptr": "*fp32"}),
         "k4-bf16": Variant({"K": 4}, ("assign_configs",), {"w_ptr": "*bf16"})}),
]


# ----------------------------------------------------------------------------------------------------------
# Worker (runs without TRITON_INTERPRET, in its own process)
# ----------------------------------------------------------------------------------------------------------

def _spec(kernel: str) -> KernelSpec:
    return next(s for s in TABLE if s.kernel == kernel)


def _resolve(value):
    if isinstance(value, str) and value.startswith("tl."):
        import triton.language as tl

        return getattr(tl, value[3:])
    return value


def _configs(module, variant: Variant) -> list[dict]:
    if variant.configs is None:
        return [variant.config]
    out = []
    for cfg in getattr(module, variant.configs[0])(*variant.configs[1:]):
        out.append({"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return out


def _resource_usage(cubin: bytes, workdir: Path) -> dict:
    """REG / STACK / SHARED of the cubin's kernel from the wheel's cuobjdump (STACK > 0 means spills)."""
    import re

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    if "reg" not in usage:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text[-300:]}")
    return usage


def compile_case(kernel: str, label: str, arch: str, which: str, workdir: Path) -> list[dict]:
    """Compile one variant of one kernel for `arch` with its first config ("first") or all of them ("all")."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = _spec(kernel)
    variant = spec.variants[label]
    try:
        module = importlib.import_module(f"calm_kernels.{kernel.split('.')[0]}")
        fn = getattr(module, kernel.split(".")[1])
        configs = _configs(module, variant)
    except Exception as exc:  # noqa: BLE001 - a module that does not import is a failed case, not a dead worker
        return [{"kernel": kernel, "variant": label, "arch": arch, "config": None, "ok": False, "seconds": 0.0,
                 "error": f"setup: {type(exc).__name__}: {str(exc)[-1500:]}"}]
    if which == "first":
        configs = configs[:1]
    types = {**spec.types, **variant.types}
    results = []
    for cfg in configs:
        constexprs = {k: _resolve(v) for k, v in {**variant.constexprs, **cfg["kwargs"]}.items()}
        signature = {}
        for p in fn.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
            elif p.name in types:
                signature[p.name] = types[p.name]
            elif p.name.endswith("_ptr"):
                raise KeyError(f"{kernel}: pointer argument {p.name} has no type in TABLE")
            else:
                signature[p.name] = "i32"
        missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
        record = {"kernel": kernel, "variant": label, "arch": arch, "config": cfg}
        t0 = time.perf_counter()
        try:
            if missing:
                raise KeyError(f"constexpr arguments without a value in TABLE or the config: {missing}")
            compiled = triton.compile(ASTSource(fn, signature, constexprs),
                                      target=GPUTarget("cuda", ARCHS[arch], 32),
                                      options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
            usage = _resource_usage(compiled.asm["cubin"], workdir)
            record.update(ok=True, reg=usage["reg"], stack=usage.get("stack", 0), local=usage.get("local", 0),
                          shared=int(compiled.metadata.shared))
        except Exception as exc:  # noqa: BLE001 - every failure is a result to report
            record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-1500:]}")
        record["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(record)
    return results


def _worker(cases: list[dict]) -> None:
    import tempfile

    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            if case.get("discover"):
                print(json.dumps({"discovered": _discover()}), flush=True)
                continue
            for record in compile_case(case["kernel"], case["variant"], case["arch"], case["which"], Path(tmp)):
                print(json.dumps(record), flush=True)


def _discover() -> list[str]:
    """Every module-level @triton.jit function named *_kernel in calm_kernels/_*_triton.py, less those its module
    checks itself: a module with `compile_specs(full)` (rotated, CKA; compiled by tests/kernels/_sm90_compile.py
    from their own tests) lists the kernels it covers there."""
    from triton.runtime.jit import JITFunction

    found = []
    for path in sorted((REPO / "calm_kernels").glob("_*_triton.py")):
        module = importlib.import_module(f"calm_kernels.{path.stem}")
        covered = ({spec[1].fn.__name__ for spec in module.compile_specs(True)}
                   if hasattr(module, "compile_specs") else set())
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and name not in covered:
                found.append(f"{path.stem}.{name}")
    return found


# ----------------------------------------------------------------------------------------------------------
# Tests (the kernel-test process, TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------------------

def run_worker(cases: list[dict], timeout: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cases)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"compile worker exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _first_variant(spec: KernelSpec) -> str:
    return next(iter(spec.variants))


FAST_CASES = [{"kernel": s.kernel, "variant": _first_variant(s), "arch": "sm90", "which": "first"} for s in TABLE]
FAST_CASES.append({"kernel": TABLE[0].kernel, "variant": _first_variant(TABLE[0]), "arch": "sm100",
                   "which": "first"})


@pytest.fixture(scope="module")
def fast_results() -> dict:
    pytest.importorskip("triton")
    records = run_worker([{"discover": True}, *FAST_CASES], timeout=900)
    return {"discovered": records[0]["discovered"],
            "cases": {(r["kernel"], r["arch"]): r for r in records[1:]}}


def _check(records: list[dict], spec: KernelSpec, every_config: bool = False) -> None:
    """Compile errors fail; spills fail where the kernel promises none. Shared memory above the device's fails
    only when every config of a variant is over it (with all configs compiled): the autotuner skips a config
    that does not fit (OutOfResources), so one such config wastes a tuning slot but breaks nothing."""
    failures = [r for r in records if not r["ok"]]
    assert not failures, "\n".join(f"{r['kernel']} {r['variant']} {r['arch']} {r['config']}: {r['error']}"
                                   for r in failures)
    for r in records:
        notes = (" SPILLS" if r["stack"] or r["local"] else "") + (" OVER SHARED" if r["shared"] > SHARED_LIMIT
                                                                   else "")
        print(f"{r['kernel']} {r['variant']} {r['arch']} {r['config']}: {r['reg']} registers, {r['stack']} "
              f"stack bytes, {r['shared']} shared bytes, {r['seconds']} s{notes}")
    if every_config:
        by_variant: dict = {}
        for r in records:
            by_variant.setdefault((r["variant"], r["arch"]), []).append(r["shared"] <= SHARED_LIMIT)
        none_fit = [v for v, fits in by_variant.items() if not any(fits)]
        assert not none_fit, f"no config fits {SHARED_LIMIT} bytes of shared memory: {none_fit}"
    if spec.no_spills:
        spilled = [r for r in records if r["stack"] > 0 or r["local"] > 0]
        assert not spilled, (f"{spec.kernel} promises no register spills; these configs spill: "
                             + "; ".join(f"{r['variant']} {r['arch']} {r['config']}: {r['stack']} stack bytes"
                                         for r in spilled))


def test_every_kernel_is_in_the_table(fast_results):
    listed = {s.kernel for s in TABLE} | set(CHECKED_ELSEWHERE)
    missing = sorted(set(fast_results["discovered"]) - listed)
    assert not missing, f"kernels without a compile check: {missing}; add a KernelSpec to TABLE ({__file__})"
    gone = sorted(listed - set(fast_results["discovered"]))
    assert not gone, f"TABLE lists kernels that no longer exist: {gone}"


@pytest.mark.parametrize("case", FAST_CASES, ids=[f"{c['kernel'].split('.')[1]}-{c['arch']}" for c in FAST_CASES])
def test_first_config_compiles(case, fast_results):
    record = fast_results["cases"].get((case["kernel"], case["arch"]))
    assert record is not None, f"the compile worker returned nothing for {case}"
    _check([record], _spec(case["kernel"]))


ALL_VARIANT_CASES = [{"kernel": s.kernel, "variant": v, "arch": arch, "which": "first"}
                     for s in TABLE for v in s.variants for arch in ARCHS]


@pytest.fixture(scope="module")
def variant_results() -> dict:
    pytest.importorskip("triton")
    records = run_worker(ALL_VARIANT_CASES, timeout=3600)
    out: dict = {}
    for r in records:
        out.setdefault((r["kernel"], r["arch"]), []).append(r)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kernel", [s.kernel for s in TABLE], ids=[s.kernel.split(".")[1] for s in TABLE])
def test_every_variant_compiles(kernel, arch, variant_results):
    """Every representative dtype / bit width of every kernel, first config, sm90 and sm100."""
    records = variant_results.get((kernel, arch), [])
    assert len(records) == len(_spec(kernel).variants)
    _check(records, _spec(kernel))


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kernel", [s.kernel for s in TABLE], ids=[s.kernel.split(".")[1] for s in TABLE])
def test_every_config_compiles(kernel, arch):
    """Every variant x every autotune config. About 290 configs per arch: on two shared cores that is ~25 min
    cold (compiles are cached in ~/.triton/cache), so by default it runs only for the kernels that promise no
    spills, on sm90 (~2 min cold for the K-means fit); CALM_COMPILE_ALL=1 runs all of it."""
    pytest.importorskip("triton")
    spec = _spec(kernel)
    if os.environ.get("CALM_COMPILE_ALL") != "1" and not (spec.no_spills and arch == "sm90"):
        pytest.skip("every config of every kernel takes ~25 min on 2 cores: set CALM_COMPILE_ALL=1 to run it")
    records = run_worker([{"kernel": kernel, "variant": v, "arch": arch, "which": "all"} for v in spec.variants],
                         timeout=3600)
    assert records, "the worker compiled nothing"
    _check(records, spec, every_config=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(json.loads(sys.argv[2]))
