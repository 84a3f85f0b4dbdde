"""Synaptic-Intelligence importance in LoRA's effective-weight space (docs/METHOD.md §1, eqs. 8-15).

Pure tensor code: knows LoRA factors, gradients and learning rates, nothing of Axolotl.
Every θ-space quantity is d_out×d_in, fp32, computed in place under no_grad, and formed only in blocks of rows
(`row_blocks`), so what a step allocates beyond ω is a few blocks, not a few modules (docs/MEMORY.md).

Two kinds of tracked parameters:
- a LoRA module (linear or embedding), θ = W0 + s·B·A: g̃ and Δθ as in eqs. 13-14;
- a full parameter (`lora_modules_to_save` copies, LoRA biases, trainable tokens): classic
  element-wise SI, g̃ = its gradient, Δθ = its change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

BLOCK_ELEMENTS = 1 << 22  # dense d_out×d_in work is done this many elements (16 MB in fp32) at a time


def row_blocks(rows: int, cols: int):
    """Slices of `rows` rows holding about BLOCK_ELEMENTS elements each (at least one row)."""
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def equivalent_gradient_factors(grad_A: Tensor, grad_B: Tensor, A: Tensor, B: Tensor, lr: float) -> tuple[Tensor, Tensor]:
    """P, Q with g̃_t = s·P·Q: P = [gB, B_t] (d_out×2r), Q = [A_t − η·gA; gA] (2r×d_in)."""
    return torch.cat([grad_B, B], dim=1), torch.cat([A - lr * grad_A, grad_A], dim=0)


def equivalent_gradient(grad_A: Tensor, grad_B: Tensor, A: Tensor, B: Tensor, lr: float, scaling: float = 1.0) -> Tensor:
    """g̃_t = s·(gB·A_t + B_t·gA − η_t·gB·gA)  (eq. 13 with peft's scaling s), as one rank-2r product.

    The outer s makes plain SGD on A and B move θ = W0 + s·B·A by exactly −η·g̃.
    """
    P, Q = equivalent_gradient_factors(grad_A, grad_B, A, B, lr)
    return (P @ Q).mul_(scaling)


def weight_change(A_before: Tensor, B_before: Tensor, A_after: Tensor, B_after: Tensor, scaling: float) -> Tensor:
    """Δθ_t = s·(B_{t+1}A_{t+1} − B_tA_t), in the difference form that avoids cancellation."""
    return _product_change(A_before, B_before, A_after, B_after).mul_(scaling)


def product_change_factors(A_before: Tensor, B_before: Tensor, A_after: Tensor, B_after: Tensor) -> tuple[Tensor, Tensor]:
    """U, V with B_{t+1}A_{t+1} − B_tA_t = U·V = (B_{t+1} − B_t)·A_{t+1} + B_t·(A_{t+1} − A_t)."""
    return torch.cat([B_after - B_before, B_before], dim=1), torch.cat([A_after, A_after - A_before], dim=0)


def reference_difference_factors(A: Tensor, B: Tensor, A_ref: Tensor, B_ref: Tensor) -> tuple[Tensor, Tensor, bool]:
    """U, V with B·A − B^ν·A^ν = U·V (exactly 0 at the reference), and whether the reference has A's rank:
    U = [B − B^ν, B^ν], V = [A; A − A^ν]; for a reference of another rank (another lora_r, or EWC's zero
    reference) U = [B, B^ν], V = [A; −A^ν]. Shared by the penalty's dense and factored forms (eq. 16)."""
    if A_ref.shape[0] == A.shape[0]:
        return torch.cat([B - B_ref, B_ref], dim=1), torch.cat([A, A - A_ref], dim=0), True
    return torch.cat([B, B_ref], dim=1), torch.cat([A, -A_ref], dim=0), False


def _product_change(A_before: Tensor, B_before: Tensor, A_after: Tensor, B_after: Tensor) -> Tensor:
    U, V = product_change_factors(A_before, B_before, A_after, B_after)
    return U @ V


def adapter_delta(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """s·B·A: the adapter's contribution to the effective weight θ = W0 + s·B·A (eq. 1)."""
    return scaling * (B.float() @ A.float())


def importance_from_omega(omega: Tensor, delta: Tensor, xi: float) -> tuple[Tensor, int]:
    """Ω = max(ω / (Δ² + ξ), 0)  (eq. 15), written over `omega`; also returns how many elements the clamp changed.
    `delta` is consumed (squared in place)."""
    omega.div_(delta.square_().add_(xi))
    clamped = int((omega < 0).sum())
    return omega.clamp_min_(0.0), clamped


def add_importance(omega, previous):
    """Ω_new + Ω_old (continual use) for any pair of forms: a dense Ω (a Tensor) or a factored one (u·vᵀ, anything
    with `u` and `v`). Dense + factored adds u·vᵀ to the dense Ω a block of rows at a time; a factored Ω
    (FactoredOmega.__add__) keeps the summed row and column sums of both."""
    if not isinstance(omega, Tensor):
        return omega + previous
    if isinstance(previous, Tensor):
        return omega.add_(previous.to(omega.device))
    u, v = previous.u.to(omega.device, torch.float32), previous.v.to(omega.device, torch.float32)
    for rows in row_blocks(*omega.shape):
        omega[rows].addr_(u[rows], v)
    return omega


def _all_finite(*tensors: Tensor) -> Tensor:
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


@dataclass
class TrackedFactors:
    """What every tracked LoRA module shares, dense or factored: live factors A (r×d_in), B (d_out×r) and scaling s,
    θ_0 (the stage's start), θ_t (the factors after the last optimizer step) and the step's gradients.

    Between two optimizer steps only the optimizer changes the parameters, so θ_t is also the next step's start,
    and at the end it is the weights ω was recorded along, even if the Trainer later restores a best checkpoint.
    A subclass holds ω in its own form: it allocates it (`_allocate_omega`), names its buffers (`omega_state`)
    and adds to it (`accumulate`), and turns it into Ω (`importance`).

    Buffers, all fp32: A_0, B_0 (θ_0), A_t, B_t (θ_t), grad_A, grad_B (the step's gradients, taken by `capture`).
    """

    name: str
    A: Tensor
    B: Tensor
    scaling: float
    lr: float = 0.0  # the step's learning rate η_t, taken by `capture`

    def __post_init__(self):
        self._allocate_omega()
        self.grad_A = torch.zeros(self.A.shape, dtype=torch.float32, device=self.A.device)
        self.grad_B = torch.zeros(self.B.shape, dtype=torch.float32, device=self.B.device)
        self.start()

    def _allocate_omega(self) -> None:
        raise NotImplementedError

    def omega_state(self) -> dict[str, Tensor]:
        """ω's buffers by name (checkpoint keys)."""
        raise NotImplementedError

    def start(self) -> None:
        self.A_0, self.B_0 = self.A.detach().float().clone(), self.B.detach().float().clone()
        self.A_t, self.B_t = self.A_0.clone(), self.B_0.clone()

    @torch.no_grad()
    def capture(self, lr: float) -> None:
        if self.A.grad is None or self.B.grad is None:
            raise RuntimeError(f"ALoRA: no gradient for {self.name} at the optimizer step; importance needs trainable LoRA factors.")
        self.grad_A.copy_(self.A.grad)
        self.grad_B.copy_(self.B.grad)
        self.lr = lr

    def finite(self) -> Tensor:
        return _all_finite(self.grad_A, self.grad_B, self.A, self.B)

    @torch.no_grad()
    def advance(self) -> None:
        self.A_t.copy_(self.A)
        self.B_t.copy_(self.B)

    def reference(self) -> dict[str, Tensor]:
        return {"lora_A": self.A_t.clone(), "lora_B": self.B_t.clone()}

    def state(self) -> dict[str, Tensor]:
        return {**self.omega_state(), "start_A": self.A_0, "start_B": self.B_0}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor]) -> None:
        for key, buffer in self.omega_state().items():
            buffer.copy_(tensors[key])
        self.A_0.copy_(tensors["start_A"])
        self.B_0.copy_(tensors["start_B"])


