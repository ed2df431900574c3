"""The kernel benchmark harness (`pytest bench/`, bench/_harness.py, bench/_timing.py) in smoke mode on the CPU,
so that it cannot rot while no GPU runs it: every kernel's script is driven through the harness, both timing
modes come out in the record contract, failures and the time guard are recorded instead of stopping the run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _harness as H  # noqa: E402

CONTRACT = {"kernel", "provider", "shape", "dtype", "bits", "median_us", "roofline_us", "device", "torch", "triton",
            "commit", "timing"}
# One small group per kernel and a few providers of each (calm beside a peer, both timing modes): about 8 s of CPU.
GROUPS = "qgemm-48x384|rotated-W4A4-64x576-M1|cka-n96-d40|kmeans-64x24-b2"
SELECT = ("(qgemm and M1- and (u3 or cb3.12+or or cublas or tinygemm)) or "
          "(rotated and (calm-W4A4 or cublas or int-mm:gemm)) or cka or kmeans")


def _pytest_bench(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env_args = [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(env_args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_smoke_run_writes_every_kernel_in_both_timing_modes(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = _pytest_bench("--bench-smoke", "--bench-out", str(out), "--bench-groups", GROUPS,
                         "-k", SELECT, "--benchmark-json", str(tmp_path / "pb.json"),
                         "--benchmark-columns=median")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ours/peer" in proc.stdout and "calm kernel benchmarks" in proc.stdout
    for kernel in H.KERNELS:
        files = list(out.glob(f"{kernel}-cpu-smoke-*.json"))
        assert len(files) == 1, (kernel, list(out.iterdir()))
        records = json.loads(files[0].read_text())
        timed = [r for r in records if r.get("median_us") is not None]
        assert timed, kernel
        for r in timed:
            assert CONTRACT <= set(r), (kernel, sorted(CONTRACT - set(r)))
            assert r["kernel"] == kernel and r["timing"] in ("cuda-graph", "eager")
            assert r["roofline_us"] > 0
        calm_modes = {r["timing"] for r in timed if r["provider"] == "calm"}
        assert calm_modes == {"cuda-graph", "eager"}, kernel
        assert not [r for r in records if r.get("error")], [r["error"] for r in records if r.get("error")]
    graph = [r for r in json.loads(next(out.glob("qgemm-*.json")).read_text()) if r["timing"] == "cuda-graph"]
    assert all(r["shape"]["M"] == 1 and r["launches_per_graph"] >= 1 and "flush_us" in r for r in graph)
    pb = json.loads((tmp_path / "pb.json").read_text())
    medians = [b["extra_info"]["median_us"] for b in pb["benchmarks"]]
    assert medians and all(m is not None and m > 0 for m in medians)
    # pytest-benchmark's own statistics are the harness's clock: the record's median is theirs, in microseconds
    b = pb["benchmarks"][0]
    assert b["stats"]["median"] * 1e6 == pytest.approx(b["extra_info"]["median_us"])


def test_without_cuda_the_gpu_run_exits_2_with_one_line() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    proc = _pytest_bench("--co")
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stdout + proc.stderr


class _Benchmark:
    """Never reached: the failing and budget cases stop before timing."""


def _session(tmp_path: Path, budget: float | None = None) -> H.Session:
    s = H.Session(smoke=True, kernels=("qgemm",), out_dir=tmp_path, budget_s=budget)
    s.device_label = "cpu-smoke-test"
    s.meta = {"device": s.device_label}
    return s


def test_a_failing_case_is_recorded_and_the_next_one_runs(tmp_path: Path) -> None:
    session = _session(tmp_path)

    def broken():
        raise RuntimeError("kernel refused this shape\nsecond line")
    entry = H.Entry(calls=[broken], slow_rounds=None, pending=1)
    case = H.Case("qgemm-x-calm-eager", "qgemm", "x", "eager", {"kernel": "qgemm", "provider": "calm"}, entry)
    rec = session.run(case, _Benchmark())
    assert rec["median_us"] is None and rec["error"] == "RuntimeError: kernel refused this shape"
    assert entry.calls is None  # the group's tensors are released after its last case
    written = json.loads((tmp_path / "qgemm-cpu-smoke-test.json").read_text())
    assert written[0]["error"] == rec["error"]
    sticky = H.Case("c2", "qgemm", "x", "eager", {}, H.Entry(calls=[lambda: (_ for _ in ()).throw(
        RuntimeError("CUDA error: an illegal memory access was encountered"))], slow_rounds=None, pending=1))
    session.run(sticky, _Benchmark())
    after = session.run(H.Case("c3", "qgemm", "x", "eager", {}, H.Entry(calls=[lambda: None], slow_rounds=None,
                                                                          pending=1)), _Benchmark())
    assert "CUDA context failed earlier" in after["error"]


def test_the_time_guard_records_cases_as_not_run(tmp_path: Path) -> None:
    session = _session(tmp_path, budget=0.0)
    entry = H.Entry(calls=[lambda: None], slow_rounds=None, pending=1)
    rec = session.run(H.Case("c", "qgemm", "x", "cuda-graph", {"provider": "calm"}, entry), _Benchmark())
    assert rec["error"].startswith("CaseNotRun: not run: time budget")


def test_recording_timer_maps_sentinels_back_to_calls() -> None:
    timer = H.RecordingTimer()
    first, second = timer(lambda: 1), timer([lambda: 2, lambda: 3], reps=3)
    assert timer.entry_for(first).slow_rounds is None and len(timer.entry_for(second).calls) == 2
    assert timer.entry_for(12.5) is None and timer.entry_for(-7.0) is None


def test_tables_render_ours_over_peer_from_harness_records(tmp_path: Path) -> None:
    from bench import bench_tables

    def rec(provider, case, timing, us, bits=4):
        return {"kernel": "qgemm", "provider": provider, "case": case, "bits": bits, "group": "64x256",
                "shape": {"N": 64, "K": 256, "M": 1}, "timing": timing, "median_us": us, "roofline_us": 2.0,
                "device": "Test GPU", "torch": "t", "triton": "x", "commit": "c"}
    records = [rec("calm", "u4", "cuda-graph", 4.0), rec("calm", "u4", "eager", 9.0),
               rec("calm", "u3", "cuda-graph", 3.0, 3), rec("cublas-bf16", "bf16", "cuda-graph", 8.0, 16),
               rec("tinygemm-int4", "u4", "cuda-graph", 5.0),
               {**rec("calm", "u2", "cuda-graph", None, 2), "error": "RuntimeError: refused"}]
    (tmp_path / "qgemm-test-gpu.json").write_text(json.dumps(records))
    (tmp_path / "qgemm-cpu-smoke-x.json").write_text(json.dumps([{**r, "device": "cpu-smoke-x"} for r in records]))
    table = bench_tables.render("qgemm", tmp_path)
    assert table.count("Test GPU") == 1 and "cpu-smoke" not in table
    u4 = next(line for line in table.splitlines() if "| u4 |" in line)
    assert "| 4.00 | 9.00 | 2.00 | 2.00 |" in u4 and "cublas-bf16 0.50" in u4 and "tinygemm-int4 0.80" in u4
    u3 = next(line for line in table.splitlines() if "| u3 |" in line)
    assert "cublas-bf16 0.38" in u3 and "tinygemm" not in u3  # tinygemm is u4's peer only
    assert "1 records carry an error" in table
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- bench:qgemm -->\nold\n<!-- /bench:qgemm -->\n<!-- bench:generate -->\n"
                      "<!-- /bench:generate -->\n")
    assert bench_tables.main(["--readme", str(readme), "--results", str(tmp_path), "--check"]) == 1
    assert bench_tables.main(["--readme", str(readme), "--results", str(tmp_path)]) == 0
    assert bench_tables.main(["--readme", str(readme), "--results", str(tmp_path), "--check"]) == 0
    assert "cublas-bf16 0.50" in readme.read_text() and "No GPU results yet" in readme.read_text()


def test_bench_readme_tables_are_current() -> None:
    from bench import bench_tables

    assert bench_tables.main(["--check"]) == 0, "run python bench/bench_tables.py"


def test_generate_smoke_decodes_the_same_tokens_every_way(tmp_path: Path, capsys) -> None:
    from bench import generate

    out = tmp_path / "generate.json"
    args = ["--smoke", "--models", "default", "llama7b", "--variants", "bf16", "w4", "--prompt-tokens", "6",
            "--new-tokens", "4", "--eager-tokens", "4", "--out", str(out)]
    assert generate.main(args) == 0
    records = json.loads(out.read_text())
    assert not [r for r in records if r.get("error")], records
    assert {(r["provider"], r["timing"]) for r in records if r["model"] == "tiny-default"} == {
        ("bf16", "eager"), ("bf16", "cuda-graph"), ("bf16:generate()", "eager"),
        ("calm-w4", "eager"), ("calm-w4", "cuda-graph"), ("calm-w4:generate()", "eager")}
    for r in records:
        assert CONTRACT <= set(r) and r["tokens_per_s"] > 0 and r["roofline_us"] > 0
        if r["timing"] == "cuda-graph":
            assert r["matches_eager_tokens"] is True
        if r["provider"].endswith(":generate()"):
            assert r["leading_match_generate"] == 4  # the static-cache step decodes what generate() decodes
    w4 = next(r for r in records if r["provider"] == "calm-w4")
    assert 4 < w4["effective_bits"] < 5 and w4["bits"] == 4
    assert all(r.get("scaled_from_layers") == 1 for r in records if r["model"] == "tiny-llama7b")


def test_generate_without_cuda_exits_2(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    from bench import generate

    assert generate.main([]) == 2
    assert capsys.readouterr().out.count("\n") == 1


def test_peers_are_compared_with_the_matching_calm_record() -> None:
    from bench.bench_tables import counterparts

    rows = [{"provider": "calm", "case": "u4", "median_us": 1.0}, {"provider": "calm", "case": "u3", "median_us": 1.0},
            {"provider": "calm:gemm", "median_us": 1.0}, {"provider": "calm:transform+quantize", "median_us": 1.0}]

    def names(peer):
        return [(o["provider"], o.get("case")) for o in counterparts(peer, rows)]
    assert names({"provider": "torch-int-mm:gemm"}) == [("calm:gemm", None)]
    assert names({"provider": "torch-int-mm:hadamard+quantize"}) == [("calm:transform+quantize", None)]
    assert names({"provider": "tinygemm-int4", "case": "u4"}) == [("calm", "u4")]
    assert names({"provider": "cublas-bf16", "case": "bf16"}) == [("calm", "u4"), ("calm", "u3")]
