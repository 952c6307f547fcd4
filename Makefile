# llava-bench developer entry points. `make demo` and `make test` work on a fresh clone:
# they create .venv/ with the CI pins (xtuner 0.2.0, CPU) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints/ci.txt
# torch/torchvision are named so pip takes the pinned builds; xtuner is not a
# dependency of the package because the image installs it from a git commit.
TRAINING_STACK := torch==2.14.1 torchvision==0.29.1 xtuner==0.2.0

.PHONY: help venv test test-gpu demo clean-demo

help:
	@echo "make demo   synthetic layout + real XTuner run on this machine (CPU is fine)"
	@echo "make test   the test suite (unit tests and real end-to-end runs)"

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint $(CONSTRAINTS) $(TRAINING_STACK) --editable '.[test]'
	touch $@

venv: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

demo: $(BIN)/.installed
	$(BIN)/llava-bench demo --root demo

clean-demo:
	rm -rf demo

# On a GPU machine whose Python already has the training stack (docs/GPU-VALIDATION.md).
test-gpu:
	$(PYTHON) -m pytest -q -s -m gpu tests/test_gpu.py
