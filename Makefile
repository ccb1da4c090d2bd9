# The two commands the README opens with: `make up` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: up test install protos lint

$(BIN)/loraplex: pyproject.toml
	bash scripts/install.sh $(VENV)

install: $(BIN)/loraplex

## Starts the whole stack on the embedded default and streams an answer.
up: install
	$(BIN)/loraplex up

## Runs the test suite (CPU).
test: install
	bash scripts/test.sh $(VENV)

## Regenerates loraplex/v1 from proto/ (commit the result).
protos:
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/loraplex/v1/*.proto

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
