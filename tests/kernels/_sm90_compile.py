"""No-GPU sm90 compile check shared by the rotated and CKA kernel tests: each kernel module lists its launch
signatures and autotune configs in `compile_specs(full)`; this compiles them for GPUTarget("cuda", 90, 32)."""
from __future__ import annotations

_COMPILE_DRIVER = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
import importlib
sys.path.insert(0, sys.argv[3])
from qgemm_sm90 import ptxas_usage
mod = importlib.import_module(sys.argv[1])
for label, fn, sig, consts, opts in mod.compile_specs(sys.argv[2] == "full"):
    c = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options=opts)
    regs, spills = ptxas_usage(c.asm["ptx"], 90)
    print(json.dumps({"label": label, "shared": c.metadata.shared, "registers": regs, "spill_bytes": spills}),
          flush=True)
"""
SM90_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one CTA may use on an H100/H200


def compile_for_sm90(module: str, full: bool) -> list[dict]:
    """Compile `module.compile_specs(full)` for sm90 in a fresh process without TRITON_INTERPRET (under the
    interpreter @triton.jit functions cannot be compiled); returns one record per kernel config: its label,
    shared memory, and registers and spill bytes by the wheel's ptxas (None when no ptxas reads the PTX)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _COMPILE_DRIVER, module, "full" if full else "small",
                          str(Path(__file__).resolve().parent)],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
