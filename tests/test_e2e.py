"""End to end: real `axolotl train` subprocesses on a tiny random Llama (CPU, a few steps).

All runs start from one saved adapter (`lora_model_dir`), because Axolotl 0.19 seeds only after the
LoRA layers are initialised (two runs of one YAML differ); OMP_NUM_THREADS=1 keeps CPU math deterministic.
Independent runs go in parallel; each test waits only for the runs it reads.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from e2e import RAW_OMEGA, Runs

pytestmark = pytest.mark.e2e
FILE = "alora_importance.safetensors"
PHI = 3e5  # large enough that the penalty visibly moves the adapter in 4 steps on this tiny model
WATCH_SAMPLES = 8


def _init_adapter(model_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(out))
    return out


def _torchrun():
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "axolotl.cli.train"]


DDP_ENV = {"ACCELERATE_USE_CPU": "true"}  # else accelerate picks DistributedType.NO: two unsynchronised trainings


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with cf.ThreadPoolExecutor(max_workers=3) as pool:
        r = Runs(tmp_path_factory.mktemp("e2e"), pool)
        r.importance_defaults = RAW_OMEGA
        r.init = _init_adapter(r.model, r.root / "init")
        gen, dom = r.general, r.domain
        saving = {"save_strategy": "steps", "save_steps": 2}
        record = {"alora_record_importance": True, **saving}
        from_init = {"lora_model_dir": str(r.init)}
        general_file = str(r.out("G_rec") / FILE)
        from_general = {"lora_model_dir": str(r.out("G_rec"))}
        watch = {"alora_general_eval": str(gen), "alora_general_eval_samples": WATCH_SAMPLES}  # forgetting in the logs

        # stage ν
        r.submit("G_rec", gen, **from_init, **record)
        r.submit("G_plain", gen, plugins=None, **from_init, **saving)
        r.submit("G_ga", gen, **from_init, **record, micro_batch_size=1, gradient_accumulation_steps=4)
        r.submit("G_stop", gen, **from_init, **record, env={"ALORA_TEST_STOP_AT": "2"},
                 plugins=["axolotl_alora.AloraPlugin", "scaffold_plugins.StopAtStepPlugin"])
        r.submit("G_ddp", gen, **from_init, **record, micro_batch_size=2, launcher=_torchrun(), env=DDP_ENV,
                 plugins=["scaffold_plugins.CpuDdpPlugin", "axolotl_alora.AloraPlugin"])
        r.submit("G_rs", gen, alora_record_importance=True, peft_use_rslora=True)
        garbage = r.root / "garbage.safetensors"
        garbage.write_bytes(b"this is not a safetensors file" * 10)
        r.submit("garbage", dom, check=False, alora_importance_path=str(garbage), **from_init)
        # resume the interrupted run from its step-2 checkpoint
        r.submit("G_resume", gen, after=["G_stop"], **from_init, **record, **watch,
                 resume_from_checkpoint=str(r.out("G_stop") / "checkpoint-2"))
        # stage μ, continuing the general adapter
        after = ["G_rec"]
        r.submit("D_plain", dom, after=after, plugins=None, **from_general)
        r.submit("D_chain", dom, after=after, **from_general, alora_importance_path=general_file, alora_phi=0.0, alora_record_importance=True)
        r.submit("D_rec", dom, after=after, **from_general, alora_record_importance=True)
        r.submit("D_alora", dom, after=after, **from_general, alora_importance_path=general_file, alora_phi=PHI)
        # only the importance file: the defaults (φ, mean normalization, τ auto) must give an active penalty
        r.submit("D_defaults", dom, after=after, **from_general, alora_importance_path=general_file, alora_importance_normalization=None,
                 alora_softmax_temperature=None)
        r.submit("D_ga", dom, after=after, **from_general, alora_importance_path=general_file, alora_phi=PHI,
                 micro_batch_size=1, gradient_accumulation_steps=4, **watch)
        # two ranks reading the two-rank general stage's shards: each holding its share of Ω (the default), and each the
        # whole; from a fresh adapter, so that φ·∇L_reg weighs in every step
        ddp = {"micro_batch_size": 2, "launcher": _torchrun(), "env": DDP_ENV, "plugins": ["scaffold_plugins.CpuDdpPlugin", "axolotl_alora.AloraPlugin"]}
        sharded_file = {"alora_importance_path": str(r.out("G_ddp") / FILE), "alora_phi": PHI}
        r.submit("D_ddp", dom, after=["G_ddp"], **from_init, **sharded_file, **watch, **ddp)
        r.submit("D_ddp_whole", dom, after=["G_ddp"], **from_init, **sharded_file, **ddp, alora_shard_importance=False)
        # the factored form: recorded in a general stage; and a dense file factored as a domain stage reads it
        factored = {"alora_importance_form": "factored"}
        r.submit("G_fac", gen, **from_init, alora_record_importance=True, **factored)
        r.submit("D_fac", dom, after=["G_fac"], lora_model_dir=str(r.out("G_fac")), alora_importance_path=str(r.out("G_fac") / FILE),
                 alora_phi=PHI, **factored)
        r.submit("D_fac_read", dom, after=after, **from_init, alora_importance_path=general_file, alora_phi=PHI, **factored)
        # D_alora watching the general-text loss: without evaluations (scored at the end), and with two
        r.submit("D_watch", dom, after=after, **from_general, alora_importance_path=general_file, alora_phi=PHI, **watch)
        r.submit("D_watch_evals", dom, after=after, **from_general, alora_importance_path=general_file, alora_phi=PHI, **watch,
                 val_set_size=0.25, eval_steps=2)
        # a stage with nothing but the general-text loss (no importance file: the rise over the base), and plain
        # LoRA continuing the general adapter with it (ν: the adapter it starts from)
        r.submit("G_watch", gen, **watch)
        r.submit("D_lora_watch", dom, after=after, **from_general, **watch)
        # a fresh adapter under the penalty (L_reg > 0 from the first step) and its φ = 0 twin: the logged loss is L_task
        r.submit("D_fresh", dom, after=after, **from_init, alora_importance_path=general_file, alora_phi=PHI)
        r.submit("D_fresh0", dom, after=after, **from_init, alora_importance_path=general_file, alora_phi=0.0)
        # embedding LoRA and a modules_to_save copy of lm_head: every trainable parameter tracked and regularized
        every = {"lora_target_modules": ["q_proj", "v_proj", "embed_tokens"], "lora_modules_to_save": ["lm_head"]}
        r.submit("G_every", gen, alora_record_importance=True, **every)
        r.submit("D_every", dom, after=["G_every"], lora_model_dir=str(r.out("G_every")),
                 alora_importance_path=str(r.out("G_every") / FILE), alora_phi=PHI, **every, **watch)
        # fp16 (on CPU: fp16 weights, no grad scaler), and one step overflowing as a grad scaler would see it
        r.submit("G_fp16", gen, **from_init, fp16=True, alora_record_importance=True, **watch)
        r.submit("G_fp16_overflow", gen, **from_init, fp16=True, alora_record_importance=True, env={"ALORA_TEST_OVERFLOW_AT": "1"},
                 plugins=["scaffold_plugins.Fp16OverflowPlugin", "axolotl_alora.AloraPlugin"])
        # a second domain stage on the chain's accumulated file
        r.submit("D2", gen, after=["D_chain"], lora_model_dir=str(r.out("D_chain")),
                 alora_importance_path=str(r.out("D_chain") / FILE), alora_phi=PHI)
        yield r


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).double().square().sum()) for k in a))


def _omegas(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if k.endswith(".omega")}


def test_general_stage_writes_a_valid_importance_file(runs):
    from axolotl_alora.importance_file import read_importance_file

    run = runs.get("G_rec")
    data = read_importance_file(run.out / FILE)
    assert len(data.omega) == 4  # 2 layers × q_proj, v_proj
    meta = data.metadata
    assert meta["source"] == "si" and meta["steps"] == 4 and meta["tokens"] > 0 and meta["xi"] == 0.1
    assert meta["stages"] == 1 and meta["base_model"] == str(runs.model)
    for name, omega in data.omega.items():
        assert float(omega.sum()) > 0
        assert meta["modules"][name]["scaling"] == 2.0  # alpha 8 / r 4
        assert meta["modules"][name]["norm"] == pytest.approx(float(torch.linalg.vector_norm(omega)), rel=1e-5)
    # the reference adapter is the adapter the stage saved
    saved = run.adapter()
    for name in data.omega:
        key = f"base_model.model.{name}.lora_A.weight"
        torch.testing.assert_close(data.lora_A[name], saved[key].float())
    assert "recording importance for 4 LoRA modules" in run.log and "wrote importance" in run.log


def test_recording_importance_does_not_change_the_adapter(runs):
    assert _same(runs.get("G_rec").adapter(), runs.get("G_plain").adapter())


def test_phi_zero_and_recording_give_the_plain_lora_adapter(runs):
    chain = runs.get("D_chain")
    assert _same(chain.adapter(), runs.get("D_plain").adapter())
    assert "alora_phi is 0, so the regularizer was off" in chain.log and "alora_reg_loss" not in chain.log  # no pass over Ω at φ = 0
    assert "the regularizer had no effect" not in runs.get("D_alora").log


def test_domain_stage_logs_reg_loss_zero_first_then_positive(runs):
    run = runs.get("D_alora")
    logs = run.logs
    reg = [entry["alora_reg_loss"] for entry in logs]
    ratio = [entry["alora_reg_ratio"] for entry in logs]
    assert len(reg) == 4
    assert reg[0] == 0.0  # continuing the general adapter: θ = θ^ν at the first step
    assert reg[-1] > 0 and ratio[-1] > 0
    assert _distance(run.adapter(), runs.get("D_plain").adapter()) > 0


def test_a_config_with_only_the_importance_file_gets_an_active_penalty(runs):
    run = runs.get("D_defaults")
    assert "defaults in use: alora_phi=3.0, alora_importance_normalization=mean, alora_softmax_temperature=auto" in run.log
    ratios = [e["alora_reg_ratio"] for e in run.logs]
    assert ratios[0] == 0.0 and max(ratios) > 1e-4 and "the regularizer had no effect" not in run.log
    assert not _same(run.adapter(), runs.get("D_plain").adapter())


def test_phi_has_the_same_effect_for_any_accumulation_split(runs):
    alora, split, plain = runs.get("D_alora").adapter(), runs.get("D_ga").adapter(), runs.get("D_plain").adapter()
    effect = _distance(alora, plain)
    assert effect > 1e-3, "the penalty must move the adapter for this test to mean anything"
    assert _distance(alora, split) < 0.02 * effect


def test_importance_is_per_optimizer_step_not_per_micro_batch(runs):
    whole, split = _omegas(runs.get("G_rec").importance()), _omegas(runs.get("G_ga").importance())
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-3, atol=1e-3 * float(whole[k].abs().max()))


def test_resumed_general_stage_gives_the_uninterrupted_file(runs):
    assert (runs.out("G_stop") / "checkpoint-2" / "alora_state.safetensors").is_file()
    resumed, whole = runs.get("G_resume"), runs.get("G_rec")
    a, b = resumed.importance(), whole.importance()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7 * float(b[k].abs().max()) + 1e-12)
    assert resumed.metadata()["steps"] == 4


def test_continual_stage_accumulates_importance(runs):
    general, chain, alone = runs.get("G_rec").importance(), runs.get("D_chain").importance(), runs.get("D_rec").importance()
    for k in _omegas(general):
        torch.testing.assert_close(chain[k], general[k] + alone[k], rtol=1e-5, atol=1e-9)
    # the new reference is the chain stage's end adapter
    assert runs.get("D_chain").metadata()["stages"] == 2
    d2 = runs.get("D2")
    assert d2.logs[0]["alora_reg_loss"] == 0.0 and d2.logs[-1]["alora_reg_loss"] > 0


def test_rslora_scaling_is_recorded(runs):
    meta = runs.get("G_rs").metadata()
    cfg = json.loads((runs.out("G_rs") / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True
    for module in meta["modules"].values():
        assert module["use_rslora"] is True
        assert module["scaling"] == pytest.approx(module["alpha"] / math.sqrt(module["r"]))


def test_garbage_importance_file_fails_before_training(runs):
    run = runs.get("garbage")
    assert run.returncode != 0
    assert "garbage.safetensors" in run.log and "not a readable safetensors file" in run.log
    assert not run.logs, "no training step may run"
    assert not (run.out / "adapter_model.safetensors").exists()


def test_two_processes_write_the_single_process_file_as_shards(runs):
    from axolotl_alora.importance_file import read_importance_file

    ddp, single = runs.get("G_ddp"), runs.get("G_rec")
    assert not (ddp.out / FILE).exists() and (ddp.out / f"{FILE}.index.json").is_file()
    shards = sorted(p.name for p in ddp.out.glob("alora_importance-*-of-*.safetensors"))
    assert shards == ["alora_importance-00001-of-00002.safetensors", "alora_importance-00002-of-00002.safetensors"]
    a, b = _omegas(ddp.importance()), _omegas(single.importance())
    assert sorted(a) == sorted(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3 * float(b[k].abs().max()))
    # read as one file through the plugin's reader, from the file name the config gives
    whole = read_importance_file(ddp.out / FILE)
    assert whole.metadata["steps"] == single.metadata()["steps"] and list(whole.omega) == list(single.metadata()["modules"])
    assert not list(ddp.out.glob(".alora_importance*.tmp")), "no temp files left behind"


def _held(run, what: str) -> dict[int, int]:
    """Elements of ω or Ω each rank reported holding."""
    import re

    return {int(rank): int(n) for rank, n in re.findall(rf"ALoRA: rank (\d+) holds {what} of \d+ modules, (\d+) elements", run.log)}


def test_sharded_ranks_hold_half_and_train_the_unsharded_adapter(runs):
    general, sharded, whole = runs.get("G_ddp"), runs.get("D_ddp"), runs.get("D_ddp_whole")
    total = sum(v.numel() for v in _omegas(general.importance()).values())
    for run, what in ((general, "ω"), (sharded, "Ω")):
        held = _held(run, what)
        assert sorted(held) == [0, 1] and sum(held.values()) == total, held
        assert max(held.values()) <= 0.6 * total  # q/v of 2 layers: 4 modules of two sizes, split 2 + 2
    assert sorted(_held(whole, "Ω")) == [0, 1] and set(_held(whole, "Ω").values()) == {total}
    # the same penalty and the same adapter, whether each rank holds its share or the whole of Ω
    assert sharded.logs[0]["alora_reg_ratio"] > 1e-2, "φ·L_reg must weigh in for the adapters' equality to mean anything"
    for a, b in zip(sharded.logs, whole.logs):
        assert a["alora_reg_loss"] == pytest.approx(b["alora_reg_loss"], rel=1e-5)
    adapter, expected = sharded.adapter(), whole.adapter()
    for k in expected:
        torch.testing.assert_close(adapter[k], expected[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(adapter[k], runs.get("G_ddp").adapter()[k]) for k in expected), "the domain stage must have moved"


def test_logged_loss_is_the_task_loss_without_the_penalty(runs):
    regularized, plain = runs.get("D_fresh").logs, runs.get("D_fresh0").logs
    assert regularized[0]["alora_reg_ratio"] > 1e-2, "φ·L_reg must be visible next to the task loss for this test to mean anything"
    # the same weights and batch at the first step: the same task loss, whatever φ·L_reg adds to the objective
    assert regularized[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-4)
    assert regularized[0]["ppl"] == pytest.approx(plain[0]["ppl"], rel=1e-4)


def test_embedding_lora_and_modules_to_save_are_recorded_and_regularized(runs):
    from axolotl_alora.importance_file import read_importance_file

    general = runs.get("G_every")
    data = read_importance_file(general.out / FILE)
    modules = data.metadata["modules"]
    embedding = [n for n, e in modules.items() if e.get("layer") == "embedding"]
    full = [n for n, e in modules.items() if e["kind"] == "full"]
    assert embedding == ["model.embed_tokens"] and full == ["lm_head.modules_to_save.default.weight"]
    assert len(modules) == 6 and all(float(o.sum()) > 0 for o in data.omega.values())
    assert "1 full parameters" in general.log or "and 1 full parameters" in general.log
    domain = runs.get("D_every")
    assert domain.logs[0]["alora_reg_loss"] == 0.0 and domain.logs[-1]["alora_reg_loss"] > 0


def test_fp16_overflow_step_adds_nothing_and_the_stage_still_writes_its_file(runs):
    from axolotl_alora.importance_file import read_importance_file

    clean, overflow = runs.get("G_fp16"), runs.get("G_fp16_overflow")
    assert read_importance_file(clean.out / FILE).metadata["skipped_steps"] == []
    data = read_importance_file(overflow.out / FILE)  # read_importance_file refuses NaN/Inf: the file is finite
    # the overflow is at global_step 1 before the step (the second step), which the Trainer logs as step 2
    assert data.metadata["skipped_steps"] == [2] and data.metadata["steps"] == 4
    assert all(float(o.sum()) > 0 for o in data.omega.values())
    assert "1 optimizer step(s) had non-finite gradients or weights" in overflow.log and "steps 2" in overflow.log


# -- the general-text loss (alora_general_eval) -------------------------------------------------------------
def _watched(run) -> dict:
    return json.loads((run.out / "alora_general_eval.json").read_text())


def _independent_general_loss(runs, adapter_dir=None) -> float:
    """transformers + peft, one sequence at a time, on the sample the run drew (seed 7, 64 tokens)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_alora.general_eval import read_documents, sample_sequences

    tok = AutoTokenizer.from_pretrained(str(runs.model))
    seqs = sample_sequences(read_documents(str(runs.general)), tok, 64, WATCH_SAMPLES, seed=7)
    model = AutoModelForCausalLM.from_pretrained(str(runs.model))
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        return sum(float(model(input_ids=s[None], labels=s[None]).loss) for s in seqs) / len(seqs)