@dataclass
class TrackedModule(TrackedFactors):
    """One LoRA module with ω dense: d_out×d_in, fp32 (the paper's form)."""

    omega: Tensor = field(init=False)

    def _allocate_omega(self) -> None:
        self.omega = torch.zeros(self.B.shape[0], self.A.shape[1], dtype=torch.float32, device=self.A.device)

    def omega_state(self) -> dict[str, Tensor]:
        return {"omega": self.omega}

    def accumulate(self) -> None:
        """ω ← ω − g̃ ⊙ Δθ (eq. 14), g̃ = s·P·Q and Δθ = s·U·V formed a block of rows at a time; s² goes into the coefficient."""
        P, Q = equivalent_gradient_factors(self.grad_A, self.grad_B, self.A_t, self.B_t, self.lr)
        U, V = product_change_factors(self.A_t, self.B_t, self.A.float(), self.B.float())
        for rows in row_blocks(*self.omega.shape):
            self.omega[rows].addcmul_(P[rows] @ Q, U[rows] @ V, value=-self.scaling**2)

    def delta(self) -> Tensor:
        """Δ^ν = s·(B_end·A_end − B_0·A_0)."""
        return weight_change(self.A_0, self.B_0, self.A_t, self.B_t, self.scaling)

    def importance(self, xi: float, in_place: bool = False) -> tuple[Tensor, int]:
        """Ω (eq. 15) a block of rows at a time; `in_place` writes it over ω (the end of the stage), saving a copy."""
        omega = self.omega if in_place else self.omega.clone()
        U, V = product_change_factors(self.A_0, self.B_0, self.A_t, self.B_t)
        clamped = 0
        for rows in row_blocks(*omega.shape):
            clamped += importance_from_omega(omega[rows], (U[rows] @ V).mul_(self.scaling), xi)[1]
        return omega, clamped


