"""Finding the adapted modules of a peft model: their LoRA factors A, B and the scaling s peft applies."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_PREFIXES = ("module.", "base_model.model.")  # DDP wrapper, then peft's PeftModel/LoraModel nesting
FINGERPRINT_SIZE = 4096


@dataclass
class LoraModule:
    name: str  # peft module path without wrapper prefixes, e.g. model.layers.0.self_attn.v_proj
    A: nn.Parameter  # r×d_in
    B: nn.Parameter  # d_out×r
    scaling: float  # s: lora_alpha/r, or lora_alpha/√r with rsLoRA
    r: int
    alpha: float
    use_rslora: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])


def module_name(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def adapted_modules(model: nn.Module) -> list[LoraModule]:
    """Every LoRA-wrapped linear layer of `model` for its active adapter, in model order."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapter = module.active_adapters[0]
        if adapter not in module.lora_A:
            continue  # e.g. an embedding-only LoRA layer of another adapter
        lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
        if not (isinstance(lora_A, nn.Linear) and isinstance(lora_B, nn.Linear)):
            raise ValueError(f"ALoRA supports LoRA on linear layers only; {name} is {type(lora_A).__name__}. Remove it from lora_target_modules.")
        if module.use_dora.get(adapter, False):
            raise ValueError("ALoRA's effective weight θ = W0 + s·B·A does not hold for DoRA; set peft_use_dora: false.")
        found.append(
            LoraModule(
                name=module_name(name),
                A=lora_A.weight,
                B=lora_B.weight,
                scaling=float(module.scaling[adapter]),
                r=int(module.r[adapter]),
                alpha=float(module.lora_alpha[adapter]),
                use_rslora=bool(getattr(module, "use_rslora", {}).get(adapter, False)),
            )
        )
    if not found:
        raise ValueError("ALoRA found no LoRA modules in the model; set `adapter: lora` and lora_target_modules.")
    return found


def base_fingerprint(model: nn.Module) -> torch.Tensor:
    """A slice of the input embedding matrix: identifies the base model across dtypes and paths."""
    weight = model.get_input_embeddings().weight
    return weight.detach().reshape(-1)[:FINGERPRINT_SIZE].float().cpu()


def same_base_model(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0)) > 0.99
