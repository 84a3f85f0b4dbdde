"""The general stage's Trainer callback: ω once per optimizer step, saved with checkpoints, Ω written at the end."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from .importance import OmegaTracker, TrackedModule, TrackedParameter
from .importance_file import ImportanceFile, ImportanceFileError, module_metadata, parameter_metadata, write_importance_file
from .lora import FullParameter, LoraModule
from .regularizer import effective_layers, layer_weights

LOG = logging.getLogger("axolotl.alora")
CHECKPOINT_STATE = "alora_state.safetensors"


class NonFiniteImportanceError(RuntimeError):
    """The general stage's importance is not finite; nothing was written."""


class ImportanceRecorder(TrainerCallback):
    """Records SI importance (docs/METHOD.md §1) and writes the importance file (§5) once training ends."""

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
        parameters: list[FullParameter] = (),
    ):
        self.lora = {m.name: m for m in modules}
        self.parameters = list(parameters)
        self.tracker = OmegaTracker(
            [TrackedModule(m.name, m.A, m.B, m.scaling) for m in modules] + [TrackedParameter(p.name, p.param) for p in parameters]
        )
        self.output_path = Path(output_path)
        self.xi = xi
        self.omega_dtype = omega_dtype
        self.metadata = metadata
        self.fingerprint = fingerprint
        self.previous = previous
        self.resume_from_checkpoint = resume_from_checkpoint
        self._group_of: dict[str, int] | None = None

    # -- start and resume -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.tracker.start()
        if state.global_step > 0:
            self._load_checkpoint_state(args, state)
        if state.is_world_process_zero:
            LOG.info(
                "ALoRA: recording importance for %d LoRA modules and %d full parameters; it will be written to %s",
                len(self.lora), len(self.parameters), self.output_path,
            )

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
                m.load_state({key: f.get_tensor(f"{m.name}.{key}") for key in m.state()})
            meta = f.metadata()
            self.tracker.steps = int(meta["steps"])
            self.tracker.skipped = json.loads(meta.get("skipped_steps", "[]"))
        LOG.info("ALoRA: resumed importance recording from %s (%d steps recorded)", path, self.tracker.steps)

    # -- every optimizer step --------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        groups = optimizer.param_groups
        if self._group_of is None:
            self._group_of = self._param_groups(groups)
        self.tracker.before_step({n: groups[g]["lr"] for n, g in self._group_of.items()})

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.tracker.after_step(state.global_step)

    def _param_groups(self, groups) -> dict[str, int]:
        index = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        owners = {n: (m.A, m.B) for n, m in self.lora.items()} | {p.name: (p.param,) for p in self.parameters}
        missing = [n for n, params in owners.items() if any(id(p) not in index for p in params)]
        if missing:
            raise RuntimeError(f"ALoRA: trainable parameters of {missing[:3]} are not in the optimizer; are they frozen?")
        if any(groups[index[id(m.A)]]["lr"] != groups[index[id(m.B)]]["lr"] for m in self.lora.values()):
            LOG.warning("ALoRA: A and B have different learning rates (LoRA+?); eq. 13's η term uses A's.")
        return {n: index[id(params[0])] for n, params in owners.items()}

    # -- checkpoints and the end -------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from safetensors.torch import save_file

        tensors = {f"{m.name}.{key}": t.detach().cpu().contiguous() for m in self.tracker.modules for key, t in m.state().items()}
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        meta = {"steps": str(self.tracker.steps), "skipped_steps": json.dumps(self.tracker.skipped)}
        save_file(tensors, str(ckpt / CHECKPOINT_STATE), metadata=meta)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.tracker.skipped:
            LOG.warning(
                "ALoRA: %d optimizer step(s) had non-finite gradients or weights and added nothing to the importance "
                "(an fp16 step the grad scaler skipped, or divergence): steps %s", len(self.tracker.skipped), _steps(self.tracker.skipped),
            )
        data = self.importance(tokens=int(getattr(state, "num_input_tokens_seen", 0) or 0))
        write_importance_file(self.output_path, data, self.omega_dtype)
        meta = data.metadata
        LOG.info(
            "ALoRA: wrote importance for %d modules (%d steps, %.2g%% elements clamped, effective layers %.1f of %d) to %s",
            len(data.omega), meta["steps"], 100 * meta["clamped_fraction"], meta["effective_layers"], len(data.omega), self.output_path,
        )

    def importance(self, tokens: int = 0) -> ImportanceFile:
        """Ω (eq. 15) and the reference θ^ν from the end of training (the weights ω was recorded along);
        with a previous file, Ω_old + Ω_new (docs/METHOD.md §1, continual use). Refuses non-finite Ω."""
        previous = self.previous.omega if self.previous is not None else None
        omega, clamped = self.tracker.importance(self.xi, previous)
        bad = [n for n, o in omega.items() if not bool(torch.isfinite(o).all())]
        if bad:
            raise NonFiniteImportanceError(
                f"ALoRA: importance is not finite for {len(bad)} of {len(omega)} modules (first: {bad[0]}); "
                f"optimizer steps with non-finite gradients or weights: {_steps(self.tracker.skipped) or 'none'}. "
                f"Nothing was written; {self.output_path} is unchanged. The general stage diverged: lower learning_rate, "
                "set max_grad_norm, or train in bf16/fp32 instead of fp16."
            )
        data = ImportanceFile({}, {}, {}, fingerprint=self.fingerprint)
        module_meta = {}
        for m in self.tracker.modules:
            o = omega[m.name].cpu()
            data.omega[m.name] = o
            refs = {k: v.cpu() for k, v in m.reference().items()}
            if "reference" in refs:
                data.reference[m.name] = refs["reference"]
                module_meta[m.name] = parameter_metadata(o)
            else:
                data.lora_A[m.name], data.lora_B[m.name] = refs["lora_A"], refs["lora_B"]
                lora = self.lora[m.name]
                module_meta[m.name] = module_metadata(o, lora.r, lora.alpha, lora.scaling, lora.use_rslora, lora.layer)
        norms = torch.tensor([v["norm"] for v in module_meta.values()])
        previous_meta = self.previous.metadata if self.previous is not None else {}
        total = sum(o.numel() for o in omega.values())
        data.metadata = {
            **self.metadata,
            "source": "si",
            "modules": module_meta,
            "xi": self.xi,
            "steps": self.tracker.steps,
            "skipped_steps": list(self.tracker.skipped),
            "tokens": tokens,
            "clamped_fraction": clamped / max(total, 1),
            "effective_layers": effective_layers(layer_weights(norms, "softmax", 1.0)),
            "stages": int(previous_meta.get("stages", 0)) + 1,
        }
        if self._restored_other_weights():
            LOG.warning(
                "ALoRA: the model's LoRA weights now differ from those at the last optimizer step (load_best_model_at_end?). "
                "The importance file's reference θ^ν is the end of training, where ω was recorded; the saved adapter is not."
            )
        return data

    def _restored_other_weights(self) -> bool:
        return any(not torch.equal(m.A_t, m.A.detach().float()) for m in self.tracker.modules if isinstance(m, TrackedModule))


def _steps(steps: list[int], shown: int = 20) -> str:
    text = ", ".join(map(str, steps[:shown]))
    return text + (f", … ({len(steps)} in all)" if len(steps) > shown else "")
