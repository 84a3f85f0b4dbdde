"""ALoRA in the configurations Axolotl users run: Axolotl's own example configs, end to end.

A. `examples/llama-3/{lora-1b,qlora-1b,instruct-lora-8b}.yml` from axolotl-ai-cloud/axolotl (verbatim copies in
   tests/fixtures/upstream/, source and commit in their headers). Each is changed only where a CPU and a tiny
   local model force it (`upstream.REASONS` says why, key by key; `test_only_forced_changes` checks that nothing
   else differs). Their optimizers (adamw_8bit, adamw_bnb_8bit), target modules, dropout, sample packing,
   gradient checkpointing, 8-/4-bit loading, eval/save cadence (per epoch: a ratio of the steps, so it scales
   to `max_steps` by itself), lr schedule, warm-up and loss watchdog stay (the tiny random model's loss, ~6, is
   above the watchdog's 5.0, but the watchdog reads the last log entry, which with an evaluation after every
   step is an eval entry: it never fires here). Harmless tiny-model artefact: the llama3 chat template ends
   turns with <|eot_id|>, which the tiny tokenizer lacks (EOS </s>), so Axolotl warns that the turn terminator
   is not trained.
   Per config, three `axolotl train` runs:
     G   general stage: + `plugins`, `alora_record_importance: true`, general data
     D   domain stage: continues G's adapter (`lora_model_dir`), + importance file, `normalization: mean`, φ = PHI
     D0  the same domain stage with φ = 0 (same start, data and seed: the difference is the penalty's)
B. QLoRA exercised: qlora-1b is `adapter: qlora`, `load_in_4bit: true`, `optimizer: adamw_bnb_8bit`; the
   `test_qlora_*` tests below name what its runs show.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import upstream
from e2e import adapter_deltas, train, train_logs
from tiny import write_text_jsonl

pytestmark = pytest.mark.e2e
FILE = "alora_importance.safetensors"
CONFIGS = ["lora-1b.yml", "qlora-1b.yml", "instruct-lora-8b.yml"]
# φ on an Ω of mean 1 (`alora_importance_normalization: mean`); the upstream lr 2e-4 moves the adapter little
# in a few steps, so φ must be large for the penalty to show.
PHI = 100.0
SEQUENCE_LEN = 256  # upstream.REASONS["sequence_len"]
N_RECORDS = 200  # enough for the steps of every config's batch (4 × micro 2 × GA ≤ 4, packed) and its eval split
WATCH_SAMPLES = 8


@dataclass
class Run:
    out: Path
    cfg: dict
    log: str

    @property
    def logs(self) -> list[dict]:
        return train_logs(self.log)

    def adapter(self) -> dict:
        return load_file(str(self.out / "adapter_model.safetensors"))

    def adapter_modules(self) -> set[str]:
        suffix = ".lora_A.weight"
        return {k[len("base_model.model."):-len(suffix)] for k in self.adapter() if k.endswith(suffix)}


class Runs:
    def __init__(self, root: Path, model: Path, pool: cf.ThreadPoolExecutor):
        self.root, self.model, self.pool, self.futures = root, model, pool, {}

    def submit(self, name: str, make_cfg, after=()):
        def job():
            for dep in after:
                self.get(dep)
            cfg = make_cfg(self.root / name, self.root / f"prepared_{name}")
            proc = train(cfg, self.root / f"{name}.yml")
            return Run(self.root / name, cfg, proc.stdout + "\n" + proc.stderr)

        self.futures[name] = self.pool.submit(job)

    def get(self, name: str) -> Run:
        return self.futures[name].result()


def _stem(config: str) -> str:
    return config.rsplit(".", 1)[0]


def _general_keys() -> dict:
    return {"plugins": ["axolotl_alora.AloraPlugin"], "alora_record_importance": True}


def _domain_keys(general_out: Path, phi: float, **extra) -> dict:
    return {
        "plugins": ["axolotl_alora.AloraPlugin"],
        "lora_model_dir": str(general_out),
        "alora_importance_path": str(general_out / FILE),
        "alora_importance_normalization": "mean",
        "alora_phi": phi,
        **extra,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("upstream")
    with cf.ThreadPoolExecutor(max_workers=2) as pool:
        r = Runs(root, tiny_model_dir, pool)
        # the φ > 0 domain stages also watch the general-text loss, at the config's own evaluations, under a forgetting
        # budget met by interpolation (which changes no training step)
        watch = {"alora_general_eval": str(write_text_jsonl(root / "watch.jsonl", 100, seed=5, tokenizer_dir=tiny_model_dir, tokens=40)),
                 "alora_general_eval_samples": WATCH_SAMPLES, "alora_max_general_loss_rise": 0.01, "alora_budget_by": "interpolation"}
        stages = []
        for config in CONFIGS:
            up, stem = upstream.load(config), _stem(config)
            general = upstream.write_data(up, root / f"{stem}_general.jsonl", N_RECORDS, seed=1)
            domain = upstream.write_data(up, root / f"{stem}_domain.jsonl", N_RECORDS, seed=2)

            def make(up=up, data=None, **stage):
                def cfg(out, prepared):
                    c, _ = upstream.adapt(up, model=tiny_model_dir, data=data, out=out, prepared=prepared, sequence_len=SEQUENCE_LEN)
                    return {**c, **stage}

                return cfg

            G = root / f"G_{stem}"
            r.submit(f"G_{stem}", make(data=general, **_general_keys()))
            stages.append((f"D_{stem}", make(data=domain, **_domain_keys(G, PHI, **watch)), [f"G_{stem}"]))
            stages.append((f"D0_{stem}", make(data=domain, **_domain_keys(G, 0.0)), [f"G_{stem}"]))

        for name, make_cfg, after in stages:  # every general stage is queued before any run that waits on one
            r.submit(name, make_cfg, after=after)
        yield r


def _distance(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in a))


def _check_importance_file(general: Run) -> None:
    """Valid, finite, positive somewhere, and one Ω per adapted module (no more, no fewer)."""
    from axolotl_alora.importance_file import read_importance_file

    data = read_importance_file(general.out / FILE)
    modules = general.adapter_modules()
    assert modules, "the general stage saved no LoRA module"
    assert set(data.omega) == modules, (
        f"importance file modules differ from the adapter's: missing {sorted(modules - set(data.omega))}, "
        f"extra {sorted(set(data.omega) - modules)}"
    )
    for name, omega in data.omega.items():
        assert torch.isfinite(omega).all(), name
    assert sum(float(o.double().sum()) for o in data.omega.values()) > 0


def _check_penalty_logged(domain: Run) -> None:
    """0 until the adapter first moves (θ = θ^ν: continuing the general adapter), > 0 at every step after.

    The adapter first moves at the first step with a learning rate > 0 (a warm-up step has lr 0), and the
    penalty logged at a step is computed before that step's update."""
    logs = domain.logs
    assert len(logs) >= 2, f"expected a log entry per step, got {logs}"
    reg = [entry["alora_reg_loss"] for entry in logs]
    first_move = next(i for i, entry in enumerate(logs) if entry["learning_rate"] > 0)
    assert first_move < len(logs) - 1, f"the adapter never moved before the last step: {logs}"
    assert all(value == 0.0 for value in reg[: first_move + 1]), f"alora_reg_loss per step: {reg}"
    assert all(value > 0 for value in reg[first_move + 1 :]), f"alora_reg_loss per step: {reg}"


