#!/usr/bin/env bash
# `make bench-gpu`: every GPU benchmark in one run that fits in 8 minutes on an H100/H200.
#
# 1. The four kernels through the pytest-benchmark harness (pytest bench/), one process per kernel so a broken
#    CUDA context costs only that kernel; each has its own time slice (--bench-budget) and a hard `timeout`.
#    Records go to bench/results/<kernel>-<device>.json after every case, so a killed process keeps its figures;
#    pytest-benchmark's own JSON goes to bench/results/pytest-benchmark/<kernel>-<device>.json.
# 2. bench/generate.py: decode tokens/s of the default and the 7B-shaped model, bf16 against calm W4/W3/hybrid.
# 3. bench/bench_tables.py rewrites the tables in bench/README.md from bench/results/.
# A failing case is recorded and skipped; a failing step is reported and the next one runs. The whole script
# stops starting new work after BENCH_BUDGET seconds (default 450) and exits 0 when it finished its steps.
#
#   bash scripts/bench_gpu.sh                     # after `CALM_EXTRAS=bench make setup` (kernel peers, pytest-benchmark)
#   BENCH_BUDGET=240 bash scripts/bench_gpu.sh    # a shorter run (every slice shrinks in proportion)
#   BENCH_SMOKE=1 BENCH_BUDGET=200 bash scripts/bench_gpu.sh   # the script itself on the CPU (smoke cases, results
#                                                              # in a temp folder, README untouched)
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUDGET=${BENCH_BUDGET:-450}
OUT=bench/results
START=$(date +%s)
SMOKE=()
GEN_SMOKE=()
if [[ "${BENCH_SMOKE:-0}" == 1 ]]; then
    OUT=${TMPDIR:-/tmp}/calm-bench-gpu-smoke
    SMOKE=(--bench-smoke --bench-out "$OUT")
    GEN_SMOKE=(--smoke --new-tokens 8 --eager-tokens 8 --prompt-tokens 8 --out "$OUT/generate-smoke.json")
    echo "bench_gpu: smoke run on the CPU into $OUT (timings mean nothing)"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench_gpu: no CUDA device visible to $PY; the GPU benchmarks need one (make bench runs the CPU smoke checks)"
    exit 2
fi
if ! "$PY" -c "import pytest_benchmark, triton" 2>/dev/null; then
    echo "bench_gpu: pytest-benchmark or triton missing; CALM_EXTRAS=bench make setup installs the bench extra"
    exit 2
fi
SLUG=$("$PY" -c "import sys; sys.path.insert(0, '.'); from bench._common import device_name, device_slug; print(device_slug(device_name(${#SMOKE[@]} > 0)))")
mkdir -p "$OUT/pytest-benchmark"
(( ${#SMOKE[@]} )) || "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'bench_gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}; budget ${BUDGET} s')"

elapsed() { echo $(( $(date +%s) - START )); }
# slice SHARE RESERVE (percent of the budget): the step's share, cut to what is left after the reserve kept for
# the steps after it
slice() {
    local want=$(( BUDGET * $1 / 100 )) left=$(( BUDGET - $(elapsed) - BUDGET * $2 / 100 ))
    (( left < want )) && want=$left
    echo $want
}
FAILED=()

run_kernel() {  # kernel share reserve first-regex
    local kernel=$1 t
    t=$(slice "$2" "$3")
    if (( t < 20 )); then echo "bench_gpu: $kernel skipped, $(elapsed) s of $BUDGET s spent"; FAILED+=("$kernel:budget"); return; fi
    echo "== $kernel: up to $t s ($(elapsed) s elapsed)"
    timeout -k 10 $(( t + 45 )) "$PY" -m pytest bench/test_bench_kernels.py -q -p no:cacheprovider \
        --bench-kernels "$kernel" --bench-budget "$t" --bench-first "$4" \
        --benchmark-json "$OUT/pytest-benchmark/$kernel-$SLUG.json" --benchmark-columns=median,rounds \
        --benchmark-sort=name -o addopts="" -rN ${SMOKE[@]+"${SMOKE[@]}"}
    local rc=$?
    (( rc != 0 )) && { echo "bench_gpu: $kernel exited with status $rc (its records so far are in $OUT)"; FAILED+=("$kernel:$rc"); }
    return 0
}

# Share of the budget and reserve for the later steps (percent), goal groups first.
run_kernel qgemm   24 60 '8192x8192'
run_kernel rotated 17 45 'M1$|M2048$'
run_kernel cka     10 35 'n262144-d4096'
run_kernel kmeans  12 25 '4096x4096-b4'

t=$(slice 30 2)
if (( t >= 30 )); then
    echo "== generate: up to $t s ($(elapsed) s elapsed)"
    timeout -k 10 $(( t + 60 )) "$PY" bench/generate.py --budget "$(( t * 7 / 10 ))" ${GEN_SMOKE[@]+"${GEN_SMOKE[@]}"} || {
        rc=$?; echo "bench_gpu: generate exited with status $rc"; FAILED+=("generate:$rc"); }
else
    echo "bench_gpu: generate skipped, $(elapsed) s of $BUDGET s spent"; FAILED+=("generate:budget")
fi

(( ${#SMOKE[@]} )) || "$PY" bench/bench_tables.py || FAILED+=("tables:$?")
echo "bench_gpu: done in $(elapsed) s; results in $OUT/*-$SLUG.json$( (( ${#SMOKE[@]} )) || echo ', tables in bench/README.md')"
(( ${#FAILED[@]} )) && echo "bench_gpu: steps with problems: ${FAILED[*]}"
exit 0
