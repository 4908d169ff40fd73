# Two commands set everything up on a fresh machine:
#   make demo   the main job: a small distillation comparison on Fashion-MNIST (table + plot)
#   make test   the whole test suite (this is what .ci/run runs)
# Each creates the virtual environment and installs what it needs on first use.

VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
FMNIST_STAMP := $(FMNIST_DIR)/train-images-idx3-ubyte.gz

.PHONY: demo test install data

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,hf]'
	touch $@

data: $(FMNIST_STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (needs root or sudo).
$(FMNIST_STAMP):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

demo: install data
	$(VENV)/bin/featkd demo

# The oldest torch featkd supports (pyproject.toml's floor) is tested too, in its own venv: the CPU build on this
# machine's disk, without torchvision (PyPI's torchvision does not import beside it), so the tests of torchvision's
# models skip there and everything else runs. Its other packages are pyproject.toml's, read from there.
OLDEST_TORCH ?= 2.13.0
OLDEST_VENV ?= .venv-oldest

test: install data $(OLDEST_VENV)/.installed
	$(PY) -m pytest -q -n 2
	@echo "--- the same suite on the oldest supported torch ($(OLDEST_TORCH), no torchvision)"
	$(OLDEST_VENV)/bin/python -m pytest -q -n 2

$(OLDEST_VENV)/.installed: pyproject.toml
	python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --quiet torch==$(OLDEST_TORCH) $$(python3 -c "import tomllib; p = \
	  tomllib.load(open('pyproject.toml', 'rb'))['project']; print(' '.join(d for d in p['dependencies'] + \
	  p['optional-dependencies']['dev'] if not d.startswith(('torch', 'timm'))))")
	$(OLDEST_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@
