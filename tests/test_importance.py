"""docs/METHOD.md §1 (eqs. 13-15) against independent float64 computations on small tensors."""

import math

import pytest
import torch

from axolotl_alora.importance import (
    OmegaTracker,
    TrackedModule,
    TrackedParameter,
    equivalent_gradient,
    importance_from_omega,
    weight_change,
)

D_OUT, D_IN, R = 6, 5, 3


def _problem(seed=0, scaling=2.0):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(D_OUT, D_IN, generator=g)
    A = torch.nn.Parameter(torch.randn(R, D_IN, generator=g) * 0.3)
    B = torch.nn.Parameter(torch.randn(D_OUT, R, generator=g) * 0.3)
    x = torch.randn(16, D_IN, generator=g)
    y = torch.randn(16, D_OUT, generator=g)

    def loss():
        return ((x @ (W0 + scaling * B @ A).T - y) ** 2).mean()

    return A, B, loss


def test_sgd_step_moves_theta_by_minus_lr_equivalent_gradient():
    """Eq. 13's defining property, with the outer s: under plain SGD, Δθ = −η·g̃ exactly."""
    s, lr = 2.0, 0.05
    A, B, loss = _problem(scaling=s)
    loss().backward()
    A0, B0, gA, gB = A.detach().clone(), B.detach().clone(), A.grad.clone(), B.grad.clone()
    torch.optim.SGD([A, B], lr=lr).step()
    d_theta = s * (B.detach().double() @ A.detach().double() - B0.double() @ A0.double())
    torch.testing.assert_close(d_theta, -lr * equivalent_gradient(gA, gB, A0, B0, lr, s).double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight_change(A0, B0, A.detach(), B.detach(), s).double(), d_theta, rtol=1e-5, atol=1e-7)


def test_omega_over_adamw_steps_with_scheduler_and_weight_decay():
    s = 1.5
    A, B, loss = _problem(seed=1, scaling=s)
    opt = torch.optim.AdamW([A, B], lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: [0.2, 1.0, 0.7, 0.4, 0.1, 0.05, 0.0][t])
    tracker = OmegaTracker([TrackedModule("m", A, B, s)])
    expected = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    lrs_seen = []
    for _ in range(6):
        opt.zero_grad()
        loss().backward()
        lr = opt.param_groups[0]["lr"]
        lrs_seen.append(lr)
        A_t, B_t = A.detach().double().clone(), B.detach().double().clone()
        gA, gB = A.grad.double().clone(), B.grad.double().clone()
        tracker.before_step({"m": lr})
        opt.step()
        tracker.after_step()
        sched.step()
        # independent: the three terms of eq. 13 with the outer s, and Δθ from the two products
        g_tilde = s * (gB @ A_t + B_t @ gA - lr * (gB @ gA))
        d_theta = s * (B.detach().double() @ A.detach().double() - B_t @ A_t)
        expected -= g_tilde * d_theta
    assert len(set(lrs_seen)) > 3, "the scheduler must make η_t vary"
    assert tracker.steps == 6
    torch.testing.assert_close(tracker.modules[0].omega.double(), expected, rtol=1e-4, atol=1e-9)
    assert expected.abs().max() > 1e-4


def test_importance_from_omega_clamps_and_counts():
    omega = torch.tensor([[0.5, -0.2], [0.0, 2.0]])
    delta = torch.tensor([[1.0, 0.3], [0.1, -2.0]])
    xi = 0.1
    importance, clamped = importance_from_omega(omega.clone(), delta, xi)
    expected = [[0.5 / (1.0 + xi), 0.0], [0.0, 2.0 / (4.0 + xi)]]
    torch.testing.assert_close(importance, torch.tensor(expected))
    assert clamped == 1


def test_tracker_refuses_missing_gradient():
    A = torch.nn.Parameter(torch.ones(R, D_IN))
    B = torch.nn.Parameter(torch.ones(D_OUT, R))
    with pytest.raises(RuntimeError, match="no gradient"):
        OmegaTracker([TrackedModule("m", A, B, 1.0)]).before_step({"m": 0.1})


def test_bf16_parameters_are_tracked_in_fp32():
    s = 1.0
    A, B, loss = _problem(seed=2, scaling=s)
    loss().backward()
    A16 = torch.nn.Parameter(A.detach().bfloat16())
    B16 = torch.nn.Parameter(B.detach().bfloat16())
    A16.grad, B16.grad = A.grad.bfloat16(), B.grad.bfloat16()
    tracker = OmegaTracker([TrackedModule("m", A16, B16, s)])
    tracker.before_step({"m": 0.01})
    with torch.no_grad():
        A16 -= 0.01 * A16.grad
        B16 -= 0.01 * B16.grad
    tracker.after_step()
    assert tracker.modules[0].omega.dtype == torch.float32
    assert math.isfinite(float(tracker.modules[0].omega.sum())) and float(tracker.modules[0].omega.abs().sum()) > 0


