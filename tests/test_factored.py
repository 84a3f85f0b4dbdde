"""The factored importance Ω ≈ u·vᵀ (axolotl_alora/factored.py) against independent dense computations on small tensors,
and at shapes whose dense d_out×d_in tensor could not be allocated."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from axolotl_alora.factored import (
    FactoredTrackedModule,
    factored_importance,
    factored_norm,
    factored_penalty,
    factored_sum,
    mean_delta_sq,
    omega_row_col_sums,
)
from axolotl_alora.importance import OmegaTracker, TrackedModule
from axolotl_alora.regularizer import quadratic_penalty

D_OUT, D_IN, R = 7, 5, 3


def _randn(*shape, g, dtype=torch.float32, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


@pytest.mark.parametrize("k_p, k_u", [(4, 4), (3, 6), (6, 1)])
def test_row_col_sums_match_the_dense_product(k_p, k_u):
    g = torch.Generator().manual_seed(k_p * 10 + k_u)
    P, Q = _randn(D_OUT, k_p, g=g, dtype=torch.float64), _randn(k_p, D_IN, g=g, dtype=torch.float64)
    U, V = _randn(D_OUT, k_u, g=g, dtype=torch.float64), _randn(k_u, D_IN, g=g, dtype=torch.float64)
    dense = (P @ Q) * (U @ V)
    rows, cols = omega_row_col_sums(P, Q, U, V)
    assert rows.shape == (D_OUT,) and cols.shape == (D_IN,)
    torch.testing.assert_close(rows, dense.sum(dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cols, dense.sum(dim=0), rtol=1e-12, atol=1e-12)


def _problem(seed, scaling):
    g = torch.Generator().manual_seed(seed)
    W0 = _randn(D_OUT, D_IN, g=g)
    A = torch.nn.Parameter(_randn(R, D_IN, g=g, scale=0.3))
    B = torch.nn.Parameter(_randn(D_OUT, R, g=g, scale=0.3))
    x, y = _randn(16, D_IN, g=g), _randn(16, D_OUT, g=g)

    def loss():
        return ((x @ (W0 + scaling * B @ A).T - y) ** 2).mean()

    return A, B, loss


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_factored_tracker_keeps_the_dense_trackers_row_and_column_sums(optimizer):
    """Both trackers on the same parameters, driven by one OmegaTracker over SGD or AdamW steps with a
    varying learning rate and one non-finite step that must add nothing."""
    s, nan_step = 1.5, 3
    A, B, loss = _problem(seed=1 if optimizer == "sgd" else 2, scaling=s)
    opt = torch.optim.SGD([A, B], lr=0.05) if optimizer == "sgd" else torch.optim.AdamW([A, B], lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: [0.2, 1.0, 0.7, 0.4, 0.1, 0.05, 0.0][t])
    dense, factored = TrackedModule("m", A, B, s), FactoredTrackedModule("m", A, B, s)
    tracker = OmegaTracker([dense, factored])
    expected = torch.zeros(D_OUT, D_IN, dtype=torch.float64)  # independent float64 ω
    A_start, B_start = A.detach().double().clone(), B.detach().double().clone()
    for step in range(6):
        opt.zero_grad()
        loss().backward()
        lr = opt.param_groups[0]["lr"]
        A_t, B_t = A.detach().double().clone(), B.detach().double().clone()
        if step == nan_step:
            A.grad[0, 0] = float("nan")
        gA, gB = A.grad.double().clone(), B.grad.double().clone()
        tracker.before_step({"m": lr})
        if step != nan_step:
            opt.step()
        tracker.after_step(step)
        sched.step()
        if step != nan_step:
            g_tilde = s * (gB @ A_t + B_t @ gA - lr * (gB @ gA))
            expected -= g_tilde * (s * (B.detach().double() @ A.detach().double() - B_t @ A_t))
    assert tracker.skipped == [nan_step]
    assert expected.abs().max() > 1e-4
    omega = dense.omega.double()
    torch.testing.assert_close(omega, expected, rtol=1e-4, atol=1e-9)  # the dense tracker is the reference it claims to be
    for got, want in ((factored.omega_rows, omega.sum(dim=1)), (factored.omega_cols, omega.sum(dim=0))):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    torch.testing.assert_close(factored.omega_rows.double(), expected.sum(dim=1), rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    torch.testing.assert_close(factored.omega_cols.double(), expected.sum(dim=0), rtol=1e-5, atol=1e-6 * float(expected.abs().max()))

    # Δ from factors: s·U·V and its mean square against the dense tracker and the float64 start/end
    U, V = factored.delta_factors()
    torch.testing.assert_close(s * (U @ V), dense.delta(), rtol=1e-5, atol=1e-7)
    delta = s * (B.detach().double() @ A.detach().double() - B_start @ A_start)
    assert float(delta.abs().max()) > 1e-3
    torch.testing.assert_close(factored.mean_delta_sq(), delta.square().mean(), rtol=1e-5, atol=0.0)
    assert factored.reference()["lora_A"].data_ptr() != factored.A_t.data_ptr()
    torch.testing.assert_close(factored.reference()["lora_B"], B.detach())


def test_mean_delta_sq_matches_dense():
    g = torch.Generator().manual_seed(3)
    A0, B0 = _randn(R, D_IN, g=g, dtype=torch.float64), _randn(D_OUT, R, g=g, dtype=torch.float64)
    A1, B1 = A0 + _randn(R, D_IN, g=g, dtype=torch.float64, scale=0.1), B0 + _randn(D_OUT, R, g=g, dtype=torch.float64, scale=0.1)
    s = 0.7
    dense = (s * (B1 @ A1 - B0 @ A0)).square().sum() / (D_OUT * D_IN)
    got = mean_delta_sq(A0, B0, A1, B1, s)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=0.0)
    assert float(mean_delta_sq(A1, B1, A1, B1, s)) == 0.0


def test_tracker_state_round_trip_and_missing_gradient():
    A, B, loss = _problem(seed=4, scaling=2.0)
    m = FactoredTrackedModule("m", A, B, 2.0)
    with pytest.raises(RuntimeError, match="no gradient"):
        m.capture(0.1)
    g = torch.Generator().manual_seed(5)
    saved = {"omega_rows": _randn(D_OUT, g=g), "omega_cols": _randn(D_IN, g=g), "start_A": _randn(R, D_IN, g=g), "start_B": _randn(D_OUT, R, g=g)}
    m.load_state(saved)
    for key, value in m.state().items():
        torch.testing.assert_close(value, saved[key])
    assert set(m.state()) == set(saved)


def test_factored_importance_of_a_nonnegative_omega_with_zero_delta():
    """ω ≥ 0 and Δ = 0 (end = start): dense Ω = ω/ξ; u·vᵀ keeps its row and column sums and equals R·Cᵀ/(T·ξ)."""
    g = torch.Generator().manual_seed(6)
    omega = torch.rand(D_OUT, D_IN, generator=g) + 0.1
    xi = 0.3
    A = torch.nn.Parameter(_randn(R, D_IN, g=g))
    B = torch.nn.Parameter(_randn(D_OUT, R, g=g))
    dense, factored = TrackedModule("m", A, B, 1.3), FactoredTrackedModule("m", A, B, 1.3)
    dense.load_state({"omega": omega, "start_A": A.detach(), "start_B": B.detach()})
    factored.load_state({"omega_rows": omega.sum(1), "omega_cols": omega.sum(0), "start_A": A.detach(), "start_B": B.detach()})
    assert float(factored.mean_delta_sq()) == 0.0
    importance, clamped = OmegaTracker([dense]).importance(xi)
    Omega = importance["m"].double()
    torch.testing.assert_close(Omega, omega.double() / xi, rtol=1e-6, atol=0.0)
    assert clamped == 0

    omega_f, clamped_f = factored.importance(xi)
    u, v = omega_f.u, omega_f.v
    assert clamped_f == 0
    assert u.dtype == v.dtype == torch.float32
    approx = torch.outer(u.double(), v.double())
    torch.testing.assert_close(approx.sum(1), Omega.sum(1), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(approx.sum(0), Omega.sum(0), rtol=1e-5, atol=0.0)
    R_, C_ = omega.double().sum(1), omega.double().sum(0)
    torch.testing.assert_close(approx, torch.outer(R_, C_) / (R_.sum() * xi), rtol=1e-5, atol=0.0)
    assert (approx - Omega).abs().max() > 1e-3, "a random ω is not rank 1: the approximation must differ from Ω somewhere"

    rank_one = torch.outer(torch.rand(D_OUT, generator=g), torch.rand(D_IN, generator=g))  # exact when ω is rank 1
    u1, v1 = factored_importance(rank_one.sum(1), rank_one.sum(0), xi)
    torch.testing.assert_close(torch.outer(u1, v1), rank_one / xi, rtol=1e-5, atol=1e-7)


def test_factored_importance_clamps_the_sums():
    rows = torch.tensor([2.0, -1.0, 0.5])
    u, v = factored_importance(rows, torch.tensor([3.0, -2.0, 1.0, 0.0]), xi=0.5)
    torch.testing.assert_close(u, torch.tensor([4.0, 0.0, 1.0]))
    torch.testing.assert_close(v, torch.tensor([0.75, 0.0, 0.25, 0.0]))
    _, v0 = factored_importance(rows, torch.tensor([-3.0, 0.0]), xi=0.5)
    torch.testing.assert_close(v0, torch.zeros(2))


def _penalty_problem(seed, r_ref):
    g = torch.Generator().manual_seed(seed)
    A, B = _randn(R, D_IN, g=g), _randn(D_OUT, R, g=g)
    u, v = torch.rand(D_OUT, generator=g) * 3, torch.rand(D_IN, generator=g)
    A_ref, B_ref = _randn(r_ref, D_IN, g=g), _randn(D_OUT, r_ref, g=g)
    return A, B, u, v, A_ref, B_ref


@pytest.mark.parametrize("r_ref", [R, R + 2, 1])
def test_factored_penalty_matches_dense_autograd_and_quadratic_penalty(r_ref):
    s = 1.7
    A, B, u, v, A_ref, B_ref = _penalty_problem(seed=7 + r_ref, r_ref=r_ref)
    value, grad_A, grad_B = factored_penalty(A, B, u, v, A_ref, B_ref, s)
    assert value.dtype == grad_A.dtype == grad_B.dtype == torch.float32
    assert grad_A.shape == A.shape and grad_B.shape == B.shape

    # independent: Σ (u·vᵀ)⊙(θ − θ^ν)² on the dense float64 effective weights, differentiated by autograd
    A64, B64 = A.double().requires_grad_(), B.double().requires_grad_()
    W0 = torch.randn(D_OUT, D_IN, dtype=torch.float64)  # cancels in θ − θ^ν
    diff = (W0 + s * B64 @ A64) - (W0 + s * B_ref.double() @ A_ref.double())
    dense = (torch.outer(u.double(), v.double()) * diff.square()).sum()
    dense.backward()
    assert float(dense.detach()) > 1.0
    torch.testing.assert_close(value.double(), dense.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_A.double(), A64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_B.double(), B64.grad, rtol=1e-5, atol=1e-5)

    q_value, q_grad_A, q_grad_B = quadratic_penalty(A, B, torch.outer(u, v), A_ref, B_ref, s)
    torch.testing.assert_close(value, q_value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_A, q_grad_A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_B, q_grad_B, rtol=1e-5, atol=1e-5)


def test_factored_penalty_is_zero_at_the_reference():
    A, B, u, v, _, _ = _penalty_problem(seed=11, r_ref=R)
    value, grad_A, grad_B = factored_penalty(A, B, u, v, A.clone(), B.clone(), 2.0)
    assert float(value) == 0.0 and float(grad_A.abs().max()) == 0.0 and float(grad_B.abs().max()) == 0.0


def test_factored_norm_and_sum_match_dense():
    g = torch.Generator().manual_seed(12)
    u, v = torch.rand(D_OUT, generator=g), torch.rand(D_IN, generator=g)
    dense = torch.outer(u.double(), v.double())
    norm, total = factored_norm(u, v), factored_sum(u, v)
    assert norm.dtype == total.dtype == torch.float64
    torch.testing.assert_close(norm, torch.linalg.matrix_norm(dense), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(total, dense.sum(), rtol=1e-12, atol=0.0)


# --- shapes whose dense d_out×d_in fp32 tensor (80 GB) cannot exist -----------------------------------------

HUGE_OUT, HUGE_IN, HUGE_R = 200_000, 100_000, 2


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any torch op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def _huge_record_and_penalize(device):
    """One factored importance stage and one penalty pass at the huge shapes; returns the results and the largest op output."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(device) if device != "meta" else torch.empty(*shape, device="meta")

    torch.manual_seed(13)
    A = torch.nn.Parameter(randn(HUGE_R, HUGE_IN, scale=0.01))
    B = torch.nn.Parameter(randn(HUGE_OUT, HUGE_R, scale=0.01))
    module = FactoredTrackedModule("m", A, B, 2.0)
    grads = [(randn(HUGE_R, HUGE_IN), randn(HUGE_OUT, HUGE_R)) for _ in range(2)]
    with _LargestTensor() as largest:
        for lr, (gA, gB) in zip((0.1, 0.05), grads):
            A.grad, B.grad = gA, gB
            module.capture(lr)
            with torch.no_grad():
                A -= lr * A.grad
                B -= lr * B.grad
            module.accumulate()
            module.advance()
        omega_f, _ = module.importance(xi=0.1)
        u, v = omega_f.u, omega_f.v
        msq = module.mean_delta_sq()
        value, grad_A, grad_B = factored_penalty(A.detach(), B.detach() + 0.01, u, v, module.A_0, module.B_0, 2.0)
        norm, total = factored_norm(u, v), factored_sum(u, v)
    return (module, u, v, msq, value, grad_A, grad_B, norm, total), largest.numel


