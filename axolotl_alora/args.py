"""The plugin's YAML keys (a pydantic model merged into Axolotl's config) and their cross-checks.

Every key defaults to None in the schema, so that the config Axolotl dumps for a run without ALoRA shows
none of them; `setting(cfg, key)` gives a key's value with its default applied, and `DEFAULTS` states each
default once. Checks run when Axolotl validates the config, before datasets or the model are loaded;
`alora_problems` finds every problem at once, for the validator and for `alora check`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, model_validator

DEFAULT_PHI = 3.0  # ALoRA's φ at the forgetting frontier's middle accuracy level (docs/FRONTIER.md)
PAPER = {"alora_phi": 1e-3, "alora_importance_normalization": "none", "alora_softmax_temperature": 1.0}  # the paper's values
# what a key left out (or null) means; alora_phi's applies when alora_importance_path is set
DEFAULTS = {
    "alora_record_importance": False,
    "alora_importance_path": None,
    "alora_phi": DEFAULT_PHI,
    "alora_xi": 0.1,
    "alora_layer_weighting": "softmax",
    "alora_softmax_temperature": "auto",
    "alora_importance_normalization": "mean",
    "alora_importance_dtype": "float32",
    "alora_importance_form": "dense",
    "alora_shard_importance": True,
    "alora_general_eval": None,
    "alora_general_eval_samples": 256,
    "alora_allow_base_model_mismatch": False,
    "alora_keep": None,
    "alora_max_general_loss_rise": None,
    "alora_budget_by": "both with alora_importance_path, else interpolation",  # setting() resolves it per config
    "alora_general_eval_steps": None,
}
BUDGET_KEYS = ("alora_keep", "alora_max_general_loss_rise")
IMPORTANCE_FILENAME = "alora_importance.safetensors"
# these update parameters inside the backward pass, not in the optimizer step the Trainer reports,
# so neither Δθ per step (eq. 14) nor a penalty computed once per step would be right
STEP_FREE_OPTIMIZERS = ("lomo", "adalomo", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
                        "apollo_adamw_layerwise")


def _described(text: str, key: str | None = None):
    """A field's schema extra: its description, ending with the default the plugin applies."""
    return {"description": f"{text} Default: {DEFAULTS[key]}." if key else text}


