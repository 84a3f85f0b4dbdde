"""Synaptic-Intelligence importance in LoRA's effective-weight space (METHOD.md §1, eqs. 8-15).

Pure tensor code: knows LoRA factors, gradients and learning rates, nothing of Axolotl.
Every θ-space quantity is d_out×d_in, fp32, computed in place under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def equivalent_gradient(grad_A: Tensor, grad_B: Tensor, A: Tensor, B: Tensor, lr: float) -> Tensor:
    """g̃_t = gB·A_t + B_t·gA − η_t·gB·gA  (eq. 13), as one rank-2r product."""
    return torch.cat([grad_B, B], dim=1) @ torch.cat([A - lr * grad_A, grad_A], dim=0)


def weight_change(A_before: Tensor, B_before: Tensor, A_after: Tensor, B_after: Tensor, scaling: float) -> Tensor:
    """Δθ_t = s·(B_{t+1}A_{t+1} − B_tA_t), in the difference form that avoids cancellation."""
    return scaling * _product_change(A_before, B_before, A_after, B_after)


def _product_change(A_before: Tensor, B_before: Tensor, A_after: Tensor, B_after: Tensor) -> Tensor:
    """B_{t+1}A_{t+1} − B_tA_t = (B_{t+1} − B_t)·A_{t+1} + B_t·(A_{t+1} − A_t), as one rank-2r product."""
    left = torch.cat([B_after - B_before, B_before], dim=1)
    right = torch.cat([A_after, A_after - A_before], dim=0)
    return left @ right


def adapter_delta(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """s·B·A: the adapter's contribution to the effective weight θ = W0 + s·B·A (eq. 1)."""
    return scaling * (B.float() @ A.float())


def importance_from_omega(omega: Tensor, delta: Tensor, xi: float) -> tuple[Tensor, int]:
    """Ω = max(ω / (Δ² + ξ), 0)  (eq. 15); also returns how many elements the clamp changed."""
    raw = omega / (delta.square() + xi)
    clamped = int((raw < 0).sum())
    return raw.clamp_min_(0.0), clamped


@dataclass
class TrackedModule:
    """One adapted module as the tracker sees it: its LoRA factors (live parameters) and scaling s."""

    name: str
    A: Tensor  # r×d_in parameter
    B: Tensor  # d_out×r parameter
    scaling: float
    omega: Tensor = field(init=False)
    # the step's starting point, snapshotted just before optimizer.step()
    A_t: Tensor = field(init=False)
    B_t: Tensor = field(init=False)
    grad_A: Tensor = field(init=False)
    grad_B: Tensor = field(init=False)
    lr: float = 0.0

    def __post_init__(self):
        dev = self.A.device
        self.omega = torch.zeros(self.B.shape[0], self.A.shape[1], dtype=torch.float32, device=dev)
        self.A_t = torch.zeros(self.A.shape, dtype=torch.float32, device=dev)
        self.B_t = torch.zeros(self.B.shape, dtype=torch.float32, device=dev)
        self.grad_A = torch.zeros_like(self.A_t)
        self.grad_B = torch.zeros_like(self.B_t)


class OmegaTracker:
    """Accumulates ω ← ω − g̃_t ⊙ Δθ_t once per optimizer step (eq. 14).

    Call `before_step(lrs)` when the gradients are final (accumulated and clipped) and
    `after_step()` once the optimizer has updated the parameters.
    """

    def __init__(self, modules: list[TrackedModule]):
        self.modules = modules
        self.steps = 0

    @torch.no_grad()
    def before_step(self, lrs: dict[str, float]) -> None:
        for m in self.modules:
            if m.A.grad is None or m.B.grad is None:
                raise RuntimeError(
                    f"ALoRA: no gradient for {m.name} at the optimizer step; importance needs trainable LoRA factors."
                )
            m.A_t.copy_(m.A)
            m.B_t.copy_(m.B)
            m.grad_A.copy_(m.A.grad)
            m.grad_B.copy_(m.B.grad)
            m.lr = lrs[m.name]

    @torch.no_grad()
    def after_step(self) -> None:
        for m in self.modules:
            A1, B1 = m.A.float(), m.B.float()
            g_tilde = equivalent_gradient(m.grad_A, m.grad_B, m.A_t, m.B_t, m.lr)
            # ω ← ω − g̃ ⊙ Δθ with Δθ = s·(product change): s goes into the coefficient, not a pass of its own
            m.omega.addcmul_(g_tilde, _product_change(m.A_t, m.B_t, A1, B1), value=-m.scaling)
        self.steps += 1
