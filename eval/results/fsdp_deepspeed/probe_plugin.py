"""Probe plugin: in on_pre_optimizer_step, report what a LoRA param and its grad are (DTensor? shard shape?) and
try to get the full factor / full gradient (DTensor.full_tensor() for FSDP2, deepspeed.utils.safe_get_full_grad for DS)."""
import os
import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


class _Probe(TrainerCallback):
    def _report(self, tag, model, optimizer=None):
        rank = int(os.environ.get("RANK", 0))
        n, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
        g = p.grad
        msg = f"[probe rank{rank} {tag}] {n}: type={type(p).__name__} shape={tuple(p.shape)}"
        if hasattr(p, "to_local"):
            msg += f" local={tuple(p.to_local().shape)}"
        if hasattr(p, "ds_shape"):
            msg += f" ds_shape={tuple(p.ds_shape)} ds_tensor={tuple(p.ds_tensor.shape)}"
        msg += f" grad={None if g is None else (type(g).__name__, tuple(g.shape))}"
        if g is not None and hasattr(g, "full_tensor"):
            fg = g.full_tensor()
            msg += f" full_grad={tuple(fg.shape)} norm={fg.norm():.4e} full_param={tuple(p.full_tensor().shape)}"
        try:
            import deepspeed
            from deepspeed.utils import safe_get_full_grad, safe_get_full_fp32_param
            fg = safe_get_full_grad(p)
            fp = safe_get_full_fp32_param(p)
            msg += f" safe_get_full_grad={None if fg is None else (tuple(fg.shape), f'{fg.norm():.4e}')}"
            msg += f" safe_get_full_fp32_param={None if fp is None else tuple(fp.shape)}"
        except ImportError:
            pass
        except Exception as e:  # record, don't crash
            msg += f" deepspeed-probe-error={type(e).__name__}: {e}"
        tot = 0.0
        for _, q in model.named_parameters():
            if not q.requires_grad:
                continue
            if os.environ.get("PROBE_DS") == "1":
                from deepspeed.utils import safe_get_full_grad as sgfg
                gq = sgfg(q)
            else:
                gq = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
            tot += float(gq.double().pow(2).sum()) if gq is not None else 0.0
        msg += f" total_full_grad_norm={tot ** 0.5:.6f}"
        print(msg, flush=True)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        self._report(f"pre_opt step{state.global_step}", model, optimizer)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        self._report(f"post_opt step{state.global_step}", model, optimizer)


class ProbePlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        print(f"[probe] trainer.model type={type(trainer.model).__name__}; accelerator distributed_type="
              f"{trainer.accelerator.state.distributed_type}", flush=True)
        return [_Probe()]


def _post_model_load(self, cfg, model):
    rank = int(os.environ.get("RANK", 0))
    s = {n: float(p.detach().double().sum()) for n, p in model.named_parameters() if "lora_A" in n}
    n0 = next(iter(s))
    print(f"[probe rank{rank} post_model_load] {n0} sum={s[n0]:.8f} type={type(next(p for n, p in model.named_parameters() if 'lora_A' in n)).__name__}", flush=True)


ProbePlugin.post_model_load = _post_model_load
