"""WiSE-FT between adapters (axolotl_alora/interpolate.py) against ΔW computed from the saved files alone."""

import json
from pathlib import Path

import pytest
import torch

from axolotl_alora.interpolate import interpolate_adapters

from e2e import adapter_deltas
from tiny import build_tiny_llama, pretrain, write_text_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model that knows the general text the budget tests score (a random one is so poor on any text that a
    random ΔW may lower its loss)."""
    root = tmp_path_factory.mktemp("interpolate")
    model = build_tiny_llama(root / "model")
    return pretrain(model, write_text_jsonl(root / "known.jsonl", 60, seed=4, tokenizer_dir=model, tokens=24), steps=35)


def _adapter(base: Path, out: Path, r: int, alpha: float, rslora: bool, seed: int, std: float = 0.1, targets=("q_proj", "v_proj")) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora))
    for name, p in model.named_parameters():  # peft starts B at 0 (an embedding's A); a trained adapter has both ≠ 0
        if "lora_B" in name or "lora_embedding" in name:
            torch.nn.init.normal_(p, std=std)
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("ref_r,ref_rslora,end_r,end_rslora", [(4, False, 4, False), (2, False, 8, True), (8, True, 2, False), (4, True, 4, True)])
def test_interpolated_adapter_is_the_formula(tmp_path, base, ref_r, ref_rslora, end_r, end_rslora):
    """ΔW(α) = (1 − α)·ΔW_ref + α·ΔW_end to float precision, as one adapter of rank r_ref + r_end that plain peft
    loads; different ranks and rsLoRA on either side (peft copies the first adapter's rsLoRA flag)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = _adapter(base, tmp_path / "ref", ref_r, 8, ref_rslora, seed=1)
    end = _adapter(base, tmp_path / "end", end_r, 16, end_rslora, seed=2)
    alpha = 0.3
    interpolate_adapters(base, ref, end, alpha, tmp_path / "wise")
    got, a, b = adapter_deltas(tmp_path / "wise"), adapter_deltas(ref), adapter_deltas(end)
    assert set(got) == set(a) == set(b) and len(got) == 4
    for name in got:
        torch.testing.assert_close(got[name], (1 - alpha) * a[name] + alpha * b[name], rtol=1e-5, atol=1e-7)
    assert json.loads((tmp_path / "wise" / "adapter_config.json").read_text())["r"] == ref_r + end_r
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(tmp_path / "wise"))


QV, EMBEDDING = ("q_proj", "v_proj"), ("q_proj", "embed_tokens")


