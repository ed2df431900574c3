"""Compile the dequant-GEMM kernels (calm_kernels/_qgemm_triton.py) for sm90 without a GPU, and read their
register use and spills with the wheel's ptxas.

Run by tests/kernels/test_qgemm.py in a child process without TRITON_INTERPRET (under the interpreter the
kernels are not compilable objects):

    python tests/kernels/qgemm_sm90.py [--all] [--arch 90]

Prints one JSON line per compiled variant: {name, config, registers, spill_bytes} (registers and spills are
null when no ptxas that reads the generated PTX is found). `--all` compiles every autotune config of every
path (minutes on two cores); the default is one representative variant per path and format
(the variants a test can afford).

Entry points for a general compile check: `variants(every_config)` -> [(name, kernel, signature, constexprs,
options)], and `compile_variant(kernel, signature, constexprs, options, arch)`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

_INT_ARGS = ["M", "N", "K", "M_BUCKET", "TUNE_BITS", "stride_xm", "stride_wn", "stride_sn", "stride_ym"]
_SLAB_ARGS = [f"{p}{i}" for i in range(5) for p in ("C", "CS", "WS", "CB")]


def qgemm_signature(x_dtype: str, mode: int) -> dict[str, str]:
    """Pointer and integer arguments of `_qgemm_kernel` (x_dtype: fp16 / bf16 / fp32; mode 0 uniform, 1 codebook)."""
    sig = {"x_ptr": f"*{x_dtype}", "w_ptr": "*i32", "meta0_ptr": "*fp16" if mode == 0 else "*fp32",
           "meta1_ptr": "*u8" if mode == 0 else "*fp32", "bias_ptr": f"*{x_dtype}", "rowptr_ptr": "*i32",
           "ocol_ptr": "*i32", "odelta_ptr": "*fp32", "y_ptr": f"*{x_dtype}", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    sig.update({n: "i32" for n in _INT_ARGS + _SLAB_ARGS})
    return sig


def dequant_signature(out_dtype: str, mode: int) -> dict[str, str]:
    sig = {"w_ptr": "*i32", "meta0_ptr": "*fp16" if mode == 0 else "*fp32",
           "meta1_ptr": "*u8" if mode == 0 else "*fp32", "out_ptr": f"*{out_dtype}"}
    sig.update({n: "i32" for n in ["N", "K", "stride_wn", "stride_sn"] + _SLAB_ARGS})
    return sig


def _widths(bits: tuple[int, ...]) -> dict[str, int]:
    return {f"B{i}": (bits[i] if i < len(bits) else 0) for i in range(5)}


def variants(every_config: bool = False):
    """(name, kernel, signature, constexprs, options) of the variants to compile."""
    from calm_kernels import _qgemm_triton as T

    def qg(name, path, cfg, bits, mode, x_dtype, group=128, outliers=False, bias=True):
        kw = dict(cfg.kwargs)
        kw.setdefault("BLOCK_M", {"gemv": 1, "small": 16}.get(path, kw.get("BLOCK_M")))
        const = dict(_widths(bits), MODE=mode, GROUP=group if mode == 0 else 1, HAS_BIAS=bias,
                     HAS_OUTLIERS=outliers, GEMV=path == "gemv",
                     DOT_PRECISION="ieee" if x_dtype == "fp32" else "tf32", **kw)
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        return (name, T._qgemm_kernel, qgemm_signature(x_dtype, mode), const, opts)

    gemv, small, prefill = T.gemv_configs(), T.small_m_configs(), T.prefill_configs()

    def first(configs, split_k):
        return next(c for c in configs if c.kwargs["SPLIT_K"] == split_k)

    out = [
        qg("gemv u3 bf16 group 64 split-K 2", "gemv", first(gemv, 2), (3,), 0, "bf16", group=64),
        qg("gemv codebook 1/2/3/4/8 + outliers bf16", "gemv", gemv[0], (1, 2, 3, 4, 8), 1, "bf16", outliers=True),
        qg("small u4 bf16 split-K 4", "small", first(small, 4), (4,), 0, "bf16"),
        qg("prefill u3 bf16", "prefill", prefill[0], (3,), 0, "bf16"),
        qg("prefill codebook 3/4 + outliers bf16", "prefill", T._prune_prefill(prefill, {}, MODE=1)[0], (3, 4), 1,
           "bf16", outliers=True),
    ]
    if every_config:
        out += [qg("gemv u4 fp16", "gemv", gemv[0], (4,), 0, "fp16", bias=False),
                qg("gemv u4 bf16 group 100 (scales per element)", "gemv", gemv[0], (4,), 0, "bf16", group=100),
                qg("gemv u8 bf16 group 96 (scales per word)", "gemv", gemv[0], (8,), 0, "bf16", group=96),
                qg("small codebook 3/4 fp16", "small", small[0], (3, 4), 1, "fp16")]
        for path, configs in (("gemv", gemv), ("small", small), ("prefill", prefill)):
            # the configs the autotuner may run for codebooks (prefill prunes the ones that spill)
            codebook = T._prune_prefill(configs, {}, MODE=1) if path == "prefill" else configs
            for i, cfg in enumerate(configs):
                for bits in (3, 4):
                    out.append(qg(f"{path}[{i}] u{bits} bf16", path, cfg, (bits,), 0, "bf16"))
                if cfg in codebook:
                    out.append(qg(f"{path}[{i}] codebook 3/4 + outliers bf16", path, cfg, (3, 4), 1, "bf16",
                                  outliers=True))
    gemv4 = dict(gemv[0].kwargs)
    out.append(("gemv M=4 u2 bf16", T._qgemm_kernel, qgemm_signature("bf16", 0),
                dict(_widths((2,)), MODE=0, GROUP=128, HAS_BIAS=True, HAS_OUTLIERS=False, GEMV=True,
                     DOT_PRECISION="tf32", **{**gemv4, "BLOCK_M": 4, "BLOCK_K": 64}),
                {"num_warps": gemv[0].num_warps, "num_stages": gemv[0].num_stages}))
    dq = T.DEQUANT_CONFIG
    for bits, mode in (((3,), 0), ((2, 3, 4), 1)) + ((((4,), 0), ((8,), 0)) if every_config else ()):
        out.append((f"dequant {'u' if mode == 0 else 'codebook '}{'/'.join(map(str, bits))} bf16", T._dequant_kernel,
                    dequant_signature("bf16", mode),
                    dict(_widths(bits), MODE=mode, GROUP=128 if mode == 0 else 1, BLOCK_N=dq["BLOCK_N"],
                         BLOCK_K=dq["BLOCK_K"]), {"num_warps": dq["num_warps"]}))
    return out


def _ptxas():
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):  # the first that reads the PTX version this triton emits
        if (bin_dir / name).exists():
            yield bin_dir / name


def ptxas_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spill store + load bytes) of the kernel in `ptx`, or (None, None) if no ptxas reads it."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        for exe in _ptxas():
            run = subprocess.run([str(exe), "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", str(Path(tmp) / "k.o")],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                text = run.stdout + run.stderr
                regs = re.search(r"Used (\d+) registers", text)
                spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
                return (int(regs.group(1)) if regs else None, sum(int(s) for s in spills))
    return None, None


def compile_variant(kernel, signature: dict[str, str], constexprs: dict, options: dict, arch: int = 90):
    """triton.compile for cuda:`arch` with no GPU; returns the compiled kernel (its .asm holds ptx and cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    const = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every autotune config of every path")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("qgemm_sm90: unset TRITON_INTERPRET (interpreted kernels do not compile)", file=sys.stderr)
        return 2
    for name, kernel, sig, const, opts in variants(args.all):
        compiled = compile_variant(kernel, sig, const, opts, args.arch)
        regs, spills = ptxas_usage(compiled.asm["ptx"], args.arch)
        cfg = {k: v for k, v in const.items() if k.startswith(("BLOCK", "SPLIT", "GROUP_M"))}
        print(json.dumps({"name": name, "config": {**cfg, **opts}, "registers": regs, "spill_bytes": spills}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
