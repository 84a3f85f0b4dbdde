"""WiSE-FT between adapters (axolotl_alora/interpolate.py) against ΔW computed from the saved files alone."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from axolotl_alora.interpolate import interpolate_adapters

from tiny import build_tiny_llama


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("interpolate") / "model")


def _adapter(base: Path, out: Path, r: int, alpha: float, rslora: bool, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], use_rslora=rslora))
    for name, p in model.named_parameters():  # peft starts B at 0; a trained adapter has B ≠ 0
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(str(out))
    return out


def _deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """s·B·A per module, from the saved files and adapter_config.json alone (s = α/r, or α/√r with rsLoRA)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return {k.replace(".lora_A.weight", ""): s * tensors[k.replace("lora_A", "lora_B")].double() @ tensors[k].double()
            for k in tensors if k.endswith("lora_A.weight")}


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
    got, a, b = _deltas(tmp_path / "wise"), _deltas(ref), _deltas(end)
    assert set(got) == set(a) == set(b) and len(got) == 4
    for name in got:
        torch.testing.assert_close(got[name], (1 - alpha) * a[name] + alpha * b[name], rtol=1e-5, atol=1e-7)
    assert json.loads((tmp_path / "wise" / "adapter_config.json").read_text())["r"] == ref_r + end_r
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(tmp_path / "wise"))


def test_no_reference_is_a_zero_delta(tmp_path, base):
    end = _adapter(base, tmp_path / "end", 4, 8, True, seed=3)
    interpolate_adapters(base, None, end, 0.25, tmp_path / "wise")
    got, b = _deltas(tmp_path / "wise"), _deltas(end)
    for name in got:
        torch.testing.assert_close(got[name], 0.25 * b[name], rtol=1e-5, atol=1e-7)