@pytest.mark.parametrize("dtype,targets", [(torch.float16, QV), (torch.bfloat16, QV), (torch.float32, EMBEDDING), (torch.bfloat16, EMBEDDING)])
def test_a_half_precision_base_keeps_the_adapters_precision(tmp_path, base, dtype, targets):
    """During an fp16 or bf16 run the base layers are 16-bit and the adapters float32. peft gives a new adapter the
    base layer's dtype, which would round the interpolated factors; they must stay float32 and the formula exact.
    An adapter on embed_tokens keeps its factors in lora_embedding_A/B, not lora_A/B: the same holds, and the check
    covers it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from axolotl_alora.interpolate import INTERPOLATED, add_interpolation, check_interpolation, factors, save_adapter

    ref, end = (_adapter(base, tmp_path / n, 4, a, False, seed=s, targets=targets) for n, a, s in (("ref", 8, 1), ("end", 16, 2)))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype), str(end), adapter_name="end")
    model.load_adapter(str(ref), adapter_name="ref")
    add_interpolation(model, "ref", "end", 0.6)
    assert {p.dtype for n, p in model.named_parameters() if INTERPOLATED in n} == {torch.float32}
    save_adapter(model, INTERPOLATED, tmp_path / "wise")
    got, a, b = adapter_deltas(tmp_path / "wise"), adapter_deltas(ref), adapter_deltas(end)
    assert set(got) == set(a) and any(t in name for name in got for t in targets[1:])
    for name in got:
        torch.testing.assert_close(got[name], 0.4 * a[name] + 0.6 * b[name], rtol=1e-5, atol=1e-7)
    layer = next(m for n, m in model.named_modules() if n.endswith(targets[-1]) and factors(m, INTERPOLATED) is not None)
    factors(layer, INTERPOLATED)[0].data.mul_(2)  # a wrong factor must not pass the check
    with pytest.raises(RuntimeError, match=targets[-1]):
        check_interpolation(model, "ref", "end", 0.6, INTERPOLATED)


def test_no_reference_is_a_zero_delta(tmp_path, base):
    end = _adapter(base, tmp_path / "end", 4, 8, True, seed=3)
    interpolate_adapters(base, None, end, 0.25, tmp_path / "wise")
    got, b = adapter_deltas(tmp_path / "wise"), adapter_deltas(end)
    for name in got:
        torch.testing.assert_close(got[name], 0.25 * b[name], rtol=1e-5, atol=1e-7)


def test_alora_interpolate_finds_the_largest_alpha_within_a_rise_budget(tmp_path, base):
    """`alora interpolate base END OUT --max-rise R`: ΔW_ref = 0, the largest α whose control-sample loss rise is ≤ R
    (to the bisection's 2^-6), written as ΔW = α·ΔW_end; the report sample is another sample."""
    from axolotl_alora.cli import main

    text = write_text_jsonl(tmp_path / "general.jsonl", 60, seed=4, tokenizer_dir=base, tokens=24)
    end = _adapter(base, tmp_path / "end", 4, 8, False, seed=5, std=1.0)  # a large random ΔW: the loss rises with α
    args = ["--general-eval", str(text), "--samples", "6", "--sequence-len", "16", "--seed", "1"]
    assert main(["interpolate", "base", str(end), str(tmp_path / "probe"), "--max-rise", "100", *args]) == 0  # loose: the end itself
    probe = json.loads((tmp_path / "probe" / "alora_interpolation.json").read_text())
    rise = probe["control"]["scored"]["1.0"] - probe["control"]["base"]
    assert probe["alpha"] == 1.0 and rise > 0
    assert main(["interpolate", "base", str(end), str(tmp_path / "wise"), "--max-rise", str(rise / 3), *args]) == 0
    summary = json.loads((tmp_path / "wise" / "alora_interpolation.json").read_text())
    alpha, scored = summary["alpha"], {float(k): v for k, v in summary["control"]["scored"].items()}
    assert 0 < alpha < 1 and scored[alpha] <= summary["target_loss"] == pytest.approx(summary["control"]["base"] + rise / 3)
    assert min(v for a, v in scored.items() if a > alpha) > summary["target_loss"]  # the next α scored above it broke the budget
    assert min(a for a in scored if a > alpha) - alpha <= 2**-6
    for name, d in adapter_deltas(tmp_path / "wise").items():
        torch.testing.assert_close(d, alpha * adapter_deltas(end)[name], rtol=1e-5, atol=1e-7)
    assert summary["report"]["chosen"] != scored[alpha]  # reported on the other sample


def test_alora_interpolate_refuses_bad_input(tmp_path, base, capsys):
    from axolotl_alora.cli import main

    end = _adapter(base, tmp_path / "end", 4, 8, False, seed=5)
    assert main(["interpolate", "base", str(end), str(tmp_path / "o"), "--keep", "0.8", "--general-eval", "x.jsonl"]) == 2
    assert "--keep is a share of REF's gain" in capsys.readouterr().err
    assert main(["interpolate", "base", str(end), str(tmp_path / "o"), "--max-rise", "0.1"]) == 2
    assert "need --general-eval" in capsys.readouterr().err
    assert main(["interpolate", str(tmp_path), str(end), str(tmp_path / "o"), "--alpha", "0.5"]) == 2
    assert "not a PEFT adapter folder" in capsys.readouterr().err
