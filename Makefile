# Set-up and the two main jobs. Each target creates its own virtual environment.
#   make run    install everything, then run the main job on the embedded `tiny` preset (the shapes model)
#   make test   install everything, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
COMMA := ,
IMAGE ?= examples/images/shapes.png
QUESTION ?= How many shapes are in the image? Answer with a single word.
DETECT ?= Please perform object detection on this image for identifying red circle, red square, red triangle, \
green circle, green square, green triangle, blue circle, blue square, blue triangle, yellow circle, yellow square, \
yellow triangle.

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

# the shipped shapes model (`tiny`): a question, then a detection instruction (boxes drawn into out/run)
run: install
	$(VENV)/bin/unimlm generate --model tiny --image $(IMAGE) --prompt "$(QUESTION)"
	$(VENV)/bin/unimlm generate --model tiny --image $(IMAGE) --prompt "$(DETECT)" --max-tokens 160 \
		--save-dir out/run

test: install-test
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

sanitize: install-test
	bash scripts/sanitize.sh

clean:
	rm -rf build $(VENV) *.egg-info out