class AloraArgs(BaseModel):
    alora_record_importance: bool | None = Field(
        default=None,
        json_schema_extra=_described("General stage: track SI importance every optimizer step and write <output_dir>/alora_importance.safetensors.",
                                     "alora_record_importance"),
    )
    alora_importance_path: str | None = Field(
        default=None,
        json_schema_extra=_described("Domain stage: importance file from a general stage; adds phi * L_reg to the loss."),
    )
    alora_phi: float | None = Field(
        default=None,
        json_schema_extra=_described(f"Regularization strength phi (eq. 18); {DEFAULT_PHI} on mean-normalized Omega when "
                                     "alora_importance_path is set (the paper's 1e-3 on raw Omega does nothing at small scale)."),
    )
    alora_xi: float | None = Field(default=None, gt=0, json_schema_extra=_described(
        "xi in Omega = omega / (Delta^2 + xi) (eq. 15); Zenke et al.'s 0.1.", "alora_xi"))
    alora_layer_weighting: Literal["softmax", "uniform", "none"] | None = Field(default=None, json_schema_extra=_described(
        "Layer weights w_l (eq. 17): softmax (paper), uniform (1/L, '- layer' ablation), none (1, EWC).", "alora_layer_weighting"))
    alora_softmax_temperature: float | Literal["auto"] | None = Field(default=None, json_schema_extra=_described(
        "tau in softmax(n_l / tau); 'auto' sets tau = mean_l n_l.", "alora_softmax_temperature"))
    alora_importance_normalization: Literal["none", "mean"] | None = Field(default=None, json_schema_extra=_described(
        "mean: divide Omega by its mean over all elements, so phi is comparable across runs; none: as recorded (the paper).", "alora_importance_normalization"))
    alora_importance_dtype: Literal["float32", "bfloat16"] | None = Field(default=None, json_schema_extra=_described(
        "dtype of Omega in the written file (general stage) and in memory (domain stage); "
        "omega is accumulated and every penalty block computed in float32.", "alora_importance_dtype"))
    alora_importance_form: Literal["dense", "factored"] | None = Field(default=None, json_schema_extra=_described(
        "dense (the paper): Omega d_out x d_in per module. factored (beyond the paper, for models whose dense "
        "Omega does not fit): Omega ~ u v^T with omega's exact row and column sums, d_out + d_in floats per module; "
        "in a domain stage, a dense file is factored as it is read.", "alora_importance_form"))
    alora_shard_importance: bool | None = Field(default=None, json_schema_extra=_described(
        "Under data parallelism, each rank holds, tracks and regularizes only its share of the modules "
        "(balanced by elements); the general stage writes one shard per rank and an index.", "alora_shard_importance"))
    alora_general_eval: str | dict | None = Field(default=None, json_schema_extra=_described(
        "General text to watch forgetting on (a .txt or .jsonl file, or a dataset entry in `datasets:` syntax): "
        "its mean token loss is logged as alora_general_loss at every evaluation, with base and ν reference points."))
    alora_general_eval_samples: int | None = Field(default=None, gt=0, json_schema_extra=_described(
        "Sequences of sequence_len tokens drawn from alora_general_eval with the run's seed.", "alora_general_eval_samples"))
    alora_allow_base_model_mismatch: bool | None = Field(default=None, json_schema_extra=_described(
        "Use an importance file recorded on a different base model (normally an error).", "alora_allow_base_model_mismatch"))

    alora_keep: float | None = Field(default=None, json_schema_extra=_described(
        "A forgetting budget: the share (0 to 1] of the general stage's gain in general-text loss to keep (needs "
        "alora_general_eval and a ν point: alora_importance_path or lora_model_dir)."))
    alora_max_general_loss_rise: float | None = Field(default=None, json_schema_extra=_described(
        "A forgetting budget for runs with no general stage: the largest rise in general-text loss over the base "
        "model, nats per token (needs alora_general_eval)."))
    alora_budget_by: Literal["interpolation", "phi", "both"] | None = Field(default=None, json_schema_extra=_described(
        "How the budget is met: interpolation (after training, the largest α of (1 − α)·ΔW_ref + α·ΔW_end that "
        "meets it, written to <output_dir>/alora_interpolated), phi (steer alora_phi at every general-text scoring; "
        "needs alora_importance_path) or both.", "alora_budget_by"))
    alora_general_eval_steps: int | None = Field(default=None, gt=0, json_schema_extra=_described(
        "Score the general text every this many optimizer steps, besides evaluations; with alora_budget_by phi or "
        "both, default: a tenth of the run's steps."))

    @model_validator(mode="before")
    @classmethod
    def check_alora_keys(cls, data):
        if isinstance(data, dict):
            problems = alora_problems(data, known=cls.model_fields)  # keys Axolotl or another plugin declares are not unknown
            if len(problems) == 1:
                raise ValueError(problems[0])
            if problems:
                raise ValueError(f"{len(problems)} problems with the ALoRA settings:\n" + "\n".join(f"- {p}" for p in problems))
        return data


def setting(cfg, key: str):
    """`cfg`'s value for the alora_ key `key`, or its default (DEFAULTS) when the config leaves it out."""
    value = cfg.get(key)
    return default(cfg, key) if value is None else value


def default(cfg, key: str):
    """The value the plugin uses for `key` when `cfg` leaves it out. The budget's mechanism depends on the run: φ can
    only be steered with an importance file; with one, steering φ meets the budget from either side (it gives back
    forgetting the budget allows for domain learning, which interpolation cannot), and α then holds the end to it."""
    if key == "alora_budget_by":
        return "both" if cfg.get("alora_importance_path") else "interpolation"
    return DEFAULTS[key]


