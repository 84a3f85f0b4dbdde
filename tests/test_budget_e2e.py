"""A forgetting budget end to end (`alora_keep`, `alora_max_general_loss_rise`, `alora_budget_by`): real `axolotl train`
runs on a tiny random Llama, a general stage ν and domain stages after it."""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import sys

import pytest
import torch

from e2e import RAW_OMEGA, Runs
from tiny import pretrain

pytestmark = pytest.mark.e2e
FILE = "alora_importance.safetensors"
SAMPLES = 16  # 8 control + 8 report
PHI0 = 1.0


def _init_adapter(model_dir, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
                   ).save_pretrained(str(out))
    return out


def _narrow_text(path, model_dir, n=48, tokens=20):
    """Text from three words only: training on it gives back general-text loss (the helpers' domain text does not)."""
    import random

    from transformers import AutoTokenizer

    tok, rng = AutoTokenizer.from_pretrained(str(model_dir)), random.Random(3)
    lines = []
    while len(lines) < n:
        ids = tok(" ".join(rng.choice(["the", "cell", "energy"]) for _ in range(tokens)), add_special_tokens=False)["input_ids"][:tokens]
        lines.append(json.dumps({"text": tok.decode(ids)}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with cf.ThreadPoolExecutor(max_workers=3) as pool:
        r = Runs(tmp_path_factory.mktemp("budget"), pool, max_steps=6)
        r.importance_defaults = RAW_OMEGA  # φ's start (1) is set for raw Ω on this model
        r.domain = _narrow_text(r.root / "narrow.jsonl", r.model)
        init = _init_adapter(r.model, r.root / "init")
        r.submit("G", r.general, lora_model_dir=str(init), alora_record_importance=True)
        nu = {"learning_rate": 0.05, "lora_model_dir": str(r.out("G")), "alora_importance_path": str(r.out("G") / FILE), "alora_phi": PHI0,
              "alora_general_eval": str(r.general), "alora_general_eval_samples": SAMPLES}
        steer = {**nu, "alora_budget_by": "phi", "alora_general_eval_steps": 1}
        saving = {"save_strategy": "steps", "save_steps": 3}
        r.submit("D_tight", r.domain, after=["G"], **steer, alora_keep=1.0, **saving)
        r.submit("D_loose", r.domain, after=["G"], **steer, alora_keep=0.01, optimizer="paged_adamw_8bit")  # bitsandbytes' paged 8-bit
        r.submit("D_none", r.domain, after=["G"], **nu)
        r.submit("D_interp", r.domain, after=["G"], **nu, alora_keep=0.8, alora_budget_by="interpolation")
        # the default mechanism with an importance file (both), where users train: fp16 (16-bit base layers, float32
        # adapters) and Axolotl's default fused AdamW
        r.submit("D_both", r.domain, after=["G"], **{k: v for k, v in steer.items() if k != "alora_budget_by"}, alora_keep=0.8, use_tensorboard=True,
                 fp16=True, optimizer="adamw_torch_fused")
        # no general stage: the budget is a rise over the base model, ΔW_ref = 0; on a model that knows the general text
        # (training the random one on anything lowers its loss on any text)
        knows = shutil.copytree(r.model, r.root / "pretrained")
        pretrain(knows, r.general, steps=35)
        r.submit("L_rise", r.domain, base_model=str(knows), learning_rate=0.05, alora_general_eval=str(r.general), alora_general_eval_samples=SAMPLES,
                 alora_max_general_loss_rise=0.01)
        # plain LoRA continuing ν's adapter, no importance file: ΔW_ref is lora_model_dir's adapter
        r.submit("L_keep", r.domain, after=["G"], **{k: v for k, v in nu.items() if k not in ("alora_importance_path", "alora_phi")},
                 alora_keep=0.8)
        ddp = {"micro_batch_size": 2, "env": {"ACCELERATE_USE_CPU": "true"},
               "launcher": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "axolotl.cli.train"],
               "plugins": ["scaffold_plugins.CpuDdpPlugin", "axolotl_alora.AloraPlugin", "scaffold_plugins.PhiPerRankPlugin"]}
        r.submit("D_ddp", r.domain, after=["G"], **{**steer, "alora_budget_by": "both"}, alora_keep=0.9, **ddp)
        # D_tight interrupted after step 3 (its checkpoint saved), then resumed
        r.submit("D_stop", r.domain, after=["G"], **steer, alora_keep=1.0, **saving, env={"ALORA_TEST_STOP_AT": "3"},
                 plugins=["axolotl_alora.AloraPlugin", "scaffold_plugins.StopAtStepPlugin"])
        r.submit("D_resume", r.domain, after=["D_stop"], **steer, alora_keep=1.0, **saving, output_dir=str(r.out("D_stop")),
                 resume_from_checkpoint=str(r.out("D_stop") / "checkpoint-3"))
        yield r


def _budget(run) -> dict:
    return json.loads((run.out / "alora_general_eval.json").read_text())["budget"]


def _logged(run, key) -> list[float]:
    import ast

    found = []
    for line in run.log.splitlines():
        line = line.strip()
        if line.startswith("{") and f"'{key}'" in line:
            found.append(float(ast.literal_eval(line)[key]))
    return found


def test_a_tight_budget_raises_phi_and_a_loose_one_lowers_it(runs):
    tight, loose = _budget(runs.get("D_tight")), _budget(runs.get("D_loose"))
    for b in (tight, loose):
        assert b["mechanism"] == "phi" and b["phi_start"] == PHI0 and len(b["phi_trajectory"]) == 6  # scored every step
        assert b["alpha"] is None and not (runs.get("D_tight").out / "alora_interpolated").exists()
    assert tight["phi_final"] > PHI0 and loose["phi_final"] < PHI0
    phis = _logged(runs.get("D_tight"), "alora_phi")
    # logged at every logging step, beside alora_reg_ratio: the φ that step's penalty used (updated after each scoring)
    assert phis == pytest.approx([PHI0] + [phi for _, phi in tight["phi_trajectory"][:-1]], rel=1e-3) and phis[-1] > PHI0
    assert "forgetting budget (keep 100% of the general stage's gain, by phi)" in runs.get("D_tight").log


def test_steering_changes_training_and_the_penalty_follows_phi(runs):
    tight, fixed = runs.get("D_tight"), runs.get("D_none")  # the same run but for φ steered
    assert tight.logs[0]["loss"] == fixed.logs[0]["loss"]  # the same first step, at the same starting φ
    assert any(not torch.equal(tight.adapter()[k], fixed.adapter()[k]) for k in tight.adapter())


def _control_and_report(runs):
    from transformers import AutoTokenizer

    from axolotl_alora.forgetting_budget import split_samples
    from axolotl_alora.general_eval import read_documents, sample_sequences

    sequences = sample_sequences(read_documents(str(runs.general)), AutoTokenizer.from_pretrained(str(runs.model)), 64, SAMPLES, seed=7)
    return split_samples(sequences)


def _loss(runs, adapter_dir, sequences) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from axolotl_alora.general_eval import mean_token_loss

    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter_dir))
    return mean_token_loss(model, sequences, 4)


