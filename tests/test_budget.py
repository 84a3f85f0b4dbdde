"""The forgetting budget's arithmetic (axolotl_alora/budget.py): the budget, the φ controller, the α search."""

import math
import random

import pytest

from axolotl_alora.budget import MAX_FACTOR, PHI_BOUNDS, PhiController, budget_loss, largest_alpha

BASE, NU = 3.0, 2.5  # general-text loss of the base model and of ν: the general stage's gain is 0.5


def response(phi: float, noise: random.Random | None = None) -> float:
    """A synthetic monotone response: the share kept rises from 0 to 1 over φ's decades (half at φ = 1), plus noise."""
    kept = 1 / (1 + math.exp(-2.0 * math.log10(phi)))
    if noise is not None:
        kept += noise.gauss(0, 0.01)
    return BASE - kept * (BASE - NU)


def test_budget_from_a_share_kept_or_a_rise():
    assert budget_loss(BASE, NU, keep=0.8) == pytest.approx((2.6, 0.5))
    assert budget_loss(BASE, None, max_rise=0.05) == pytest.approx((3.05, 0.05))
    with pytest.raises(ValueError, match="alora_keep needs a general stage"):
        budget_loss(BASE, None, keep=0.8)
    with pytest.raises(ValueError, match="alora_keep needs a general stage"):
        budget_loss(BASE, 3.1, keep=0.8)  # ν did not lower the loss


@pytest.mark.parametrize("keep,phi0", [(0.8, 0.03), (0.5, 30.0), (0.95, 1e-3), (0.2, 100.0)])
def test_controller_reaches_the_budget_within_5_percent_of_the_gain(keep, phi0):
    target, scale = budget_loss(BASE, NU, keep=keep)
    noise = random.Random(0)
    controller = PhiController(phi0, target, scale)
    for _ in range(25):
        controller.update(response(controller.phi, noise))
    assert PHI_BOUNDS[0] <= controller.phi <= PHI_BOUNDS[1]
    assert abs(response(controller.phi) - target) <= 0.05 * (BASE - NU)
    factors = [b["phi"] / a["phi"] for a, b in zip(controller.history, controller.history[1:])]
    assert all(1 / MAX_FACTOR - 1e-12 <= f <= MAX_FACTOR + 1e-12 for f in factors)


def test_controller_holds_phi_when_the_budget_is_met_and_stays_in_bounds():
    target, scale = budget_loss(BASE, NU, keep=0.8)
    controller = PhiController(0.5, target, scale)
    assert controller.update(target + 0.01 * scale) == 0.5  # within the tolerance: held
    assert controller.update(target + 0.5 * scale) == pytest.approx(0.5 * MAX_FACTOR)  # far above: the largest step up
    assert controller.update(target - 0.1 * scale) < 0.5 * MAX_FACTOR  # below the budget: φ shrinks
    high = PhiController(PHI_BOUNDS[1] / 2, target, scale)
    for _ in range(5):
        high.update(BASE)  # a budget that cannot be met: φ stops at its bound
    assert high.phi == PHI_BOUNDS[1]
    assert PhiController.from_state(high.state()).state() == high.state()


def test_largest_alpha_meets_the_budget_by_bisection():
    loss = lambda a: NU + a * (BASE - NU)  # noqa: E731 - linear from ν (α 0) to the end (α 1)
    alpha, scored = largest_alpha(loss, 2.75, steps=8)
    assert alpha == pytest.approx(0.5, abs=2**-8) and loss(alpha) <= 2.75 and len(scored) == 9
    assert largest_alpha(loss, 3.5)[0] == 1.0  # the end adapter meets it: no interpolation
    assert largest_alpha(loss, 2.0)[0] == 0.0  # not even ν meets it


