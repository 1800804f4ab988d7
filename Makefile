# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv lock test-latest demo demo-data test gpu-check gpu-wheels lint format clean

venv: $(STAMP)

# CI installs exactly the versions in $(LOCK) (pip constraints: pip itself, the build tools, every
# package of the cpu/dev/test extras and timm); setup.py keeps ranges for users, and a test fails
# when the two disagree. The build runs without isolation so that its setuptools is the locked one.
# The `cpu` extra names the exact CPU build of torch that lies on the CPU machines' disk, which keeps
# pip from downloading a multi-GB CUDA build. timm comes without its dependencies: no torchvision
# imports beside the CPU torch wheel, and the timm export test (tests/timm_worker.py) runs timm's ViT
# with torchvision stubbed out.
LOCK := requirements-lock.txt

# A fresh venv in folder $(1) with pip and the build tools, the package (editable) with its
# cpu/dev/test extras, and timm without its dependencies; $(2): pip's version choice (the lock's
# constraints, or --upgrade for the newest releases).
define fresh_venv
	rm -rf $(1)
	$(PY) -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) pip setuptools wheel
	$(1)/bin/python -m pip install -q $(2) --no-build-isolation -e '.[cpu,dev,test]'
	$(1)/bin/python -m pip install -q $(2) --no-deps timm
endef

$(STAMP): setup.py pyproject.toml $(LOCK)
	$(call fresh_venv,$(VENV),-c $(LOCK))
	touch $(STAMP)

# Refresh the lock on purpose: the newest releases that setup.py's ranges allow, installed into a
# throwaway venv, then frozen. Review the diff, run `make test`, commit both.
lock:
	$(call fresh_venv,.venv-lock,--upgrade)
	( echo "# What CI installs (make venv: pip install -c $(LOCK)). Made by 'make lock'; refresh on purpose."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -iv '^ijepa[-_]fast' ) > $(LOCK)
	rm -rf .venv-lock

# The newest releases setup.py allows, in their own venv (the lock untouched): what a user installing
# today gets. Run it before `make lock` to see what a refresh would break.
test-latest:
	$(call fresh_venv,.venv-latest,--upgrade)
	IJEPA_UNLOCKED=1 .venv-latest/bin/python -m pytest -q -p no:cacheprovider

FMNIST := /usr/share/datasets/fashion-mnist

# The embedded default data: Debian's dataset-fashion-mnist (real images, offline, IDX files).
demo-data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null); \
	else \
	  echo "Fashion-MNIST is not installed at $(FMNIST) and this is not root with apt."; \
	  echo "Install it (sudo apt-get install dataset-fashion-mnist), or run the demo on your own data:"; \
	  echo "  $(VPY) -m ijepa_fast.cli.demo --data DIR   (IDX files, or an image folder with --dataset folder)"; \
	  exit 1; \
	fi

demo: $(STAMP) demo-data
	$(VPY) -m ijepa_fast.cli.demo

test: lint
	$(VPY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .venv-lock .venv-latest build *.egg-info

# The check of a lent GPU (profiling/gpu_check.sh), in stages of one device call each: `make gpu-check`
# runs the first (preflight, kernel tests, the ViT-H/14 step against the authors' preset, the phase
# split; cut to a 285 s budget), `make gpu-check STAGE=deepspeed|ablation|kernels|attention|data`
# another (each cut to 225 s). The summary, printed last, merges every stage run on this machine. No venv
# there: python3 from PATH, with the package and the wheels of .whl/ installed offline into a
# throwaway virtualenv over it. Without CUDA a stage runs its CPU-safe parts at tiny sizes.
STAGE ?= first
gpu-check:
	bash profiling/gpu_check.sh $(STAGE)

# The packages a bare GPU machine lacks (DeepSpeed, a wheel built here with no ops, and what it needs:
# the files and why each travels in profiling/gpu_wheels.txt), into the git-ignored .whl/ that travels
# with the working tree; then proves they install for CPython 3.12 on manylinux x86-64 beside the
# machine's packages (profiling/gpu_machine.txt) and fit, with the tree, the 64 MiB one device call
# sends. Needs network.
gpu-wheels: $(STAMP)
	$(VPY) -m profiling.gpu_wheels
