"""What Axolotl 0.20/0.21 changed for plugins, through real `axolotl train` runs (skipped under Axolotl 0.19).

- 0.21 loads every installed `axolotl.plugins` entry point on every run, this package's included: a config
  with no alora_ key must train exactly as without the package, and one with alora_ keys but no `plugins:`
  line must run the whole workflow.
- 0.20 re-draws fresh LoRA A factors from the seed after `post_lora_load`: the importance recorder must
  snapshot, and track, the weights training really starts from.

Runs go through tests/helpers/probe_train.py (`axolotl.cli.train`, printing the trainer's class, and able to hide
this package's entry point as if it were not installed).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import sys
from importlib.metadata import version

import pytest
import torch
from safetensors.torch import load_file

from e2e import RAW_OMEGA, Runs, train_logs

AXOLOTL = tuple(int(p) for p in version("axolotl").split(".")[:2])
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(AXOLOTL < (0, 21), reason="Axolotl 0.21's plugin discovery and seeded LoRA init")]
FILE = "alora_importance.safetensors"
PHI = 3e5
SEED = 7
PROBE = [sys.executable, "-m", "probe_train"]
HIDDEN = {"ALORA_TEST_HIDE_ENTRY_POINT": "1"}
AUDITED = ["axolotl_alora.AloraPlugin", "scaffold_plugins.AuditPlugin"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with cf.ThreadPoolExecutor(max_workers=3) as pool:
        r = Runs(tmp_path_factory.mktemp("axolotl021"), pool, launcher=PROBE, seed=SEED)
        r.importance_defaults = RAW_OMEGA
        # no alora_ key, no `plugins:` line: with the package's entry point, and hidden as if not installed
        r.submit("plain", r.general, plugins=None)
        r.submit("plain_hidden", r.general, plugins=None, env=HIDDEN)
        # the workflow through entry-point discovery alone
        r.submit("general_found", r.general, plugins=None, alora_record_importance=True)
        r.submit("domain_found", r.domain, after=["general_found"], plugins=None, lora_model_dir=str(r.root / "general_found"),
                 alora_importance_path=str(r.root / "general_found" / FILE), alora_phi=PHI)
        # the workflow through `plugins:`, audited (fresh adapter: 0.20's seeded re-draw applies)
        r.submit("general_listed", r.general, plugins=AUDITED, alora_record_importance=True)
        r.submit("domain_listed", r.domain, after=["general_listed"], plugins=AUDITED, lora_model_dir=str(r.root / "general_listed"),
                 alora_importance_path=str(r.root / "general_listed" / FILE), alora_phi=PHI)
        # a forgetting budget by both mechanisms, found through the entry point
        r.submit("domain_budget", r.domain, after=["general_found"], plugins=None, lora_model_dir=str(r.root / "general_found"),
                 alora_importance_path=str(r.root / "general_found" / FILE), alora_phi=1.0, alora_general_eval=str(r.general),
                 alora_general_eval_samples=16, alora_keep=0.9, alora_budget_by="both", alora_general_eval_steps=1)
        # the key checks, with the plugin found only through its entry point
        r.submit("bad_phi", r.domain, check=False, plugins=None, alora_importance_path=str(r.root / "missing.safetensors"), alora_phi=-1.0)
        r.submit("missing_file", r.domain, check=False, plugins=None, alora_importance_path=str(r.root / "missing.safetensors"))
        yield r


def _trainer_class(log: str) -> str:
    return next(line.split()[1] for line in log.splitlines() if line.startswith("TRAINER_CLASS "))


def test_without_alora_keys_training_is_what_it_is_without_the_package(runs):
    out, log = runs.get("plain").out, runs.get("plain").log
    hidden_out, hidden_log = runs.get("plain_hidden").out, runs.get("plain_hidden").log
    # the entry point was really loaded in one run and really hidden in the other
    assert "Plugin loaded successfully: axolotl_alora.AloraPlugin" in log
    assert "axolotl_alora" not in hidden_log
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(hidden_out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the adapter must be bit for bit the same"
    losses = [e["loss"] for e in train_logs(log)]
    assert losses and losses == [e["loss"] for e in train_logs(hidden_log)]
    assert _trainer_class(log) == _trainer_class(hidden_log) and "alora" not in _trainer_class(log)
    assert "ALoRA" not in log and "[axolotl.alora]" not in log
    assert not (out / FILE).exists()


def test_entry_point_discovery_alone_runs_the_workflow(runs):
    general, general_log = runs.get("general_found").out, runs.get("general_found").log
    assert "ALoRA: wrote importance" in general_log and (general / FILE).is_file()
    log = runs.get("domain_found").log
    assert _trainer_class(log) == "axolotl_alora.trainer.AloraTrainer"
    reg = [e["alora_reg_loss"] for e in train_logs(log)]
    assert reg[0] == 0.0 and reg[-1] > 0, reg


def test_key_checks_fire_before_the_model_loads_without_a_plugins_line(runs):
    for name, message in [("bad_phi", "alora_phi must be >= 0"), ("missing_file", "missing.safetensors")]:
        returncode, log = runs.get(name).returncode, runs.get(name).log
        assert returncode != 0 and message in log, log[-3000:]
        assert "Loading weights" not in log, f"{name}: the model was loaded before the check"


def test_recorder_starts_from_the_seeded_adapter_training_starts_from(runs):
    """0.20 re-draws each fresh lora_A from the seed after post_lora_load: the recorder's θ_0 must be that draw,
    taken from the very parameters being trained, and the file's Ω must match ω recomputed from those weights."""
    from axolotl.loaders.adapter import reinit_lora_from_seed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_alora.importance_file import read_importance_file

    out = runs.get("general_listed").out
    audit = json.loads((out / "audit.json").read_text())
    tensors = load_file(str(out / "audit_omega.safetensors"))
    assert audit["recorder_tracks_live"] is True
    # the seeded draw, made independently here
    model = AutoModelForCausalLM.from_pretrained(str(runs.model))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert reinit_lora_from_seed(peft_model, SEED) == 4
    drawn = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default"): m.weight.detach()
             for n, m in peft_model.named_modules() if n.endswith("lora_A.default")}
    written = read_importance_file(out / FILE)
    for name, omega in written.omega.items():
        torch.testing.assert_close(tensors[f"{name}.start_A"], drawn[name], rtol=0, atol=0)
        torch.testing.assert_close(tensors[f"{name}.recorder_A_0"], drawn[name], rtol=0, atol=0)
        assert float(tensors[f"{name}.recorder_B_0"].abs().max()) == 0.0
        independent = (tensors[f"{name}.omega"] / (tensors[f"{name}.delta"] ** 2 + 0.1)).clamp_min(0)
        assert float(independent.abs().max()) > 0
        torch.testing.assert_close(omega.double(), independent, rtol=1e-3, atol=1e-4 * float(independent.abs().max()))


