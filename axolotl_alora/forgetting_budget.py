"""A forgetting budget in a training run (docs/METHOD.md §9): `alora_keep` or `alora_max_general_loss_rise`.

The general-text sample is split in two disjoint halves: the control sample, which every scoring reads and which
steers, and the report sample, scored only at the start (base, ν) and at the end, which reports. Two mechanisms
(`alora_budget_by`):

- **phi**: at every scoring of the control sample, `PhiController` updates alora_phi (logged as `alora_phi`);
  its state is saved in each checkpoint and restored on resume. Every rank scores the same all-reduced loss, so
  every rank computes the same φ.
- **interpolation**: at the end, the largest α with L(ΔW(α)) ≤ L_budget on the control sample, where
  ΔW(α) = (1 − α)·ΔW_ref + α·ΔW_end and ΔW_ref is ν (the importance file's reference, else the adapter in
  lora_model_dir) or 0; written to <output_dir>/alora_interpolated. The trained adapter is left as it was:
  output_dir holds it, unmodified.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .args import setting
from .budget import PhiController, budget_loss, largest_alpha
from .interpolate import INTERPOLATED, add_interpolation, save_adapter

LOG = logging.getLogger("axolotl.alora")
BUDGET_STATE = "alora_budget.json"
REFERENCE_ADAPTER = "alora_reference"
CANDIDATE_ADAPTER = "alora_candidate"
SLACK = 0.1  # a run more than this share of the budget's scale below it, with α = 1, says how to use the margin


@dataclass(frozen=True)
class BudgetSpec:
    mechanism: str  # "interpolation" | "phi" | "both"
    keep: float | None = None
    max_rise: float | None = None

    @classmethod
    def from_cfg(cls, cfg) -> BudgetSpec | None:
        keep, rise = cfg.get("alora_keep"), cfg.get("alora_max_general_loss_rise")
        if keep is None and rise is None:
            return None
        return cls(setting(cfg, "alora_budget_by"), None if keep is None else float(keep), None if rise is None else float(rise))

    @property
    def steers_phi(self) -> bool:
        return self.mechanism in ("phi", "both")

    @property
    def interpolates(self) -> bool:
        return self.mechanism in ("interpolation", "both")

    def describe(self) -> str:
        if self.keep is not None:
            return f"keep {100 * self.keep:g}% of the general stage's gain"
        return f"a general-text loss at most {self.max_rise:g} nats over the base model"


def split_samples(sequences: Tensor) -> tuple[Tensor, Tensor]:
    """The control sample (even rows) and the report sample (odd rows): disjoint, from the same stretch of text."""
    return sequences[0::2], sequences[1::2]


def default_scoring_interval(spec: BudgetSpec | None, max_steps: int) -> int | None:
    """Steps between general-text scorings when alora_general_eval_steps is not set: a tenth of the run when φ is
    steered (ten updates), else only at evaluations and the end."""
    if spec is None or not spec.steers_phi or not max_steps or max_steps <= 0:
        return None
    return max(1, round(max_steps / 10))


class BudgetRun:
    """The budget's state through one run. `score(sequences)` is the callback's scorer (all ranks, all-reduced)."""

    def __init__(self, spec: BudgetSpec, trainer, report: Tensor, output_dir: str | None, reference_dir: str | None = None,
                 resume_from_checkpoint: str | None = None):
        self.spec, self.trainer, self.report = spec, trainer, report
        self.output_dir, self.reference_dir, self.resume_from_checkpoint = output_dir, reference_dir, resume_from_checkpoint
        self.controller: PhiController | None = None
        self.phi_start: float | None = None
        self.target = self.scale = None
        self.control_points: dict = {}
        self.report_points: dict = {}
        self.alpha: float | None = None
        self.alpha_scored: dict[float, float] = {}
        self.finished = False

    # -- start and resume -------------------------------------------------------------------------------------
    def start(self, control, report, args, state) -> None:
        """`control`/`report`: GeneralScores (base, ν) on each sample; on resume the checkpoint's state wins."""
        restored = self._restored(args, state) if state.global_step > 0 else None
        if restored is not None:  # the start points of the run that began it (a resumed lora_model_dir run has no ν to score)
            self.control_points, self.report_points = restored["control"], restored["report"]
        else:
            self.control_points = {"base": control.base, "reference": control.reference}
            self.report_points = {"base": report.base, "reference": report.reference}
        if self.spec.keep is not None and self.control_points["reference"] is None:
            raise ValueError("ALoRA: alora_keep needs ν's general-text loss, but this run has no ν adapter to score: the importance "
                             "file's reference adapter has another LoRA shape than this run's (lora_r, lora_target_modules) and no "
                             "lora_model_dir is set. Match the general stage's LoRA settings, or use alora_max_general_loss_rise.")
        self.target, self.scale = budget_loss(self.control_points["base"], self.control_points["reference"], keep=self.spec.keep,
                                              max_rise=self.spec.max_rise)
        if self.spec.steers_phi:
            if restored is not None and restored.get("controller"):
                self.controller = PhiController.from_state({**restored["controller"], "target": self.target, "scale": self.scale})
            else:
                self.controller = PhiController(self.trainer.alora_phi, self.target, self.scale)
            self.trainer.alora_phi = self.controller.phi
            self.phi_start = restored.get("phi_start", self.controller.phi) if restored is not None else self.controller.phi
        if state.is_world_process_zero:
            LOG.info("ALoRA: forgetting budget: %s, general-text loss ≤ %.4f on the control sample, by %s%s", self.spec.describe(),
                     self.target, self.spec.mechanism, f"; φ starts at {self.controller.phi:g}" if self.controller else "")

    def _restored(self, args, state) -> dict | None:
        folder = Path(self.resume_from_checkpoint or os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        path = folder / BUDGET_STATE
        if not path.is_file():
            LOG.warning("ALoRA: resuming at step %d, but %s has no %s; the budget starts afresh from alora_phi", state.global_step,
                        folder, BUDGET_STATE)
            return None
        restored = json.loads(path.read_text())
        LOG.info("ALoRA: restored the forgetting budget from %s%s", path,
                 f" (φ {restored['controller']['phi']:g})" if restored.get("controller") else "")
        return restored

    def state(self) -> dict:
        return {"budget": self.spec.describe(), "mechanism": self.spec.mechanism, "keep": self.spec.keep, "max_rise": self.spec.max_rise,
                "target": self.target, "scale": self.scale, "phi_start": self.phi_start, "control": self.control_points, "report": self.report_points,
                "controller": self.controller.state() if self.controller else None}

    def save(self, folder: Path) -> None:
        from .general_eval import write_json_atomically

        write_json_atomically(folder / BUDGET_STATE, self.state())

    # -- during training ----------------------------------------------------------------------------------------
    def after_score(self, loss: float, step: int) -> None:
        if self.controller is not None:
            self.trainer.alora_phi = self.controller.update(loss, step)

    # -- at the end -------------------------------------------------------------------------------------------
    def finish(self, model, score, end_loss: float, regularizer=None, write: bool = True) -> None:
        """Report the end adapter on the report sample; with interpolation, search α on the control sample, write
        the adapter and report it too. `score(sequences)` scores the control sample when `sequences` is None. The
        model is left with its trained adapter active, as it was."""
        self.finished = True
        self.report_points["end"] = score(self.report)
        self.control_points["end"] = end_loss
        if not self.spec.interpolates:
            return
        end = model.active_adapter
        reference = self._add_reference(model, end, regularizer)
        try:
            def loss_at(alpha: float) -> float:
                if alpha == 1.0:
                    return end_loss
                add_interpolation(model, reference, end, alpha, name=CANDIDATE_ADAPTER)
                try:
                    return score(None)
                finally:
                    model.set_adapter(end)
                    model.delete_adapter(CANDIDATE_ADAPTER)

            self.alpha, self.alpha_scored = largest_alpha(loss_at, self.target)
            add_interpolation(model, reference, end, self.alpha)
            self.control_points["chosen"] = self.alpha_scored[self.alpha] if self.alpha in self.alpha_scored else score(None)
            self.report_points["chosen"] = score(self.report)
            if write and self.output_dir and self.trainer.is_world_process_zero():
                save_adapter(model, INTERPOLATED, Path(self.output_dir) / INTERPOLATED)
        finally:
            model.set_adapter(end)
            for name in (INTERPOLATED, reference):
                if name is not None and name in model.peft_config:
                    model.delete_adapter(name)

    def _add_reference(self, model, end: str, regularizer) -> str | None:
        """ΔW_ref as adapter REFERENCE_ADAPTER: the importance file's θ^ν, else lora_model_dir's adapter; None: ΔW_ref = 0."""
        from .general_eval import swappable_references
        from .lora import adapted_modules

        swappable = swappable_references(regularizer)
        if swappable is not None:
            by_name = {m.name: m for m in swappable[0]}
            model.add_adapter(REFERENCE_ADAPTER, copy.deepcopy(model.peft_config[end]))
            model.set_adapter(REFERENCE_ADAPTER)  # adapted_modules finds the active adapter's factors
            try:
                with torch.no_grad():
                    for m in adapted_modules(model):
                        m.A.copy_(by_name[m.name].A_ref)
                        m.B.copy_(by_name[m.name].B_ref)
            finally:
                model.set_adapter(end)
            return REFERENCE_ADAPTER
        if self.reference_dir:
            model.load_adapter(str(self.reference_dir), adapter_name=REFERENCE_ADAPTER)
            model.set_adapter(end)
            return REFERENCE_ADAPTER
        return None

    # -- what it did ------------------------------------------------------------------------------------------
    @staticmethod
    def kept(points: dict, key: str) -> float | None:
        from .general_eval import GeneralScores

        return GeneralScores(points["base"], points["reference"]).kept(points[key]) if key in points else None

    def summary(self) -> dict:
        report_key = "chosen" if "chosen" in self.report_points else "end"
        return {**self.state(), "phi_final": self.controller.phi if self.controller else None,
                "phi_trajectory": [(h["step"], h["phi"]) for h in self.controller.history] if self.controller else None,
                "alpha": self.alpha, "alpha_scored": {f"{a:g}": v for a, v in sorted(self.alpha_scored.items())},
                "adapter": str(Path(self.output_dir) / INTERPOLATED) if self.alpha is not None and self.output_dir else None,
                "report_sample": report_key, "report_kept_share": self.kept(self.report_points, report_key),
                "report_rise_over_base": self.report_points[report_key] - self.report_points["base"] if report_key in self.report_points else None}

    def slack_note(self) -> str | None:
        """With interpolation alone, α can only hold the run back; a run that already kept far more than asked (α = 1)
        gave up domain learning it did not need to. Say how to trade that margin back."""
        if self.spec.mechanism != "interpolation" or self.alpha != 1.0 or self.target is None:
            return None
        margin = (self.target - self.control_points["end"]) / self.scale
        if margin <= SLACK:
            return None
        end, base = self.control_points["end"], self.control_points["base"]
        if self.spec.keep is not None:
            met = f"kept {100 * self.kept(self.control_points, 'end'):.0f}% of the gain on the control sample, {100 * self.spec.keep:g}% asked"
        else:
            met = f"rose {end - base:+.4f} nats over the base on the control sample, {self.spec.max_rise:g} allowed"
        return (f"ALoRA: the run met the forgetting budget with room to spare ({met}), and interpolation can only hold a run "
                "back. To trade that margin for domain learning, let the budget steer φ down (alora_budget_by: both), or lower alora_phi.")

    def verdict(self) -> str:
        parts = [f"ALoRA: forgetting budget ({self.spec.describe()}, by {self.spec.mechanism})"]
        if self.controller is not None:
            parts.append(f"φ {self.phi_start:g} → {self.controller.phi:g} over {len(self.controller.history)} scorings")
        if self.alpha is not None:
            parts.append(f"α {self.alpha:.4g} → {Path(self.output_dir or '.') / INTERPOLATED}")
        summary = self.summary()
        if summary["report_kept_share"] is not None:
            parts.append(f"on the report sample {100 * summary['report_kept_share']:.0f}% of the gain kept")
        elif summary["report_rise_over_base"] is not None:
            parts.append(f"on the report sample {summary['report_rise_over_base']:+.4f} over the base")
        return "; ".join(parts)