def test_general_loss_equals_transformers_and_peft_at_base_reference_and_end(runs):
    run = runs.get("D_watch")
    watched = _watched(run)
    assert watched["sequences"] == WATCH_SAMPLES and watched["seed"] == 7 and watched["sequence_len"] == 64
    assert watched["base"] == pytest.approx(_independent_general_loss(runs), rel=1e-5)
    assert watched["reference"] == pytest.approx(_independent_general_loss(runs, runs.out("G_rec")), rel=1e-5)
    assert watched["final"] == pytest.approx(_independent_general_loss(runs, run.out), rel=1e-5)
    assert [e["step"] for e in watched["evaluations"]] == [4]
    assert len({watched["base"], watched["reference"], watched["final"]}) == 3, "three different adapters, three numbers"
    kept = (watched["base"] - watched["final"]) / (watched["base"] - watched["reference"])
    assert watched["kept_share"] == pytest.approx(kept)
    logged = [ast.literal_eval(line.strip()) for line in run.log.splitlines() if line.strip().startswith("{'alora_general_loss'")]
    assert len(logged) == 1 and float(logged[0]["alora_general_loss"]) == pytest.approx(watched["final"], rel=1e-3)
    assert float(logged[0]["alora_general_ppl"]) == pytest.approx(math.exp(watched["final"]), rel=1e-3)
    assert f"{round(100 * kept)}% of the general stage's gain kept" in run.log


