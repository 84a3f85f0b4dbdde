"""Every trainable parameter is covered: embedding LoRA, `modules_to_save`, LoRA biases and trainable tokens.

For each kind, on a tiny peft model: discovery covers every parameter with requires_grad; ω over plain SGD
steps equals an independent Σ_t (Δθ_t)²/η (under SGD, Δθ = −η·g̃, so −g̃⊙Δθ = Δθ²/η), with Δθ read from
peft's own merged weights; and the file's penalty and gradients equal plain autograd through peft.
"""

import pytest
import torch

from axolotl_alora.callbacks import ImportanceRecorder
from axolotl_alora.importance_file import read_importance_file, write_importance_file
from axolotl_alora.lora import adapted_modules, full_parameters
from axolotl_alora.plugin import check_modules_match
from axolotl_alora.regularizer import build_regularizer

KINDS = {
    "embedding_lora": {"target_modules": ["q_proj", "embed_tokens"]},
    "modules_to_save": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "lora_bias": {"target_modules": ["q_proj", "v_proj"], "lora_bias": True},
    "trainable_tokens": {"target_modules": ["q_proj"], "trainable_token_indices": [3, 5, 7]},
}
LR = 0.05


def _peft_model(model_dir, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **lora))
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # peft starts B at 0: make every factor get a gradient
    return model


def _theta(model):
    """Each covered parameter's effective value, from peft: get_delta_weight for LoRA modules (the
    embedding's transposed to dim×vocab, the space its Ω lives in), the parameter itself otherwise."""
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "get_delta_weight")}
    params = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters()}

    def values():
        out = {}
        for m in adapted_modules(model):
            delta = layers[m.name].get_delta_weight("default")
            out[m.name] = delta.T if m.layer == "embedding" else delta
        for p in full_parameters(model, adapted_modules(model)):
            out[p.name] = params[p.name]
        return out

    return values


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 60, (4, 12), generator=g)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_trainable_parameter_is_tracked_and_regularized(tiny_model_dir, tmp_path, kind):
    model = _peft_model(tiny_model_dir, **KINDS[kind])
    modules = adapted_modules(model)
    parameters = full_parameters(model, modules)
    covered = {id(p) for m in modules for p in (m.A, m.B)} | {id(p.param) for p in parameters}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in trainable.values()} == covered
    kind_names = {
        "embedding_lora": [m.name for m in modules if m.layer == "embedding"],
        "modules_to_save": [p.name for p in parameters if "modules_to_save" in p.name],
        "lora_bias": [p.name for p in parameters if p.name.endswith("lora_B.default.bias")],
        "trainable_tokens": [p.name for p in parameters if "trainable_tokens_delta" in p.name],
    }[kind]
    assert kind_names, f"no {kind} parameter found"

    # stage ν: ω over plain SGD steps against Σ (Δθ)²/η from peft's merged weights
    theta = _theta(model)
    recorder = ImportanceRecorder(modules, tmp_path / "imp.safetensors", xi=0.1, omega_dtype="float32",
                                  metadata={"base_model": "tiny"}, parameters=parameters)
    opt = torch.optim.SGD(list(trainable.values()), lr=LR)
    ids = _batch()
    expected = {}
    for step in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        before = {n: v.detach().double().clone() for n, v in theta().items()}
        recorder.tracker.before_step({n: LR for n in before})
        opt.step()
        recorder.tracker.after_step(step)
        for n, v in theta().items():
            expected[n] = expected.get(n, 0) + (v.detach().double() - before[n]) ** 2 / LR
    omega = {m.name: m.omega.double() for m in recorder.tracker.modules}
    for name in kind_names:
        assert float(expected[name].abs().max()) > 0, f"{name} did not move"
    for name, want in expected.items():
        torch.testing.assert_close(omega[name], want, rtol=2e-3, atol=1e-4 * float(want.abs().max()) + 1e-12)

    path = write_importance_file(tmp_path / "imp.safetensors", recorder.importance())
    data = read_importance_file(path)
    check_modules_match(data, modules + parameters, path)
    assert set(kind_names) <= set(data.omega)

    # stage μ: move away from θ^ν, then the penalty against plain autograd through peft (weighting none)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    opt.zero_grad()
    reg = build_regularizer(data, modules, parameters, "none", 1.0, "none")
    value = reg(step=0)
    value.backward()
    ours = {n: p.grad.clone() for n, p in trainable.items()}
    opt.zero_grad()
    expected_value = 0
    for name, v in theta().items():
        if name in data.reference:
            ref = data.reference[name].double()
        else:
            entry = data.metadata["modules"][name]
            ref = entry["scaling"] * data.lora_B[name].double() @ data.lora_A[name].double()
        expected_value = expected_value + (data.omega[name].double() * (v.double() - ref) ** 2).sum()
    expected_value.backward()
    assert float(expected_value) > 0
    torch.testing.assert_close(value.detach().double(), expected_value.detach(), rtol=1e-4, atol=0)
    for n, p in trainable.items():
        torch.testing.assert_close(ours[n].double(), p.grad.double(), rtol=1e-3, atol=1e-5 * float(p.grad.abs().max()) + 1e-12)
