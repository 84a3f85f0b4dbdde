"""The memory model (memory.py, `alora check`): module sizes from config.json, bytes per stage, and real peaks."""

import concurrent.futures as cf
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from axolotl_alora.memory import ModuleSize, config_module_sizes, domain_stage, general_stage, memory_report, rank_share
from axolotl_alora.sharding import owners, rank_loads

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "model-configs"


def _llama_elements(name: str, targets: tuple[str, ...]) -> int:
    """Hand count from the public config values: Σ_layers Σ_targets d_out·d_in."""
    c = json.loads((CONFIGS / name / "config.json").read_text())
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
    shapes = {"q_proj": q * h, "k_proj": kv * h, "v_proj": kv * h, "o_proj": h * q, "gate_proj": inter * h, "up_proj": inter * h, "down_proj": h * inter}
    return layers * sum(shapes[t] for t in targets)


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("name,cfg,targets,billions", [
    ("llama-3.2-3b", {"lora_target_modules": ["q_proj", "v_proj"]}, ("q_proj", "v_proj"), 0.352),
    ("llama-3.1-8b", {"lora_target_linear": True}, ALL_LINEAR, 6.98),
    ("llama-3-70b", {"lora_target_linear": True}, ALL_LINEAR, 68.5),
])
def test_omega_elements_from_config_json(name, cfg, targets, billions):
    sizes = config_module_sizes({"lora_r": 16, **cfg}, CONFIGS / name)
    assert all(m.kind == "lora" and m.r == 16 for m in sizes)
    assert sum(m.numel for m in sizes) == _llama_elements(name, targets)
    assert sum(m.numel for m in sizes) / 1e9 == pytest.approx(billions, rel=2e-3)  # the figures