def test_watching_the_general_loss_changes_no_training(runs):
    assert _same(runs.get("D_watch").adapter(), runs.get("D_alora").adapter())
    assert [e["loss"] for e in runs.get("D_watch").logs] == [e["loss"] for e in runs.get("D_alora").logs]
    assert _same(runs.get("D_lora_watch").adapter(), runs.get("D_plain").adapter())


def test_plain_lora_continuing_the_general_adapter_takes_its_start_as_the_reference(runs):
    run = runs.get("D_lora_watch")
    watched = _watched(run)
    assert watched["reference"] == pytest.approx(_independent_general_loss(runs, runs.out("G_rec")), rel=1e-5)
    assert watched["final"] == pytest.approx(_independent_general_loss(runs, run.out), rel=1e-5)
    assert watched["kept_share"] is not None and "of the general stage's gain kept" in run.log


def test_general_loss_at_every_evaluation(runs):
    run = runs.get("D_watch_evals")
    watched = _watched(run)
    # Axolotl also evaluates before the first step
    assert [e["step"] for e in watched["evaluations"]] == [0, 2, 4] and run.log.count("'eval_loss'") == 3
    logged = [float(ast.literal_eval(line.strip())["alora_general_loss"]) for line in run.log.splitlines()
              if line.strip().startswith("{'alora_general_loss'")]
    assert logged == pytest.approx([e["loss"] for e in watched["evaluations"]], rel=1e-3)
    assert watched["final"] == watched["evaluations"][-1]["loss"]
    assert watched["final"] == pytest.approx(_independent_general_loss(runs, run.out), rel=1e-5)


