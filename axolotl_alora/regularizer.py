"""Layer weights (eq. 17) and the element-wise regularizer L_reg (eq. 16), METHOD.md §2-3.

Pure tensor code. For module l with reference adapter (A^ν, B^ν) and importance Ω_l:

    L_reg,l = Σ_i Ω_i (θ_i − θ^ν_i)²,   θ − θ^ν = s·(B·A − B^ν·A^ν)
    L_reg   = Σ_l c_l · L_reg,l,         c_l = w_l / normalizer

The value and its gradients w.r.t. A and B are computed together in one pass over Ω (see
`quadratic_penalty`), so autograd never stores a d_out×d_in tensor, and the result is reused by
every micro-batch of one optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LAYER_WEIGHTINGS = ("softmax", "uniform", "none")


def importance_norms(omegas: list[Tensor]) -> Tensor:
    """n_l = ‖Ω_l‖_F for each module (eq. 17), in float64."""
    return torch.stack([torch.linalg.vector_norm(omega.double()) for omega in omegas])


def layer_weights(norms: Tensor, mode: str = "softmax", temperature: float | str = 1.0) -> Tensor:
    """w_l from n_l = ‖Ω_l‖_F (eq. 17): softmax(n/τ) over all adapted modules, 1/L, or 1."""
    norms = norms.double()
    if mode == "softmax":
        tau = float(norms.mean()) if temperature == "auto" else float(temperature)
        if not tau > 0:
            raise ValueError(f"softmax temperature must be > 0, got {tau}")
        return torch.softmax(norms / tau, dim=0)
    if mode == "uniform":
        return torch.full_like(norms, 1.0 / len(norms))
    if mode == "none":
        return torch.ones_like(norms)
    raise ValueError(f"alora_layer_weighting must be one of {LAYER_WEIGHTINGS}, got {mode!r}")


def effective_layers(weights: Tensor) -> float:
    """(Σw)²/Σw², which is 1/Σw² for weights that sum to 1: L when uniform, 1 when one layer dominates."""
    w = weights.double()
    return float(w.sum() ** 2 / w.square().sum())


def quadratic_penalty(A: Tensor, B: Tensor, omega: Tensor, A_ref: Tensor, B_ref: Tensor, scaling: float):
    """(L_reg,l, dL/dA, dL/dB) for one module, in fp32 (eq. 16).

    With U = [B − B^ν, B^ν] and V = [A; A − A^ν], θ − θ^ν = s·U·V (exactly 0 at the reference) and
    G = Ω⊙(U·V) is the only d_out×d_in tensor: L = s²·Σ (UᵀG)⊙V, dL/dA = 2s²·BᵀG = 2s²·(the two r-row
    blocks of UᵀG added), dL/dB = 2s²·G·Aᵀ. One pass writes G, two small products read it.
    """
    A, B = A.float(), B.float()
    r = A.shape[0]
    same_rank = A_ref.shape[0] == r
    if same_rank:
        U, V = torch.cat([B - B_ref, B_ref], dim=1), torch.cat([A, A - A_ref], dim=0)
    else:  # a reference of another rank (another lora_r, or EWC's zero reference): U = [B, B^ν], V = [A; −A^ν]
        U, V = torch.cat([B, B_ref], dim=1), torch.cat([A, -A_ref], dim=0)
    G = (U @ V).mul_(omega)
    UtG = U.T @ G
    s2 = scaling * scaling
    value = s2 * torch.dot(UtG.view(-1), V.reshape(-1))
    grad_A = (2 * s2) * (UtG[:r] + UtG[r:] if same_rank else UtG[:r])
    grad_B = (2 * s2) * (G @ A.T)
    return value, grad_A, grad_B


class _Precomputed(torch.autograd.Function):
    """A scalar whose gradients w.r.t. the given parameters were computed together with its value."""

    @staticmethod
    def forward(ctx, value, n_params, *params_then_grads):
        ctx.n_params = n_params
        ctx.save_for_backward(*params_then_grads[n_params:])
        ctx.dtypes = [p.dtype for p in params_then_grads[:n_params]]
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grads = [(grad_out * g).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (None, None, *grads, *([None] * len(grads)))


@dataclass
class RegularizedModule:
    """One adapted module with what stage ν left for it: Ω and the reference adapter (fp32)."""

    name: str
    A: Tensor  # live parameters
    B: Tensor
    scaling: float
    omega: Tensor
    A_ref: Tensor
    B_ref: Tensor
    coefficient: float = 1.0  # c_l = w_l / normalizer


class Regularizer:
    """L_reg = Σ_l c_l·L_reg,l with gradients; computed once per parameter update.

    The parameters' version counters change only when the optimizer updates them, so all
    micro-batches of one optimizer step share one pass over Ω.
    """

    def __init__(self, modules: list[RegularizedModule]):
        self.modules = modules
        self._params = [p for m in modules for p in (m.A, m.B)]
        self._key = None
        self._value = None
        self._grads: list[Tensor] = []

    def _versions(self):
        return tuple(p._version for p in self._params)

    @torch.no_grad()
    def _compute(self) -> None:
        total = torch.zeros((), dtype=torch.float32, device=self._params[0].device)
        grads = []
        for m in self.modules:
            value, grad_A, grad_B = quadratic_penalty(m.A, m.B, m.omega, m.A_ref, m.B_ref, m.scaling)
            total += m.coefficient * value
            grads += [grad_A.mul_(m.coefficient), grad_B.mul_(m.coefficient)]
        self._value, self._grads = total, grads

    def __call__(self) -> Tensor:
        key = self._versions()
        if key != self._key:
            self._compute()
            self._key = key
        return _Precomputed.apply(self._value, len(self._params), *self._params, *self._grads)
