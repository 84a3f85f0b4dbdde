"""`alora check`: catches what Axolotl 0.19 cannot report (alora_ keys without the plugin) before any training, and knows 0.21 finds it."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from axolotl_alora.cli import main


def _axolotl_version(fake: str):
    """importlib.metadata.version with only Axolotl's answer faked (other packages' versions stay real)."""
    import importlib.metadata

    real = importlib.metadata.version
    return lambda name: fake if name == "axolotl" else real(name)


def _write(tmp_path, **cfg):
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({"adapter": "lora", "output_dir": str(tmp_path / "out"), **cfg}))
    return str(path)


def test_keys_without_the_plugin(tmp_path, capsys, monkeypatch):
    import importlib.metadata

    cfg = _write(tmp_path, alora_record_importance=True)
    monkeypatch.setattr(importlib.metadata, "version", _axolotl_version("0.19.0"))
    assert main(["check", cfg]) == 1
    assert "does not list axolotl_alora.AloraPlugin" in capsys.readouterr().out
    # 0.21 finds the plugin through its entry point: fine there, with a note about 0.19
    monkeypatch.setattr(importlib.metadata, "version", _axolotl_version("0.21.0"))
    assert main(["check", cfg]) == 0
    out = capsys.readouterr().out
    assert "finds it through its entry point" in out and "ALoRA settings OK" in out
    # the entry-point spelling under `plugins:` counts as listed
    assert main(["check", _write(tmp_path, plugins=["axolotl_alora:AloraPlugin"], alora_record_importance=True)]) == 0
    assert "note:" not in capsys.readouterr().out


def test_missing_importance_file_and_bad_phi(tmp_path, capsys):
    cfg = _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_importance_path=str(tmp_path / "none.safetensors"), alora_phi=-1)
    assert main(["check", cfg]) == 1
    out = capsys.readouterr().out
    assert "error: alora_phi must be >= 0" in out and "note: importance file" in out and "none.safetensors does not exist yet" in out


def test_missing_general_text_is_a_note_and_strict_makes_it_an_error(tmp_path, capsys):
    cfg = _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_general_eval=str(tmp_path / "none.jsonl"))
    assert main(["check", cfg]) == 0
    assert "note: alora_general_eval:" in capsys.readouterr().out
    assert main(["check", cfg, "--strict"]) == 1
    assert "error: alora_general_eval:" in capsys.readouterr().out
    (tmp_path / "empty.txt").write_text("  \n")
    assert main(["check", _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_general_eval=str(tmp_path / "empty.txt"))]) == 1
    assert "holds no text" in capsys.readouterr().out


def test_good_and_plain_configs(tmp_path, capsys):
    assert main(["check", _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_record_importance=True)]) == 0
    assert "ALoRA settings OK" in capsys.readouterr().out
    assert main(["check", _write(tmp_path)]) == 0
    assert "plain Axolotl run" in capsys.readouterr().out
    # a key at its default (a user switching the general stage off) leaves the plugin inert: not an error
    assert main(["check", _write(tmp_path, adapter=None, alora_record_importance=False, alora_xi=0.1)]) == 0
    assert "no alora_ keys in use (plain Axolotl run)" in capsys.readouterr().out


def test_names_the_axolotl_version_and_what_it_does_with_plugin_keys(tmp_path, capsys, monkeypatch):
    import importlib.metadata

    from axolotl_alora.check import axolotl_behaviour

    assert main(["check", _write(tmp_path)]) == 0
    installed = importlib.metadata.version("axolotl")
    assert f"Axolotl {installed}:" in capsys.readouterr().out
    monkeypatch.setattr(importlib.metadata, "version", _axolotl_version("0.19.0"))
    assert "drops keys no listed plugin declares" in axolotl_behaviour()
    monkeypatch.setattr(importlib.metadata, "version", _axolotl_version("0.21.0"))
    assert "loads every installed `axolotl.plugins` entry point" in axolotl_behaviour()


# -- every problem in one run --------------------------------------------------------------------------------
def test_every_problem_in_one_run(tmp_path, capsys):
    cfg = _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_importance_path=str(tmp_path / "none.safetensors"), alora_phi=-1,
                 deepspeed="zero3.json", alora_phii=3, alora_layer_weighting="bogus", optimizer="lomo")
    assert main(["check", cfg]) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 5, errors
    for part in ("unknown key alora_phii; did you mean alora_phi?", "alora_layer_weighting: Input should be", "alora_phi must be >= 0",
                 "FSDP and DeepSpeed", "optimizer lomo"):
        assert sum(part in line for line in errors) == 1, part


def test_unknown_key_alone_is_reported(tmp_path, capsys):
    assert main(["check", _write(tmp_path, alora_phii=3)]) == 1
    assert "error: unknown key alora_phii; did you mean alora_phi?" in capsys.readouterr().out


# -- a domain stage checked before its importance file exists ----------------------------------------------------
def test_domain_config_before_its_general_stage_is_a_note(tmp_path, capsys):
    path = tmp_path / "general" / "alora_importance.safetensors"
    cfg = _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_importance_path=str(path))
    assert main(["check", cfg]) == 0
    out = capsys.readouterr().out
    assert "note: importance file" in out and "the general stage writes it" in out and "alora_record_importance: true" in out
    assert f"output_dir: {path.parent}" in out and "error:" not in out
    assert main(["check", cfg, "--strict"]) == 1
    assert "error: importance file" in capsys.readouterr().out


@pytest.mark.parametrize("name,weighting", [("alora_fisher.safetensors", None), ("imp.safetensors", "none")])
def test_an_ewc_file_is_written_by_alora_fisher(tmp_path, capsys, name, weighting):
    path = tmp_path / "ewc" / name
    cfg = _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], base_model="my/model", alora_importance_path=str(path),
                 **({"alora_layer_weighting": weighting} if weighting else {}))
    assert main(["check", cfg]) == 0
    out = capsys.readouterr().out
    assert f"`alora fisher` writes it (run it first: alora fisher --base my/model --data <general text> --out {path})" in out
    assert "alora_record_importance" not in out


def test_a_damaged_importance_file_is_an_error(tmp_path, capsys):
    bad = tmp_path / "imp.safetensors"
    bad.write_text("nope")
    assert main(["check", _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_importance_path=str(bad))]) == 1
    assert "error:" in (out := capsys.readouterr().out) and "is not a readable safetensors file" in out


def test_hub_references(tmp_path, capsys, monkeypatch):
    """hf://… is checked in the local Hugging Face cache only: read there when cached, a note when not, an error when malformed."""
    import torch
    from huggingface_hub import constants

    from axolotl_alora.importance_file import ImportanceFile, module_metadata, write_importance_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--adapter"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def check(spec):
        assert main(["check", _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_importance_path=spec)]) in (0, 1)
        return capsys.readouterr().out

    assert "note: alora_importance_path hf://org/adapter: not in the local Hugging Face cache" in check("hf://org/adapter")
    assert "error: alora_importance_path 'hf://org': a Hub reference is" in check("hf://org")
    omega = torch.ones(2, 3)
    data = ImportanceFile({"m.q_proj": omega}, {"m.q_proj": torch.zeros(1, 3)}, {"m.q_proj": torch.zeros(2, 1)},
                          {"modules": {"m.q_proj": module_metadata(omega, 1, 2.0, 2.0, False)}})
    cached = repo / "snapshots" / commit / "alora_importance.safetensors"
    write_importance_file(cached, data)
    assert "ALoRA settings OK" in check("hf://org/adapter")
    cached.write_text("nope")
    assert "is not a readable safetensors file" in check("hf://org/adapter")


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("**/*.yml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"{p.parent.name}/{p.name}" for p in EXAMPLES])
def test_every_example_passes(example, tmp_path, capsys, monkeypatch):
    """Before anything has run (no model, data or general stage here): notes at most, never an error."""
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(example)]) == 0
    out = capsys.readouterr().out
    assert "error:" not in out and "ALoRA settings OK" in out


