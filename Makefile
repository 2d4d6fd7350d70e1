# Two entry points for a fresh machine with Python >= 3.10 and make:
#   make demo   create .venv, install mbv2train, write the digits dataset, train on it, evaluate
#   make test   create .venv, install mbv2train with its test tools, run the tests
# Both reuse .venv on a second run. Set TORCH_SPEC to install another torch build,
# e.g. make test TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
PIP_FLAGS ?= --disable-pip-version-check
# The demo imports a small part of torch: byte-compiling all its files at install time (about half a
# minute) costs more than compiling what the demo imports. The tests start many processes, so `make test`
# installs compiled.
DEMO_PIP_FLAGS ?= --no-compile

BIN := $(VENV)/bin

.PHONY: demo test clean

DEMO_DATA ?= data/digits
DEMO_RUN ?= runs/demo

demo: $(VENV)/.installed-demo
	$(BIN)/mbv2 data demo $(DEMO_DATA)
	$(BIN)/mbv2 train --config configs/demo.yaml --data $(DEMO_DATA) --output-dir $(DEMO_RUN) --resume auto
	$(BIN)/mbv2 eval --ckpt $(DEMO_RUN)/best.pt

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch and the project in one pip call: one resolver pass over both is faster than two.
$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(PIP_FLAGS) $(DEMO_PIP_FLAGS) $(TORCH_SPEC) -e '.[demo]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(PIP_FLAGS) $(TORCH_SPEC) -e '.[dev,demo]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_RUN)
