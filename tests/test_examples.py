"""Every example YAML passes Axolotl's own validation with the plugin's keys (nothing is loaded or trained)."""

from pathlib import Path

import pytest
import yaml

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*/*.yml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_validates(path):
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    raw = yaml.safe_load(path.read_text())
    cfg = validate_config(_prepared(DictDefault(raw), prepare_plugins))
    assert "axolotl_alora.AloraPlugin" in cfg.plugins and cfg.adapter == "lora"
    for key, value in raw.items():
        if key.startswith("alora_"):
            assert cfg[key] == value, f"{key} lost in validation"
    assert cfg.lora_r == 8 and cfg.lora_alpha == 32 and cfg.learning_rate == 0.0008  # the paper's recipe


def _prepared(cfg, prepare_plugins):
    prepare_plugins(cfg)
    return cfg


def test_examples_exist():
    names = {f"{p.parent.name}/{p.name}" for p in EXAMPLES}
    assert {"smollm2-cpu/general.yml", "smollm2-cpu/domain-alora.yml", "smollm2-cpu/domain-lora.yml",
            "smollm2-cpu/domain-lora-mu.yml", "smollm2-cpu/domain-rslora.yml", "smollm2-cpu/domain-ewc.yml",
            "smollm2-cpu/domain-alora-nolayer.yml", "llama-3.2-3b/general.yml", "llama-3.2-3b/domain-alora.yml"} <= names
