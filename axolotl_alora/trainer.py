"""The domain-stage trainer: L = L_task + φ·L_reg (eq. 18), with the regularizer's logging (docs/METHOD.md §4)."""

from __future__ import annotations

import logging

import torch
from axolotl.core.trainers.base import AxolotlTrainer

LOG = logging.getLogger("axolotl.alora")
NO_EFFECT_RATIO = 1e-4


class AloraTrainer(AxolotlTrainer):
    """AxolotlTrainer plus φ·L_reg once per micro-batch, scaled like the task loss under accumulation.

    The logged `loss` (and Axolotl's `ppl`) stay the task loss; the penalty is logged on its own.
    """

    alora_regularizer = None  # a regularizer.Regularizer, attached by the plugin in post_trainer_create
    alora_phi: float = 0.0
    _alora_penalty = None  # φ·L_reg's share of the value training_step returns, for the micro-batch in flight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.alora_regularizer is None or not model.training or self.alora_phi == 0:
            return out  # φ = 0: no pass over Ω (and no all-reduce when sharded); nothing to add or log
        loss, outputs = out if return_outputs else (out, None)
        # one pass over Ω per optimizer step: all micro-batches of a step see the same parameters
        reg = self.alora_regularizer(self.state.global_step)
        self._alora_phi_in_step = self.alora_phi  # a budget may change φ between steps: the log gives the one this step used
        # transformers divides the returned loss by the accumulation steps unless the model normalises
        # by num_items_in_batch itself; then the penalty must be divided here to mean φ per optimizer step
        divided_later = (not self.model_accepts_loss_kwargs or num_items_in_batch is None) and self.compute_loss_func is None
        penalty = self.alora_phi * (reg if divided_later else reg / self.current_gradient_accumulation_steps)
        self._alora_record(reg.detach(), penalty.detach() / loss.detach())
        loss = loss + penalty
        self._alora_penalty = self.alora_phi * reg.detach() / self.current_gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._alora_penalty = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._alora_penalty is not None:
            loss = loss - self._alora_penalty.to(loss.dtype)  # the backward saw the penalty; the log reports L_task
        return loss

    def _alora_record(self, reg: torch.Tensor, ratio: torch.Tensor) -> None:
        # device-side sums: no host sync per micro-batch; read at logging steps only
        if getattr(self, "_alora_sums", None) is None:
            self._alora_sums = torch.zeros(3, dtype=torch.float64, device=reg.device)
            self._alora_max_ratio = torch.zeros((), dtype=torch.float64, device=reg.device)
        self._alora_sums += torch.stack([reg.double(), ratio.double(), torch.ones((), dtype=torch.float64, device=reg.device)])
        self._alora_max_ratio = torch.maximum(self._alora_max_ratio, ratio.double())

    def log(self, logs, start_time=None):
        if "loss" in logs and self.alora_regularizer is not None:
            logs["alora_phi"] = getattr(self, "_alora_phi_in_step", self.alora_phi)  # a forgetting budget steers it
        sums = getattr(self, "_alora_sums", None)
        if "loss" in logs and sums is not None and sums[2] > 0:
            reg_sum, ratio_sum, count = sums.tolist()
            logs["alora_reg_loss"] = reg_sum / count  # full precision: Axolotl rounds stored metrics to 5 digits
            logs["alora_reg_ratio"] = ratio_sum / count
            sums.zero_()
        return super().log(logs, start_time)

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        if self.alora_regularizer is not None and self.alora_phi == 0:
            LOG.warning("ALoRA: alora_phi is 0, so the regularizer was off and this was plain LoRA training; raise alora_phi to regularize.")
        elif self.alora_regularizer is not None and getattr(self, "_alora_max_ratio", None) is not None:
            max_ratio = float(self._alora_max_ratio)
            if max_ratio < NO_EFFECT_RATIO:
                LOG.warning(
                    "ALoRA: the regularizer had no effect; raise alora_phi. φ·L_reg/L_task never exceeded %.3g "
                    "(max %.3g, alora_phi=%g); see README 'Choosing φ', or set a forgetting budget (alora_keep).",
                    NO_EFFECT_RATIO, max_ratio, self.alora_phi,
                )
            else:
                LOG.info("ALoRA: max φ·L_reg/L_task over the run: %.3g", max_ratio)
        return result
