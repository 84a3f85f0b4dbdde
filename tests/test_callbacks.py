"""The general stage's recorder: non-finite importance is refused and overwrites nothing; the reference is the
end of training even when the Trainer restores another checkpoint afterwards (load_best_model_at_end)."""

import logging
from types import SimpleNamespace

import pytest
import torch

from axolotl_alora.callbacks import ImportanceRecorder, NonFiniteImportanceError
from axolotl_alora.importance_file import read_importance_file
from axolotl_alora.lora import LoraModule


def _recorder(tmp_path, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.nn.Parameter(torch.randn(2, 5, generator=g) * 0.3)
    B = torch.nn.Parameter(torch.randn(6, 2, generator=g) * 0.3)
    module = LoraModule("model.layers.0.self_attn.q_proj", A, B, scaling=2.0, r=2, alpha=4.0, use_rslora=False)
    recorder = ImportanceRecorder([module], tmp_path / "alora_importance.safetensors", xi=0.1, omega_dtype="float32", metadata={})
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 6, generator=g)
    opt = torch.optim.SGD([A, B], lr=0.1)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, num_input_tokens_seen=0)
    recorder.on_train_begin(None, state, None)

    def step(poison=False, skip=False):
        opt.zero_grad()
        ((x @ (2.0 * B @ A).T - y) ** 2).mean().backward()
        if poison or skip:  # an fp16 overflow
            A.grad[0, 0] = float("nan")
        recorder.on_pre_optimizer_step(None, state, None, optimizer=opt)
        if not skip:  # a grad scaler skips the step; an optimizer without one steps on the NaN
            opt.step()
        recorder.on_optimizer_step(None, state, None)
        state.global_step += 1

    return recorder, state, step, (A, B)


def test_non_finite_importance_is_refused_names_the_steps_and_keeps_the_old_file(tmp_path):
    recorder, state, step, _ = _recorder(tmp_path)
    old = tmp_path / "alora_importance.safetensors"
    old.write_bytes(b"the previous run's file")
    step()
    step(poison=True)
    step()
    with pytest.raises(NonFiniteImportanceError) as err:
        recorder.on_train_end(None, state, None)
    message = str(err.value)
    assert "non-finite gradients or weights: 2, 3" in message  # numbered as the Trainer logs them and "Nothing was written" in message
    assert old.read_bytes() == b"the previous run's file"
    assert not list(tmp_path.glob(".alora_importance*")), "no temp file left behind"


def test_skipped_steps_are_recorded_in_the_file(tmp_path):
    recorder, state, step, _ = _recorder(tmp_path)
    step()
    step(skip=True)
    step()
    recorder.on_train_end(None, state, None)
    data = read_importance_file(tmp_path / "alora_importance.safetensors")
    assert data.metadata["skipped_steps"] == [2] and data.metadata["steps"] == 3  # the second step, as the Trainer numbers it


def test_reference_is_the_end_of_training_not_a_restored_checkpoint(tmp_path, caplog):
    recorder, state, step, (A, B) = _recorder(tmp_path)
    for _ in range(3):
        step()
    end_A, end_B = A.detach().clone(), B.detach().clone()
    with torch.no_grad():  # load_best_model_at_end restores an earlier checkpoint after the last step
        A.mul_(0.5)
        B.mul_(0.5)
    with caplog.at_level(logging.WARNING, logger="axolotl.alora"):
        data = recorder.importance()
    name = recorder.tracker.modules[0].name
    assert torch.equal(data.lora_A[name], end_A) and torch.equal(data.lora_B[name], end_B)
    delta = 2.0 * (end_B.double() @ end_A.double() - recorder.tracker.modules[0].B_0.double() @ recorder.tracker.modules[0].A_0.double())
    expected = (recorder.tracker.modules[0].omega.double() / (delta**2 + 0.1)).clamp_min(0)
    torch.testing.assert_close(data.omega[name].double(), expected, rtol=1e-5, atol=1e-12)
    assert "load_best_model_at_end" in caplog.text


def _modules(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (4, 7), (8, 3), (5, 5)]
    return [LoraModule(f"model.layers.{i}.self_attn.q_proj", torch.nn.Parameter(torch.randn(2, d_in, generator=g) * 0.3),
                       torch.nn.Parameter(torch.randn(d_out, 2, generator=g) * 0.3), scaling=2.0, r=2, alpha=4.0, use_rslora=False)
            for i, (d_out, d_in) in enumerate(shapes)]


def _train_and_write(out, form, dtype, shard=None, previous=None, count=4, xi=0.1):
    """Three SGD steps on every module (the same on every rank: DDP's gradients are already averaged), then the end."""
    modules = _modules(0)[:count]
    recorder = ImportanceRecorder(modules, out / "alora_importance.safetensors", xi=xi, omega_dtype=dtype, metadata={}, shard=shard, form=form,
                                  fingerprint=torch.arange(4.0), previous=previous)
    params = [p for m in modules for p in (m.A, m.B)]
    opt = torch.optim.SGD(params, lr=0.1)
    state = SimpleNamespace(global_step=0, is_world_process_zero=shard is None or shard.rank == 0, num_input_tokens_seen=0)
    recorder.on_train_begin(None, state, None)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        sum(((torch.randn(4, m.A.shape[1], generator=g) @ (2.0 * m.B @ m.A).T) ** 2).mean() for m in modules).backward()
        recorder.on_pre_optimizer_step(None, state, None, optimizer=opt)
        opt.step()
        recorder.on_optimizer_step(None, state, None)
        state.global_step += 1
    recorder.on_train_end(None, state, None)
    return recorder


