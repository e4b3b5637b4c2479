# Two commands for a newcomer: `make run` (install + train the recommended ensemble) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= $(if $(wildcard ../shared/data/chest_xray_224),../shared/data/chest_xray_224,data/chest_xray)

.PHONY: install run test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m xrayfusion.train experiment=kermany_cpu data.root=$(DATA_ROOT)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
