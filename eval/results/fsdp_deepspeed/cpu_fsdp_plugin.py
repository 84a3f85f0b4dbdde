"""Scratch-only workarounds to try Axolotl 0.19's FSDP2 path on CPU (on top of scaffold_plugins' device_map trick)."""
import torch
import scaffold_plugins  # noqa: F401  (applies the device_map={'':LOCAL_RANK} -> 'cpu' patch at import)
from axolotl.integrations.base import BasePlugin


def _cpu_mesh():
    # axolotl/utils/distributed.py:314 hard-codes parallelism_config.build_device_mesh("cuda")
    from accelerate.parallelism_config import ParallelismConfig
    orig = ParallelismConfig.build_device_mesh

    def patched(self, device_type):
        if device_type == "cuda" and not torch.cuda.is_available():
            device_type = "cpu"
        return orig(self, device_type)

    ParallelismConfig.build_device_mesh = patched


_cpu_mesh()


class CpuFsdpPlugin(BasePlugin):
    pass


def _force_fsdp_on_multi_cpu():
    # accelerate 1.13 state.py: FSDP is only switched on for MULTI_GPU/MLU/SDAA/MUSA/NPU/XPU/HPU/NEURON; with
    # ACCELERATE_USE_CPU=true the type is MULTI_CPU and the fsdp_plugin is silently dropped (plain DDP runs instead).
    import os
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    orig = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        orig(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (os.environ.get("SCRATCH_FORCE_FSDP") == "1" and fsdp_plugin is not None
                and self.distributed_type == DistributedType.MULTI_CPU):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            print("[cpu_fsdp_plugin] forced DistributedType.FSDP on MULTI_CPU", flush=True)

    AcceleratorState.__init__ = patched


_force_fsdp_on_multi_cpu()
