# The two commands of the README: `make demo` and `make test`. Each sets itself up.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint

setup:
	@bash tools/setup.sh

demo: setup
	$(PY) tools/demo.py

lint: setup
	$(VENV)/bin/ruff check ckpt_ir converters tests tools

test: setup lint
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest -n 2 --dist loadfile -q --durations=25 tests
