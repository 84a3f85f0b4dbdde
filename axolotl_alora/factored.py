"""Factored importance Ω ≈ u·vᵀ for modules whose dense Ω does not fit (beyond docs/METHOD.md §1-3).

The dense method keeps ω (d_out×d_in, fp32) per LoRA module (docs/METHOD.md §1, eqs. 14-15) and
penalizes Σ Ω⊙(θ − θ^ν)² (§2, eq. 16). Here a module keeps only the exact row sums R (d_out) and
column sums C (d_in) of ω, and the regularizer uses the rank-1 Ω ≈ u·vᵀ built from them. No
d_out×d_in tensor is formed anywhere: every θ-space quantity stays a product of thin factors,

    g̃_t  = s·P·Q,  P = [gB, B_t],             Q = [A_t − η·gA; gA]     (eq. 13, `equivalent_gradient`)
    Δθ_t = s·U·V,  U = [B_{t+1} − B_t, B_t],  V = [A_{t+1}; A_{t+1} − A_t]  (eq. 14, `_product_change`)

and sums of element-wise products of two such products cost O(k²·(d_out + d_in)) for k columns.
Pure tensor code, fp32 like importance.py and regularizer.py; norms and sums in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .importance import TrackedFactors, equivalent_gradient_factors, product_change_factors, reference_difference_factors


def omega_row_col_sums(P: Tensor, Q: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Row sums (d_out) and column sums (d_in) of (P·Q)⊙(U·V), from the factors only.

    With P (d_out×k), Q (k×d_in), U (d_out×m), V (m×d_in), k and m free:
        rows_i = Σ_j Σ_ab P_ia Q_aj U_ib V_bj = Σ_ab P_ia U_ib (Q·Vᵀ)_ab   → ((P·(Q·Vᵀ))⊙U)·1
        cols_j = Σ_i Σ_ab P_ia Q_aj U_ib V_bj = Σ_ab Q_aj V_bj (Pᵀ·U)_ab   → 1ᵀ·(((Pᵀ·U)·V)⊙Q)
    The largest intermediates are d_out×m and k×d_in.
    """
    rows = ((P @ (Q @ V.T)) * U).sum(dim=1)
    cols = (((P.T @ U) @ V) * Q).sum(dim=0)
    return rows, cols


gradient_factors = equivalent_gradient_factors  # (P, Q): g̃_t = s·P·Q (eq. 13)
change_factors = product_change_factors  # (U, V): B_{t+1}A_{t+1} − B_tA_t = U·V


def mean_delta_sq(A_0: Tensor, B_0: Tensor, A_end: Tensor, B_end: Tensor, scaling: float) -> Tensor:
    """‖Δ‖²_F / (d_out·d_in) for Δ = s·(B_end·A_end − B_0·A_0), in float64, without forming Δ.

    ‖U·V‖²_F = trace((UᵀU)·(VVᵀ)) = Σ (UᵀU)⊙(VVᵀ), both Gram matrices symmetric. Compare it with ξ:
    `factored_importance` drops Δ² from Ω = ω/(Δ² + ξ), which is close when this is ≪ ξ.
    """
    U, V = change_factors(A_0.double(), B_0.double(), A_end.double(), B_end.double())
    square = (scaling * scaling) * ((U.T @ U) * (V @ V.T)).sum()
    return square / (U.shape[0] * V.shape[1])


