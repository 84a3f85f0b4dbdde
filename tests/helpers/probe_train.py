"""Test-only launcher: `python -m probe_train CONFIG` is `python -m axolotl.cli.train CONFIG`, and also

- prints `TRAINER_CLASS <module>.<name>` when training starts, so a test can tell whose trainer ran;
- with ALORA_TEST_HIDE_ENTRY_POINT=1, hides this package's `axolotl.plugins` entry point from Axolotl's
  plugin discovery (0.21 loads every installed entry point), as if the package were not installed.
"""

import os
import runpy
import sys


def _hide_entry_point():
    import importlib.metadata as metadata

    import axolotl.integrations.base as base

    def entry_points(**params):
        found = metadata.entry_points(**params)
        if params.get("group") == "axolotl.plugins":
            return metadata.EntryPoints(ep for ep in found if not ep.value.startswith("axolotl_alora"))
        return found

    base.entry_points = entry_points


def _print_trainer_class():
    from transformers import Trainer

    train = Trainer.train

    def probed(self, *args, **kwargs):
        print(f"TRAINER_CLASS {type(self).__module__}.{type(self).__name__}", flush=True)
        return train(self, *args, **kwargs)

    Trainer.train = probed


if __name__ == "__main__":  # not in the worker processes datasets spawns, which import this module as __mp_main__
    if os.environ.get("ALORA_TEST_HIDE_ENTRY_POINT"):
        _hide_entry_point()
    _print_trainer_class()
    sys.argv = ["axolotl.cli.train", *sys.argv[1:]]
    runpy.run_module("axolotl.cli.train", run_name="__main__", alter_sys=True)
