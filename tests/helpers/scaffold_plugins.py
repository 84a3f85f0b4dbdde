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


class _Overflow(TrainerCallback):
    """At optimizer step $ALORA_TEST_OVERFLOW_AT, what an fp16 overflow does under a grad scaler (which CPUs
    lack): the gradients are not finite and the optimizer step is skipped."""

    def __init__(self, step: int):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        if state.global_step != self.step:
            return
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("inf"))
        self._step, optimizer.step = optimizer.step, lambda *a, **k: None

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == self.step:
            optimizer.step = self._step


class Fp16OverflowPlugin(BasePlugin):
    """Puts its callback first, so it runs before the importance recorder's (Axolotl 0.21 registers
    discovered plugins before those under `plugins:`, so list order cannot ensure it)."""

    def add_callbacks_post_trainer(self, cfg, trainer):
        trainer.callback_handler.callbacks.insert(0, _Overflow(int(os.environ["ALORA_TEST_OVERFLOW_AT"])))
        return []


def _cpu_device_map():
    # with WORLD_SIZE > 1 Axolotl 0.19 forces device_map={"": LOCAL_RANK} before any plugin hook runs, which fails without a GPU
    from axolotl.loaders.model import ModelLoader

    original = ModelLoader._set_device_map_config

    def patched(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not torch.cuda.is_available():
            self.model_kwargs["device_map"] = "cpu"
        return result

    ModelLoader._set_device_map_config = patched


def _no_cuda_peer_probe():
    # with WORLD_SIZE > 1 Axolotl 0.21 asks torch.cuda whether ranks can reach each other's GPUs while loading the
    # config; torch's CUDA build (the only one for Python 3.12 here) raises there without a driver
    import axolotl.utils.trainer as trainer_utils

    if hasattr(trainer_utils, "check_cuda_p2p_ib_support") and not torch.cuda.is_available():
        trainer_utils.check_cuda_p2p_ib_support = lambda: True


_cpu_device_map()
_no_cuda_peer_probe()


class CpuDdpPlugin(BasePlugin):
    """With ACCELERATE_USE_CPU=true in the environment, lets `torchrun --nproc_per_node 2` run real DDP on CPU (gloo)."""


# -- an independent audit of the regularizer and of ω inside a real `axolotl train` (tests/test_optimizers.py) --------


def _dense_penalty(modules):
    """L_reg from the live parameters on dense θ in float64, differentiated by plain autograd (no cache, no factoring)."""
    leaves, total = [], 0.0
    for m in modules:
        if hasattr(m, "A"):
            A = m.A.detach().double().requires_grad_()
            B = m.B.detach().double().requires_grad_()
            d = m.scaling * (B @ A - m.B_ref.double() @ m.A_ref.double())
            leaves += [A, B]
        else:
            p = m.param.detach().double().requires_grad_()
            d = p - m.reference.double()
            leaves.append(p)
        total = total + m.coefficient * (m.omega.double() * d * d).sum()
    grads = torch.autograd.grad(total, leaves)
    return float(total), grads


class _AuditedRegularizer:
    def __init__(self, inner, trainer):
        self.inner, self.trainer, self.records = inner, trainer, []

    def __call__(self, step=None):
        out = self.inner(step)
        params = [p for m in self.inner.modules for p in m.params]
        ours = torch.autograd.grad(out, params, retain_graph=True)
        dense, grads = _dense_penalty(self.inner.modules)
        err = max(float((a.double() - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(ours, grads))
        self.records.append({"step": step, "global_step": self.trainer.state.global_step, "ours": float(out), "dense": dense, "grad_err": err})
        return out


class _OmegaAudit(TrainerCallback):
    """ω of eqs. 13-14 recomputed on dense float64 θ = s·B·A, from the same hooks the Trainer calls."""

    def __init__(self, modules, audited, out_dir, trainer):
        self.modules, self.audited, self.out_dir, self.trainer = modules, audited, out_dir, trainer

    def _dense(self, m):
        return m.scaling * (m.B.detach().double() @ m.A.detach().double())

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = {m.name: self._dense(m) for m in self.modules}
        self.start_A = {m.name: m.A.detach().float().clone() for m in self.modules}
        self.omega = {m.name: torch.zeros_like(self.start[m.name]) for m in self.modules}
        self.steps = 0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        self.before = {m.name: (m.A.detach().double().clone(), m.B.detach().double().clone(), m.A.grad.double().clone(),
                                m.B.grad.double().clone(), lr[id(m.A)]) for m in self.modules}

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steps += 1
        for m in self.modules:
            A, B, gA, gB, lr = self.before[m.name]
            g_tilde = m.scaling * (gB @ A + B @ gA - lr * gB @ gA)
            d_theta = self._dense(m) - m.scaling * (B @ A)
            self.omega[m.name] -= g_tilde * d_theta

    def on_train_end(self, args, state, control, **kwargs):
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        tensors = {}
        for m in self.modules:
            tensors[f"{m.name}.omega"] = self.omega[m.name].contiguous()
            tensors[f"{m.name}.delta"] = (self._dense(m) - self.start[m.name]).contiguous()
            tensors[f"{m.name}.start_A"] = self.start_A[m.name].contiguous()
        # what the importance recorder snapshotted as θ_0, and whether it tracks the very parameters being trained
        recorder = _recorder(self.trainer)
        if recorder is not None:
            live = {m.name: (m.A, m.B) for m in self.modules}
            for t in recorder.tracker.modules:
                tensors[f"{t.name}.recorder_A_0"] = t.A_0.contiguous()
                tensors[f"{t.name}.recorder_B_0"] = t.B_0.contiguous()
            tracks_live = all(t.A is live[t.name][0] and t.B is live[t.name][1] for t in recorder.tracker.modules)
        save_file(tensors, str(Path(self.out_dir) / "audit_omega.safetensors"))
        records = self.audited.records if self.audited is not None else []
        summary = {"penalty": records, "steps": self.steps, "recorder_tracks_live": tracks_live if recorder is not None else None}
        (Path(self.out_dir) / "audit.json").write_text(json.dumps(summary))


def _recorder(trainer):
    from axolotl_alora.callbacks import ImportanceRecorder

    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, ImportanceRecorder)), None)