def factored_importance(omega_rows: Tensor, omega_cols: Tensor, xi: float) -> tuple[Tensor, Tensor]:
    """(u, v) with Ω ≈ u·vᵀ: the method's rank-1 approximation of eq. 15, Ω = max(ω / (Δ² + ξ), 0).

    Two approximations, both documented limits of the factored form:
    - Δ² ≪ ξ, so Ω ≈ ω/ξ (check with `mean_delta_sq`);
    - a non-negative matrix with row sums R, column sums C and total T is replaced by its
      "independence" rank-1 form R·Cᵀ/T, which keeps every row and column sum (exact if ω is rank 1).
    The clamp acts on the sums: u = max(R, 0)/ξ and v = max(C, 0)/Σ_j max(C_j, 0), so Σ_j v_j = 1 and
    u·vᵀ has row sums u; v = 0 when no column sum is positive. For ω ≥ 0 this is R·Cᵀ/(T·ξ).
    """
    u = omega_rows.float().clamp_min(0.0) / xi
    cols = omega_cols.float().clamp_min(0.0)
    total = cols.sum()
    v = cols / torch.where(total > 0, total, torch.ones_like(total))  # all-zero columns stay zero
    return u, v


def factored_penalty(A: Tensor, B: Tensor, u: Tensor, v: Tensor, A_ref: Tensor, B_ref: Tensor, scaling: float):
    """(L_reg,l, dL/dA, dL/dB) for Ω = u·vᵀ, in fp32 (eq. 16, as `quadratic_penalty` with that Ω).

    θ − θ^ν = s·U·V with `quadratic_penalty`'s U, V (its branch for a reference of another rank too).
    With G_u = Uᵀ·diag(u)·U and G_v = V·diag(v)·Vᵀ (both k×k, k = r + r^ν):
        L = s²·‖diag(√u)·U·V·diag(√v)‖²_F = s²·trace(G_u·G_v) = s²·Σ G_u⊙G_v,
        dL/dU = 2s²·diag(u)·U·G_v,  dL/dV = 2s²·G_u·V·diag(v),
    chained as there: dL/dB = the first r columns of dL/dU; dL/dA = the two r-row blocks of dL/dV
    added (same rank) or the first block (another rank). O(k²·(d_out + d_in)), nothing d_out×d_in.
    """
    A, B, u, v = A.float(), B.float(), u.float(), v.float()
    r = A.shape[0]
    U, V, same_rank = reference_difference_factors(A, B, A_ref, B_ref)
    uU = u[:, None] * U  # diag(u)·U
    Vv = V * v  # V·diag(v)
    G_u, G_v = U.T @ uU, Vv @ V.T
    s2 = scaling * scaling
    value = s2 * torch.dot(G_u.view(-1), G_v.view(-1))
    G_uA = G_u[:r] + G_u[r:] if same_rank else G_u[:r]  # the rows of dL/dV that reach A, added as in quadratic_penalty
    grad_A = (2 * s2) * (G_uA @ Vv)
    grad_B = (2 * s2) * (uU @ G_v[:, :r])
    return value, grad_A, grad_B


def factored_norm(u: Tensor, v: Tensor) -> Tensor:
    """‖u·vᵀ‖_F = ‖u‖·‖v‖ in float64: n_l for the layer weights (eq. 17)."""
    return torch.linalg.vector_norm(u.double()) * torch.linalg.vector_norm(v.double())


def factored_sum(u: Tensor, v: Tensor) -> Tensor:
    """Σ_ij u_i·v_j = (Σu)·(Σv) in float64: Ω's total, for `normalization: mean` (docs/METHOD.md §4)."""
    return u.double().sum() * v.double().sum()