def test_sizes_are_the_plugin_modules_of_the_real_model(tiny_model_dir):
    """The meta-device model wrapped as Axolotl would gives the names and shapes the plugin sees on the real one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_alora.lora import adapted_modules, full_parameters

    cfg = {"lora_r": 4, "lora_target_linear": True, "lora_modules_to_save": ["lm_head"]}
    sizes = config_module_sizes(cfg, tiny_model_dir)
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    real = get_peft_model(real, LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    modules = adapted_modules(real)
    expected = [(m.name, "lora", tuple(m.shape)) for m in modules] + [(p.name, "full", p.shape) for p in full_parameters(real, modules)]
    assert [(m.name, m.kind, m.shape) for m in sizes] == expected
    assert any(m.kind == "full" for m in sizes)


def test_stage_bytes_by_hand():
    small = ModuleSize("a.q_proj", "lora", (6, 10), r=2)  # 60 elements, factors 2·16 = 32
    big = ModuleSize("a.up_proj", "lora", (20, 10), r=2)  # 200 elements, factors 60
    full = ModuleSize("lm_head", "full", (7, 10))  # 70 elements
    sizes = [small, big, full]
    g = general_stage(sizes)
    assert g.persistent == 4 * 60 + 12 * 32 + 4 * 200 + 12 * 60 + 16 * 70
    assert g.transient == max(8 * 200, 5 * 70)  # g̃ and Δθ of the largest module, whole (it is one block)
    assert general_stage(sizes, "bfloat16").persistent == g.persistent  # ω is float32 whatever the file's dtype
    d32, d16 = domain_stage(sizes, "float32"), domain_stage(sizes, "bfloat16")
    assert d32.persistent == 4 * 60 + 12 * 32 + 4 * 200 + 12 * 60 + (4 + 8) * 70
    assert d16.persistent == 2 * 60 + 12 * 32 + 2 * 200 + 12 * 60 + (2 + 8) * 70
    assert d32.transient == max(4 * 200, 4 * 70) and d16.transient == max(8 * 200, 8 * 70)
    # factored: d_out + d_in floats per LoRA module; full parameters stay dense
    gf, df = general_stage(sizes, form="factored"), domain_stage(sizes, form="factored")
    assert gf.persistent == 4 * 16 + 12 * 32 + 4 * 30 + 12 * 60 + 16 * 70
    assert df.persistent == 4 * 16 + 12 * 32 + 4 * 30 + 12 * 60 + (4 + 8) * 70
    assert gf.transient == max(24 * 60, 5 * 70) and df.transient == max(16 * 60, 4 * 70)


def test_blocks_bound_the_transients(monkeypatch):
    import axolotl_alora.memory as memory

    monkeypatch.setattr(memory, "BLOCK_ELEMENTS", 1000)
    wide = ModuleSize("w.down_proj", "lora", (100, 300), r=1)  # blocks of 3 rows
    assert wide.block == 900
    assert general_stage([wide]).transient == 8 * 900 and domain_stage([wide]).transient == 4 * 900


def test_owners_balance_by_elements_and_are_deterministic():
    sizes = {f"m{i}": n for i, n in enumerate([100, 90, 80, 70, 60, 50, 40, 30, 20, 10])}
    for world in (1, 2, 3, 4):
        owner = owners(sizes, world)
        assert owner == owners(dict(reversed(sizes.items())), world)
        loads = rank_loads(sizes, world)
        assert sum(loads) == 550 and set(owner.values()) <= set(range(world))
        assert max(loads) - min(loads) <= max(sizes.values())  # greedy largest-first: within one module
    assert rank_loads(sizes, 2) == [280, 270]


def test_report_marks_the_configs_storage():
    from axolotl_alora.memory import storage_label

    assert storage_label({}) == "float32" and storage_label({"alora_importance_dtype": "bfloat16"}) == "bfloat16"
    assert storage_label({"alora_importance_dtype": "bfloat16", "alora_importance_form": "factored"}) == "factored"
    sizes = [ModuleSize("l0.q_proj", "lora", (8, 4), r=2), ModuleSize("l1.q_proj", "lora", (8, 4), r=2)]

    def marked(report):
        return [line.split()[:2] for line in report.splitlines() if line.endswith("<- this config")]

    assert marked(memory_report(sizes, [1, 2])) == []
    assert marked(memory_report(sizes, [1, 2], used="bfloat16")) == [["bfloat16", "1"], ["bfloat16", "2"]]
    assert marked(memory_report(sizes, [1, 2], used="factored", world=2)) == [["factored", "2"]]


def test_rank_share_is_the_heaviest_rank():
    sizes = [ModuleSize(f"l{i}.q_proj", "lora", (n, 1), r=1) for i, n in enumerate([5, 4, 3, 3, 1])]
    share = rank_share(sizes, 2)
    assert sum(m.numel for m in share) == max(rank_loads({m.name: m.numel for m in sizes}, 2)) == 8
    assert rank_share(sizes, 1) == sizes


def test_alora_check_prints_the_memory_table(tmp_path):
    cfg = tmp_path / "qlora-8b.yml"
    cfg.write_text(f"base_model: {CONFIGS / 'llama-3.1-8b'}\nadapter: qlora\nload_in_4bit: true\nlora_r: 16\nlora_alpha: 32\n"
                   f"lora_target_linear: true\noutput_dir: {tmp_path / 'out'}\nplugins: [axolotl_alora.AloraPlugin]\nalora_record_importance: true\n")
    out = subprocess.run([sys.executable, "-m", "axolotl_alora.cli", "check", str(cfg), "--ranks", "1,4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "224 LoRA modules (r=16)" in text
    total = next(line for line in text.splitlines() if line.startswith("total"))
    assert "6.98 B" in total and "27.9 GB" in total and "14 GB" in total
    sizes = config_module_sizes({"lora_r": 16, "lora_target_linear": True}, CONFIGS / "llama-3.1-8b")
    assert memory_report(sizes, [1, 4], used="float32") in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("float32 ", "bfloat16 ", "factored "))]
    assert [(r[0], r[1]) for r in rows] == [(o, k) for o in ("float32", "bfloat16", "factored") for k in ("1", "4")]
    factored = next(line for line in text.splitlines() if line.startswith("factored") and line.split()[1] == "1")
    assert "MB" in factored and "GB" not in factored  # 224 modules × (d_in + d_out) floats, plus the snapshots


# -- the model against real CPU runs ---------------------------------------------------------------------------
MEASURED = {"hidden": 512, "layers": 20}  # Ω all-linear: 47 M elements (189 MB) in modules of ≤ 0.5 M: transients small


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from e2e import Runs

    targets = {"lora_target_linear": True, "lora_r": 8, "lora_alpha": 16, "max_steps": 3, "micro_batch_size": 2,
               "plugins": ["axolotl_alora.AloraPlugin", "scaffold_plugins.PeakMemoryPlugin"]}
    # glibc's default raises its mmap threshold as blocks are freed and then keeps freed blocks of up to 32 MB
    # resident in the heap: RSS would count the allocator's retention, which differs run to run. A fixed threshold
    # makes RSS what the process holds (eval/results/memory.md gives both).
    threshold = os.environ.get("ALORA_TEST_MMAP_THRESHOLD", "65536")  # "default": glibc's own, for eval/results/memory.md
    env = {} if threshold == "default" else {"MALLOC_MMAP_THRESHOLD_": threshold}
    with cf.ThreadPoolExecutor(max_workers=2) as pool:
        r = Runs(tmp_path_factory.mktemp("memory"), pool, model=MEASURED, **targets)
        r.submit("G_plain", r.general, env=env)
        r.submit("G_rec", r.general, env=env, alora_record_importance=True)
        general = {"lora_model_dir": str(r.out("G_rec")), "alora_importance_path": str(r.out("G_rec") / "alora_importance.safetensors"), "alora_phi": 1.0}
        r.submit("D_plain", r.domain, after=["G_rec"], env=env, lora_model_dir=str(r.out("G_rec")))
        r.submit("D_fp32", r.domain, after=["G_rec"], env=env, **general)
        r.submit("D_bf16", r.domain, after=["G_rec"], env=env, **general, alora_importance_dtype="bfloat16")
        runs = {name: r.get(name) for name in ("G_plain", "G_rec", "D_plain", "D_fp32", "D_bf16")}
        runs["sizes"] = config_module_sizes({"lora_target_linear": True, "lora_r": 8}, r.model)
        yield runs


def _peak_bytes(run) -> int:
    return 1024 * json.loads((run.out / "peak_memory.json").read_text())["peak_kib"]


@pytest.mark.parametrize("stage,run,plain,dtype", [
    ("general", "G_rec", "G_plain", "float32"),
    ("domain", "D_fp32", "D_plain", "float32"),
    ("domain", "D_bf16", "D_plain", "bfloat16"),
])
def test_model_predicts_the_measured_peak_within_10_percent(measured, stage, run, plain, dtype):
    sizes = measured["sizes"]
    predicted = (general_stage if stage == "general" else domain_stage)(sizes, dtype)
    difference = _peak_bytes(measured[run]) - _peak_bytes(measured[plain])
    assert predicted.transient < 0.05 * predicted.persistent, "the setting must make the model's main term dominate"
    report = os.environ.get("ALORA_MEMORY_REPORT")  # a markdown row per case, for eval/results/memory.md
    if report:
        with open(report, "a") as f:
            f.write(f"| {stage} | {dtype} | {_peak_bytes(measured[plain]) / 1e6:.1f} | {_peak_bytes(measured[run]) / 1e6:.1f} | "
                    f"{difference / 1e6:.1f} | {predicted.persistent / 1e6:.1f} | {predicted.peak / 1e6:.1f} | {predicted.peak / difference - 1:+.1%} |\n")
    assert abs(predicted.peak - difference) <= 0.1 * difference, (predicted, difference)


def test_the_runs_hold_what_the_model_counts(measured):
    """The plugin's own report of what it holds equals the model's element count for the config."""
    import re

    total = sum(m.numel for m in measured["sizes"])
    assert re.search(rf"holds ω of {len(measured['sizes'])} modules, {total} elements", measured["G_rec"].log)
    assert re.search(rf"holds Ω of {len(measured['sizes'])} modules, {total} elements \([\d.]+ MB, bfloat16\)", measured["D_bf16"].log)


def test_block_size_is_the_codes():
    import axolotl_alora.importance as importance
    import axolotl_alora.memory as memory

    assert memory.BLOCK_ELEMENTS == importance.BLOCK_ELEMENTS
