# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel of torch lies on the CPU machines' disk; naming the exact version keeps pip from
# downloading a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: venv demo test test-fast gpu-check lint clean

venv: $(STAMP)

$(STAMP): setup.py requirements-test.txt
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH_PIN)
	$(VPY) -m pip install -q -e '.[dev]' -r requirements-test.txt
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check ijepa_fast kernels tests profiling launch

clean:
	rm -rf $(VENV) build *.egg-info
