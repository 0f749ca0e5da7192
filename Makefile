# breastcad: the two commands are `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# re-install when pyproject.toml changes
HASH   := $(shell sha1sum pyproject.toml | cut -c1-12)
STAMP_RUN  := $(VENV)/.installed-run-$(HASH)
STAMP_TEST := $(VENV)/.installed-test-$(HASH)
APT_PACKAGES := orthanc dcmtk dicom3tools orthanc-dicomweb chromium chromium-driver
PYTEST_ARGS ?=

.PHONY: serve test lint typecheck install install-test system-deps models clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP_RUN): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP_TEST): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(STAMP_RUN)

install: $(STAMP_RUN)
install-test: $(STAMP_TEST)

## make serve: the whole node in one process (embedded broker and worker, SQLite).
## Configuration: CONFIG=path/to/config.yaml or $$BREASTCAD_CONFIG; defaults otherwise.
serve: install
	$(BIN)/breastcad serve $(if $(CONFIG),--config $(CONFIG))

## System packages the tests talk to: Orthanc (the PACS) and its DICOMweb plugin, dcmtk (storescu,
## dsrdump), dciodvfy, chromium (the dashboard and upload-page tests; Playwright drives
## /usr/bin/chromium, never its own browser).
system-deps:
	@missing=""; \
	command -v Orthanc  >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing="$$missing orthanc"; \
	command -v storescu >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null 2>&1 || missing="$$missing dicom3tools"; \
	[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

lint: install-test
	$(BIN)/ruff check dicom_node workers inference reports tests bench

typecheck: install-test
	$(BIN)/mypy

## make test: everything CI runs.
## Two pytest-xdist workers, whole files each (module fixtures such as a shared Orthanc stay in
## one worker): most of the suite waits on subprocesses, sockets and quiet periods, so two
## overlap well on 2 cores (562 s against 780 s in one process, 2026-12-07). PYTEST_WORKERS=0
## runs in one process.
PYTEST_WORKERS ?= 2
test: system-deps install-test lint typecheck
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -ra \
	  $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile,-p no:xdist) \
	  $(PYTEST_ARGS)

## make models: retrain the bundled models from ../shared/data (about 2 h on 2 cores), into
## runs/models/; copy <name>.pt, <name>.json and <name>_ood.npz into inference/bundled/ to ship.
## MG (inference/candidates/): three patch runs on the split of seed 0, ensembled (1.1.0); then
## three 4-fold cross-validations of the recipe on the development women (bench/mg_cv.py, about
## 20 min each) whose out-of-fold scores fit its calibration and operating point (1.2.0).
MODELS_OUT ?= runs/models
MG_SEEDS ?= 1 2 3
MG_CV_SEEDS ?= 0 10 20
models: install-test
	OMP_WAIT_POLICY=PASSIVE $(BIN)/breastcad train --modality US --out $(MODELS_OUT)/us
	OMP_WAIT_POLICY=PASSIVE $(BIN)/breastcad train --modality SM --out $(MODELS_OUT)/sm
	for seed in $(MG_SEEDS); do \
	  OMP_WAIT_POLICY=PASSIVE $(BIN)/breastcad train --modality MG --seed $$seed --split-seed 0 \
	    --max-minutes 10 --out $(MODELS_OUT)/mg_seed$$seed || exit 1; \
	done
	OMP_WAIT_POLICY=PASSIVE $(BIN)/breastcad ensemble --model-version 1.1.0 \
	  --out $(MODELS_OUT)/mg $(foreach seed,$(MG_SEEDS),$(MODELS_OUT)/mg_seed$(seed)/mg_mias.json)
	for seed in $(MG_CV_SEEDS); do \
	  OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/mg_cv.py train --seed $$seed --working-height 512 \
	    --out $(MODELS_OUT)/mg_cv_s$$seed || exit 1; \
	done
	OMP_WAIT_POLICY=PASSIVE $(BIN)/breastcad recalibrate $(MODELS_OUT)/mg/mg_mias.json \
	  $(foreach seed,$(MG_CV_SEEDS),--cv $(MODELS_OUT)/mg_cv_s$(seed)) \
	  --model-version 1.2.0 --out $(MODELS_OUT)/mg_recalibrated

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