def _check_penalty_moves_the_adapter(general: Run, domain: Run, domain0: Run) -> None:
    reference, alora, plain = general.adapter(), domain.adapter(), domain0.adapter()
    assert _distance(alora, plain) > 0, "φ > 0 and φ = 0 gave the same adapter"
    # and the difference is the penalty's: it pulls towards the general adapter
    assert _distance(alora, reference) < _distance(plain, reference)


# ---------------------------------------------------------------------------------------------- A


@pytest.mark.parametrize("config", CONFIGS)
def test_only_forced_changes(config, tmp_path):
    """What the runs change in the upstream file, key by key, each with its reason in upstream.REASONS."""
    up = upstream.load(config)
    cfg, changes = upstream.adapt(up, model=tmp_path / "m", data=tmp_path / "d.jsonl", out=tmp_path / "o", prepared=tmp_path / "p")
    assert upstream.changed_keys(up, cfg) == set(changes) <= set(upstream.REASONS)
    # the things that make it the user's configuration are untouched
    for key in ("adapter", "optimizer", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
                "sample_packing", "eval_sample_packing", "gradient_checkpointing", "load_in_4bit", "load_in_8bit",
                "lr_scheduler", "learning_rate", "warmup_ratio", "evals_per_epoch", "saves_per_epoch", "val_set_size",
                "micro_batch_size", "gradient_accumulation_steps", "num_epochs", "chat_template", "weight_decay",
                "loss_watchdog_threshold", "loss_watchdog_patience"):
        assert cfg.get(key) == up.get(key), key
    assert [d["type"] for d in cfg["datasets"]] == [d["type"] for d in up["datasets"]]


@pytest.mark.parametrize("config", CONFIGS)
def test_runs_change_only_forced_and_stage_keys(runs, config):
    stem, up = _stem(config), upstream.load(config)
    for name in (f"G_{stem}", f"D_{stem}", f"D0_{stem}"):
        changed = upstream.changed_keys(up, runs.get(name).cfg)
        assert changed <= set(upstream.REASONS) | upstream.STAGE_KEYS, (name, changed)