def keys_in_use(cfg) -> dict:
    """The alora_ keys `cfg` sets to something other than their default: a key at its default changes nothing.
    alora_phi counts whatever its value, since it does nothing without alora_importance_path."""
    return {k: v for k, v in cfg.items() if k in DEFAULTS and v is not None and (k == "alora_phi" or v != default(cfg, k))}


def unknown_keys(cfg, known=()) -> list[str]:
    """A problem for every alora_ key that is neither the plugin's nor in `known`, with the nearest real one when there is one."""
    problems = []
    for key in sorted(k for k in cfg if str(k).startswith("alora_") and k not in DEFAULTS and k not in known):
        near = difflib.get_close_matches(key.removeprefix("alora_"), [k.removeprefix("alora_") for k in DEFAULTS], n=1)  # the prefix all share
        hint = f"did you mean alora_{near[0]}?" if near else "it is not an ALoRA key (see the README's keys)."
        problems.append(f"unknown key {key}; {hint}")
    return problems


def alora_problems(cfg, known=()) -> list[str]:
    """Every problem with `cfg`'s ALoRA settings, each naming the key to change; empty when there is none
    (a config that sets no alora_ key, or only keys at their defaults, has none: the plugin is then inert).
    `known`: other keys the config may declare (an alora_ key among them is not reported as unknown)."""
    problems = unknown_keys(cfg, known)
    given = keys_in_use(cfg)
    if not given:
        return problems
    problems += _value_problems(given)
    problems += _stage_problems(given)
    problems += _run_problems(cfg)
    problems += _budget_problems(cfg, given)
    record, path = bool(given.get("alora_record_importance")), given.get("alora_importance_path")
    if record and path and cfg.get("output_dir"):
        out = Path(cfg["output_dir"]) / IMPORTANCE_FILENAME
        if out.resolve() == Path(path).resolve():
            problems.append(f"this run would write its importance file to {out}, the file it reads (alora_importance_path). "
                            "Set a different output_dir for this stage.")
    return problems


def _value_problems(given: dict) -> list[str]:
    """Each key's value against its type in AloraArgs, and the bounds the types cannot say."""
    problems = []
    for key, value in given.items():
        field = AloraArgs.model_fields[key]
        try:
            TypeAdapter(field.annotation).validate_python(value)
            for bound in field.metadata:  # gt=0
                if not float(value) > bound.gt:
                    raise ValueError(f"must be > {bound.gt}")
        except (ValidationError, ValueError) as e:
            reason = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            problems.append(f"{key}: {reason}, got {value!r}.")
    phi, tau = _number(given.get("alora_phi")), _number(given.get("alora_softmax_temperature"))
    if phi is not None and phi < 0:
        problems.append(f"alora_phi must be >= 0, got {given['alora_phi']}.")
    if tau is not None and not tau > 0:
        problems.append(f"alora_softmax_temperature must be > 0 or 'auto', got {given['alora_softmax_temperature']}.")
    general_eval = given.get("alora_general_eval")
    if isinstance(general_eval, dict) and not general_eval.get("path"):
        problems.append("alora_general_eval: a dataset entry needs `path` (as in `datasets:`).")
    return problems


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _stage_problems(given: dict) -> list[str]:
    """Whether the keys in use give the plugin something to do."""
    record, path = given.get("alora_record_importance"), given.get("alora_importance_path")
    if "alora_phi" in given and not path:
        return ["alora_phi is set but alora_importance_path is not: the regularizer needs the importance file from a general stage."]
    if not record and not path and not given.get("alora_general_eval"):
        return [f"ALoRA keys {sorted(given)} are set but the plugin has nothing to do: set "
                "`alora_record_importance: true` (general stage), `alora_importance_path: <file>` (domain stage) "
                "or `alora_general_eval: <text>` (watch forgetting)."]
    return []