def test_examples_are_found():
    assert len(EXAMPLES) >= 10


# -- plain output -------------------------------------------------------------------------------------------------
def test_invalid_yaml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("adapter: lora\nplugins: [axolotl_alora.AloraPlugin\nalora_phi: 1\n")
    assert main(["check", str(bad)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"alora check: error: {bad} is not valid YAML: line ") and "column" in lines[0]
    assert "Traceback" not in captured.err + captured.out
    (tmp_path / "list.yml").write_text("- adapter: lora\n")
    assert main(["check", str(tmp_path / "list.yml")]) == 2
    assert "its top level is a list, not a mapping" in capsys.readouterr().err


def test_hub_model_without_local_config_is_one_line(tmp_path, capsys):
    cfg = _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], base_model="no-such-org/no-such-model-here", alora_record_importance=True)
    assert main(["check", cfg]) == 0
    out = capsys.readouterr().out
    memory = [line for line in out.splitlines() if "memory" in line or "config.json" in line]
    assert len(memory) == 1 and memory[0].startswith("memory: 'no-such-org/no-such-model-here'") and "--model-config PATH" in memory[0]
    assert "Traceback" not in out and "Error" not in out


def test_the_configs_memory_row_is_marked(tmp_path, capsys, monkeypatch):
    cfg = _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_record_importance=True, alora_importance_dtype="bfloat16",
                 lora_target_modules=["q_proj", "v_proj"])
    model = str(Path(__file__).resolve().parents[1] / "examples" / "model-configs" / "llama-3.2-3b")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["check", cfg, "--model-config", model, "--ranks", "1,2"]) == 0
    marked = [line.split()[:2] for line in capsys.readouterr().out.splitlines() if line.endswith("<- this config")]
    assert marked == [["bfloat16", "1"], ["bfloat16", "2"]]  # world size unknown: every row of its storage
    monkeypatch.setenv("WORLD_SIZE", "4")
    factored = _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_record_importance=True, alora_importance_form="factored",
                      lora_target_modules=["q_proj", "v_proj"])
    assert main(["check", factored, "--model-config", model, "--ranks", "1,2"]) == 0
    marked = [line.split()[:2] for line in capsys.readouterr().out.splitlines() if line.endswith("<- this config")]
    assert marked == [["factored", "4"]]


