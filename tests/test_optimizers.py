"""Every optimizer Axolotl 0.19 accepts that runs on CPU, through the real trainer (`axolotl train`).

One run per optimizer continues a general adapter with both the penalty and importance recording on
(continual use), with gradient accumulation 2. A scaffold plugin (tests/helpers/scaffold_plugins.py:AuditPlugin)
checks, at every micro-batch, that the penalty and its gradients equal L_reg recomputed from the live A and
B on dense θ by plain autograd, and recomputes ω of eqs. 13-14 from the same hooks on dense float64 θ.
Fused and bitsandbytes optimizers update in place without bumping `_version`: a cache keyed on it froze
the penalty at its first value.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from e2e import RAW_OMEGA, base_config, train, train_logs
from tiny import build_tiny_llama, write_text_jsonl

pytestmark = pytest.mark.e2e
FILE = "alora_importance.safetensors"
PHI = 3e5
STEPS, GA = 3, 2
# adamw_8bit is an alias of adamw_bnb_8bit in transformers (one class): one run covers both names
OPTIMIZERS = [
    "adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd",
    "lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit",
]
if os.environ.get("ALORA_TEST_OPTIMIZERS"):  # a subset while developing, e.g. adamw_torch,adamw_torch_fused
    OPTIMIZERS = os.environ["ALORA_TEST_OPTIMIZERS"].split(",")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimizers")
    model = build_tiny_llama(root / "model")
    general_data = write_text_jsonl(root / "general.jsonl", 48, seed=1, tokenizer_dir=model)
    domain_data = write_text_jsonl(root / "domain.jsonl", 48, seed=2, tokenizer_dir=model)
    general = root / "general"
    train(base_config(model, general_data, general, root / "prep_g", alora_record_importance=True), root / "general.yml")

    def run(optimizer):
        out = root / optimizer
        cfg = base_config(
            model, domain_data, out, root / f"prep_{optimizer}", optimizer=optimizer, lora_model_dir=str(general),
            alora_importance_path=str(general / FILE), alora_phi=PHI, alora_record_importance=True, **RAW_OMEGA,
            micro_batch_size=2, gradient_accumulation_steps=GA, max_steps=STEPS, learning_rate=0.01, warmup_steps=0,
            plugins=["axolotl_alora.AloraPlugin", "scaffold_plugins.AuditPlugin"],
        )
        proc = train(cfg, root / f"{optimizer}.yml")
        return out, proc.stdout + "\n" + proc.stderr

    with cf.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, name) for name in OPTIMIZERS}
        yield general, {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_penalty_and_omega_follow_the_live_adapter(runs, optimizer):
    from axolotl_alora.importance_file import read_importance_file

    general, results = runs
    out, log = results[optimizer]
    audit = json.loads((out / "audit.json").read_text())
    records = audit["penalty"]
    # one penalty per micro-batch, keyed on the optimizer step the Trainer reports
    assert [r["step"] for r in records] == [s for s in range(STEPS) for _ in range(GA)]
    assert all(r["step"] == r["global_step"] for r in records)
    for r in records:
        assert r["ours"] == pytest.approx(r["dense"], rel=1e-4, abs=1e-12), r
        assert r["grad_err"] < 1e-3, r
    per_step = [records[GA * s]["dense"] for s in range(STEPS)]
    assert per_step[0] == pytest.approx(0.0, abs=1e-12)  # θ = θ^ν at the first step: continuing the general adapter
    assert per_step[1] > 0 and per_step[2] != per_step[1], "the adapter must move for this test to mean anything"
    logged = [entry["alora_reg_loss"] for entry in train_logs(log)]
    assert logged[-1] > 0

    # ω: the written file is Ω_old + max(ω / (Δ² + ξ), 0) with ω, Δ recomputed independently
    assert audit["steps"] == STEPS
    written = read_importance_file(out / FILE)
    old = read_importance_file(general / FILE)
    ours = load_file(str(out / "audit_omega.safetensors"))
    assert written.metadata["skipped_steps"] == []
    for name, omega in written.omega.items():
        independent = (ours[f"{name}.omega"] / (ours[f"{name}.delta"] ** 2 + 0.1)).clamp_min(0) + old.omega[name].double()
        new_part = independent - old.omega[name].double()
        assert float(new_part.abs().max()) > 0, f"{name}: no importance recorded"
        torch.testing.assert_close(omega.double(), independent, rtol=1e-3, atol=1e-4 * float(new_part.abs().max()) + 1e-12)
