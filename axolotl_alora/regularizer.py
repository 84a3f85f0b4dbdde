"""Layer weights (eq. 17) and the element-wise regularizer L_reg (eq. 16), docs/METHOD.md §2-3.

Tensor code, plus `build_regularizer`, which builds one from an importance file. For LoRA module l
with reference adapter (A^ν, B^ν) and importance Ω_l:

    L_reg,l = Σ_i Ω_i (θ_i − θ^ν_i)²,   θ − θ^ν = s·(B·A − B^ν·A^ν)
    L_reg   = Σ_l c_l · L_reg,l,         c_l = w_l / normalizer

The value and its gradients w.r.t. A and B are computed together in one pass over Ω, a block of rows at a
time (see `quadratic_penalty`), so autograd never stores a d_out×d_in tensor, and the result is reused by
every micro-batch of one optimizer step. A full trainable parameter contributes Σ Ω (θ − θ^ν)² in its own space.
Ω may be held in bfloat16 (`alora_importance_dtype`); every block is computed in fp32.

Under data parallelism with `alora_shard_importance`, each rank holds only the modules it owns (sharding.py):
their gradients are multiplied by the world size W, so DDP's average leaves exactly φ·∇L_reg on every rank,
and the value is summed across ranks, so every rank logs the whole L_reg.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .factored import FactoredOmega, factored_penalty
from .importance import reference_difference_factors, row_blocks
from .importance_file import ImportanceFile, ImportanceFileError

LOG = logging.getLogger("axolotl.alora")

LAYER_WEIGHTINGS = ("softmax", "uniform", "none")


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
    G = Ω⊙(U·V) is the only d_out×d_in quantity: L = s²·Σ (UᵀG)⊙V, dL/dA = 2s²·BᵀG = 2s²·(the two r-row
    blocks of UᵀG added), dL/dB = 2s²·G·Aᵀ. G is formed a block of rows at a time; two small products read it.
    """
    A, B = A.float(), B.float()
    r = A.shape[0]
    U, V, same_rank = reference_difference_factors(A, B, A_ref, B_ref)
    UtG = torch.zeros_like(V)
    GAt = torch.empty_like(B)
    for rows in row_blocks(*omega.shape):
        G = (U[rows] @ V).mul_(omega[rows].float())
        UtG.addmm_(U[rows].T, G)
        GAt[rows] = G @ A.T
    s2 = scaling * scaling
    value = s2 * torch.dot(UtG.view(-1), V.reshape(-1))
    grad_A = (2 * s2) * (UtG[:r] + UtG[r:] if same_rank else UtG[:r])
    grad_B = GAt.mul_(2 * s2)
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
    """One LoRA module with what stage ν left for it: Ω and the reference adapter (fp32)."""

    name: str
    A: Tensor  # live parameters
    B: Tensor
    scaling: float
    omega: Tensor
    A_ref: Tensor
    B_ref: Tensor
    coefficient: float = 1.0  # c_l = w_l / normalizer

    @property
    def params(self) -> tuple[Tensor, ...]:
        return (self.A, self.B)

    def penalty(self) -> tuple[Tensor, list[Tensor]]:
        if isinstance(self.omega, FactoredOmega):  # Ω ≈ u·vᵀ: nothing d_out×d_in is formed
            value, grad_A, grad_B = factored_penalty(self.A, self.B, self.omega.u, self.omega.v, self.A_ref, self.B_ref, self.scaling)
        else:
            value, grad_A, grad_B = quadratic_penalty(self.A, self.B, self.omega, self.A_ref, self.B_ref, self.scaling)
        return value, [grad_A, grad_B]


@dataclass
class RegularizedParameter:
    """A full trainable parameter: L_reg,l = Σ Ω (θ − θ^ν)², dL/dθ = 2·Ω⊙(θ − θ^ν)."""

    name: str
    param: Tensor
    omega: Tensor
    reference: Tensor
    coefficient: float = 1.0

    @property
    def params(self) -> tuple[Tensor, ...]:
        return (self.param,)

    def penalty(self) -> tuple[Tensor, list[Tensor]]:
        diff = self.param.float() - self.reference  # θ − θ^ν, formed once
        weighted = diff * self.omega.float()  # Ω⊙(θ − θ^ν)
        value = torch.dot(weighted.view(-1), diff.view(-1))
        return value, [weighted.mul_(2.0)]


