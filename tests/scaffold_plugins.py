"""Test-only Axolotl plugins (scaffolding, never product code); listed under `plugins:` in test YAMLs."""

import os

import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class StopAtStepPlugin(BasePlugin):
    """Simulates an interrupted run: stops after step $ALORA_TEST_STOP_AT (its checkpoint is still saved)."""

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [_StopAt(int(os.environ["ALORA_TEST_STOP_AT"]))]


def _cpu_device_map():
    # AXOLOTL.md §5b: with WORLD_SIZE > 1 Axolotl forces device_map={"": LOCAL_RANK}, which fails without a GPU
    from axolotl.loaders.model import ModelLoader

    original = ModelLoader._set_device_map_config

    def patched(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not torch.cuda.is_available():
            self.model_kwargs["device_map"] = "cpu"
        return result

    ModelLoader._set_device_map_config = patched


_cpu_device_map()


class CpuDdpPlugin(BasePlugin):
    """With ACCELERATE_USE_CPU=true in the environment, lets `torchrun --nproc_per_node 2` run real DDP on CPU (gloo)."""
