"""Compile every Triton kernel of calm_kernels for a GPU architecture on a machine without a GPU, and read each
cubin's registers, stack (spilled registers) and shared memory.

    python -m calm_kernels.compile_check [--arch 90 100] [--full] [--module qgemm rotated ...] [--jsonl]

Why: the interpreter (TRITON_INTERPRET=1, where the kernel tests run) executes kernels as NumPy and accepts code
the GPU compiler refuses (type merges across a dynamic `if`, shared memory beyond the device) or compiles into
register spills. `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the whole pipeline down
to the cubin with the ptxas shipped in the triton wheel; the wheel's cuobjdump then reports the cubin's
resources. It must run without TRITON_INTERPRET (under it `@triton.jit` makes interpreter objects with no
compile path, and the config lists hold the interpreter's one config), so tests/kernels/test_compile.py runs
this module in a child process.

Each kernel module `calm_kernels/_<name>_triton.py` lists its launch variants in `compile_specs(full)`:
without `full`, one representative config per kernel and path (the likeliest to exceed shared memory or to
spill); with `full`, every autotune config. A config that is known to spill and kept for the GPU tuning to weigh
says why in `CompileSpec.may_spill`; any other spill above MINOR_SPILL_BYTES fails the check. Every
`@triton.jit` function named `*_kernel` must appear in its module's specs (`uncovered_kernels`).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHS = (90, 100)  # H100/H200 and B200: the GPUs the kernels are written for
SHARED_LIMIT = 227 * 1024  # the most shared memory one CTA may use on sm90 and sm100
# ptxas's allocator, at the 128- or 255-register cap of a config, leaves a word or a few on the stack in some
# configs and not in their neighbours, differently on sm90 and sm100: reported, not failed. Above this, a spill
# fails unless its spec says why.
MINOR_SPILL_BYTES = 32
MODULES = ("_cka_triton", "_kmeans_triton", "_qgemm_triton", "_rotated_triton")


@dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration to compile. `signature` gives the Triton type of each pointer and float
    argument ("*bf16", "*i32", "fp32", ...); other non-constexpr arguments are "i32". `constexprs` holds the
    value of every constexpr argument (the launcher's and the autotune config's)."""
    label: str
    kernel: Any  # a @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    may_spill: str = ""  # why this config may spill registers; empty: it must not


def spec(label: str, kernel, signature: dict[str, str], constexprs: dict[str, Any], config,
         may_spill: str = "") -> CompileSpec:
    """A CompileSpec from a triton.Config (its kwargs join the constexprs, its warps and stages the options)."""
    return CompileSpec(f"{label} {config.kwargs} w{config.num_warps} s{config.num_stages}", kernel, signature,
                       {**constexprs, **config.kwargs}, config.num_warps, config.num_stages, may_spill)


def _full_signature(s: CompileSpec) -> dict[str, str]:
    out = {}
    for p in s.kernel.params:
        if p.is_constexpr:
            if p.name not in s.constexprs:
                raise KeyError(f"{s.label}: constexpr argument {p.name} has no value")
            out[p.name] = "constexpr"
        elif p.name in s.signature:
            out[p.name] = s.signature[p.name]
        elif p.name.endswith("_ptr"):
            raise KeyError(f"{s.label}: pointer argument {p.name} has no type in the signature")
        else:
            out[p.name] = "i32"
    return out


def nvidia_tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK (bytes of per-thread stack frame: > 0 means spilled registers) of a cubin, by cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(nvidia_tool("cuobjdump")), "-res-usage", str(path)], capture_output=True,
                              text=True, check=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}
    if "reg" not in usage:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text[-300:]}")
    return usage


