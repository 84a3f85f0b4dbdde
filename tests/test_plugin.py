"""The plugin's glue on a tiny peft model: module discovery and s (vs peft), file/model matching, the built regularizer."""

import math

import pytest
import torch

from axolotl_alora.importance_file import ImportanceFile, ImportanceFileError
from axolotl_alora.lora import adapted_modules, base_fingerprint


def _peft_model(model_dir, seed=0, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **lora)
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # peft starts B at 0; make s·B·A non-trivial
    return peft_model


def _cfg(**kw):
    from axolotl.utils.dict import DictDefault

    base = dict(alora_importance_path="imp.safetensors", alora_phi=1.0, alora_layer_weighting="softmax",
                alora_softmax_temperature=1.0, alora_importance_normalization="none", base_model="tiny")
    return DictDefault({**base, **kw})


def _file_for(modules, seed=1, scaling=None):
    g = torch.Generator().manual_seed(seed)
    omega = {m.name: torch.rand(m.shape, generator=g) * (i + 1) for i, m in enumerate(modules)}
    meta = {"modules": {m.name: {"scaling": scaling or m.scaling} for m in modules}}
    return ImportanceFile(
        omega=omega,
        lora_A={m.name: torch.randn(m.A.shape, generator=g) * 0.1 for m in modules},
        lora_B={m.name: torch.randn(m.B.shape, generator=g) * 0.1 for m in modules},
        metadata=meta,
    )


@pytest.mark.parametrize("rslora", [False, True])
def test_adapted_modules_and_scaling_match_peft(tiny_model_dir, rslora):
    from axolotl_alora.importance import adapter_delta

    model = _peft_model(tiny_model_dir, use_rslora=rslora)
    modules = adapted_modules(model)
    assert [m.name for m in modules] == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    expected_s = 8 / math.sqrt(4) if rslora else 8 / 4
    peft_layers = {n.removeprefix("base_model.model."): mod for n, mod in model.named_modules() if hasattr(mod, "get_delta_weight")}
    for m in modules:
        assert m.scaling == expected_s and m.use_rslora is rslora and (m.r, m.alpha) == (4, 8)
        torch.testing.assert_close(adapter_delta(m.A, m.B, m.scaling), peft_layers[m.name].get_delta_weight("default").detach())


def test_regularizer_gradient_matches_autograd_through_peft(tiny_model_dir):
    from axolotl_alora.regularizer import build_regularizer

    model = _peft_model(tiny_model_dir, use_rslora=True)
    modules = adapted_modules(model)
    data = _file_for(modules, scaling=3.0)  # a general stage with another s: θ^ν = 3·B^ν·A^ν
    reg = build_regularizer(data, modules, [], "softmax", 1.0, "mean")
    value = reg()
    value.backward()
    ours = {m.name: (m.A.grad.clone(), m.B.grad.clone()) for m in modules}
    model.zero_grad()

    # independent: peft's own delta weight, softmax of Frobenius norms, mean over every element, autograd
    peft_layers = {n.removeprefix("base_model.model."): mod for n, mod in model.named_modules() if hasattr(mod, "get_delta_weight")}
    norms = torch.stack([data.omega[m.name].double().norm() for m in modules])
    weights = torch.softmax(norms, 0)
    mean = torch.cat([data.omega[m.name].flatten() for m in modules]).double().mean()
    expected = 0
    for m, w in zip(modules, weights):
        ref = 3.0 * data.lora_B[m.name].double() @ data.lora_A[m.name].double()
        diff = peft_layers[m.name].get_delta_weight("default").double() - ref
        expected = expected + w * (data.omega[m.name].double() / mean * diff**2).sum()
    expected.backward()
    torch.testing.assert_close(value.detach().double(), expected.detach(), rtol=1e-5, atol=0)
    for m in modules:  # fp32 against fp64: tolerance relative to each gradient's scale
        for got, want in zip(ours[m.name], (m.A.grad, m.B.grad)):
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_normalization_never_changes_layer_weights(tiny_model_dir):
    from axolotl_alora.regularizer import build_regularizer

    modules = adapted_modules(_peft_model(tiny_model_dir))
    data = _file_for(modules)
    raw = build_regularizer(data, modules, [], "softmax", "auto", "none")
    mean = build_regularizer(data, modules, [], "softmax", "auto", "mean")
    m = float(torch.cat([o.flatten() for o in data.omega.values()]).double().mean())
    for a, b in zip(raw.modules, mean.modules):
        assert b.coefficient == pytest.approx(a.coefficient / m)


def test_mismatched_modules_name_the_first_differences(tiny_model_dir):
    from axolotl_alora.plugin import check_modules_match

    modules = adapted_modules(_peft_model(tiny_model_dir))
    data = _file_for(modules)
    check_modules_match(data, modules, "imp.safetensors")  # matching: no error
    del data.omega["model.layers.1.self_attn.v_proj"]
    data.omega["model.layers.0.self_attn.q_proj"] = torch.zeros(3, 3)
    with pytest.raises(ImportanceFileError) as err:
        check_modules_match(data, modules, "imp.safetensors")
    message = str(err.value)
    assert "imp.safetensors does not match" in message
    assert "model.layers.1.self_attn.v_proj: in the model, not in the file" in message
    assert "model.layers.0.self_attn.q_proj: shape (64, 64) in the model, (3, 3) in the file" in message
    assert "lora_target_modules" in message


def test_a_different_base_model_is_an_error_unless_overridden(tiny_model_dir, tmp_path, caplog):
    from axolotl_alora.plugin import check_base_model

    from tiny import build_tiny_llama

    model = _peft_model(tiny_model_dir)
    modules = adapted_modules(model)
    data = _file_for(modules)
    data.fingerprint = base_fingerprint(model)
    check_base_model(data, base_fingerprint(model.to(torch.bfloat16)), _cfg())  # same weights in bf16: fine
    other = _peft_model(build_tiny_llama(tmp_path / "other", seed=5))
    with pytest.raises(ImportanceFileError, match="alora_allow_base_model_mismatch: true"):
        check_base_model(data, base_fingerprint(other), _cfg())
    check_base_model(data, base_fingerprint(other), _cfg(alora_allow_base_model_mismatch=True))
    assert "continuing because alora_allow_base_model_mismatch" in caplog.text


def test_dora_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="DoRA"):
        adapted_modules(_peft_model(tiny_model_dir, use_dora=True))


def test_identical_model_whose_first_embedding_rows_are_zero_is_accepted(tiny_model_dir):
    from axolotl_alora.lora import FINGERPRINT_SIZE
    from axolotl_alora.plugin import check_base_model

    model = _peft_model(tiny_model_dir)
    with torch.no_grad():  # e.g. padding and reserved tokens zeroed: the whole fingerprint slice is 0
        model.get_input_embeddings().weight.view(-1)[:FINGERPRINT_SIZE] = 0
    data = _file_for(adapted_modules(model))
    data.fingerprint = base_fingerprint(model)
    assert float(data.fingerprint.abs().sum()) == 0
    check_base_model(data, base_fingerprint(model), _cfg())
    check_base_model(data, base_fingerprint(model.to(torch.bfloat16)), _cfg())
    with torch.no_grad():
        model.get_input_embeddings().weight.view(-1)[:FINGERPRINT_SIZE] = 1.0
    with pytest.raises(ImportanceFileError, match="whose weights differ"):
        check_base_model(data, base_fingerprint(model), _cfg())
