"""docs/METHOD.md §2-3 (eqs. 16-17) against hand computation and plain autograd on the dense effective weight."""

import math

import pytest
import torch

from axolotl_alora.regularizer import RegularizedModule, Regularizer, effective_layers, layer_weights


def test_layer_weights_every_mode_and_temperature():
    n = torch.tensor([0.5, 1.0, 3.0])
    for tau in (1.0, 0.5, 2.0):
        e = [math.exp(v / tau) for v in n.tolist()]
        torch.testing.assert_close(layer_weights(n, "softmax", tau), torch.tensor([v / sum(e) for v in e], dtype=torch.float64))
    mean = sum(n.tolist()) / 3
    e = [math.exp(v / mean) for v in n.tolist()]
    torch.testing.assert_close(layer_weights(n, "softmax", "auto"), torch.tensor([v / sum(e) for v in e], dtype=torch.float64))
    torch.testing.assert_close(layer_weights(n, "uniform"), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(layer_weights(n, "none"), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        layer_weights(n, "bogus")


def test_auto_temperature_is_scale_free():
    n = torch.tensor([1e-4, 3e-4, 2e-3])
    torch.testing.assert_close(layer_weights(n, "softmax", "auto"), layer_weights(n * 1e6, "softmax", "auto"))


def test_effective_layers():
    assert effective_layers(torch.full((8,), 1 / 8)) == pytest.approx(8)
    assert effective_layers(torch.ones(8)) == pytest.approx(8)
    assert effective_layers(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1)
    w = torch.tensor([0.7, 0.2, 0.1])
    assert effective_layers(w) == pytest.approx(1 / float((w**2).sum()))


def _modules(seed=0, shapes=((6, 5, 2), (4, 7, 3)), scalings=(2.0, 0.7), coefficients=(0.3, 1.4)):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for i, ((o, d, r), s, c) in enumerate(zip(shapes, scalings, coefficients)):
        mods.append(
            RegularizedModule(
                name=f"m{i}",
                A=torch.nn.Parameter(torch.randn(r, d, generator=g)),
                B=torch.nn.Parameter(torch.randn(o, r, generator=g)),
                scaling=s,
                omega=torch.rand(o, d, generator=g),
                A_ref=torch.randn(r, d, generator=g),
                B_ref=torch.randn(o, r, generator=g),
                coefficient=c,
            )
        )
    return mods


def _dense_reference(mods):
    """Eq. 16 on the dense effective weights θ = W0 + s·B·A, differentiated by plain autograd (float64)."""
    As = [m.A.detach().double().requires_grad_() for m in mods]
    Bs = [m.B.detach().double().requires_grad_() for m in mods]
    total = 0
    for m, A, B in zip(mods, As, Bs):
        W0 = torch.randn(m.omega.shape, dtype=torch.float64)  # cancels in θ − θ^ν
        theta = W0 + m.scaling * B @ A
        theta_ref = W0 + m.scaling * m.B_ref.double() @ m.A_ref.double()
        total = total + m.coefficient * (m.omega.double() * (theta - theta_ref) ** 2).sum()
    total.backward()
    return total.detach(), [A.grad for A in As], [B.grad for B in Bs]


def _assert_matches_dense_autograd(mods, regularizer=None, step=None):
    value, gA, gB = _dense_reference(mods)
    reg = (regularizer or Regularizer(mods))(step)
    reg.backward()
    torch.testing.assert_close(reg.double(), value, rtol=1e-5, atol=1e-6)
    for m, ga, gb in zip(mods, gA, gB):
        torch.testing.assert_close(m.A.grad.double(), ga, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.B.grad.double(), gb, rtol=1e-5, atol=1e-5)


def test_reg_loss_value_and_gradients_match_autograd():
    _assert_matches_dense_autograd(_modules())


def test_reference_of_another_rank():
    mods = _modules(seed=5)
    g = torch.Generator().manual_seed(9)
    mods[0].A_ref, mods[0].B_ref = torch.randn(7, 5, generator=g), torch.randn(6, 7, generator=g)  # r 7 vs 2
    mods[1].A_ref, mods[1].B_ref = torch.zeros(1, 7), torch.zeros(4, 1)  # EWC: θ^ν = W0
    _assert_matches_dense_autograd(mods)


def test_reg_loss_is_zero_at_the_reference():
    mods = _modules()
    for m in mods:
        m.A_ref, m.B_ref = m.A.detach().clone(), m.B.detach().clone()
    assert float(Regularizer(mods)()) == 0.0


def test_one_pass_per_optimizer_step_and_fresh_after_a_step_that_bumps_no_version():
    """Cached within one optimizer step (keyed on the Trainer's step), recomputed at the next one, even
    when the optimizer updates in place without bumping `_version` (fused AdamW, bitsandbytes)."""
    mods = _modules(seed=3)
    params = [p for m in mods for p in (m.A, m.B)]
    reg = Regularizer(mods)
    first = reg(step=0)
    (2.5 * first).backward()  # grad_out scales the precomputed gradients
    second = reg(step=0)
    second.backward()  # the same step: cached value, gradients accumulate
    assert first.item() == second.item()
    _, gA, _ = _dense_reference(mods)
    torch.testing.assert_close(mods[0].A.grad.double(), 3.5 * gA[0], rtol=1e-5, atol=1e-5)

    versions = [p._version for p in params]
    torch.optim.AdamW(params, lr=0.1, fused=True).step()
    assert [p._version for p in params] == versions, "this test needs an optimizer that bumps no version"
    for m in mods:
        m.A.grad, m.B.grad = None, None
    _assert_matches_dense_autograd(mods, reg, step=1)


def test_without_a_step_every_call_recomputes():
    mods = _modules(seed=6)
    reg = Regularizer(mods)
    before = reg().item()
    with torch.no_grad():
        mods[0].A.mul_(1.5)  # in place, like a fused optimizer
    fresh, _, _ = _dense_reference(mods)
    assert reg().item() != before
    torch.testing.assert_close(reg().double(), fresh, rtol=1e-5, atol=1e-6)


def test_bf16_parameters_get_bf16_gradients():
    mods = _modules(seed=4)
    for m in mods:
        m.A = torch.nn.Parameter(m.A.detach().bfloat16())
        m.B = torch.nn.Parameter(m.B.detach().bfloat16())
    Regularizer(mods)().backward()
    assert mods[0].A.grad.dtype == torch.bfloat16 and mods[0].A.grad.abs().sum() > 0


def test_row_blocks_and_bfloat16_omega_match_autograd(monkeypatch):
    """G formed 2 rows at a time, and Ω held in bfloat16: eq. 16 on the bf16-rounded Ω, to fp32 accuracy."""
    import axolotl_alora.importance as importance

    monkeypatch.setattr(importance, "BLOCK_ELEMENTS", 14)  # 2 rows of 7, 2 rows of 5: several blocks per module
    _assert_matches_dense_autograd(_modules(seed=3))
    mods = _modules(seed=4)
    for m in mods:
        m.omega = m.omega.to(torch.bfloat16)
    _assert_matches_dense_autograd(mods)  # the reference reads the same bf16 Ω, widened to float64


def _sharded_rank(rank, world, path, results):
    import torch.distributed as dist

    from axolotl_alora.sharding import Shard

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        mods = _modules(seed=11, shapes=((6, 5, 2), (4, 7, 3), (8, 3, 2)), scalings=(2.0, 0.7, 1.0), coefficients=(0.3, 1.4, 0.9))
        shard = Shard.of({m.name: m.omega.numel() for m in mods}, rank, world)
        reg = Regularizer([m for m in mods if m.name in shard.owned], world)
        value = reg()
        value.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for m in mods for p in (m.A, m.B)]
        for g in grads:  # what DDP does to every gradient: the average over ranks
            dist.all_reduce(g)
            g /= world
        results.put((rank, float(value), sorted(shard.owned), [g.tolist() for g in grads]))
    finally:
        dist.destroy_process_group()


def test_sharded_regularizer_leaves_phi_grad_after_ddp_averaging(tmp_path):
    """Two gloo processes, each holding its share: the summed value and the DDP-averaged gradients are the whole's."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_sharded_rank, args=(k, 2, str(tmp_path / "rendezvous"), results)) for k in range(2)]
    for p in procs:
        p.start()
    out = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    mods = _modules(seed=11, shapes=((6, 5, 2), (4, 7, 3), (8, 3, 2)), scalings=(2.0, 0.7, 1.0), coefficients=(0.3, 1.4, 0.9))
    value, gA, gB = _dense_reference(mods)
    assert out[0][2] and out[1][2] and not set(out[0][2]) & set(out[1][2]), "each rank holds a non-empty share of its own"
    expected = [g for pair in zip(gA, gB) for g in pair]
    for rank, v, _, grads in out:
        assert v == pytest.approx(float(value), rel=1e-5)  # every rank logs the whole L_reg
        for got, want in zip(grads, expected):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-5, atol=1e-5)
