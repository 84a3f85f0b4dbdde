"""The plugin's YAML keys through Axolotl's own config validation (runs before datasets or the model load)."""

import pytest
import yaml

from e2e import base_config


def _validate(tmp_path, **overrides):
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = base_config(tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "out", tmp_path / "prep", **overrides)
    cfg = DictDefault(yaml.safe_load(yaml.safe_dump(cfg)))
    prepare_plugins(cfg)
    return validate_config(cfg)


def test_no_alora_key_leaves_the_plugin_inert(tmp_path):
    from axolotl_alora.plugin import alora_enabled

    cfg = _validate(tmp_path)
    assert not alora_enabled(cfg) and cfg.alora_phi is None and cfg.alora_xi == 0.1


def test_defaults_are_the_papers(tmp_path):
    cfg = _validate(tmp_path, alora_importance_path=str(tmp_path / "f.safetensors"))
    assert cfg.alora_phi == 1e-3 and cfg.alora_xi == 0.1 and cfg.alora_layer_weighting == "softmax"
    assert cfg.alora_softmax_temperature == 1.0 and cfg.alora_importance_normalization == "none"
    assert cfg.alora_importance_dtype == "float32"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"alora_phi": -1.0, "alora_importance_path": "x.safetensors"}, "alora_phi must be >= 0"),
        ({"alora_phi": 0.1}, "alora_importance_path is not"),
        ({"alora_record_importance": True, "adapter": None}, "set `adapter: lora`"),
        ({"alora_importance_path": "x.safetensors", "adapter": None}, "full fine-tune"),
        ({"alora_xi": 0.5}, "nothing to do"),
        ({"alora_record_importance": True, "optimizer": "lomo"}, "optimizer lomo updates parameters during the backward pass"),
        ({"alora_record_importance": True, "optimizer": "galore_adamw_layerwise"}, "Choose a step-based optimizer"),
        ({"alora_record_importance": True, "peft_use_dora": True}, "DoRA"),
        ({"alora_record_importance": True, "deepspeed": "zero3.json"}, "FSDP and DeepSpeed"),
        ({"alora_importance_path": "x.safetensors", "alora_softmax_temperature": -2.0}, "temperature"),
        ({"alora_importance_path": "x.safetensors", "alora_layer_weighting": "bogus"}, "alora_layer_weighting"),
        ({"alora_general_eval_samples": 8}, "nothing to do"),
        ({"alora_general_eval": "g.jsonl", "alora_general_eval_samples": 0}, "alora_general_eval_samples"),
        ({"alora_general_eval": {"ds_type": "json"}}, "alora_general_eval: a dataset entry needs `path`"),
    ],
)
def test_bad_settings_fail_at_validation_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _validate(tmp_path, **overrides)


def test_output_may_not_overwrite_the_importance_file_it_reads(tmp_path):
    target = tmp_path / "out" / "alora_importance.safetensors"
    with pytest.raises(ValueError, match="different output_dir"):
        _validate(tmp_path, alora_record_importance=True, alora_importance_path=str(target))
    # a different output_dir is the continual use case and is fine
    cfg = _validate(tmp_path, alora_record_importance=True, alora_importance_path=str(tmp_path / "other" / "alora_importance.safetensors"))
    assert cfg.alora_record_importance and cfg.alora_phi == 1e-3


def test_qlora_is_accepted(tmp_path):
    cfg = _validate(tmp_path, alora_record_importance=True, adapter="qlora", load_in_4bit=True)
    assert cfg.adapter == "qlora"


def test_general_eval_alone_enables_the_plugin(tmp_path):
    from axolotl_alora.plugin import alora_enabled

    cfg = _validate(tmp_path, alora_general_eval="g.jsonl")
    assert alora_enabled(cfg) and cfg.alora_general_eval_samples == 256 and cfg.alora_phi is None
    entry = {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}
    assert _validate(tmp_path, alora_general_eval=entry, alora_general_eval_samples=16).alora_general_eval == entry
