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

.PHONY: install system-data demo test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@# torch first and alone: an unpinned torch would pull gigabytes of CUDA packages.
	$(PIP) install $(FIND_LINKS) "$(TORCH_SPEC)"
	@# mrml + ui: the Slicer module's tests outside Slicer (slicer-core's MRML scene, PySide6 offscreen).
	$(PIP) install $(FIND_LINKS) -e ".[test,mrml,ui]"
	@# Only nilearn's bundled ICBM152 files are used; its own dependencies are not needed.
	$(PIP) install --no-deps "$(NILEARN_SPEC)"
	touch $@

install: $(VENV)/.installed

# Colin27 (Debian's mricron-data, 16 MB) is the second real anatomy the default models are
# measured on. Installed where apt is usable (root or password-less sudo); elsewhere the tests
# that need it skip, except under CI=true where they fail.
COLIN27 := /usr/share/mricron/templates/ch2bet.nii.gz
APT     := $(if $(filter 0,$(shell id -u)),apt-get,sudo -n apt-get)
system-data:
	@if [ ! -f $(COLIN27) ]; then \
	  if command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	    $(APT) install -y --no-install-recommends mricron-data || \
	      { $(APT) update && $(APT) install -y --no-install-recommends mricron-data; }; \
	  else echo "note: cannot install mricron-data here (no apt or no root): Colin27 checks will skip"; fi; \
	fi

demo: install
	$(VENV)/bin/scorefusion demo --out demo_output/ $(if $(wildcard demo_output),--overwrite,)

lint: install
	$(VENV)/bin/ruff check ScoreFusionLib ScoreFusionSlicer Testing benchmarks

test: install system-data lint
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is broken"; exit 1; fi; \
	exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_output

# ---------------------------------------------------------------------------------------------
# The embedded default models (Resources/models/*.zip), rebuilt from scratch with the project's
# own commands: `make -j2 train-default` (about 80 min on a 2-core CPU; see docs/models.md).
# Every model is trained on 2 mm data from the ICBM152 2009a maps in the nilearn wheel.
DEFAULT_WORK ?= build/default-models
SF           := $(abspath $(VENV))/bin/scorefusion
TRAIN_COMMON := --grid 72 88 72 --config tiny --batch-size 8 --lr 1e-3 --ema-decay 0.999 --threads 1 --device cpu --quiet
FUSER_COMMON := --phase crops --config tiny --crop-size 24 --batch-size 2 --lr 1e-4 --loss-weighting min-snr \
                --ema-start 20 --ema-every 1 --val-every 0 --threads 1 --device cpu --quiet
DEFAULT_IDS  := t1-sr4-iso t1-thick4-axial t1-to-flair t1-t2-to-flair tumour-seg-sim

.PHONY: train-default $(addprefix default-,$(DEFAULT_IDS))

train-default: $(addprefix default-,$(DEFAULT_IDS))

$(DEFAULT_WORK)/data/t1-icbm/.done: | install
	$(SF) simulate --out $(@D) --cases 20 --seed 11 --spacing 2 --t1-source icbm --quiet --overwrite && touch $@

$(DEFAULT_WORK)/data/brain-tumour/.done: | install
	$(SF) simulate --out $(@D) --cases 20 --seed 12 --spacing 2 --tumor --quiet --overwrite && touch $@

$(DEFAULT_WORK)/planes/t1-sr4/.done: $(DEFAULT_WORK)/data/t1-icbm/.done
	$(SF) train planes --data $(<D) --task sr --target t1n --factor 4 --steps 1500 --val-every 500 \
	    $(TRAIN_COMMON) --out $(@D) --overwrite && touch $@

$(DEFAULT_WORK)/planes/t1-thick4/.done: $(DEFAULT_WORK)/data/t1-icbm/.done
	$(SF) train planes --data $(<D) --task sr --target t1n --thick-slice-axis k --thick-slice-factor 4 \
	    --steps 800 --val-every 400 $(TRAIN_COMMON) --out $(@D) --overwrite && touch $@