def test_general_loss_without_a_general_stage_is_the_rise_over_the_base(runs):
    run = runs.get("G_watch")
    watched = _watched(run)
    assert watched["reference"] is None and watched["kept_share"] is None
    assert watched["rise_over_base"] == pytest.approx(watched["final"] - watched["base"])
    assert watched["final"] == pytest.approx(_independent_general_loss(runs, run.out), rel=1e-5)
    assert "general-text loss base" in run.log and "→ now" in run.log and "kept" not in run.log.split("general-text loss base")[-1]


@pytest.mark.parametrize("name", ["D_ddp", "D_ga", "D_every", "G_resume"])
def test_general_loss_under_ddp_accumulation_full_parameters_and_resumption(runs, name):
    run = runs.get(name)
    watched = _watched(run)
    assert watched["final"] == pytest.approx(_independent_general_loss(runs, run.out), rel=1e-5)
    reference = {"D_ddp": "G_ddp", "D_ga": "G_rec", "D_every": "G_every"}.get(name)
    if reference:  # θ^ν rebuilt from the file, full parameters (lm_head's copy) included
        assert watched["reference"] == pytest.approx(_independent_general_loss(runs, runs.out(reference)), rel=1e-5)


def test_general_loss_in_fp16(runs):
    """Scored in the run's precision (fp16 weights): close to the fp32 computation of the same adapter."""
    run = runs.get("G_fp16")
    watched = _watched(run)
    assert all(math.isfinite(watched[k]) for k in ("base", "final"))
    assert watched["final"] == pytest.approx(_independent_general_loss(runs, run.out), rel=1e-2)
    assert watched["base"] == pytest.approx(_independent_general_loss(runs), rel=1e-2)


