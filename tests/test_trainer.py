"""AloraTrainer.compute_loss: φ·L_reg scaled like the task loss on both of transformers' accumulation paths."""

from types import SimpleNamespace

import pytest
import torch
from axolotl.core.trainers.base import AxolotlTrainer

from axolotl_alora.trainer import AloraTrainer


class _Model(torch.nn.Module):
    def __init__(self, training=True):
        super().__init__()
        self.train(training)


def _trainer(monkeypatch, accepts_loss_kwargs, phi=0.5, ga=4):
    monkeypatch.setattr(AxolotlTrainer, "compute_loss", lambda self, model, inputs, return_outputs=False, num_items_in_batch=None: torch.tensor(2.0))
    trainer = object.__new__(AloraTrainer)  # no Trainer.__init__: only what compute_loss reads
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    trainer.compute_loss_func = None
    trainer.current_gradient_accumulation_steps = ga
    trainer.alora_phi = phi
    trainer.alora_regularizer = lambda step=None: torch.tensor(3.0)
    trainer.state = SimpleNamespace(global_step=0)
    return trainer


@pytest.mark.parametrize(
    "accepts, num_items, expected",
    [
        (False, None, 2.0 + 0.5 * 3.0),  # transformers divides the whole loss by GA later
        (True, None, 2.0 + 0.5 * 3.0),
        (True, torch.tensor(100), 2.0 + 0.5 * 3.0 / 4),  # the model normalises by num_items: divide the penalty here
    ],
)
def test_penalty_scaling(monkeypatch, accepts, num_items, expected):
    trainer = _trainer(monkeypatch, accepts)
    loss = trainer.compute_loss(_Model(), {}, num_items_in_batch=num_items)
    assert float(loss) == pytest.approx(expected)
    reg_sum, ratio_sum, count = trainer._alora_sums.tolist()
    assert (reg_sum, count) == (3.0, 1.0) and ratio_sum == pytest.approx((expected - 2.0) / 2.0)


def test_no_penalty_in_eval_or_at_phi_zero(monkeypatch):
    trainer = _trainer(monkeypatch, False)
    assert float(trainer.compute_loss(_Model(training=False), {})) == 2.0
    trainer = _trainer(monkeypatch, False, phi=0.0)

    def never(step=None):
        raise AssertionError("φ = 0: the regularizer must not run")

    trainer.alora_regularizer = never
    assert float(trainer.compute_loss(_Model(), {})) == 2.0


def test_log_reports_means_at_full_precision_and_resets(monkeypatch):
    trainer = _trainer(monkeypatch, False)
    trainer.alora_regularizer = lambda step=None: torch.tensor(1.234567e-9)
    trainer.compute_loss(_Model(), {})
    trainer.compute_loss(_Model(), {})
    seen = {}
    monkeypatch.setattr(AxolotlTrainer, "log", lambda self, logs, start_time=None: seen.update(logs))
    trainer.log({"loss": 2.0})
    assert seen["alora_reg_loss"] == pytest.approx(1.234567e-9, rel=1e-6)  # Axolotl's stored metrics would round it to 0
    assert float(trainer._alora_sums.sum()) == 0.0
