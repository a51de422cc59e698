# Set-up and the two main jobs. Each target creates its own virtual environment.
#   make run    install everything, then run the main job on the embedded `tiny` preset
#   make test   install everything, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
COMMA := ,
IMAGE ?= examples/images/chelsea.png
PROMPT ?= Where is the cat? Describe it and find it.

.PHONY: install install-test run test test-fast sanitize bench clean

install: $(VENV)/.installed-run
install-test: $(VENV)/.installed-test

# run: what running needs (the package, diffusers for [GEN]/[EDIT], the HTTP server); test: the test extras on top
# (one install each: `make test` alone never installs the package twice)
define install_into_venv
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q setuptools wheel pybind11 cmake ninja
	$(PIP) install -q --no-build-isolation -e ".[$(1)]"
	touch $@
endef

$(VENV)/.installed-run: setup.py pyproject.toml CMakeLists.txt
	$(call install_into_venv,decoders$(COMMA)serve)

$(VENV)/.installed-test: setup.py pyproject.toml CMakeLists.txt
	$(call install_into_venv,test)

run: install
	$(VENV)/bin/unimlm generate --model tiny --image $(IMAGE) --prompt "$(PROMPT)" \
		--route DET,SEG,POSE,GEN,EDIT --save-dir out/run

test: install-test
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

sanitize: install-test
	bash scripts/sanitize.sh

clean:
	rm -rf build $(VENV) *.egg-info out
