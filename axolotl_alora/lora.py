"""Finding what a peft model trains: LoRA modules (factors A, B and the scaling s peft applies) and every
other trainable parameter (full parameters: `lora_modules_to_save` copies, LoRA biases, trainable tokens)."""

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
    layer: str = "linear"  # or "embedding": peft's ΔW = s·(B·A)ᵀ, so θ-space here is the transposed table

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])


def module_name(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def adapted_modules(model: nn.Module) -> list[LoraModule]:
    """Every LoRA module of `model` (linear and embedding layers) for its active adapter, in model order.

    An embedding LoRA has A = lora_embedding_A (r×vocab) and B = lora_embedding_B (dim×r), and changes the
    table by s·(B·A)ᵀ: in the transposed space it is exactly a linear LoRA with d_out = dim, d_in = vocab.
    """
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapter = module.active_adapters[0]
        if adapter in module.lora_A:
            lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
            if not (isinstance(lora_A, nn.Linear) and isinstance(lora_B, nn.Linear)):
                raise ValueError(f"ALoRA supports LoRA on linear and embedding layers; {name} is {type(lora_A).__name__}. Remove it from lora_target_modules.")
            A, B, layer = lora_A.weight, lora_B.weight, "linear"
        elif adapter in module.lora_embedding_A:
            A, B, layer = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter], "embedding"
        else:
            continue
        if module.use_dora.get(adapter, False):
            raise ValueError("ALoRA's effective weight θ = W0 + s·B·A does not hold for DoRA; set peft_use_dora: false.")
        found.append(
            LoraModule(
                name=module_name(name),
                A=A,
                B=B,
                scaling=float(module.scaling[adapter]),
                r=int(module.r[adapter]),
                alpha=float(module.lora_alpha[adapter]),
                use_rslora=bool(getattr(module, "use_rslora", {}).get(adapter, False)),
                layer=layer,
            )
        )
    if not found:
        raise ValueError("ALoRA found no LoRA modules in the model; set `adapter: lora` and lora_target_modules.")
    return found


@dataclass
class FullParameter:
    """A trainable parameter outside LoRA's factors, regularized element-wise in its own space."""

    name: str  # parameter path without wrapper prefixes, e.g. lm_head.modules_to_save.default.weight
    param: nn.Parameter

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


def full_parameters(model: nn.Module, modules: list[LoraModule]) -> list[FullParameter]:
    """Every trainable parameter of `model` that is not a LoRA factor of `modules`."""
    factors = {id(p) for m in modules for p in (m.A, m.B)}
    return [FullParameter(module_name(n), p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in factors]


def base_fingerprint(model: nn.Module) -> torch.Tensor:
    """A slice of the input embedding matrix: identifies the base model across dtypes and paths."""
    weight = model.get_input_embeddings().weight
    return weight.detach().reshape(-1)[:FINGERPRINT_SIZE].float().cpu()


def same_base_model(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to storage precision (bf16 rounds by < 0.4%): ‖a − b‖ ≤ 5% of the larger norm. Two all-zero
    slices (a model whose first embedding rows are zero) count as the same; they carry no identity."""
    if a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    scale = max(float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b)))
    return float(torch.linalg.vector_norm(a - b)) <= 0.05 * scale
