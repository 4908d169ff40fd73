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

test: install data
	$(PY) -m pytest -q -n 2
