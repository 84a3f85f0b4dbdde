"""AloraPlugin: validates early, then wires the importance recorder (stage ν) and the regularizer (stage μ)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from axolotl.integrations.base import BasePlugin

from .args import IMPORTANCE_FILENAME, PAPER, setting
from .importance_file import ImportanceFile, base_metadata, check_base_model, check_modules_match, read_importance_file
from .lora import adapted_modules, base_fingerprint, full_parameters
from .regularizer import Regularizer, build_regularizer
from .sharding import Shard, data_parallel

LOG = logging.getLogger("axolotl.alora")


def alora_enabled(cfg) -> bool:
    return bool(cfg.get("alora_record_importance") or cfg.get("alora_importance_path") or cfg.get("alora_general_eval"))


class AloraPlugin(BasePlugin):
    """ALoRA (arXiv 2501.13669): SI importance in a general stage, layer/element-wise regularization after it."""

    def __init__(self):
        super().__init__()
        self.previous: ImportanceFile | None = None
        self.regularizer: Regularizer | None = None
        self.recorder = None
        self.general_documents: list[str] | None = None
        self.shard: Shard | None = None

    def get_input_args(self):
        return "axolotl_alora.args.AloraArgs"

    def pre_model_load(self, cfg):
        if not alora_enabled(cfg):
            return
        if cfg.alora_general_eval:  # a missing or empty text fails here, before the model loads
            from .general_eval import read_documents

            self.general_documents = read_documents(cfg.alora_general_eval)
        if not cfg.alora_importance_path:
            return
        # every check that needs only the file runs here, before the model is loaded
        from .hub import resolve_importance_path
        from .importance_file import read_metadata

        cfg.alora_importance_path = resolve_importance_path(cfg.alora_importance_path)  # hf://… → the cached file

        meta = read_metadata(cfg.alora_importance_path)
        self.shard = self._shard(cfg, {n: math.prod(e["shape"]) for n, e in meta["modules"].items()})
        keep = self.shard.owned if self.shard.sharded else None
        self.previous = read_importance_file(cfg.alora_importance_path, keep=keep, omega_dtype=setting(cfg, "alora_importance_dtype"),
                                             omega_form=setting(cfg, "alora_importance_form"))
        meta = self.previous.metadata
        LOG.info(
            "ALoRA: read importance for %d modules from %s (format version %d, source %s, %s steps, base %s)",
            len(meta["modules"]), cfg.alora_importance_path, self.previous.format_version, meta.get("source"),
            meta.get("steps"), meta.get("base_model"),
        )

    @staticmethod
    def _shard(cfg, sizes: dict[str, int]) -> Shard:
        rank, world_size = data_parallel()
        if world_size > 1 and setting(cfg, "alora_shard_importance"):
            shard = Shard.of(sizes, rank, world_size)
            if rank == 0:
                LOG.info("ALoRA: importance sharded across %d ranks: rank 0 holds %d of %d modules", world_size, len(shard.owned), len(sizes))
            return shard
        return Shard.whole(sizes)

    def post_model_load(self, cfg, model):
        if not alora_enabled(cfg):
            return
        modules = adapted_modules(model)
        parameters = full_parameters(model, modules)
        if parameters:
            LOG.info(
                "ALoRA: %d trainable parameters outside LoRA's factors (%s) get element-wise SI importance in their own space",
                len(parameters), ", ".join(p.name for p in parameters[:3]) + (", …" if len(parameters) > 3 else ""),
            )
        fingerprint = base_fingerprint(model)
        if self.shard is None:
            self.shard = self._shard(cfg, {m.name: math.prod(m.shape) for m in modules + parameters})
        if self.previous is not None:
            path = cfg.alora_importance_path
            check_modules_match(self.previous, modules + parameters, path)
            check_base_model(self.previous, fingerprint, cfg)
            self.regularizer = build_regularizer(
                self.previous, modules, parameters, setting(cfg, "alora_layer_weighting"), setting(cfg, "alora_softmax_temperature"),
                setting(cfg, "alora_importance_normalization"),
                world_size=self.shard.world_size,
            )
            held = [m.omega for m in self.regularizer.modules]
            stored = [o.stored() if hasattr(o, "stored") else o.numel() for o in held]
            LOG.info("ALoRA: rank %d holds Ω of %d modules, %d elements (%.1f MB, %s)", data_parallel()[0], len(held), sum(stored),
                     1e-6 * sum(n * o.element_size() for n, o in zip(stored, held)), setting(cfg, "alora_importance_dtype"))
            LOG.info("ALoRA: phi %g", float(setting(cfg, "alora_phi")))
            defaulted = [k for k in PAPER if cfg.get(k) is None]
            if defaulted:
                LOG.info("ALoRA: defaults in use: %s (changed in 0.2.0 from the paper's %s, which did nothing at small scale; "
                         "set those keys to the paper's values to get them back)",
                         ", ".join(f"{k}={setting(cfg, k)}" for k in defaulted), ", ".join(f"{k}={PAPER[k]}" for k in defaulted))
        if cfg.alora_record_importance:
            from .callbacks import ImportanceRecorder

            self.recorder = ImportanceRecorder(
                modules,
                output_path=Path(cfg.output_dir) / IMPORTANCE_FILENAME,
                xi=float(setting(cfg, "alora_xi")),
                omega_dtype=setting(cfg, "alora_importance_dtype"),
                metadata=base_metadata(cfg.base_model, model, cfg.lora_target_modules),
                fingerprint=fingerprint,
                previous=self.previous,
                resume_from_checkpoint=cfg.resume_from_checkpoint,
                parameters=parameters,
                shard=self.shard,
                form=setting(cfg, "alora_importance_form"),
            )
        else:
            self.previous = None  # the regularizer holds what it needs

    def get_training_args(self, cfg):
        if alora_enabled(cfg) and cfg.alora_record_importance and cfg.include_tokens_per_second is None:
            return {"include_num_input_tokens_seen": "non_padding"}  # for the file's `tokens`
        return None

    def get_trainer_cls(self, cfg):
        if alora_enabled(cfg) and cfg.alora_importance_path:
            from .trainer import AloraTrainer

            return AloraTrainer
        return None

    def post_trainer_create(self, cfg, trainer):
        if self.regularizer is None:
            return
        from .trainer import AloraTrainer

        if not isinstance(trainer, AloraTrainer):
            raise RuntimeError(
                f"ALoRA needs its trainer class, but {type(trainer).__name__} was built (another plugin's "
                "get_trainer_cls or an RL trainer?). ALoRA's domain stage supports supervised LoRA training only."
            )
        trainer.alora_regularizer = self.regularizer
        trainer.alora_phi = float(setting(cfg, "alora_phi"))

    def add_callbacks_post_trainer(self, cfg, trainer):
        callbacks = [self.recorder] if self.recorder is not None else []
        if alora_enabled(cfg) and cfg.alora_general_eval:
            from .general_eval import general_eval_callback

            callbacks.append(general_eval_callback(cfg, trainer, self.general_documents, self.regularizer))
        return callbacks
