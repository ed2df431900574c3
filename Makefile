# The two commands: `make run` (set up, then the CALM search on the default model) and `make test`.
PY := .venv/bin/python
RUN_ARGS ?=

.PHONY: setup run test test-unit test-kernels test-fast bench bench-gpu quality lint clean

setup:
	bash scripts/setup.sh

run: setup
	$(PY) -m calm.run $(RUN_ARGS)

# Lint (ruff, configured in pyproject.toml), unit and end-to-end tests, then the Triton kernels under the
# interpreter in their own process (the variable must be set before the kernel modules are imported).
test: setup lint
	$(PY) -m pytest -q tests --ignore=tests/kernels
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels

test-unit: setup
	$(PY) -m pytest -q tests --ignore=tests/kernels -m "not slow"

test-kernels: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels

lint: setup
	$(PY) -m ruff check calm calm_kernels tests bench scripts

bench: setup
	$(PY) bench/bench_cka.py --smoke && $(PY) bench/bench_kmeans.py --smoke && \
	$(PY) bench/bench_qgemm.py --smoke && $(PY) bench/bench_rotated.py --smoke && \
	$(PY) -m pytest bench/ --bench-smoke -q --benchmark-columns=median && $(PY) bench/generate.py --smoke

# Every GPU benchmark in one run of at most 8 minutes (kernels through pytest bench/, decode tokens/s), then
# bench/README.md's tables from bench/results/ (scripts/bench_gpu.sh; BENCH_BUDGET=seconds shortens it).
# No setup step: a GPU machine may be offline with its own PyTorch/Triton (then python3 runs it); on a machine
# with the project's venv (make setup, or CALM_EXTRAS=bench bash scripts/setup.sh) that venv runs it.
bench-gpu:
	PY=$$( [ -x $(PY) ] && echo $(PY) || echo python3 ) bash scripts/bench_gpu.sh

quality: setup
	$(PY) bench/quality.py

clean:
	rm -rf .venv outputs .pytest_cache