@pytest.mark.parametrize("name", ["D_interp", "L_rise", "L_keep"])
def test_the_interpolated_adapter_loads_and_meets_the_budget_on_the_control_sample(runs, name):
    run = runs.get(name)
    budget = _budget(run)
    control, report = _control_and_report(runs)
    assert 0 <= len(control) - len(report) <= 1 and not any(torch.equal(c, q) for c in control for q in report)
    out = run.out / "alora_interpolated"
    assert 0 <= budget["alpha"] < 1, "the end adapter alone breaks this budget"
    loss = _loss(runs, out, control)  # plain peft
    assert loss == pytest.approx(budget["control"]["chosen"], rel=1e-5) and loss <= budget["target"] + 1e-6
    assert _loss(runs, out, report) == pytest.approx(budget["report"]["chosen"], rel=1e-5)
    assert _loss(runs, run.out, report) == pytest.approx(budget["report"]["end"], rel=1e-5)
    if name != "L_rise":
        expected_target = budget["control"]["base"] - 0.8 * (budget["control"]["base"] - budget["control"]["reference"])
        kept = (budget["report"]["base"] - budget["report"]["chosen"]) / (budget["report"]["base"] - budget["report"]["reference"])
        assert budget["report_kept_share"] == pytest.approx(kept)
    else:
        expected_target = budget["control"]["base"] + 0.01
        assert budget["report_rise_over_base"] == pytest.approx(budget["report"]["chosen"] - budget["report"]["base"])
    assert budget["target"] == pytest.approx(expected_target)
    assert _logged(run, "alora_alpha") == pytest.approx([budget["alpha"]], abs=1e-4)