def test_a_budget_run_saves_and_restores_phi_and_its_start_points(tmp_path):
    """What a checkpoint's alora_budget.json carries: φ's controller and the start points, so a resumed run (which
    may not be able to score ν again) steers on as before; a changed budget is recomputed from the same points."""
    from types import SimpleNamespace

    from axolotl_alora.forgetting_budget import BUDGET_STATE, BudgetRun, BudgetSpec
    from axolotl_alora.general_eval import GeneralScores

    args = SimpleNamespace(output_dir=str(tmp_path))
    trainer = SimpleNamespace(alora_phi=0.5)
    run = BudgetRun(BudgetSpec("phi", keep=0.8), trainer, report=None, output_dir=str(tmp_path))
    run.start(GeneralScores(BASE, NU), GeneralScores(3.1, 2.4), args, SimpleNamespace(global_step=0, is_world_process_zero=True))
    assert run.target == pytest.approx(2.6) and trainer.alora_phi == 0.5
    run.after_score(2.9, 1)  # far above the budget: φ grows
    assert trainer.alora_phi == pytest.approx(0.5 * MAX_FACTOR)
    run.save(tmp_path / "checkpoint-1")

    resumed_trainer = SimpleNamespace(alora_phi=0.5)  # alora_phi from the YAML again
    resumed = BudgetRun(BudgetSpec("phi", keep=0.8), resumed_trainer, report=None, output_dir=str(tmp_path))
    resumed.start(GeneralScores(BASE, None), GeneralScores(3.1, None), args, SimpleNamespace(global_step=1, is_world_process_zero=True))
    assert resumed_trainer.alora_phi == pytest.approx(0.5 * MAX_FACTOR) and resumed.phi_start == 0.5
    assert resumed.control_points == {"base": BASE, "reference": NU} and resumed.report_points == {"base": 3.1, "reference": 2.4}
    assert resumed.controller.history == run.controller.history

    looser = BudgetRun(BudgetSpec("phi", keep=0.5), SimpleNamespace(alora_phi=0.5), report=None, output_dir=str(tmp_path))
    looser.start(GeneralScores(BASE, None), GeneralScores(3.1, None), args, SimpleNamespace(global_step=1, is_world_process_zero=True))
    assert looser.target == looser.controller.target == pytest.approx(2.75)

    (tmp_path / "checkpoint-1" / BUDGET_STATE).unlink()  # a checkpoint from a run without a budget: start afresh
    fresh_trainer = SimpleNamespace(alora_phi=0.5)
    fresh = BudgetRun(BudgetSpec("phi", keep=0.8), fresh_trainer, report=None, output_dir=str(tmp_path))
    fresh.start(GeneralScores(BASE, NU), GeneralScores(3.1, 2.4), args, SimpleNamespace(global_step=1, is_world_process_zero=True))
    assert fresh_trainer.alora_phi == 0.5 and fresh.controller.history == []


def test_keep_without_a_nu_to_score_says_why():
    from types import SimpleNamespace

    from axolotl_alora.forgetting_budget import BudgetRun, BudgetSpec
    from axolotl_alora.general_eval import GeneralScores

    run = BudgetRun(BudgetSpec("interpolation", keep=0.8), SimpleNamespace(alora_phi=1.0), report=None, output_dir=None)
    with pytest.raises(ValueError, match="another LoRA shape than this run's .* or use alora_max_general_loss_rise"):
        run.start(GeneralScores(BASE, None), GeneralScores(3.1, None), SimpleNamespace(output_dir="."),
                  SimpleNamespace(global_step=0, is_world_process_zero=True))


@pytest.mark.parametrize("mechanism,end,alpha,warns", [
    ("interpolation", 2.55, 1.0, True),    # kept 90% of the gain against a budget of 50%: α can only hold back
    ("interpolation", 2.74, 1.0, False),   # just under the budget: nothing to trade
    ("interpolation", 2.9, 0.4, False),    # the budget held the run back
    ("both", 2.55, 1.0, False),            # φ was steered already
])
def test_interpolation_alone_says_how_to_use_a_large_margin(mechanism, end, alpha, warns):
    from types import SimpleNamespace

    from axolotl_alora.forgetting_budget import BudgetRun, BudgetSpec
    from axolotl_alora.general_eval import GeneralScores

    run = BudgetRun(BudgetSpec(mechanism, keep=0.5), SimpleNamespace(alora_phi=1.0), report=None, output_dir=None)
    run.start(GeneralScores(BASE, NU), GeneralScores(3.1, 2.4), SimpleNamespace(output_dir="."), SimpleNamespace(global_step=0, is_world_process_zero=True))
    run.control_points["end"], run.alpha = end, alpha
    note = run.slack_note()
    assert (note is not None) == warns
    if warns:
        assert "kept 90% of the gain on the control sample, 50% asked" in note and "alora_budget_by: both" in note


def test_the_margin_of_a_rise_budget_is_said_in_nats():
    from types import SimpleNamespace

    from axolotl_alora.forgetting_budget import BudgetRun, BudgetSpec
    from axolotl_alora.general_eval import GeneralScores

    run = BudgetRun(BudgetSpec("interpolation", max_rise=0.1), SimpleNamespace(alora_phi=1.0), report=None, output_dir=None)
    run.start(GeneralScores(BASE, None), GeneralScores(3.1, None), SimpleNamespace(output_dir="."), SimpleNamespace(global_step=0, is_world_process_zero=True))
    run.control_points["end"], run.alpha = BASE + 0.02, 1.0
    assert "rose +0.0200 nats over the base on the control sample, 0.1 allowed" in run.slack_note()