def test_domain_stage_starts_from_the_reference_adapter(runs):
    out = runs.get("domain_listed").out
    records = json.loads((out / "audit.json").read_text())["penalty"]
    assert records[0]["dense"] == 0.0 and records[0]["ours"] == 0.0, "training must start at θ^ν (lora_model_dir: no re-draw)"
    assert records[-1]["dense"] > 0 and records[-1]["ours"] == pytest.approx(records[-1]["dense"], rel=1e-4)
    assert all(r["grad_err"] < 1e-3 for r in records)


def test_forgetting_budget_steers_phi_and_interpolates(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs.get("domain_budget")
    budget = json.loads((run.out / "alora_general_eval.json").read_text())["budget"]
    steps = len(train_logs(run.log))
    assert budget["mechanism"] == "both" and len(budget["phi_trajectory"]) == steps and budget["phi_final"] != 1.0
    logged = [e["alora_phi"] for e in train_logs(run.log)]
    assert logged[0] == 1.0 and logged[1:] == pytest.approx([phi for _, phi in budget["phi_trajectory"][:-1]], rel=1e-3)
    assert 0 <= budget["alpha"] <= 1 and "forgetting budget (keep 90% of the general stage's gain, by both)" in run.log
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(runs.model)), str(run.out / "alora_interpolated"))