def test_third_party_import_noise_is_hidden(tmp_path):
    """A subprocess, as a user runs it: torchao, bitsandbytes and torch's _pytree print on import (peft, Axolotl)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "llama-3.2-3b" / "general.yml"
    model = Path(__file__).resolve().parents[1] / "examples" / "model-configs" / "llama-3.2-3b"
    out = subprocess.run([sys.executable, "-m", "axolotl_alora.cli", "check", str(example), "--model-config", str(model)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "LoRA modules" in out.stdout  # Axolotl and peft were imported to build the table
    text = out.stdout + out.stderr
    for noise in ("Failed to load", "Enum subclass", "UserWarning", "gemm_4bit", "_pytree", "torchao"):
        assert noise not in text, noise


# -- `axolotl alora-check` ------------------------------------------------------------------------------------------
def _axolotl_command(name: str):
    """The click command Axolotl's CLI loads from the `axolotl.cli_commands` entry-point group."""
    from importlib.metadata import entry_points

    return next(ep for ep in entry_points(group="axolotl.cli_commands") if ep.name == name).load()


def test_axolotl_alora_check(tmp_path):
    from click.testing import CliRunner

    command = _axolotl_command("alora-check")
    good = _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_record_importance=True)
    result = CliRunner().invoke(command, [good, "--strict"])
    assert result.exit_code == 0 and "ALoRA settings OK" in result.output, result.output
    result = CliRunner().invoke(command, [_write(tmp_path, alora_phii=3)])
    assert result.exit_code == 1 and "did you mean alora_phi?" in result.output
    assert "--strict" in CliRunner().invoke(command, ["--help"]).output  # options reach `alora check`'s own parser


def test_axolotl_alora_inspect(tmp_path):
    from click.testing import CliRunner

    bad = tmp_path / "x.safetensors"
    bad.write_text("nope")
    result = CliRunner().invoke(_axolotl_command("alora-inspect"), [str(bad)])
    assert result.exit_code == 2 and "alora inspect: error:" in result.output


@pytest.mark.parametrize("extra,line", [
    ({"alora_importance_path": "imp.safetensors", "alora_keep": 0.8},
     "forgetting budget: keep 80% of the general stage's gain, by both (the default for this config): φ steered from alora_phi, then"),
    ({"alora_max_general_loss_rise": 0.05},
     "forgetting budget: a general-text loss at most 0.05 nats over the base model, by interpolation (the default for this config)"),
    ({"alora_importance_path": "imp.safetensors", "alora_keep": 0.5, "alora_budget_by": "phi"},
     "forgetting budget: keep 50% of the general stage's gain, by phi: φ steered from alora_phi"),
])
def test_says_how_the_budget_will_be_met(tmp_path, capsys, extra, line):
    (tmp_path / "g.txt").write_text("general text " * 50)
    assert main(["check", _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_general_eval=str(tmp_path / "g.txt"), **extra)]) == 0
    assert line in capsys.readouterr().out


def test_nan_importance_is_an_error_before_training(tmp_path, capsys):
    """A diverged general stage leaves NaN in Ω; its recorded ‖Ω‖ says so, and the check reads only the metadata."""
    import torch

    from axolotl_alora.importance_file import ImportanceFile, module_metadata, write_importance_file

    def file(name, omega):
        mod = "model.layers.0.self_attn.q_proj"
        data = ImportanceFile(omega={mod: omega}, lora_A={mod: torch.zeros(2, 5)}, lora_B={mod: torch.zeros(6, 2)},
                              metadata={"source": "si", "modules": {mod: module_metadata(omega, 2, 4, 2.0, False)}, "steps": 3})
        return str(write_importance_file(tmp_path / name, data))

    good = file("good.safetensors", torch.rand(6, 5))
    assert main(["check", _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_importance_path=good)]) == 0
    omega = torch.rand(6, 5)
    omega[1, 2] = float("nan")
    bad = file("bad.safetensors", omega)
    assert main(["check", _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_importance_path=bad)]) == 1
    out = capsys.readouterr().out
    assert "Ω has NaN/Inf values in 1 module(s), e.g. model.layers.0.self_attn.q_proj; the general stage diverged" in out