def test_huge_module_never_forms_a_dense_tensor():
    """First on the meta device (shapes only, nothing allocated: a dense intermediate fails here, on any machine),
    then for real on the CPU, where an 80 GB allocation would be refused."""
    limit = 4 * HUGE_R * max(HUGE_OUT, HUGE_IN)  # a few factor-sized tensors; dense would be HUGE_OUT·HUGE_IN = 2e10
    _, largest = _huge_record_and_penalize("meta")
    assert 0 < largest <= limit
    (module, u, v, msq, value, grad_A, grad_B, norm, total), largest = _huge_record_and_penalize("cpu")
    assert largest <= limit
    assert module.omega_rows.shape == u.shape == (HUGE_OUT,) and module.omega_cols.shape == v.shape == (HUGE_IN,)
    assert grad_A.shape == (HUGE_R, HUGE_IN) and grad_B.shape == (HUGE_OUT, HUGE_R)
    for t in (module.omega_rows, module.omega_cols, u, v, msq, value, grad_A, grad_B, norm, total):
        assert bool(torch.isfinite(t).all())
    assert float(module.omega_rows.abs().max()) > 0 and float(msq) > 0 and float(value) > 0
    # ω's total, two ways: Σ rows = Σ cols (fp32 sums over 2e5 and 1e5 terms)
    rows_total, cols_total = float(module.omega_rows.double().sum()), float(module.omega_cols.double().sum())
    assert rows_total == pytest.approx(cols_total, rel=1e-3, abs=1e-3 * float(module.omega_rows.double().abs().sum()))
