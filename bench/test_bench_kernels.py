"""One pytest-benchmark case per (kernel, shape group, provider, timing mode); bench/_harness.py builds them from
the bench_<kernel>.py scripts and bench/_timing.py times them. A case that fails or is refused records its error
in bench/results/<kernel>-<device>.json and is reported as skipped: one bad case never stops the run."""
from __future__ import annotations

import pytest


def test_kernel(bench_case, bench_session, benchmark) -> None:
    benchmark.group = f"{bench_case.kernel} {bench_case.group} {bench_case.mode}"
    benchmark.extra_info.update({k: v for k, v in bench_case.record.items() if k in ("provider", "shape", "bits",
                                                                                      "case", "scheme")})
    rec = bench_session.run(bench_case, benchmark)
    benchmark.extra_info.update(timing=rec["timing"], median_us=rec.get("median_us"),
                                roofline_us=rec.get("roofline_us"))
    if rec.get("error"):
        pytest.skip(f"recorded: {rec['error']}")
