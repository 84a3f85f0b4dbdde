"""WiSE-FT between two LoRA adapters: ΔW(α) = (1 − α)·ΔW_ref + α·ΔW_end, exact as one PEFT adapter.

peft's `add_weighted_adapter(combination_type="cat")` stacks the factors: A = [w_ref·s_ref·A_ref; w_end·s_end·A_end],
B = [B_ref, B_end], rank r_ref + r_end, with the new adapter's scaling meant to be 1 (lora_alpha = r). It copies
the first adapter's config, rsLoRA flag included, which would make that scaling √r; `add_interpolation` clears the
flag first. A missing reference (no general stage) is ΔW_ref = 0. Used by `alora interpolate` and the harness.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

INTERPOLATED = "alora_interpolated"


def add_interpolation(model, ref: str | None, end: str, alpha: float, name: str = INTERPOLATED) -> str:
    """Add adapter `name` = (1 − α)·`ref` + α·`end` to a PeftModel holding both (ref None: ΔW_ref = 0) and make it
    active; checks every module's ΔW against the formula."""
    adapters, weights = ([ref, end], [1 - alpha, alpha]) if ref is not None else ([end], [alpha])
    first = model.peft_config[adapters[0]]
    model.peft_config[adapters[0]] = dataclasses.replace(first, use_rslora=False)  # the new adapter's scaling must be 1
    try:
        model.add_weighted_adapter(adapters, weights, name, combination_type="cat")
    finally:
        model.peft_config[adapters[0]] = first
    check_interpolation(model, ref, end, alpha, name)
    model.set_adapter(name)
    return name


def delta(layer, name: str) -> torch.Tensor:
    """s·B·A of adapter `name` in one LoRA layer, in float64."""
    return layer.scaling[name] * layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double()


@torch.no_grad()
def check_interpolation(model, ref: str | None, end: str, alpha: float, name: str) -> None:
    for module_name, layer in model.named_modules():
        if not hasattr(layer, "lora_A") or name not in layer.lora_A:
            continue
        expected = alpha * delta(layer, end) + ((1 - alpha) * delta(layer, ref) if ref is not None else 0)
        got = delta(layer, name)
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-7 * max(1.0, float(expected.abs().max()))):
            raise RuntimeError(f"ALoRA: the interpolated adapter differs from (1 − α)·ΔW_ref + α·ΔW_end in {module_name}")


def interpolate_adapters(base: str | Path, ref: str | Path | None, end: str | Path, alpha: float, out: str | Path) -> Path:
    """Write ΔW(α) between the adapter folders `ref` (None: the base model, ΔW = 0) and `end` to `out` as one PEFT
    adapter that plain peft and Axolotl's `lora_model_dir` load; atomically (a temp folder, then a rename)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(end), adapter_name="end")
    if ref is not None:
        model.load_adapter(str(ref), adapter_name="ref")
    add_interpolation(model, "ref" if ref is not None else None, "end", alpha)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=[INTERPOLATED])
    saved = tmp / INTERPOLATED if (tmp / INTERPOLATED).is_dir() else tmp
    shutil.rmtree(out, ignore_errors=True)
    saved.replace(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out