class Regularizer:
    """L_reg = Σ_l c_l·L_reg,l with its gradients, computed once per optimizer step.

    `step` is the Trainer's optimizer-step counter (`state.global_step`): every micro-batch of one
    step sees the same parameters and shares one pass over Ω. Keying on the step, not on a
    parameter's `_version`, matters: fused and bitsandbytes optimizers update parameters in place
    without bumping `_version`, so a version-keyed cache would freeze the penalty at its first value.
    Without a step (direct use), every call recomputes.
    """

    def __init__(self, modules: list[RegularizedModule | RegularizedParameter], world_size: int = 1, elsewhere=()):
        self.modules = modules
        self.world_size = world_size  # > 1: this rank holds only its share of the modules
        self.references = list(modules) + list(elsewhere)  # every module's θ^ν, also those another rank regularizes
        self._params = [p for m in modules for p in m.params]
        self._step = None
        self._value = None
        self._grads: list[Tensor] = []

    @torch.no_grad()
    def _compute(self) -> None:
        total = torch.zeros((), dtype=torch.float32, device=self._device())
        grads = []
        for m in self.modules:
            value, module_grads = m.penalty()
            total += m.coefficient * value
            grads += [g.mul_(m.coefficient * self.world_size) for g in module_grads]
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        self._value, self._grads = total, grads

    def _device(self) -> torch.device:
        if self._params:
            return self._params[0].device
        import torch.distributed as dist  # a rank that owns no module still joins the sum

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def __call__(self, step: int | None = None) -> Tensor:
        if step is None or step != self._step:
            self._compute()
            self._step = step
        return _Precomputed.apply(self._value, len(self._params), *self._params, *self._grads)


def build_regularizer(data: ImportanceFile, modules: list, parameters: list, weighting: str = "softmax",
                      temperature: float | str = 1.0, normalization: str = "none", world_size: int = 1) -> Regularizer:
    """The regularizer for a model's LoRA modules and full parameters from an importance file (eqs. 16-17).

    Layer weights come from n_l = ‖Ω_l‖_F over all of them; `normalization: mean` divides Ω by its mean
    over all elements (docs/METHOD.md §4) and never changes the layer weights. The reference θ^ν =
    s_ν·B^ν·A^ν keeps the general stage's scaling s_ν, written as s·((s_ν/s)·B^ν)·A^ν.
    Only the modules whose tensors `data` holds are regularized here (this rank's share under sharding);
    n_l and ΣΩ come from the whole file, so every rank uses the same weights.
    """
    names = [m.name for m in modules] + [p.name for p in parameters]
    norms = torch.tensor([data.norms[n] for n in names], dtype=torch.float64)
    weights = layer_weights(norms, weighting, temperature).tolist()
    normalizer = 1.0
    entries = data.metadata["modules"]
    if normalization == "mean":
        normalizer = sum(data.sums[n] for n in names) / sum(math.prod(entries[n]["shape"]) if "shape" in entries[n] else data.omega[n].numel() for n in names)
        if not normalizer > 0:
            raise ImportanceFileError("Ω is zero everywhere in the importance file; mean normalization is undefined.")
    regularized, elsewhere = [], []  # Ω held here; only the reference (another rank holds Ω)
    for m, w in zip(modules, weights):
        ratio = float(entries[m.name]["scaling"]) / m.scaling
        device = m.A.device
        held = m.name in data.omega
        (regularized if held else elsewhere).append(RegularizedModule(
            name=m.name, A=m.A, B=m.B, scaling=m.scaling,
            omega=data.omega[m.name].to(device) if held else None,
            A_ref=data.lora_A[m.name].to(device, torch.float32),
            B_ref=(data.lora_B[m.name] * ratio).to(device, torch.float32),
            coefficient=w / normalizer,
        ))
    for p, w in zip(parameters, weights[len(modules):]):
        device = p.param.device
        held = p.name in data.omega
        (regularized if held else elsewhere).append(RegularizedParameter(
            name=p.name, param=p.param,
            omega=data.omega[p.name].to(device) if held else None,
            reference=data.reference[p.name].to(device, torch.float32),
            coefficient=w / normalizer,
        ))
    n_eff = effective_layers(torch.tensor(weights))
    share = f" (sharded across {world_size} ranks)" if world_size > 1 else ""
    LOG.info("ALoRA: regularizing %d LoRA modules and %d full parameters%s, layer weighting %s (effective layers %.2f), normalization %s",
             len(modules), len(parameters), share, weighting, n_eff, normalization)
    warn_if_uniform(torch.tensor(weights), weighting, temperature)
    return Regularizer(regularized, world_size, elsewhere)


def uniform_softmax_note(weights: Tensor, weighting: str, temperature: float | str) -> str | None:
    """The note for softmax layer weights that are uniform to within 1% (n_l ≪ τ), or None."""
    n = len(weights)
    if weighting != "softmax" or temperature == "auto" or effective_layers(weights) <= 0.99 * n:
        return None
    return (f"softmax layer weights are uniform to within 1% (effective layers {effective_layers(weights):.2f} of {n}): "
            "n_l = ||Ω_l|| is small next to the temperature. Set alora_softmax_temperature: auto for a layer-wise effect.")


def warn_if_uniform(weights: Tensor, weighting: str, temperature: float | str) -> None:
    note = uniform_softmax_note(weights, weighting, temperature)
    if note:
        LOG.warning("ALoRA: %s", note)
