# vitup recipes: `just --list`. Run them inside the virtual environment made by `just install`.
set shell := ["bash", "-euo", "pipefail", "-c"]

default:
    @just --list

# Install vitup with the dev tools (pytest, ruff, just, xarray) into the active environment
install:
    python -m pip install -e ".[dev]"

# The whole suite, slow and integration tests included (what CI runs)
test *args:
    python -m pytest {{args}}

# Only the fast tests
test-fast:
    python -m pytest -m "not slow and not integration"

# Lint and format check (what CI runs)
lint:
    ruff check .
    ruff format --check .

# Format and fix in place
fmt:
    ruff format .
    ruff check --fix .

# What CI runs, in a fresh virtual environment
ci:
    bash .ci/run
