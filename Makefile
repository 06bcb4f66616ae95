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

# SAELens 6 needs transformer-lens<4 and the suite uses 4.x, so the SAELens round-trip test
# (tests/test_saelens.py) runs SAELens in its own environment, created once and cached here.
# The stamp names the pin, so changing SAELENS_PIN rebuilds it. SKIP_SAELENS=1 opts out (the
# test then skips with that reason); otherwise a failure to create it fails `make test`.
SAELENS_VENV ?= .venv-saelens
SAELENS_PIN ?= sae-lens==6.54.12
SAELENS_STAMP := $(SAELENS_VENV)/.installed-$(subst ==,-,$(SAELENS_PIN))

.PHONY: saelens-venv
saelens-venv: $(SAELENS_STAMP)

$(SAELENS_STAMP):
	@$(SAELENS_VENV)/bin/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(SAELENS_VENV)
	rm -f $(SAELENS_VENV)/.installed*
	$(SAELENS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SAELENS_VENV)/bin/python -m pip install --quiet "$(TORCH_PIN)" || echo "$(TORCH_PIN) is not available here; pip picks a torch build"
	$(SAELENS_VENV)/bin/python -m pip install --quiet "$(SAELENS_PIN)"
	$(SAELENS_VENV)/bin/python -c "import sae_lens; print('SAELens', sae_lens.__version__)"
	@touch $@

# pytest over tests/, and nbval executing every notebook at its quick defaults (the claim
# cells are the assertions).
test: $(STAMP) $(if $(SKIP_SAELENS),,$(SAELENS_STAMP))
	$(PY) -m pytest tests notebooks --nbval-lax

quick: $(STAMP)
	$(PY) -m adaptive_sae.quick

# Every sweep of papermill_runs/ at its reproduction scale (points already done are skipped;
# failures are recorded and the rest still run), then the book. The points run as Ray tasks on
# a local Ray instance with JOBS points at once, or on the cluster at ADDRESS (from
# `ray start --head`; see the README's Sweeps section) when it is given.
JOBS ?= 2
ADDRESS ?=
reproduce: $(STAMP)
	@if [ -z "$(ALLOW_DIRTY)" ] && ! git diff --quiet HEAD -- . ':!results'; then \
		echo "make reproduce: the working tree differs from its commit (outside results/);"; \
		echo "commit first so the results record true provenance, or set ALLOW_DIRTY=1."; \
		exit 1; fi
	$(PY) -m adaptive_sae.sweep papermill_runs/*.yaml $(if $(ADDRESS),--address $(ADDRESS),--jobs $(JOBS)); \
	status=$$?; $(MAKE) book && exit $$status

# Renders the notebooks the sweeps executed (papermill_runs/<sweep>/*.ipynb); never executes.
book: $(STAMP)
	rm -rf book/_build/html
	$(PY) book/prepare.py
	$(VENV)/bin/jupyter-book build . --config book/_config.yml --toc book/_toc.yml --path-output book
	@echo "book: book/_build/html/index.html"

lint: $(STAMP)
	$(PY) -m ruff check lib tests bench
	$(PY) -m ruff format --check lib tests bench
