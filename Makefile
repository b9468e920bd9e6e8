# The two quick-start commands (README.md): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install lint

$(BIN)/pxsgate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull several GB of CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,evaluate,triton]'
	# The tests' Triton Inference Server: the CPU tritonserver binary (Python backend) that
	# this wheel ships. --no-deps: its numpy<2 pin is for PyTriton's Python code, not used.
	$(BIN)/pip install --quiet --no-deps nvidia-pytriton==0.7.0
	touch $@

install: $(BIN)/pxsgate

demo: install
	$(BIN)/pxsgate demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/mypy