def test_the_interpolated_adapter_continues_through_lora_model_dir(runs, tmp_path):
    from e2e import base_config, train

    run = runs.get("D_interp")
    cfg = base_config(runs.model, runs.domain, tmp_path / "next", tmp_path / "prepared", lora_model_dir=str(run.out / "alora_interpolated"),
                      max_steps=1, plugins=None)
    train(cfg, tmp_path / "next.yml")


def test_interpolation_leaves_training_and_the_saved_adapter_bit_for_bit(runs):
    """output_dir holds the trained adapter, unmodified; the budget's keys change no step (φ is not steered)."""
    a, b = runs.get("D_interp"), runs.get("D_none")
    assert a.adapter().keys() == b.adapter().keys() and all(torch.equal(a.adapter()[k], b.adapter()[k]) for k in a.adapter())
    assert [e["loss"] for e in a.logs] == [e["loss"] for e in b.logs]
    assert not (b.out / "alora_interpolated").exists()


def test_by_default_phi_then_interpolation_in_fp16_and_both_reach_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs.get("D_both")
    budget = _budget(run)
    assert budget["mechanism"] == "both" and len(budget["phi_trajectory"]) == 6 and 0 <= budget["alpha"] <= 1
    assert budget["phi_final"] != PHI0, "φ was steered"
    # the adapter built on the fp16 model, loaded in float32 with plain peft, is the one the budget scored
    assert _loss(runs, run.out / "alora_interpolated", _control_and_report(runs)[0]) == pytest.approx(budget["control"]["chosen"], rel=1e-2)
    events = [EventAccumulator(str(f.parent)).Reload() for f in run.out.rglob("events.out.tfevents*")]
    scalars = {tag: [e.value for e in acc.Scalars(tag)] for acc in events for tag in acc.Tags()["scalars"]}
    assert scalars["train/alora_phi"] == pytest.approx(_logged(run, "alora_phi"), rel=1e-3) and len(scalars["train/alora_phi"]) == 6
    assert scalars["train/alora_alpha"] == pytest.approx([budget["alpha"]], abs=1e-6)


def test_two_ranks_hold_the_same_phi(runs):
    run = runs.get("D_ddp")
    ranks = [json.loads((run.out / f"phi_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == 6 and ranks[0] == ranks[1]
    assert ranks[0][-1][1] != PHI0, "φ was steered"
    assert ranks[0][-1][1] == _budget(run)["phi_final"]
    # then both ranks scored the candidates α together, and rank 0 wrote the adapter
    budget = _budget(run)
    control, _ = _control_and_report(runs)
    assert _loss(runs, run.out / "alora_interpolated", control) == pytest.approx(budget["control"]["chosen"], rel=1e-5)


def test_resumption_restores_phi(runs):
    runs.get("D_resume")  # it finishes the interrupted run in D_stop's output_dir
    full, resumed = _budget(runs.get("D_tight")), _budget(runs.get("D_stop"))
    saved = json.loads((runs.get("D_stop").out / "checkpoint-3" / "alora_budget.json").read_text())
    assert [[h["step"], h["phi"]] for h in saved["controller"]["history"]] == full["phi_trajectory"][:3]
    assert "restored the forgetting budget" in runs.get("D_resume").log
    assert [p for _, p in resumed["phi_trajectory"]] == pytest.approx([p for _, p in full["phi_trajectory"]], rel=1e-6)
    assert resumed["phi_start"] == full["phi_start"] == PHI0
