"""A forgetting budget: the general-text loss a run may reach, and the two ways to meet it (docs/METHOD.md §9).

- `budget_loss`: the loss the budget allows, from `alora_keep` (a share of the general stage's gain to keep) or
  `alora_max_general_loss_rise` (nats per token over the base model).
- `PhiController`: steers φ during training, one multiplicative (log-space) step per general-text scoring.
- `largest_alpha`: after training, the largest interpolation α between the reference and the end adapter whose
  loss meets the budget (WiSE-FT), by bisection over a loss that rises with α.

Pure arithmetic: no Axolotl, no model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

PHI_BOUNDS = (1e-4, 1e4)  # φ never leaves this range
MAX_FACTOR = 4.0  # one update multiplies φ by at most this, or divides it by at most this
FULL_STEP_GAP = 0.25  # a gap of a quarter of the scale takes the largest step
TOLERANCE = 0.02  # within 2% of the scale of the budget, φ holds


def budget_loss(base: float, reference: float | None, keep: float | None = None, max_rise: float | None = None) -> tuple[float, float]:
    """(the loss the budget allows, the scale gaps are measured in). `keep`: base − keep·(base − ν), scale the gain
    base − ν; `max_rise`: base + max_rise, scale max_rise."""
    if keep is not None:
        if reference is None or not base - reference > 0:
            raise ValueError("alora_keep needs a general stage that lowered the general-text loss (a ν point below the base model).")
        gain = base - reference
        return base - keep * gain, gain
    if max_rise is None:
        raise ValueError("a budget needs alora_keep or alora_max_general_loss_rise")
    return base + max_rise, max_rise


@dataclass
class PhiController:
    """φ ← φ·exp(clip(k·(L − L_budget)/scale, ±ln MAX_FACTOR)), held while |L − L_budget| ≤ TOLERANCE·scale,
    and kept within PHI_BOUNDS; k = ln MAX_FACTOR / FULL_STEP_GAP. Above the budget (too much forgotten) φ grows,
    below it φ shrinks so that the domain learns more."""

    phi: float
    target: float
    scale: float
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.phi = min(max(float(self.phi), PHI_BOUNDS[0]), PHI_BOUNDS[1])

    def update(self, loss: float, step: int | None = None) -> float:
        gap = (loss - self.target) / self.scale
        if abs(gap) > TOLERANCE:
            k = math.log(MAX_FACTOR) / FULL_STEP_GAP
            log_factor = min(max(k * gap, -math.log(MAX_FACTOR)), math.log(MAX_FACTOR))
            self.phi = min(max(self.phi * math.exp(log_factor), PHI_BOUNDS[0]), PHI_BOUNDS[1])
        self.history.append({"step": step, "loss": loss, "phi": self.phi})
        return self.phi

    def state(self) -> dict:
        return {"phi": self.phi, "target": self.target, "scale": self.scale, "history": self.history}

    @classmethod
    def from_state(cls, state: dict) -> PhiController:
        return cls(state["phi"], state["target"], state["scale"], list(state.get("history", [])))


def kept_share_text(base: float, reference: float | None, now: float) -> str:
    """`base → ν → now` and, where ν lowered the loss, the share of that gain kept; else the rise over the base."""
    if reference is not None and base - reference > 0:
        return f"general-text loss base {base:.4f} → ν {reference:.4f} → now {now:.4f}, {100 * (base - now) / (base - reference):.0f}% of ν's gain kept"
    return f"general-text loss base {base:.4f} → now {now:.4f} ({now - base:+.4f} over the base)"


def largest_alpha(loss_at: Callable[[float], float], target: float, steps: int = 6) -> tuple[float, dict[float, float]]:
    """The largest α in [0, 1] with loss_at(α) ≤ target, for a loss that rises with α (α = 0: the reference,
    α = 1: the end adapter), to within 2^-steps; and every α scored. α = 1 when the end meets the budget; α = 0
    when even the reference does not (the budget cannot be met by interpolation)."""
    scored = {1.0: loss_at(1.0)}
    if scored[1.0] <= target:
        return 1.0, scored
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        scored[mid] = loss_at(mid)
        low, high = (mid, high) if scored[mid] <= target else (low, mid)
    return low, scored
