# Two entry points for a fresh machine with Python >= 3.10 and make:
#   make demo   create .venv, install mbv2train, write the digits dataset, train on it, evaluate
#   make test   create .venv, install mbv2train with its test tools, run ruff, lint-imports and the tests
# Both reuse .venv on a second run. Set TORCH_SPEC to install another torch build,
# e.g. make test TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# uv (installed into .venv first) unpacks torch's wheels about three times faster than pip; INSTALLER=pip
# uses pip alone. scripts/install_venv.py says more.
INSTALLER ?= auto
# The demo imports a small part of torch: byte-compiling all of it at install time costs more than
# compiling what the demo imports. The tests start many processes, so `make test` installs compiled.
DEMO_COMPILE ?= --no-compile

BIN := $(VENV)/bin

.PHONY: demo test clean

DEMO_DATA ?= data/digits
DEMO_RUN ?= runs/demo

demo: $(VENV)/.installed-demo
	$(BIN)/mbv2 data demo $(DEMO_DATA)
	$(BIN)/mbv2 train --config configs/demo.yaml --data $(DEMO_DATA) --output-dir $(DEMO_RUN) --resume auto
	$(BIN)/mbv2 eval --ckpt $(DEMO_RUN)/best.pt

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

INSTALL := $(BIN)/python scripts/install_venv.py --installer $(INSTALLER) --torch-spec "$(TORCH_SPEC)"

$(VENV)/.installed-demo: pyproject.toml scripts/install_venv.py | $(BIN)/python
	$(INSTALL) --extras demo $(DEMO_COMPILE)
	touch $@

$(VENV)/.installed-dev: pyproject.toml scripts/install_venv.py | $(BIN)/python
	$(INSTALL) --extras dev,demo,report,export,quantize,executorch --compile
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_RUN)