@dataclass
class TrackedParameter:
    """A full trainable parameter: classic element-wise SI, ω ← ω − g ⊙ (θ_{t+1} − θ_t)."""

    name: str
    param: Tensor
    omega: Tensor = field(init=False)
    theta_0: Tensor = field(init=False)
    theta_t: Tensor = field(init=False)
    grad: Tensor = field(init=False)
    lr: float = 0.0

    def __post_init__(self):
        self.omega = torch.zeros(self.param.shape, dtype=torch.float32, device=self.param.device)
        self.grad = torch.zeros_like(self.omega)
        self.start()

    def start(self) -> None:
        self.theta_0 = self.param.detach().float().clone()
        self.theta_t = self.theta_0.clone()

    def capture(self, lr: float) -> None:
        if self.param.grad is None:
            raise RuntimeError(f"ALoRA: no gradient for {self.name} at the optimizer step.")
        self.grad.copy_(self.param.grad)
        self.lr = lr

    def finite(self) -> Tensor:
        return _all_finite(self.grad, self.param)

    def accumulate(self) -> None:
        # −g·(θ_{t+1} − θ_t) = g·(θ_t − θ_{t+1}), formed in θ_t's buffer, which advance() then refills
        self.omega.add_(self.theta_t.sub_(self.param).mul_(self.grad))

    def advance(self) -> None:
        self.theta_t.copy_(self.param)

    def delta(self) -> Tensor:
        return self.theta_t - self.theta_0

    def importance(self, xi: float, in_place: bool = False) -> tuple[Tensor, int]:
        return importance_from_omega(self.omega if in_place else self.omega.clone(), self.delta(), xi)

    def reference(self) -> dict[str, Tensor]:
        return {"reference": self.theta_t.clone()}

    def state(self) -> dict[str, Tensor]:
        return {"omega": self.omega, "start": self.theta_0}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.omega.copy_(tensors["omega"])
        self.theta_0.copy_(tensors["start"])


class OmegaTracker:
    """Accumulates ω ← ω − g̃_t ⊙ Δθ_t once per optimizer step (eq. 14).

    Call `before_step(lrs)` when the gradients are final (accumulated and clipped) and
    `after_step(step)` once the optimizer has updated the parameters. A step whose gradients (or
    resulting parameters) are not finite adds nothing: an fp16 step the grad scaler skipped has
    Δθ = 0 and NaN gradients, and NaN·0 would poison ω for good. Such steps are listed in `skipped`.
    """

    def __init__(self, modules: list[TrackedFactors | TrackedParameter]):
        self.modules = modules
        self.steps = 0
        self.skipped: list[int] = []

    @torch.no_grad()
    def start(self) -> None:
        """θ_0 and θ_t from the live parameters (at the start of training, or after a resume loaded them)."""
        for m in self.modules:
            m.start()

    @torch.no_grad()
    def before_step(self, lrs: dict[str, float]) -> None:
        for m in self.modules:
            m.capture(lrs[m.name])

    @torch.no_grad()
    def after_step(self, step: int | None = None) -> None:
        # one host sync per step; a rank that owns no module (sharded, more ranks than modules) has nothing to check
        finite = not self.modules or bool(torch.stack([m.finite() for m in self.modules]).all())
        for m in self.modules:
            if finite:
                m.accumulate()
            m.advance()
        if not finite:
            self.skipped.append(self.steps if step is None else step)
        self.steps += 1

    @torch.no_grad()
    def importance(self, xi: float, previous: dict[str, Tensor] | None = None, in_place: bool = False,
                   dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], int]:
        """Ω per module (eq. 15), plus Ω_old when continuing from an earlier file (continual use), in `dtype`; and
        the number of elements the clamp changed. `in_place` (the end of the stage) turns each ω into Ω and lets
        it go once converted, so the stage never holds ω and Ω side by side; the tracker is spent afterwards."""
        out, clamped = {}, 0
        for m in self.modules:
            omega, n = m.importance(xi, in_place)
            if previous is not None:
                omega = add_importance(omega, previous[m.name])
            out[m.name], clamped = omega.to(dtype), clamped + n
            if in_place and isinstance(m, (TrackedModule, TrackedParameter)):
                m.omega = out[m.name]
        return out, clamped
