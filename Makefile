# Every target sets itself up: a virtual environment in .venv with pinned dependencies.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where no NVIDIA GPU is present pip takes the local CPU build of torch for this pin.
TORCH_PIN ?= torch==2.13.*

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cvnet demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/rerank.py
	$(PY) bench/extract.py

clean:
	rm -rf $(VENV) cvnet-store .pytest_cache
