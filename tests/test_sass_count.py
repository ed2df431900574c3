"""bench/sass_count.py: the hot-loop parser on known SASS, one real count (a compile, no GPU), and the table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FFMA R2, R3, R4, R2 ;
        /*0020*/                   ISETP.GE.AND P0, PT, R5, 0x8, PT ;
        /*0030*/              @!P0 BRA `(.L_x_0) ;
        /*0040*/                   BRA `(.L_x_2) ;
.L_x_1:
        /*0050*/                   SHF.R.U32.HI R6, RZ, 0x4, R7 ;
        /*0060*/                   LOP3.LUT R6, R6, 0xf, RZ, 0xc0, !PT ;
        /*0070*/                   FFMA R2, R6, R4, R2 ;
        /*0080*/                   FFMA R8, R6, R4, R8 ;
        /*0090*/               @P1 BRA `(.L_x_1) ;
.L_x_2:
        /*00a0*/                   EXIT ;
"""


def test_hot_loop_is_the_largest_backward_branch_body():
    sys.path.insert(0, str(ROOT / "bench"))
    from sass_count import hot_loop

    body = hot_loop(SASS)
    assert body == {"SHF": 1, "LOP3": 1, "FFMA": 2, "BRA": 1}  # not the 3-instruction loop, not the forward BRA


@pytest.mark.slow
def test_counts_a_real_kernel_and_the_table_shows_it(tmp_path: Path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, json; sys.path.insert(0, 'bench'); import sass_count as S; "
            "S.CASES = S.CASES[:1]; print(json.dumps(S.count(90, every_config=False)))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (record,) = json.loads(run.stdout.splitlines()[-1])
    # The uniform 4-bit GEMV: at least the two FMAs per weight (dequantize, multiply-add) and a code extraction
    assert record["opcodes"]["FFMA"] * record["num_warps"] * 32 >= 2 * record["weights_per_iteration"]
    assert 3 < record["thread_instructions_per_weight"] < 40

    from bench import bench_tables

    (tmp_path / "sass-sm90.json").write_text(json.dumps([record]))
    table = bench_tables.render("sass", tmp_path)
    assert f"{record['thread_instructions_per_weight']:.2f}" in table and "sm90" in table