class AuditPlugin(BasePlugin):
    """Listed after axolotl_alora.AloraPlugin: wraps its regularizer and tracks ω independently."""

    def add_callbacks_post_trainer(self, cfg, trainer):  # Axolotl calls this before post_trainer_create
        from axolotl_alora.lora import adapted_modules

        self._callback = _OmegaAudit(adapted_modules(trainer.model), None, cfg.output_dir, trainer)
        return [self._callback]

    def post_trainer_create(self, cfg, trainer):
        if getattr(trainer, "alora_regularizer", None) is not None:
            trainer.alora_regularizer = self._callback.audited = _AuditedRegularizer(trainer.alora_regularizer, trainer)


class _PeakMemory(TrainerCallback):
    """At train begin, restarts the process's peak RSS from its current RSS; at exit, writes that peak."""

    def __init__(self, path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        import atexit
        import gc

        from alora_bench.peak_memory import reset_peak, vm_hwm_kib

        gc.collect()
        reset_peak()
        start = vm_hwm_kib()

        def write():
            import json

            with open(self.path, "w") as f:
                json.dump({"start_kib": start, "peak_kib": vm_hwm_kib()}, f)

        atexit.register(write)


class PeakMemoryPlugin(BasePlugin):
    """Writes <output_dir>/peak_memory.json: the process's peak RSS from the start of training to its exit."""

    def add_callbacks_post_trainer(self, cfg, trainer):
        import os

        os.makedirs(cfg.output_dir, exist_ok=True)
        return [_PeakMemory(os.path.join(cfg.output_dir, "peak_memory.json"))]


class _PhiPerRank(TrainerCallback):
    def __init__(self, trainer, out):
        self.trainer, self.out, self.seen = trainer, out, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append([state.global_step, self.trainer.alora_phi])

    def on_train_end(self, args, state, control, **kwargs):
        import json

        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(self.out, f"phi_rank{rank}.json"), "w") as f:
            json.dump(self.seen, f)


class PhiPerRankPlugin(BasePlugin):
    """Writes <output_dir>/phi_rank<RANK>.json: the trainer's alora_phi after every step, as each rank holds it."""

    def add_callbacks_post_trainer(self, cfg, trainer):
        os.makedirs(cfg.output_dir, exist_ok=True)
        return [_PhiPerRank(trainer, cfg.output_dir)]