def _sharded_writer(rank, world, rendezvous, out, form, dtype, count=4):
    import torch.distributed as dist

    from axolotl_alora.sharding import Shard

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        sizes = {m.name: m.shape[0] * m.shape[1] for m in _modules(0)[:count]}
        recorder = _train_and_write(out, form, dtype, Shard.of(sizes, rank, world), count=count)
        assert len(recorder.tracker.modules) == (count + world - 1 - rank) // world  # its share only
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("form,dtype", [("dense", "float32"), ("factored", "bfloat16")])
def test_two_ranks_write_shards_that_read_as_the_single_process_file(tmp_path, form, dtype):
    import torch.multiprocessing as mp

    single = _train_and_write(tmp_path / "single", form, dtype)
    assert len(single.tracker.modules) == 4
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_sharded_writer, args=(k, 2, str(tmp_path / "rendezvous"), tmp_path / "sharded", form, dtype)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "alora_importance-00001-of-00002.safetensors", "alora_importance-00002-of-00002.safetensors", "alora_importance.safetensors.index.json"]
    a = read_importance_file(tmp_path / "single" / "alora_importance.safetensors")
    b = read_importance_file(tmp_path / "sharded" / "alora_importance.safetensors")
    assert list(a.omega) == list(b.omega) and a.metadata["modules"] == b.metadata["modules"]
    assert a.metadata["clamped_fraction"] == b.metadata["clamped_fraction"] and torch.equal(a.fingerprint, b.fingerprint)
    for name in a.omega:
        x, y = a.omega[name], b.omega[name]
        for t, u in ((x.u, y.u), (x.v, y.v)) if form == "factored" else ((x, y),):
            assert torch.equal(t, u)
        assert torch.equal(a.lora_A[name], b.lora_A[name]) and torch.equal(a.lora_B[name], b.lora_B[name])
    assert {e["kind"] for e in b.metadata["modules"].values()} == {"lora" if form == "dense" else "factored"}


def test_a_rank_that_owns_no_module_still_steps_and_writes(tmp_path):
    """Two ranks, one module: rank 1 tracks nothing (it crashed at its first optimizer step), and the shards read
    as the single-process file."""
    import torch.multiprocessing as mp

    single = _train_and_write(tmp_path / "single", "dense", "float32", count=1)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_sharded_writer, args=(k, 2, str(tmp_path / "rdv"), tmp_path / "sharded", "dense", "float32", 1)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    a = read_importance_file(tmp_path / "single" / "alora_importance.safetensors")
    b = read_importance_file(tmp_path / "sharded" / "alora_importance.safetensors")
    assert list(a.omega) == list(b.omega) == [single.tracker.modules[0].name]
    assert torch.equal(a.omega[single.tracker.modules[0].name], b.omega[single.tracker.modules[0].name])


def _rows_cols(omega):
    dense = omega.dense() if hasattr(omega, "u") else omega
    return dense.double().sum(dim=1), dense.double().sum(dim=0)


@pytest.mark.parametrize("before,now", [("dense", "dense"), ("dense", "factored"), ("factored", "dense"), ("factored", "factored")])
def test_continual_sum_for_every_pair_of_forms(tmp_path, before, now):
    """A general stage that continues an earlier file (Ω_old + Ω_new, docs/METHOD.md §1 and §8) in either form. The
    previous file is read in this stage's form, as the plugin reads it; the sum is checked against this stage's
    Ω alone plus the previous Ω as read: the matrix when this stage is dense, its row and column sums when factored.
    Three of the four pairs crashed after training before."""
    _train_and_write(tmp_path / "old", before, "float32")
    previous = read_importance_file(tmp_path / "old" / "alora_importance.safetensors", omega_form=now)
    alone = _train_and_write(tmp_path / "alone", now, "float32")
    summed = _train_and_write(tmp_path / "summed", now, "float32", previous=previous)
    a = read_importance_file(tmp_path / "alone" / "alora_importance.safetensors")
    b = read_importance_file(tmp_path / "summed" / "alora_importance.safetensors")
    assert b.metadata["stages"] == 2 and alone.tracker.steps == summed.tracker.steps == 3
    for name in a.omega:
        old = previous.omega[name]
        if now == "dense":
            expected = a.omega[name].double() + (old.dense() if hasattr(old, "u") else old).double()
            torch.testing.assert_close(b.omega[name].double(), expected, rtol=1e-6, atol=1e-12)
        else:
            assert hasattr(b.omega[name], "u")
            for got, new, prev in zip(_rows_cols(b.omega[name]), _rows_cols(a.omega[name]), _rows_cols(old)):
                torch.testing.assert_close(got, new + prev, rtol=1e-5, atol=1e-9)


def test_factored_stage_warns_where_delta_is_not_small_next_to_xi(tmp_path, caplog):
    """The factored Ω ≈ ω/ξ drops Δ²: the end of a factored stage compares mean Δ² (factored.mean_delta_sq) with ξ."""
    with caplog.at_level(logging.WARNING, logger="axolotl.alora"):
        recorder = _train_and_write(tmp_path / "big", "factored", "float32", xi=1e3)
    assert "mean Δ²" not in caplog.text
    worst = max(float(m.mean_delta_sq()) for m in recorder.tracker.modules)
    assert worst > 0
    with caplog.at_level(logging.WARNING, logger="axolotl.alora"):
        _train_and_write(tmp_path / "small", "factored", "float32", xi=worst)  # the worst module's mean Δ² is 1·ξ
    assert "mean Δ² is 1·ξ" in caplog.text and "alora_importance_form: dense" in caplog.text
