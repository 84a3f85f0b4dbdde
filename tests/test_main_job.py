"""The main job (README's first command) end to end on the tiny model: 1 step per stage, tiny eval limits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_main_job_runs_the_whole_workflow(tiny_model_dir, tmp_path):
    report = tmp_path / "report.md"
    cmd = [sys.executable, "-m", "alora_bench.main_job", "--base-model", str(tiny_model_dir), "--work", str(tmp_path / "work"),
           "--general-steps", "2", "--domain-steps", "2", "--limit", "2", "--ppl-limit", "1", "--results", str(report)]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "AXOLOTL_DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    work = tmp_path / "work"
    assert (work / "runs" / "general" / "alora_importance.safetensors").is_file()
    for run in ("domain-alora", "domain-lora"):
        assert (work / "runs" / run / "adapter_model.safetensors").is_file()
    assert "ALoRA: regularizing" in (work / "logs" / "domain-alora.log").read_text()
    plain = (work / "logs" / "domain-lora.log").read_text()
    assert "ALoRA: regularizing" not in plain and "of the general stage's gain kept" in plain  # it only watches the general loss
    watched = {run: json.loads((work / "runs" / run / "alora_general_eval.json").read_text()) for run in ("general", "domain-alora", "domain-lora")}
    # 64 each: the ALoRA run draws 128 and scores half as its budget's control sample
    assert {run: w["sequences"] for run, w in watched.items()} == {"general": 64, "domain-alora": 64, "domain-lora": 64}
    # the ALoRA example's forgetting budget: φ steered from its start, then α; the row evaluates the budgeted adapter
    budget = watched["domain-alora"]["budget"]
    assert budget["mechanism"] == "both" and budget["keep"] == 0.8 and budget["phi_start"] == 3.0 and watched["domain-lora"]["budget"] is None
    assert (work / "runs" / "domain-alora" / "alora_interpolated" / "adapter_config.json").is_file()
    assert "alora_interpolated" in str(json.loads((work / "eval" / "domain-alora.json").read_text()).get("config"))
    text = report.read_text()
    for row in ("| base |", "| general (ν) |", "| ALoRA (ν→μ) |", "| LoRA (ν+μ) |"):
        assert row in text
    assert "SciQ acc" in text and "WikiText-2 PPL" in text and "| total |" in text
    header, base_row, general_row, alora_row, lora_row = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")][:5]
    column = header.index("General held-out, in training, token PPL ↓ (kept)")
    assert base_row[column] == "–" and "%)" not in general_row[column] and "%)" in alora_row[column] and "%)" in lora_row[column]
    assert "scale: general 2 steps" in proc.stdout
    assert "forgetting budget (keep 80% of the general stage's gain, by both): φ 3 →" in text
