# Scratch-only: make accelerate's PartialState use backend="gloo" on a CUDA-less machine when DeepSpeed is requested
# (accelerate 1.13 leaves backend=None there -> num_processes=1 although deepspeed initialised a 2-rank gloo group).
import os

if os.environ.get("SCRATCH_DS_GLOO") == "1":
    import accelerate.state as _st

    _orig = _st.PartialState.__init__

    def _patched(self, cpu: bool = False, **kwargs):
        import torch
        if not torch.cuda.is_available() and kwargs.get("backend") is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kwargs["backend"] = "gloo"
        _orig(self, cpu, **kwargs)

    _st.PartialState.__init__ = _patched
