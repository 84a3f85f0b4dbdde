"""The general stage's Trainer callback: ω once per optimizer step, saved with checkpoints, Ω written at the end.

Under `alora_shard_importance` with W > 1 ranks, each rank tracks only the modules it owns (sharding.py),
saves its own checkpoint state, and writes its own shard of the importance file; rank 0 writes the index."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from .factored import FactoredTrackedModule
from .importance import OmegaTracker, TrackedModule, TrackedParameter
from .importance_file import (
    FINGERPRINT_KEY,
    OMEGA_DTYPES,
    SUFFIXES,
    ImportanceFile,
    ImportanceFileError,
    module_kind,
    module_metadata,
    parameter_metadata,
    write_importance_file,
    write_importance_index,
)
from .lora import FullParameter, LoraModule
from .regularizer import effective_layers, layer_weights
from .sharding import Shard, data_parallel

LOG = logging.getLogger("axolotl.alora")
CHECKPOINT_STATE = "alora_state.safetensors"
FACTORED_DELTA_LIMIT = 0.1  # the factored form drops Δ² from ω/(Δ² + ξ): warn when mean Δ² exceeds this share of ξ


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
        shard: Shard | None = None,
        form: str = "dense",
    ):
        self.order = [m.name for m in modules] + [p.name for p in parameters]  # the file lists modules in model order
        self.counts = (len(modules), len(parameters))
        self.shard = shard or Shard.whole(self.order)
        self.lora = {m.name: m for m in modules if m.name in self.shard.owned}
        self.parameters = [p for p in parameters if p.name in self.shard.owned]
        tracked = FactoredTrackedModule if form == "factored" else TrackedModule
        self.tracker = OmegaTracker(
            [tracked(m.name, m.A, m.B, m.scaling) for m in self.lora.values()] + [TrackedParameter(p.name, p.param) for p in self.parameters]
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
        held = sum(t.numel() for m in self.tracker.modules for k, t in m.state().items() if k.startswith("omega"))
        LOG.info("ALoRA: rank %d holds ω of %d modules, %d elements (%.1f MB)", data_parallel()[0], len(self.tracker.modules), held, 4e-6 * held)
        if state.is_world_process_zero:
            share = f" (sharded across {self.shard.world_size} ranks)" if self.shard.sharded else ""
            LOG.info(
                "ALoRA: recording importance for %d LoRA modules and %d full parameters%s; it will be written to %s",
                *self.counts, share, self.output_path if not self.shard.sharded else f"shards and an index beside {self.output_path}",
            )

    def _load_checkpoint_state(self, args, state):
        from safetensors import safe_open

        ckpt = Path(self.resume_from_checkpoint or os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        files = sorted(ckpt.glob("alora_state*.safetensors"))
        if not files:
            raise ImportanceFileError(
                f"resuming from {ckpt}, which holds no {CHECKPOINT_STATE}: the importance recorded before it is lost. "
                "Restart the general stage without resume_from_checkpoint."
            )
        found = {}
        for path in files:  # one file, or one per rank of the run that saved it: take this rank's modules from any
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                for m in self.tracker.modules:
                    if all(f"{m.name}.{key}" in keys for key in m.state()):
                        m.load_state({key: f.get_tensor(f"{m.name}.{key}") for key in m.state()})
                        found[m.name] = path
                meta = f.metadata()
        missing = [m.name for m in self.tracker.modules if m.name not in found]
        if missing:
            raise ImportanceFileError(f"{ckpt}: its ALoRA state lacks {len(missing)} modules (first: {missing[0]}); "
                                      "restart the general stage without resume_from_checkpoint.")
        self.tracker.steps = int(meta["steps"])
        self.tracker.skipped = json.loads(meta.get("skipped_steps", "[]"))
        LOG.info("ALoRA: resumed importance recording from %s (%d steps recorded)", ckpt, self.tracker.steps)

    # -- every optimizer step --------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        groups = optimizer.param_groups
        if self._group_of is None:
            self._group_of = self._param_groups(groups)
        self.tracker.before_step({n: groups[g]["lr"] for n, g in self._group_of.items()})

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.tracker.after_step(state.global_step + 1)  # the Trainer numbers this step global_step + 1 (logs, checkpoints)

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
        if not (self.shard.sharded or state.is_world_process_zero):
            return
        from safetensors.torch import save_file

        tensors = {f"{m.name}.{key}": t.detach().cpu().contiguous() for m in self.tracker.modules for key, t in m.state().items()}
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)  # another rank may not have made it yet
        meta = {"steps": str(self.tracker.steps), "skipped_steps": json.dumps(self.tracker.skipped)}
        name = f"alora_state-{self.shard.rank + 1:05d}-of-{self.shard.world_size:05d}.safetensors" if self.shard.sharded else CHECKPOINT_STATE
        save_file(tensors, str(ckpt / name), metadata=meta)

    def on_train_end(self, args, state, control, **kwargs):
        if not (self.shard.sharded or state.is_world_process_zero):
            return
        if self.tracker.skipped and state.is_world_process_zero:
            LOG.warning(
                "ALoRA: %d optimizer step(s) had non-finite gradients or weights and added nothing to the importance "
                "(an fp16 step the grad scaler skipped, or divergence): steps %s", len(self.tracker.skipped), _steps(self.tracker.skipped),
            )
        self._check_factored_delta()
        data = self.importance(tokens=int(getattr(state, "num_input_tokens_seen", 0) or 0), in_place=True)
        if self.shard.sharded:
            written = self._write_shard(data)
        else:
            written = write_importance_file(self.output_path, data, self.omega_dtype)
        meta = data.metadata
        if state.is_world_process_zero:
            LOG.info(
                "ALoRA: wrote importance for %d modules (%d steps, %.2g%% elements clamped, effective layers %.1f of %d) to %s",
                len(meta["modules"]), meta["steps"], 100 * meta["clamped_fraction"], meta["effective_layers"], len(meta["modules"]), written,
            )

    def _check_factored_delta(self) -> None:
        """The factored form's Ω ≈ ω/ξ assumes Δ² ≪ ξ (factored.factored_importance); say where that does not hold."""
        ratios = {m.name: float(m.mean_delta_sq()) / self.xi for m in self.tracker.modules if isinstance(m, FactoredTrackedModule)}
        worst = max(ratios, key=ratios.get, default=None)
        if worst is not None and ratios[worst] > FACTORED_DELTA_LIMIT:
            LOG.warning(
                "ALoRA: factored importance assumes the stage's weight change Δ is small next to ξ, but mean Δ² is %.3g·ξ in %s "
                "(%d of %d modules above %g·ξ): Ω is overstated there. Raise alora_xi, or use alora_importance_form: dense.",
                ratios[worst], worst, sum(r > FACTORED_DELTA_LIMIT for r in ratios.values()), len(ratios), FACTORED_DELTA_LIMIT,
            )

    def _write_shard(self, data: ImportanceFile):
        import torch.distributed as dist

        shard = (self.shard.rank, self.shard.world_size)
        write_importance_file(self.output_path, data, self.omega_dtype, shard=shard)
        keys = [f"{n}.{suffix}" for n in data.omega for suffix in SUFFIXES[module_kind(data.metadata["modules"][n])]]
        keys += [FINGERPRINT_KEY] if data.fingerprint is not None else []
        every = [None] * self.shard.world_size
        dist.all_gather_object(every, keys)  # also a barrier: every shard is on disk
        if self.shard.rank == 0:
            return write_importance_index(self.output_path, data.metadata, every, self.omega_dtype)
        return None

    def importance(self, tokens: int = 0, in_place: bool = False) -> ImportanceFile:
        """Ω (eq. 15) and the reference θ^ν from the end of training (the weights ω was recorded along);
        with a previous file, Ω_old + Ω_new (docs/METHOD.md §1, continual use). Refuses non-finite Ω.
        `in_place` turns ω into Ω (the end of training: the tracker is spent). Sharded, each rank returns its
        own modules' tensors with the whole run's metadata."""
        previous = self.previous.omega if self.previous is not None else None
        omega, clamped = self.tracker.importance(self.xi, previous, in_place=in_place, dtype=OMEGA_DTYPES[self.omega_dtype])
        bad = [n for n, o in omega.items() if not all(bool(torch.isfinite(t).all()) for t in _parts(o))]
        module_meta = self._module_metadata(omega) if not bad else {}
        total = sum(o.stored() if hasattr(o, "stored") else o.numel() for o in omega.values())  # the factored form clamps sums
        if self.shard.sharded:
            bad, module_meta, clamped, total = self._gather(bad, module_meta, clamped, total)
        if bad:
            raise NonFiniteImportanceError(
                f"ALoRA: importance is not finite for {len(bad)} of {len(omega)} modules (first: {bad[0]}); "
                f"optimizer steps with non-finite gradients or weights: {_steps(self.tracker.skipped) or 'none'}. "
                f"Nothing was written; {self.output_path} is unchanged. The general stage diverged: lower learning_rate, "
                "set max_grad_norm, or train in bf16/fp32 instead of fp16."
            )
        data = ImportanceFile({}, {}, {}, fingerprint=self.fingerprint if self.shard.rank == 0 else None)
        for m in self.tracker.modules:
            data.omega[m.name] = omega[m.name].to("cpu")
            refs = {k: v.cpu() for k, v in m.reference().items()}
            if "reference" in refs:
                data.reference[m.name] = refs["reference"]
            else:
                data.lora_A[m.name], data.lora_B[m.name] = refs["lora_A"], refs["lora_B"]
        norms = torch.tensor([v["norm"] for v in module_meta.values()])
        previous_meta = self.previous.metadata if self.previous is not None else {}
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

    def _module_metadata(self, omega: dict[str, torch.Tensor]) -> dict[str, dict]:
        meta = {}
        for name, o in omega.items():
            lora = self.lora.get(name)
            meta[name] = parameter_metadata(o) if lora is None else module_metadata(o, lora.r, lora.alpha, lora.scaling, lora.use_rslora, lora.layer)
        return meta

    def _gather(self, bad: list[str], module_meta: dict, clamped: int, total: int):
        """Every rank's findings, merged in model order: each rank must decide alike (raise, or write)."""
        import torch.distributed as dist

        every = [None] * self.shard.world_size
        dist.all_gather_object(every, (bad, module_meta, clamped, total))
        merged = {k: v for _, meta, _, _ in every for k, v in meta.items()}
        return ([n for b, _, _, _ in every for n in b], {n: merged[n] for n in self.order if n in merged},
                sum(c for _, _, c, _ in every), sum(t for _, _, _, t in every))

    def _restored_other_weights(self) -> bool:
        return any(not torch.equal(m.A_t, m.A.detach().float()) for m in self.tracker.modules if hasattr(m, "A_t"))


def _parts(omega):
    return (omega.u, omega.v) if hasattr(omega, "u") else (omega,)


def _steps(steps: list[int], shown: int = 20) -> str:
    text = ", ".join(map(str, steps[:shown]))
    return text + (f", … ({len(steps)} in all)" if len(steps) > shown else "")