@pytest.mark.parametrize("config", CONFIGS)
def test_general_stage_ran_the_config_as_written(runs, config):
    """Evaluations and checkpoints happened, at the upstream cadence scaled to the steps."""
    run = runs.get(f"G_{_stem(config)}")
    assert "'eval_loss'" in run.log
    checkpoints = sorted(run.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "no checkpoint saved"
    assert len(run.logs) == run.cfg["max_steps"]
    _check_quantization_and_optimizer(run, checkpoints[-1])


def _check_quantization_and_optimizer(run: Run, checkpoint: Path) -> None:
    """The base weights were loaded in 4/8 bit as the config asks, and the 8-bit optimizer is what stepped."""
    quant = json.loads((run.out / "config.json").read_text()).get("quantization_config") or {}
    assert bool(quant.get("load_in_4bit")) == bool(run.cfg.get("load_in_4bit")), quant
    assert bool(quant.get("load_in_8bit")) == bool(run.cfg.get("load_in_8bit")), quant
    if run.cfg.get("load_in_4bit"):
        assert quant["bnb_4bit_quant_type"] == "nf4"
    if "8bit" in run.cfg["optimizer"]:
        state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
        assert state and all("__bnb_optimizer_quant_state__" in s for s in state.values()), "not a bitsandbytes 8-bit optimizer state"


@pytest.mark.parametrize("config", CONFIGS)
def test_importance_file_covers_every_adapted_module(runs, config):
    _check_importance_file(runs.get(f"G_{_stem(config)}"))


@pytest.mark.parametrize("config", CONFIGS)
def test_domain_stage_logs_a_positive_penalty(runs, config):
    _check_penalty_logged(runs.get(f"D_{_stem(config)}"))


@pytest.mark.parametrize("config", CONFIGS)
def test_penalty_changes_the_domain_adapter(runs, config):
    stem = _stem(config)
    _check_penalty_moves_the_adapter(runs.get(f"G_{stem}"), runs.get(f"D_{stem}"), runs.get(f"D0_{stem}"))


@pytest.mark.parametrize("config", CONFIGS)
def test_general_loss_is_logged_at_every_evaluation(runs, config):
    """alora_general_loss beside every eval_loss of the config's own cadence (QLoRA's 4-bit base and the 8-bit
    base included), with the base (adapter disabled) and θ^ν reference points."""
    run = runs.get(f"D_{_stem(config)}")
    watched = json.loads((run.out / "alora_general_eval.json").read_text())
    evals = run.log.count("'eval_loss'")
    # one per evaluation, and one more at the end if the last evaluation came before the last step
    assert evals >= 1 and len(watched["evaluations"]) in (evals, evals + 1), (evals, watched["evaluations"])
    assert run.log.count("{'alora_general_loss'") == len(watched["evaluations"])
    assert watched["sequences"] == WATCH_SAMPLES // 2  # the budget's control sample; the other half reports
    values = [watched["base"], watched["reference"], *(e["loss"] for e in watched["evaluations"])]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert watched["base"] != watched["reference"], "the adapter must be disabled for the base point"
    assert watched["final"] == watched["evaluations"][-1]["loss"]


@pytest.mark.parametrize("config", CONFIGS)
def test_the_budget_interpolates_in_the_users_configs(runs, config):
    """alora_interpolated = (1 − α)·ΔW_ν + α·ΔW_end, module by module from the saved files (ν: the general stage's
    adapter), in each config (QLoRA's 4-bit base and 8-bit optimizer included), and within the budget."""
    stem = _stem(config)
    general, domain = runs.get(f"G_{stem}"), runs.get(f"D_{stem}")
    budget = json.loads((domain.out / "alora_general_eval.json").read_text())["budget"]
    alpha = budget["alpha"]
    assert 0 <= alpha <= 1 and budget["control"]["chosen"] <= budget["target"] + 1e-6
    assert "'alora_alpha'" in domain.log  # logged at the end, like the other metrics
    ref, end, got = (adapter_deltas(run_dir) for run_dir in (general.out, domain.out, domain.out / "alora_interpolated"))
    assert got.keys() == end.keys() == ref.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], (1 - alpha) * ref[name] + alpha * end[name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- B


def test_qlora_general_stage_writes_a_valid_importance_file(runs):
    run = runs.get("G_qlora-1b")
    assert "qlora" == run.cfg["adapter"] and run.cfg["load_in_4bit"] and run.cfg["optimizer"] == "adamw_bnb_8bit"
    checkpoints = sorted(run.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    _check_quantization_and_optimizer(run, checkpoints[-1])
    _check_importance_file(run)


def test_qlora_domain_stage_penalty_rises_above_zero(runs):
    _check_penalty_logged(runs.get("D_qlora-1b"))


def test_qlora_penalty_changes_the_domain_adapter(runs):
    _check_penalty_moves_the_adapter(runs.get("G_qlora-1b"), runs.get("D_qlora-1b"), runs.get("D0_qlora-1b"))
