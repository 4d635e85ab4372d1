# ScoreFusion developer entry points. `make test` is what CI runs (via .ci/run).
VENV        ?= .venv
PYTHON      ?= python3
TORCH_SPEC  ?= torch==2.13.0
NILEARN_SPEC ?= nilearn==0.14.1
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
# A local wheel folder (present on our build machines) holds the CPU torch wheel.
FIND_LINKS  := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=

.PHONY: install test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@# torch first and alone: an unpinned torch would pull gigabytes of CUDA packages.
	$(PIP) install $(FIND_LINKS) "$(TORCH_SPEC)"
	$(PIP) install $(FIND_LINKS) -e ".[test]"
	@# Only nilearn's bundled ICBM152 files are used; its own dependencies are not needed.
	$(PIP) install --no-deps "$(NILEARN_SPEC)"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check ScoreFusionLib ScoreFusionSlicer Testing benchmarks

test: install lint
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is broken"; exit 1; fi; \
	exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
