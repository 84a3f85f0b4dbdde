"""The plugin's YAML keys (a pydantic model merged into Axolotl's config) and their cross-checks.

Checks run when Axolotl validates the config, before datasets or the model are loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

DEFAULT_PHI = 1e-3
IMPORTANCE_FILENAME = "alora_importance.safetensors"
# these update parameters inside the backward pass, not in the optimizer step the Trainer reports,
# so neither Δθ per step (eq. 14) nor a penalty computed once per step would be right
STEP_FREE_OPTIMIZERS = ("lomo", "adalomo", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
                        "apollo_adamw_layerwise")


class AloraArgs(BaseModel):
    alora_record_importance: bool | None = Field(
        default=None,
        json_schema_extra={"description": "General stage: track SI importance every optimizer step and write <output_dir>/alora_importance.safetensors."},
    )
    alora_importance_path: str | None = Field(
        default=None,
        json_schema_extra={"description": "Domain stage: importance file from a general stage; adds phi * L_reg to the loss."},
    )
    alora_phi: float | None = Field(
        default=None,
        json_schema_extra={"description": f"Regularization strength phi (eq. 18). Default {DEFAULT_PHI} (the paper's) when alora_importance_path is set."},
    )
    alora_xi: float = Field(default=0.1, gt=0, json_schema_extra={"description": "xi in Omega = omega / (Delta^2 + xi) (eq. 15); Zenke et al.'s 0.1."})
    alora_layer_weighting: Literal["softmax", "uniform", "none"] = Field(
        default="softmax", json_schema_extra={"description": "Layer weights w_l (eq. 17): softmax (paper), uniform (1/L, '- layer' ablation), none (1, EWC)."}
    )
    alora_softmax_temperature: float | Literal["auto"] = Field(
        default=1.0, json_schema_extra={"description": "tau in softmax(n_l / tau); 'auto' sets tau = mean_l n_l."}
    )
    alora_importance_normalization: Literal["none", "mean"] = Field(
        default="none", json_schema_extra={"description": "none (paper) or mean: divide Omega by its mean over all elements, so phi is comparable across runs."}
    )
    alora_importance_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        json_schema_extra={"description": "dtype of Omega in the written file (general stage) and in memory (domain stage); "
                           "omega is accumulated and every penalty block computed in float32."},
    )
    alora_importance_form: Literal["dense", "factored"] = Field(
        default="dense",
        json_schema_extra={"description": "dense (the paper): Omega d_out x d_in per module. factored (beyond the paper, for models whose dense "
                           "Omega does not fit): Omega ~ u v^T with omega's exact row and column sums, d_out + d_in floats per module; "
                           "in a domain stage, a dense file is factored as it is read."},
    )
    alora_shard_importance: bool = Field(
        default=True,
        json_schema_extra={"description": "Under data parallelism, each rank holds, tracks and regularizes only its share of the modules "
                           "(balanced by elements); the general stage writes one shard per rank and an index."},
    )
    alora_general_eval: str | dict | None = Field(
        default=None,
        json_schema_extra={"description": "General text to watch forgetting on (a .txt or .jsonl file, or a dataset entry in `datasets:` syntax): "
                           "its mean token loss is logged as alora_general_loss at every evaluation, with base and ν reference points."},
    )
    alora_general_eval_samples: int = Field(
        default=256, gt=0, json_schema_extra={"description": "Sequences of sequence_len tokens drawn from alora_general_eval with the run's seed."}
    )
    alora_allow_base_model_mismatch: bool | None = Field(
        default=None, json_schema_extra={"description": "Use an importance file recorded on a different base model (normally an error)."}
    )

    @model_validator(mode="before")
    @classmethod
    def check_alora_keys(cls, data):
        if not isinstance(data, dict):
            return data
        given = {k: v for k, v in data.items() if k.startswith("alora_") and v is not None}
        if not given:
            return data
        check_alora_settings(data, given)
        if given.get("alora_importance_path") and data.get("alora_phi") is None:
            data = {**data, "alora_phi": DEFAULT_PHI}
        return data


def check_alora_settings(cfg, given: dict) -> None:
    """Raise ValueError naming the key to change for every inconsistent combination."""
    record = bool(given.get("alora_record_importance"))
    path = given.get("alora_importance_path")
    phi = given.get("alora_phi")
    if phi is not None:
        if not path:
            raise ValueError("alora_phi is set but alora_importance_path is not: the regularizer needs the importance file from a general stage.")
        if float(phi) < 0:
            raise ValueError(f"alora_phi must be >= 0, got {phi}.")
    general_eval = given.get("alora_general_eval")
    if not record and not path and not general_eval:
        raise ValueError(
            f"ALoRA keys {sorted(given)} are set but the plugin has nothing to do: set "
            "`alora_record_importance: true` (general stage), `alora_importance_path: <file>` (domain stage) "
            "or `alora_general_eval: <text>` (watch forgetting)."
        )
    if isinstance(general_eval, dict) and not general_eval.get("path"):
        raise ValueError("alora_general_eval: a dataset entry needs `path` (as in `datasets:`).")
    adapter = cfg.get("adapter")
    if adapter not in ("lora", "qlora"):
        raise ValueError(
            f"ALoRA needs a LoRA adapter: set `adapter: lora` (got adapter: {adapter!r}; without an adapter Axolotl "
            "runs a full fine-tune, and ALoRA's importance lives in the LoRA effective-weight space)."
        )
    if cfg.get("fsdp") or cfg.get("fsdp_config") or cfg.get("deepspeed"):
        raise ValueError(
            "ALoRA needs whole LoRA factors and gradients on every process; FSDP and DeepSpeed shard them. "
            "Use plain data parallel (accelerate launch / torchrun without fsdp or deepspeed keys)."
        )
    if str(cfg.get("optimizer") or "") in STEP_FREE_OPTIMIZERS:
        raise ValueError(
            f"optimizer {cfg['optimizer']} updates parameters during the backward pass, outside the optimizer step ALoRA "
            "hooks into. Choose a step-based optimizer (e.g. adamw_torch_fused, adamw_bnb_8bit, paged_adamw_8bit)."
        )
    if cfg.get("peft_use_dora"):
        raise ValueError("ALoRA does not support DoRA (θ = W0 + s·B·A no longer holds): set peft_use_dora: false.")
    tau = given.get("alora_softmax_temperature")
    if tau is not None and tau != "auto" and not float(tau) > 0:
        raise ValueError(f"alora_softmax_temperature must be > 0 or 'auto', got {tau}.")
    if record and path and cfg.get("output_dir"):
        out = Path(cfg["output_dir"]) / IMPORTANCE_FILENAME
        if out.resolve() == Path(path).resolve():
            raise ValueError(
                f"this run would write its importance file to {out}, the file it reads (alora_importance_path). "
                "Set a different output_dir for this stage."
            )
