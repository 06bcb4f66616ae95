# The two commands of the README: `make reproduce` and `make test`.
# Each creates the virtual environment on first use, so nothing else has to be typed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch first, pinned to the CPU build where that version is available, so that resolving the
# other dependencies does not pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: test reproduce quick book lint venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)" || echo "$(TORCH_PIN) is not available here; pip picks a torch build"
	$(PY) -m pip install --quiet -e ".[dev,book]"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

quick: $(STAMP)
	$(PY) -m adaptive_sae.quick

reproduce: $(STAMP)
	$(PY) -m adaptive_sae.quick

lint: $(STAMP)
	$(PY) -m ruff check lib tests bench
	$(PY) -m ruff format --check lib tests bench