def test_a_step_the_grad_scaler_skips_adds_nothing():
    """fp16: an overflowing step leaves non-finite gradients and Δθ = 0; NaN·0 must not reach ω."""
    s, skipped_at = 2.0, 2
    A, B, loss = _problem(seed=3, scaling=s)
    opt = torch.optim.AdamW([A, B], lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    tracker = OmegaTracker([TrackedModule("m", A, B, s)])
    expected = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    for step in range(5):
        opt.zero_grad()
        value = loss() * (float("inf") if step == skipped_at else 1.0)
        scaler.scale(value).backward()
        scaler.unscale_(opt)
        A_t, B_t = A.detach().double().clone(), B.detach().double().clone()
        gA, gB = A.grad.double().clone(), B.grad.double().clone()
        tracker.before_step({"m": 0.05})
        scaler.step(opt)
        tracker.after_step(step)
        scaler.update()
        d_theta = s * (B.detach().double() @ A.detach().double() - B_t @ A_t)
        if step == skipped_at:
            assert not torch.isfinite(gA).all() and float(d_theta.abs().max()) == 0.0, "the scaler must have skipped this step"
            continue
        expected -= s * (gB @ A_t + B_t @ gA - 0.05 * (gB @ gA)) * d_theta
    assert tracker.skipped == [skipped_at] and tracker.steps == 5
    omega = tracker.modules[0].omega.double()
    assert torch.isfinite(omega).all()
    torch.testing.assert_close(omega, expected, rtol=1e-4, atol=1e-9)


def test_full_parameter_takes_classic_si():
    """A full parameter: ω ← ω − g ⊙ (θ_{t+1} − θ_t), Ω = max(ω / ((θ_end − θ_0)² + ξ), 0)."""
    g = torch.Generator().manual_seed(4)
    theta = torch.nn.Parameter(torch.randn(4, 3, generator=g))
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 4, generator=g)
    opt = torch.optim.AdamW([theta], lr=0.05, weight_decay=0.1)
    tracker = OmegaTracker([TrackedParameter("p", theta)])
    start = theta.detach().double().clone()
    expected = torch.zeros(4, 3, dtype=torch.float64)
    for step in range(4):
        opt.zero_grad()
        ((x @ theta.T - y) ** 2).mean().backward()
        before, grad = theta.detach().double().clone(), theta.grad.double().clone()
        tracker.before_step({"p": 0.05})
        opt.step()
        tracker.after_step(step)
        expected -= grad * (theta.detach().double() - before)
    torch.testing.assert_close(tracker.modules[0].omega.double(), expected, rtol=1e-5, atol=1e-9)
    importance, _ = tracker.importance(xi=0.1)
    delta = theta.detach().double() - start
    torch.testing.assert_close(importance["p"].double(), (expected / (delta**2 + 0.1)).clamp_min(0), rtol=1e-5, atol=1e-9)


def test_row_blocks_in_place_and_bfloat16_importance_match_the_whole(monkeypatch):
    """ω accumulated and Ω formed a few rows at a time equal the one-pass computation; in place and in bf16 too."""
    import axolotl_alora.importance as importance

    def run(block):
        monkeypatch.setattr(importance, "BLOCK_ELEMENTS", block)
        A, B, loss = _problem(seed=3)
        tracker = OmegaTracker([TrackedModule("m", A, B, 2.0)])
        tracker.start()
        opt = torch.optim.AdamW([A, B], lr=0.05)
        for _ in range(4):
            opt.zero_grad()
            loss().backward()
            tracker.before_step({"m": 0.05})
            opt.step()
            tracker.after_step()
        return tracker

    whole, blocked = run(10**9), run(D_IN * 2)  # 2 rows per block: 3 blocks
    torch.testing.assert_close(blocked.modules[0].omega, whole.modules[0].omega, rtol=1e-6, atol=1e-9)
    before = whole.modules[0].omega.clone()
    expected, clamped = whole.importance(0.1)
    assert torch.equal(whole.modules[0].omega, before), "importance() without in_place leaves ω as it was"
    kept = blocked.modules[0].omega.clone()
    in_place, clamped_in_place = blocked.importance(0.1, in_place=True, dtype=torch.bfloat16)
    assert in_place["m"].dtype == torch.bfloat16 and clamped_in_place == clamped
    torch.testing.assert_close(in_place["m"].float(), expected["m"].bfloat16().float())
    independent = (kept.double() / (blocked.modules[0].delta().double() ** 2 + 0.1)).clamp_min(0)
    torch.testing.assert_close(expected["m"].double(), independent, rtol=1e-5, atol=1e-9)
