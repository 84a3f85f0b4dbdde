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
    """Inert means invisible: every alora_ key of a validated config without them is None, so no dump lists them."""
    from axolotl_alora.args import AloraArgs
    from axolotl_alora.plugin import alora_enabled

    cfg = _validate(tmp_path)
    assert not alora_enabled(cfg)
    assert {k: cfg[k] for k in AloraArgs.model_fields} == dict.fromkeys(AloraArgs.model_fields)
    assert set(AloraArgs.model_validate({"adapter": "lora", "lora_r": 8}).model_dump().values()) == {None}


def test_defaults_are_the_frontiers_and_applied_where_used(tmp_path):
    from axolotl_alora.args import DEFAULTS, AloraArgs, setting

    cfg = _validate(tmp_path, alora_importance_path=str(tmp_path / "f.safetensors"))
    assert cfg.alora_phi is None and cfg.alora_xi is None
    # φ, normalization and τ: the settings the forgetting frontier supports (docs/FRONTIER.md), not the paper's
    assert setting(cfg, "alora_phi") == 3.0 and setting(cfg, "alora_xi") == 0.1 and setting(cfg, "alora_layer_weighting") == "softmax"
    assert setting(cfg, "alora_softmax_temperature") == "auto" and setting(cfg, "alora_importance_normalization") == "mean"
    assert setting(cfg, "alora_importance_dtype") == "float32" and setting(cfg, "alora_importance_form") == "dense"
    assert setting(cfg, "alora_shard_importance") is True and setting(cfg, "alora_general_eval_samples") == 256
    assert setting({"alora_xi": 0.5}, "alora_xi") == 0.5
    assert set(DEFAULTS) == set(AloraArgs.model_fields)  # every key has its default stated once
    described = {k: f["description"] for k, f in AloraArgs.model_json_schema()["properties"].items()}
    assert "Default: 0.1." in described["alora_xi"] and "Default: softmax." in described["alora_layer_weighting"]


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
        ({"alora_record_importance": True, "alora_phii": 3}, "unknown key alora_phii; did you mean alora_phi\\?"),
        ({"alora_bogus_thing": 1}, "unknown key alora_bogus_thing; it is not an ALoRA key"),
        # a forgetting budget
        ({"alora_importance_path": "x.safetensors", "alora_keep": 0.8}, "alora_keep is measured on general text: set alora_general_eval"),
        ({"alora_general_eval": "g.jsonl", "alora_keep": 0.8}, "alora_keep keeps a share of a general stage's gain, but this stage has no ν point"),
        ({"alora_general_eval": "g.jsonl", "alora_importance_path": "x.safetensors", "alora_keep": 1.5}, "alora_keep is a share .* in \\(0, 1\\]"),
        ({"alora_general_eval": "g.jsonl", "alora_importance_path": "x.safetensors", "alora_keep": 0}, "alora_keep is a share"),
        ({"alora_general_eval": "g.jsonl", "alora_max_general_loss_rise": -0.1}, "alora_max_general_loss_rise is a rise in nats per token, > 0"),
        ({"alora_general_eval": "g.jsonl", "alora_importance_path": "x.safetensors", "alora_keep": 0.8, "alora_max_general_loss_rise": 0.1},
         "alora_keep and alora_max_general_loss_rise are both set"),
        ({"alora_general_eval": "g.jsonl", "alora_max_general_loss_rise": 0.1, "alora_budget_by": "phi"},
         "alora_budget_by: phi steers alora_phi, which needs an importance file"),
        ({"alora_general_eval": "g.jsonl", "alora_max_general_loss_rise": 0.1, "alora_budget_by": "sometimes"}, "alora_budget_by"),
        ({"alora_general_eval": "g.jsonl", "alora_importance_path": "x.safetensors", "alora_budget_by": "phi"},
         "alora_budget_by is set but there is no budget to meet"),
        ({"alora_general_eval": "g.jsonl", "alora_max_general_loss_rise": 0.1, "lora_modules_to_save": ["lm_head"]},
         "lora_modules_to_save trains full copies it cannot interpolate"),
        ({"alora_importance_path": "x.safetensors", "alora_general_eval_steps": 5}, "alora_general_eval_steps is set but there is no general text"),
        ({"alora_general_eval": "g.jsonl", "alora_general_eval_steps": 0}, "alora_general_eval_steps"),
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
    assert cfg.alora_record_importance and cfg.alora_importance_path


def test_qlora_is_accepted(tmp_path):
    cfg = _validate(tmp_path, alora_record_importance=True, adapter="qlora", load_in_4bit=True)
    assert cfg.adapter == "qlora"


def test_general_eval_alone_enables_the_plugin(tmp_path):
    from axolotl_alora.plugin import alora_enabled

    cfg = _validate(tmp_path, alora_general_eval="g.jsonl")
    assert alora_enabled(cfg) and cfg.alora_general_eval_samples is None and cfg.alora_phi is None
    entry = {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}
    assert _validate(tmp_path, alora_general_eval=entry, alora_general_eval_samples=16).alora_general_eval == entry


def test_every_problem_in_one_error(tmp_path):
    with pytest.raises(ValueError) as error:
        _validate(tmp_path, alora_importance_path="x.safetensors", alora_phi=-1.0, deepspeed="zero3.json", alora_phii=3,
                  alora_layer_weighting="bogus")
    message = str(error.value)
    assert "4 problems with the ALoRA settings" in message
    for part in ("alora_phi must be >= 0", "FSDP and DeepSpeed", "unknown key alora_phii; did you mean alora_phi?", "alora_layer_weighting: Input should be"):
        assert part in message


@pytest.mark.parametrize("overrides", [
    {"alora_record_importance": False},
    {"alora_record_importance": False, "adapter": None},  # inert: no adapter needed either
    {"alora_xi": 0.1, "alora_shard_importance": True, "alora_importance_dtype": "float32", "alora_general_eval_samples": 256},
    {"alora_allow_base_model_mismatch": False, "alora_layer_weighting": "softmax", "alora_softmax_temperature": "auto",
     "alora_importance_normalization": "mean", "alora_budget_by": "interpolation"},
])
def test_keys_at_their_defaults_are_inert_not_errors(tmp_path, overrides):
    from axolotl_alora.args import keys_in_use
    from axolotl_alora.plugin import alora_enabled

    cfg = _validate(tmp_path, **overrides)
    assert not alora_enabled(cfg) and keys_in_use(cfg) == {}


def test_phi_at_its_default_without_a_file_is_still_an_error(tmp_path):
    with pytest.raises(ValueError, match="alora_importance_path is not"):
        _validate(tmp_path, alora_phi=1e-3)


def test_the_budget_steers_phi_then_interpolates_by_default_when_it_can():
    """With an importance file the default is both (φ steered, then α); without one, φ cannot be steered."""
    from axolotl_alora.args import keys_in_use, setting

    with_file = {"alora_importance_path": "x.safetensors", "alora_general_eval": "g.jsonl", "alora_keep": 0.8}
    assert setting(with_file, "alora_budget_by") == "both"
    assert setting({**with_file, "alora_budget_by": "phi"}, "alora_budget_by") == "phi"
    assert setting({"alora_general_eval": "g.jsonl", "alora_max_general_loss_rise": 0.1}, "alora_budget_by") == "interpolation"
    assert "alora_budget_by" not in keys_in_use({**with_file, "alora_budget_by": "both"})
    assert keys_in_use({**with_file, "alora_budget_by": "interpolation"})["alora_budget_by"] == "interpolation"