def test_factored_form_end_to_end(runs):
    """alora_importance_form: factored — u, v recorded from ω's row and column sums, and penalised without a dense Ω."""
    from safetensors.torch import load_file

    from axolotl_alora.factored import FactoredOmega
    from axolotl_alora.importance_file import read_importance_file
    from axolotl_alora.regularizer import layer_weights

    runs.get("G_fac"), runs.get("G_rec")
    factored, dense = read_importance_file(runs.out("G_fac") / FILE), read_importance_file(runs.out("G_rec") / FILE)
    assert {e["kind"] for e in factored.metadata["modules"].values()} == {"factored"}
    assert not [k for k in runs.get("G_fac").importance() if k.endswith(".omega")], "no dense Ω in the file"
    for name, omega in dense.omega.items():  # the same run recorded densely: about its row and column sums
        ours, theirs = factored.omega[name], FactoredOmega.from_dense(omega)
        assert ours.shape == omega.shape
        # exact but for the clamp (on sums here, on elements there: 8% of this tiny model's elements) and Δ² next to ξ
        for a, b in ((ours.u, theirs.u), (ours.v, theirs.v)):
            assert float((a - b).norm() / b.norm()) < 0.05
    # a dense file factored on read: the first step's L_reg, recomputed densely from u·vᵀ and the fresh adapter
    read = read_importance_file(runs.out("G_rec") / FILE, omega_form="factored")
    init = load_file(str(runs.init / "adapter_model.safetensors"))
    names = list(read.omega)
    weights = layer_weights(torch.tensor([read.norms[n] for n in names], dtype=torch.float64))
    expected = 0.0
    for w, n in zip(weights, names):
        A0, B0 = (init[f"base_model.model.{n}.lora_{x}.weight"].double() for x in "AB")
        theta = 2.0 * (B0 @ A0 - read.lora_B[n].double() @ read.lora_A[n].double())  # s = lora_alpha / r = 2
        expected += float(w) * float((read.omega[n].dense().double() * theta**2).sum())
    first = runs.get("D_fac_read").logs[0]["alora_reg_loss"]
    assert first == pytest.approx(expected, rel=1e-3)  # the log line prints 4 significant digits
    stored = sum(sum(o.shape) for o in read.omega.values())
    for run in (runs.get("D_fac_read"), runs.get("D_fac")):
        assert f"holds Ω of {len(names)} modules, {stored} elements" in run.log
    assert runs.get("D_fac").logs[-1]["alora_reg_loss"] > 0
