# abscess-node — see README.md. `make demo` and `make test` work on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install apt venv secrets data viewer demo stop test test-unit lint-imports bench clean

install: apt venv secrets data viewer  ## Debian packages + .venv + secrets + sample data + OHIF viewer (idempotent)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.cfg
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

secrets: venv  ## the admin's HTTP password and the pseudonym secret in runtime/secrets (0600, created once)
	@$(PY) -m dicom_node init-secrets

data: venv
	@$(PY) -m tooling fetch-data ct_head rider_lung_ct jpeg2000_ct >/dev/null

viewer: viewer/www/viewer  ## OHIF (pinned prebuilt @ohif/app dist, no OHIF build) laid out for Orthanc's /ohif/

viewer/www/viewer: viewer/package.json viewer/package-lock.json viewer/app-config.js viewer/prepare.mjs
	cd viewer && npm ci --ignore-scripts --no-audit --no-fund
	node viewer/prepare.mjs

demo: install  ## start the node, send the sample head-and-neck CT with storescu, print where the SEG is
	$(PY) -m tooling demo

stop:  ## stop the node started by `make demo`
	$(PY) -m tooling demo --stop

lint-imports: venv  ## the architecture's import contracts (setup.cfg [importlinter])
	$(VENV)/bin/lint-imports

test: install lint-imports  ## the whole test suite: import contracts, unit and end-to-end tests
	$(PY) -m pytest -q -rs

test-unit: venv lint-imports  ## the fast tier: tests/unit, no Orthanc, dcmtk or browser (fetches registry samples)
	$(PY) -m pytest -q -rs -m "not e2e" tests/unit

BENCH_SIZES ?= 10000,100000,1000000
bench: install  ## every benchmark figure, measured in one run each (the 1M sizes take hours on 2 cores: BENCH_SIZES=10000,100000 for less)
	$(PY) bench/segmentation.py
	$(PY) bench/study.py --runs 3
	$(PY) bench/query.py --sizes $(BENCH_SIZES) --cfind
	$(PY) bench/index.py --sizes $(BENCH_SIZES)
	PYTHON=$(PY) bash bench/gpu_check.sh runtime/gpu_check.json

clean:
	rm -rf runtime .pytest_cache
