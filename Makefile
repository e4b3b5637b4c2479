# Two commands for a newcomer: `make run` (install + train the recommended ensemble) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= $(if $(wildcard ../shared/data/chest_xray_224),../shared/data/chest_xray_224,data/chest_xray)
# offline ImageNet weights (efficientnet_lite0*.pth) when present; otherwise null = timm's hub (needs internet)
WEIGHTS_DIR ?= $(if $(wildcard ../shared/weights/efficientnet_lite0*),../shared/weights,null)

.PHONY: install run test lint browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m xrayfusion.train experiment=kermany_cpu data.root=$(DATA_ROOT) model.weights_dir=$(WEIGHTS_DIR)

# Debian's chromium + chromedriver for the MLflow UI browser test (installed when missing and running as root)
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "browser: apt-get install chromium chromium-driver failed; the MLflow UI test will be skipped"; \
	else echo "browser: no chromium/chromedriver and not root; the MLflow UI test will be skipped"; fi

# two pytest workers, one torch thread each: most of an end-to-end test is single-threaded start-up
# (imports, MLflow, Hydra), so two workers keep both cores busy without oversubscribing them
TEST_WORKERS ?= 2
test: install browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check xrayfusion tests scripts
	$(VENV)/bin/lint-imports
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check xrayfusion tests scripts
	$(VENV)/bin/lint-imports
