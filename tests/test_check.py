"""`alora check`: catches what Axolotl 0.19 cannot report (alora_ keys without the plugin) before any training, and knows 0.21 finds it."""

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
    assert "alora_phi must be >= 0" in out and "none.safetensors does not exist" in out


def test_missing_general_text(tmp_path, capsys):
    cfg = _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_general_eval=str(tmp_path / "none.jsonl"))
    assert main(["check", cfg]) == 1
    assert "alora_general_eval" in capsys.readouterr().out


def test_good_and_plain_configs(tmp_path, capsys):
    assert main(["check", _write(tmp_path, plugins=["axolotl_alora.AloraPlugin"], alora_record_importance=True)]) == 0
    assert "ALoRA settings OK" in capsys.readouterr().out
    assert main(["check", _write(tmp_path)]) == 0
    assert "plain Axolotl run" in capsys.readouterr().out


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