def compile_spec(s: CompileSpec, arch: int):
    """triton.compile of one spec for cuda:`arch`, no GPU needed (the result's .asm holds ptx and cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(s.kernel, _full_signature(s), dict(s.constexprs)),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": s.num_warps, "num_stages": s.num_stages})


def compile_one(s: CompileSpec, arch: int) -> dict:
    """Compile one spec for cuda:`arch`; a record with ok, registers, stack_bytes, shared_bytes (or error)."""
    record = {"kernel": s.kernel.__name__, "label": s.label, "arch": arch, "may_spill": s.may_spill}
    t0 = time.perf_counter()
    try:
        compiled = compile_spec(s, arch)
        usage = resource_usage(compiled.asm["cubin"])
        record.update(ok=True, registers=usage["reg"], stack_bytes=usage.get("stack", 0) + usage.get("local", 0),
                      shared_bytes=int(compiled.metadata.shared))
    except Exception as exc:  # noqa: BLE001 - every failure is a result to report
        record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-1500:]}")
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def module_specs(module: str, full: bool) -> list[CompileSpec]:
    return importlib.import_module(f"calm_kernels.{module}").compile_specs(full)


def uncovered_kernels() -> list[str]:
    """`module.function` of every @triton.jit `*_kernel` in calm_kernels/_*_triton.py that no spec compiles."""
    from triton.runtime.jit import JITFunction

    found = []
    for path in sorted((Path(__file__).parent).glob("_*_triton.py")):
        if path.stem not in MODULES:
            found.append(f"{path.stem} (not in compile_check.MODULES)")
            continue
        covered = {s.kernel.__name__ for s in module_specs(path.stem, full=True)}
        module = importlib.import_module(f"calm_kernels.{path.stem}")
        found += [f"{path.stem}.{name}" for name, obj in vars(module).items()
                  if isinstance(obj, JITFunction) and name.endswith("_kernel") and name not in covered]
    return found


def problems(records: list[dict]) -> list[str]:
    """One line per failed compile, unexplained spill, or config over the shared-memory limit."""
    out = []
    for r in records:
        where = f"{r['kernel']} sm{r['arch']} {r['label']}"
        if not r["ok"]:
            out.append(f"{where}: {r['error']}")
            continue
        if r["stack_bytes"] > MINOR_SPILL_BYTES and not r["may_spill"]:
            out.append(f"{where}: spills ({r['stack_bytes']} stack bytes, {r['registers']} registers)")
        if r["shared_bytes"] > SHARED_LIMIT:
            out.append(f"{where}: {r['shared_bytes']} bytes of shared memory, over {SHARED_LIMIT}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities, e.g. 90 100")
    ap.add_argument("--module", nargs="+", default=list(MODULES),
                    help=f"kernel modules, with or without the _..._triton wrapping: {', '.join(MODULES)}")
    ap.add_argument("--full", action="store_true", help="every autotune config (minutes to tens of minutes)")
    ap.add_argument("--jsonl", action="store_true", help="one JSON record per line (for tests and scripts)")
    ap.add_argument("--coverage", action="store_true", help="also list kernels without a spec (fails if any)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels have no compile path)", file=sys.stderr)
        return 2
    modules = [m if m.startswith("_") else f"_{m}_triton" for m in args.module]
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        print(f"compile_check: unknown module(s) {unknown}; choose from {list(MODULES)}", file=sys.stderr)
        return 2
    failed = False
    if args.coverage:
        missing = uncovered_kernels()
        failed = bool(missing)
        if args.jsonl:
            print(json.dumps({"uncovered": missing}), flush=True)
        elif missing:
            print(f"kernels without a compile spec: {missing}")
    for module in modules:
        try:
            specs = module_specs(module, args.full)
        except Exception as exc:  # noqa: BLE001 - a module whose specs fail is a reported failure
            specs, failed = [], True
            record = {"kernel": module, "label": "compile_specs", "arch": 0, "may_spill": "", "ok": False,
                      "error": f"{type(exc).__name__}: {exc}", "seconds": 0.0}
            print(json.dumps(record) if args.jsonl else problems([record])[0], flush=True)
        for s in specs:
            for arch in args.arch:
                record = compile_one(s, arch)
                record["module"] = module
                bad = problems([record])
                failed |= bool(bad)
                if args.jsonl:
                    print(json.dumps(record), flush=True)
                elif record["ok"]:
                    note = ("" if not record["stack_bytes"] else f"  (allowed: {s.may_spill})" if s.may_spill
                            else "  (minor)")
                    print(f"sm{arch} {s.label}: {record['registers']} registers, {record['stack_bytes']} stack "
                          f"bytes, {record['shared_bytes']} shared bytes, {record['seconds']} s"
                          f"{' FAIL' if bad else ''}{note}", flush=True)
                else:
                    print(bad[0], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
