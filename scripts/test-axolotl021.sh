#!/usr/bin/env bash
# Set up the Axolotl 0.21 venv if needed (Python 3.12, .venv-axolotl021), then run the end-to-end ALoRA tests
# there: entry-point discovery, the whole workflow, and the e2e, optimizer and trainable-parameter runs.
# With arguments, they go to pytest instead.
set -euo pipefail
export ALORA_LANE=0.21
source "$(dirname "$0")/env.sh"
# the memory model's module sizes come from Axolotl's own LoRA config builder: check them on 0.21 too
TESTS=(tests/test_axolotl_021.py tests/test_e2e.py tests/test_optimizers.py tests/test_check.py
       tests/test_memory.py::test_omega_elements_from_config_json tests/test_memory.py::test_sizes_are_the_plugin_modules_of_the_real_model
       tests/test_memory.py::test_alora_check_prints_the_memory_table)
if [ $# -gt 0 ]; then TESTS=("$@"); fi
# three optimizers on this lane: the reference, the fused one and bitsandbytes (the 0.19 lane runs all 11)
export ALORA_TEST_OPTIMIZERS=${ALORA_TEST_OPTIMIZERS:-adamw_torch,adamw_torch_fused,adamw_bnb_8bit}
echo "[test] Axolotl 0.21 lane: ${TESTS[*]}"
exec .venv-axolotl021/bin/python -m pytest -q -p no:cacheprovider "${TESTS[@]}"
