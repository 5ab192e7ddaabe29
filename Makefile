# Every target sets itself up: a virtual environment in .venv with pinned dependencies.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where no NVIDIA GPU is present pip takes the local CPU build of torch for this pin.
TORCH_PIN ?= torch==2.13.*

.PHONY: install browser demo test bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cvnet demo

# The report's rendering test screenshots it in headless Chromium: taken from the OS packages where
# this user may (root with apt-get, as on CI), else that one test says why it is skipped.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	  echo "make browser: no chromium installed (needs root and apt-get); the report's browser test will skip"

# Two pytest-xdist workers, a test module each at a time (each with its own Ray, moto and mlflow):
# most of a test's time is process start-up and polling, which the other worker fills.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(PY) bench/rerank.py
	$(PY) bench/extract.py

clean:
	rm -rf $(VENV) cvnet-store .pytest_cache