def _budget_problems(cfg, given: dict) -> list[str]:
    """A forgetting budget needs the general text, a reference for a share kept, and a regularizer to steer."""
    budgets = [k for k in BUDGET_KEYS if k in given]
    if "alora_general_eval_steps" in given and not given.get("alora_general_eval"):
        return ["alora_general_eval_steps is set but there is no general text to score: set alora_general_eval."]
    if not budgets:
        return [f"{k} is set but there is no budget to meet: set alora_keep or alora_max_general_loss_rise."
                for k in ("alora_budget_by",) if k in given]
    if len(budgets) == 2:
        return ["alora_keep and alora_max_general_loss_rise are both set: give one forgetting budget."]
    problems = []
    keep, rise = _number(given.get("alora_keep")), _number(given.get("alora_max_general_loss_rise"))
    if "alora_keep" in given and not (keep is not None and 0 < keep <= 1):
        problems.append(f"alora_keep is a share of the general stage's gain to keep, in (0, 1]; got {given['alora_keep']!r}.")
    if "alora_max_general_loss_rise" in given and not (rise is not None and rise > 0):
        problems.append(f"alora_max_general_loss_rise is a rise in nats per token, > 0; got {given['alora_max_general_loss_rise']!r}.")
    if not given.get("alora_general_eval"):
        problems.append(f"{budgets[0]} is measured on general text: set alora_general_eval (a .txt or .jsonl of held-out general text).")
    if "alora_keep" in given and not (given.get("alora_importance_path") or cfg.get("lora_model_dir")):
        problems.append("alora_keep keeps a share of a general stage's gain, but this stage has no ν point: set alora_importance_path "
                        "(or lora_model_dir, the general stage's adapter), or use alora_max_general_loss_rise.")
    mechanism = setting(cfg, "alora_budget_by")
    if mechanism in ("phi", "both") and not given.get("alora_importance_path"):
        problems.append(f"alora_budget_by: {mechanism} steers alora_phi, which needs an importance file: set alora_importance_path, "
                        "or use alora_budget_by: interpolation.")
    if mechanism in ("interpolation", "both") and cfg.get("lora_modules_to_save"):
        problems.append(f"alora_budget_by: {mechanism} interpolates LoRA adapters, and lora_modules_to_save trains full copies it "
                        "cannot interpolate: remove lora_modules_to_save, or use alora_budget_by: phi.")
    return problems


def _run_problems(cfg) -> list[str]:
    """What the rest of the config must be for ALoRA to run."""
    problems = []
    adapter = cfg.get("adapter")
    if adapter not in ("lora", "qlora"):
        problems.append(f"ALoRA needs a LoRA adapter: set `adapter: lora` (got adapter: {adapter!r}; without an adapter Axolotl "
                        "runs a full fine-tune, and ALoRA's importance lives in the LoRA effective-weight space).")
    if cfg.get("fsdp") or cfg.get("fsdp_config") or cfg.get("deepspeed"):
        problems.append("ALoRA needs whole LoRA factors and gradients on every process; FSDP and DeepSpeed shard them. "
                        "Remove the fsdp/fsdp_config/deepspeed keys and use plain data parallel (accelerate launch / torchrun).")
    if str(cfg.get("optimizer") or "") in STEP_FREE_OPTIMIZERS:
        problems.append(f"optimizer {cfg['optimizer']} updates parameters during the backward pass, outside the optimizer step ALoRA "
                        "hooks into. Choose a step-based optimizer (e.g. adamw_torch_fused, adamw_bnb_8bit, paged_adamw_8bit).")
    if cfg.get("peft_use_dora"):
        problems.append("ALoRA does not support DoRA (θ = W0 + s·B·A no longer holds): set peft_use_dora: false.")
    return problems