$(DEFAULT_WORK)/planes/t1-flair/.done: $(DEFAULT_WORK)/data/brain-tumour/.done
	$(SF) train planes --data $(<D) --task mt --inputs t1n --target t2f --steps 1500 --val-every 500 \
	    $(TRAIN_COMMON) --out $(@D) --overwrite && touch $@

$(DEFAULT_WORK)/planes/t1-t2-flair/.done: $(DEFAULT_WORK)/data/brain-tumour/.done
	$(SF) train planes --data $(<D) --task mt --inputs t1n,t2w --target t2f --steps 800 --val-every 400 \
	    $(TRAIN_COMMON) --out $(@D) --overwrite && touch $@

# A fuser is trained on a copy of the plane bundle, so the plane-only bundle stays reusable.
$(DEFAULT_WORK)/fused/t1-sr4/.done: $(DEFAULT_WORK)/planes/t1-sr4/.done
	rm -rf $(@D) && mkdir -p $(dir $(@D)) && cp -r $(<D) $(@D) && rm $(@D)/.done
	$(SF) train fuser --bundle $(@D) --data $(DEFAULT_WORK)/data/t1-icbm --steps 120 $(FUSER_COMMON) && touch $@

$(DEFAULT_WORK)/fused/t1-flair/.done: $(DEFAULT_WORK)/planes/t1-flair/.done
	rm -rf $(@D) && mkdir -p $(dir $(@D)) && cp -r $(<D) $(@D) && rm $(@D)/.done
	$(SF) train fuser --bundle $(@D) --data $(DEFAULT_WORK)/data/brain-tumour --steps 120 $(FUSER_COMMON) && touch $@

# Packing keeps the EMA weights only, adds the model card and updates the registry entry.
default-t1-sr4-iso: $(DEFAULT_WORK)/fused/t1-sr4/.done
	$(SF) models pack $(<D) --out Resources/models/t1-sr4-iso.zip --id t1-sr4-iso \
	    --card Resources/models/t1-sr4-iso.md --registry Resources/models.json

default-t1-thick4-axial: $(DEFAULT_WORK)/planes/t1-thick4/.done
	$(SF) models pack $(<D) --out Resources/models/t1-thick4-axial.zip --id t1-thick4-axial \
	    --card Resources/models/t1-thick4-axial.md --registry Resources/models.json

default-t1-to-flair: $(DEFAULT_WORK)/fused/t1-flair/.done
	$(SF) models pack $(<D) --out Resources/models/t1-to-flair.zip --id t1-to-flair \
	    --card Resources/models/t1-to-flair.md --registry Resources/models.json

default-t1-t2-to-flair: $(DEFAULT_WORK)/planes/t1-t2-flair/.done
	$(SF) models pack $(<D) --out Resources/models/t1-t2-to-flair.zip --id t1-t2-to-flair \
	    --card Resources/models/t1-t2-to-flair.md --registry Resources/models.json

# The default segmenter is a segmenter bundle zip (not a registry entry), trained on the data set and
# held-out split of the two FLAIR translation models; packing keeps the EMA weights only.
$(DEFAULT_WORK)/segmenter/tumour-seg-sim/.done: $(DEFAULT_WORK)/data/brain-tumour/.done
	$(SF) train segmenter --data $(<D) --grid 72 88 72 --crop-size 48 --steps 1500 --batch-size 2 --lr 1e-3 \
	    --val-every 500 --threads 2 --device cpu --quiet --model-id tumour-seg-sim \
	    --card Resources/models/tumour-seg-sim.md --out $(@D) --overwrite && touch $@

default-tumour-seg-sim: $(DEFAULT_WORK)/segmenter/tumour-seg-sim/.done
	$(SF) models pack $(<D) --out Resources/models/tumour-seg-sim.zip
