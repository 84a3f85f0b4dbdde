"""The general stage's Trainer callback: ω once per optimizer step, saved with checkpoints, Ω written at the end."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from .importance import OmegaTracker, TrackedModule, adapter_delta, importance_from_omega
from .importance_file import ImportanceFile, ImportanceFileError, module_metadata, write_importance_file
from .lora import LoraModule
from .regularizer import effective_layers, layer_weights

LOG = logging.getLogger("axolotl.alora")
CHECKPOINT_STATE = "alora_state.safetensors"


class ImportanceRecorder(TrainerCallback):
    """Records SI importance (METHOD.md §1) and writes the importance file (§5) once training ends."""

    def __init__(
        self,
        modules: list[LoraModule],
        output_path: str | os.PathLike,
        xi: float,
        omega_dtype: str,
        metadata: dict,
        fingerprint: torch.Tensor | None = None,
        previous: ImportanceFile | None = None,
        resume_from_checkpoint: str | None = None,
    ):
        self.lora = {m.name: m for m in modules}
        self.tracker = OmegaTracker([TrackedModule(m.name, m.A, m.B, m.scaling) for m in modules])
        self.output_path = Path(output_path)
        self.xi = xi
        self.omega_dtype = omega_dtype
        self.metadata = metadata
        self.fingerprint = fingerprint
        self.previous = previous
        self.resume_from_checkpoint = resume_from_checkpoint
        self.start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._group_of: dict[str, int] | None = None

    # -- start and resume -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            self._load_checkpoint_state(args, state)
        else:
            self.start = {n: (m.A.detach().float().clone(), m.B.detach().float().clone()) for n, m in self.lora.items()}
        if state.is_world_process_zero:
            LOG.info("ALoRA: recording importance for %d LoRA modules; it will be written to %s", len(self.lora), self.output_path)

    def _load_checkpoint_state(self, args, state):
        from safetensors import safe_open

        ckpt = self.resume_from_checkpoint or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = Path(ckpt) / CHECKPOINT_STATE
        if not path.is_file():
            raise ImportanceFileError(
                f"resuming from {ckpt}, which holds no {CHECKPOINT_STATE}: the importance recorded before it is lost. "
                "Restart the general stage without resume_from_checkpoint."
            )
        with safe_open(str(path), framework="pt") as f:
            for m in self.tracker.modules:
                m.omega.copy_(f.get_tensor(f"{m.name}.omega"))
                self.start[m.name] = (f.get_tensor(f"{m.name}.start_A"), f.get_tensor(f"{m.name}.start_B"))
            self.tracker.steps = int(f.metadata()["steps"])
        LOG.info("ALoRA: resumed importance recording from %s (%d steps recorded)", path, self.tracker.steps)

    # -- every optimizer step --------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        groups = optimizer.param_groups
        if self._group_of is None:
            self._group_of = self._param_groups(groups)
        self.tracker.before_step({n: groups[g]["lr"] for n, g in self._group_of.items()})

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.tracker.after_step()

    def _param_groups(self, groups) -> dict[str, int]:
        index = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        missing = [n for n, m in self.lora.items() if id(m.A) not in index or id(m.B) not in index]
        if missing:
            raise RuntimeError(f"ALoRA: LoRA factors of {missing[:3]} are not in the optimizer; are they frozen?")
        if any(groups[index[id(m.A)]]["lr"] != groups[index[id(m.B)]]["lr"] for m in self.lora.values()):
            LOG.warning("ALoRA: A and B have different learning rates (LoRA+?); eq. 13's η term uses A's.")
        return {n: index[id(m.A)] for n, m in self.lora.items()}

    # -- checkpoints and the end -------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from safetensors.torch import save_file

        tensors = {}
        for m in self.tracker.modules:
            start_A, start_B = self.start[m.name]
            tensors[f"{m.name}.omega"] = m.omega.cpu()
            tensors[f"{m.name}.start_A"] = start_A.cpu()
            tensors[f"{m.name}.start_B"] = start_B.cpu()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_file(tensors, str(ckpt / CHECKPOINT_STATE), metadata={"steps": str(self.tracker.steps)})

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        data = self.importance(tokens=int(getattr(state, "num_input_tokens_seen", 0) or 0))
        write_importance_file(self.output_path, data, self.omega_dtype)
        meta = data.metadata
        LOG.info(
            "ALoRA: wrote importance for %d modules (%d steps, %.2g%% elements clamped, effective layers %.1f of %d) to %s",
            len(data.omega), meta["steps"], 100 * meta["clamped_fraction"], meta["effective_layers"], len(data.omega), self.output_path,
        )

    def importance(self, tokens: int = 0) -> ImportanceFile:
        """Ω (eq. 15) from ω and Δ^ν; with a previous file, Ω_old + Ω_new (METHOD.md §1, continual use)."""
        omega, refs_A, refs_B, module_meta = {}, {}, {}, {}
        clamped = total = 0
        for m in self.tracker.modules:
            lora = self.lora[m.name]
            start_A, start_B = self.start[m.name]
            A_end, B_end = lora.A.detach().float(), lora.B.detach().float()
            delta = adapter_delta(A_end, B_end, m.scaling) - adapter_delta(start_A.to(A_end.device), start_B.to(A_end.device), m.scaling)
            importance, n_clamped = importance_from_omega(m.omega.clone(), delta, self.xi)
            if self.previous is not None:
                importance += self.previous.omega[m.name].to(importance.device)
            omega[m.name], refs_A[m.name], refs_B[m.name] = importance.cpu(), A_end.cpu(), B_end.cpu()
            clamped, total = clamped + n_clamped, total + importance.numel()
            module_meta[m.name] = module_metadata(importance, lora.r, lora.alpha, lora.scaling, lora.use_rslora)
        norms = torch.tensor([v["norm"] for v in module_meta.values()])
        previous_meta = self.previous.metadata if self.previous is not None else {}
        metadata = {
            **self.metadata,
            "source": "si",
            "modules": module_meta,
            "xi": self.xi,
            "steps": self.tracker.steps,
            "tokens": tokens,
            "clamped_fraction": clamped / max(total, 1),
            "effective_layers": effective_layers(layer_weights(norms, "softmax", 1.0)),
            "stages": int(previous_meta.get("stages", 0)) + 1,
        }
        return ImportanceFile(omega, refs_A, refs_B, metadata, self.fingerprint)