@dataclass
class FactoredOmega:
    """Ω ≈ u·vᵀ for a d_out×d_in module, stored as u (d_out) and v (d_in): what a file's "factored" module holds.

    Row sums are u·Σv and column sums v·Σu. `numel` and `shape` are the matrix's; `stored` counts what is held."""

    u: Tensor
    v: Tensor

    @classmethod
    def from_dense(cls, omega: Tensor) -> FactoredOmega:
        """The rank-1 form with Ω's row and column sums: u = row sums, v = column sums / total (0 when Ω = 0)."""
        rows, cols = omega.double().sum(dim=1), omega.double().sum(dim=0)
        total = cols.sum()
        return cls(rows.float(), (cols / total if total > 0 else cols).float())

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.u.numel(), self.v.numel()))

    @property
    def dtype(self) -> torch.dtype:
        return self.u.dtype

    def numel(self) -> int:
        return self.u.numel() * self.v.numel()

    def stored(self) -> int:
        return self.u.numel() + self.v.numel()

    def element_size(self) -> int:
        return self.u.element_size()

    def to(self, *args, **kwargs) -> FactoredOmega:
        return FactoredOmega(self.u.to(*args, **kwargs), self.v.to(*args, **kwargs))

    def dense(self) -> Tensor:
        """u·vᵀ (for tests and small modules only)."""
        return torch.outer(self.u.float(), self.v.float())

    def __add__(self, other: FactoredOmega | Tensor) -> FactoredOmega:
        """Continual use (Σ_ν Ω^ν, eq. 15): the rank-1 form with the summed row and column sums."""
        other = FactoredOmega.from_dense(other.to(self.u.device)) if isinstance(other, Tensor) else other.to(self.u.device)
        rows = self.u.double() * self.v.double().sum() + other.u.double() * other.v.double().sum()
        cols = self.v.double() * self.u.double().sum() + other.v.double() * other.u.double().sum()
        total = cols.sum()
        return FactoredOmega(rows.float(), (cols / total if total > 0 else cols).float())


@dataclass
class FactoredTrackedModule(TrackedFactors):
    """`TrackedModule` with ω kept as its exact row and column sums: omega_rows (d_out), omega_cols (d_in), fp32.

    Same life cycle and semantics (start, capture, finite, accumulate, advance, reference, state,
    load_state: all but accumulate and importance from `TrackedFactors`), so `OmegaTracker`'s step loop drives it
    unchanged. Δ is available as factors (`delta_factors`) and as its mean square (`mean_delta_sq`), never as a
    d_out×d_in tensor.
    """

    omega_rows: Tensor = field(init=False)
    omega_cols: Tensor = field(init=False)

    def _allocate_omega(self) -> None:
        self.omega_rows = torch.zeros(self.B.shape[0], dtype=torch.float32, device=self.B.device)
        self.omega_cols = torch.zeros(self.A.shape[1], dtype=torch.float32, device=self.A.device)

    def omega_state(self) -> dict[str, Tensor]:
        return {"omega_rows": self.omega_rows, "omega_cols": self.omega_cols}

    @torch.no_grad()
    def accumulate(self) -> None:
        """ω ← ω − g̃ ⊙ Δθ (eq. 14), as its row and column sums; both carry s, so s² goes into the coefficient."""
        P, Q = gradient_factors(self.grad_A, self.grad_B, self.A_t, self.B_t, self.lr)
        U, V = change_factors(self.A_t, self.B_t, self.A.float(), self.B.float())
        rows, cols = omega_row_col_sums(P, Q, U, V)
        s2 = self.scaling**2
        self.omega_rows.sub_(rows, alpha=s2)
        self.omega_cols.sub_(cols, alpha=s2)

    def delta_factors(self) -> tuple[Tensor, Tensor]:
        """(U, V) with Δ^ν = s·U·V = s·(B_end·A_end − B_0·A_0)."""
        return change_factors(self.A_0, self.B_0, self.A_t, self.B_t)

    def mean_delta_sq(self) -> Tensor:
        """‖Δ^ν‖²_F / (d_out·d_in), float64: how far Δ² ≪ ξ holds for `factored_importance`."""
        return mean_delta_sq(self.A_0, self.B_0, self.A_t, self.B_t, self.scaling)

    def importance(self, xi: float, in_place: bool = False) -> tuple[FactoredOmega, int]:
        """Ω ≈ u·vᵀ (see `factored_importance`) and how many row and column sums the clamp changed."""
        negative = (self.omega_rows < 0).sum() + (self.omega_cols < 0).sum()
        clamped = 0 if negative.is_meta else int(negative)  # the meta device (shape checks) has no values
        return FactoredOmega(*factored_importance(self.omega_rows, self.omega_cols, xi)), clamped
