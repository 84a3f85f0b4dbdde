"""What ALoRA adds to a training process's memory, from a model's config.json alone (README "Memory").

The model follows the code byte for byte: per adapted module (d_out×d_in, rank r; "factors" = r·(d_in + d_out))
and per full trainable parameter (n elements), on the device that trains, on top of plain LoRA:

general stage (recording)   persistent: ω fp32 (4·d_out·d_in) and A_0, B_0, A_t, B_t, gA, gB fp32 (4·3·factors);
                            a full parameter: ω, its gradient, θ_0, θ_t (16·n)
                            transient: a step forms g̃ and Δθ a block of rows at a time (2 blocks); the end writes Ω over
                            ω (a block of Δ, a mask) and, for bfloat16 files, converts each module (2·d_out·d_in)
domain stage (penalty)      persistent: Ω in alora_importance_dtype (4 or 2 bytes an element), the reference A^ν, B^ν
                            and the gradients handed to autograd (4·3·factors); a full parameter: Ω, θ^ν, gradient
                            transient: G = Ω⊙(U·V) a block of rows at a time (one block, two for bfloat16 Ω);
                            a full parameter's θ − θ^ν (4·n, 8·n for bfloat16 Ω)

factored form (alora_importance_form: factored): a LoRA module holds d_out + d_in floats instead of d_out·d_in
                            (general: ω's row and column sums in float32; domain: u, v in alora_importance_dtype);
                            its transients are thin factors, at most 6·factors float32 elements (general), 4·factors (domain)

Sharded across W ranks (alora_shard_importance), each rank holds its modules only (sharding.owners).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .sharding import owners

BLOCK_ELEMENTS = 1 << 22  # importance.BLOCK_ELEMENTS; kept here so that this module imports no torch

OMEGA_BYTES = {"float32": 4, "bfloat16": 2}
STORAGE = (("float32", "float32", "dense"), ("bfloat16", "bfloat16", "dense"), ("factored", "float32", "factored"))  # label, dtype, form


@dataclass(frozen=True)
class ModuleSize:
    name: str
    kind: str  # "lora" (θ-space d_out×d_in) or "full" (a trainable parameter of `shape`)
    shape: tuple[int, ...]
    r: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def factors(self) -> int:
        return self.r * sum(self.shape) if self.kind == "lora" else 0

    @property
    def block(self) -> int:
        """Elements of the largest row block the code forms for this module (importance.row_blocks)."""
        cols = self.shape[-1]
        return min(self.numel, max(1, BLOCK_ELEMENTS // cols) * cols)

    @property
    def kind_label(self) -> str:
        return self.name.rsplit(".", 1)[-1] if self.kind == "lora" else f"{self.name} (full)"


@dataclass(frozen=True)
class StageMemory:
    persistent: int  # bytes held from the start of training to its end
    transient: int  # the most held on top of that at any moment

    @property
    def peak(self) -> int:
        return self.persistent + self.transient


def general_stage(sizes: list[ModuleSize], omega_dtype: str = "float32", form: str = "dense") -> StageMemory:
    """Bytes the general stage adds per process (alora_record_importance): ω is float32 whatever the file's dtype."""
    persistent = sum(_omega_elements(m, form) * 4 + 12 * m.factors if m.kind == "lora" else 16 * m.numel for m in sizes)
    transient = max((_general_transient(m, omega_dtype, form) for m in sizes), default=0)
    return StageMemory(persistent, transient)


def _omega_elements(m: ModuleSize, form: str) -> int:
    return sum(m.shape) if form == "factored" and m.kind == "lora" else m.numel


def _general_transient(m: ModuleSize, omega_dtype: str, form: str = "dense") -> int:
    if form == "factored" and m.kind == "lora":
        return 4 * 6 * m.factors  # P, Q, U, V and two products of their size
    end_conversion = 2 * m.numel if omega_dtype == "bfloat16" else 0
    if m.kind == "lora":
        return max(8 * m.block, 5 * m.block, end_conversion)  # g̃ and Δθ blocks; at the end a Δ block and its sign mask
    return max(5 * m.numel, end_conversion)  # at the end: Δ and the mask, whole


def domain_stage(sizes: list[ModuleSize], omega_dtype: str = "float32", form: str = "dense") -> StageMemory:
    """Bytes the domain stage adds per process (alora_importance_path), Ω held in `omega_dtype`."""
    b = OMEGA_BYTES[omega_dtype]
    persistent = sum(b * _omega_elements(m, form) + 12 * m.factors if m.kind == "lora" else (b + 8) * m.numel for m in sizes)
    widen = 4 if b != 4 else 0  # a bfloat16 block is widened to float32 before it multiplies
    transient = max((_domain_transient(m, widen, form) for m in sizes), default=0)
    return StageMemory(persistent, transient)


def _domain_transient(m: ModuleSize, widen: int, form: str) -> int:
    if m.kind != "lora":
        return (4 + widen) * m.numel
    if form == "factored":
        return 4 * 4 * m.factors + widen * sum(m.shape)  # U, V, diag(u)·U, V·diag(v)
    return (4 + widen) * m.block


def rank_share(sizes: list[ModuleSize], world_size: int) -> list[ModuleSize]:
    """The modules of the rank holding the most elements when sharded across `world_size` ranks."""
    if world_size <= 1:
        return sizes
    owner = owners({m.name: m.numel for m in sizes}, world_size)
    loads = [0] * world_size
    for m in sizes:
        loads[owner[m.name]] += m.numel
    heaviest = max(range(world_size), key=lambda k: loads[k])
    return [m for m in sizes if owner[m.name] == heaviest]


# -- the modules a config adapts, from config.json on the meta device ------------------------------------------
def config_module_sizes(cfg: dict, model_config) -> list[ModuleSize]:
    """The LoRA modules and full trainable parameters `cfg` would train on the model of `model_config` (a
    transformers config, or the path of a config.json or its folder): the model is built on the meta device
    (no weights, no memory), and peft wraps it with the LoRA config Axolotl builds from `cfg`."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from .lora import adapted_modules, full_parameters

    if not hasattr(model_config, "to_dict"):
        model_config = AutoConfig.from_pretrained(str(model_config))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    model = get_peft_model(model, _lora_config(model, cfg))
    modules = adapted_modules(model)
    sizes = [ModuleSize(m.name, "lora", tuple(m.shape), m.r) for m in modules]
    return sizes + [ModuleSize(p.name, "full", tuple(p.shape)) for p in full_parameters(model, modules)]


def _lora_config(model, cfg: dict):
    from axolotl.loaders import adapter
    from axolotl.utils.dict import DictDefault

    defaults = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
    cfg = DictDefault({**defaults, **{k: v for k, v in cfg.items() if v is not None}})
    return adapter._build_peft_lora_config(model, cfg)  # Axolotl's own: lora_target_linear, modules_to_save, rsLoRA, …


# -- the table `alora check` prints ----------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    """Bytes in kB, MB, GB or TB, three significant digits."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def format_count(n: int) -> str:
    """A count in k, M or B, three significant digits."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def storage_label(cfg) -> str:
    """The row label of STORAGE that `cfg`'s alora_importance_form and alora_importance_dtype select."""
    from .args import setting

    return "factored" if setting(cfg, "alora_importance_form") == "factored" else setting(cfg, "alora_importance_dtype")


def memory_report(sizes: list[ModuleSize], world_sizes=(1, 2, 8), used: str | None = None, world: int | None = None) -> str:
    """Ω per module kind and in total, and what each stage adds per process under each storage option and sharding.
    The rows of storage `used` (a STORAGE label) are marked, only the one of `world` ranks when it is known."""
    lines = [f"{'module kind':<28}{'count':>7}{'Ω elements':>13}{'Ω float32':>12}{'Ω bfloat16':>12}"]
    kinds: dict[str, list[ModuleSize]] = {}
    for m in sizes:
        kinds.setdefault(m.kind_label, []).append(m)
    for kind, members in [*kinds.items(), ("total", sizes)]:
        n = sum(m.numel for m in members)
        lines.append(f"{kind:<28}{len(members):>7}{format_count(n):>13}{format_bytes(4 * n):>12}{format_bytes(2 * n):>12}")
    lines.append("")
    lines.append("added per process on top of plain LoRA: held through training / at its peak")
    lines.append(f"{'Ω storage':<12}{'ranks':>6}   {'general stage (ω, snapshots)':<32}{'domain stage (Ω, reference)':<32}")
    for label, dtype, form in STORAGE:
        for ranks in world_sizes:
            share = rank_share(sizes, ranks)
            g, d = general_stage(share, dtype, form), domain_stage(share, dtype, form)
            mark = "<- this config" if label == used and world in (None, ranks) else ""
            lines.append(f"{label:<12}{ranks:>6}   {format_bytes(g.persistent) + ' / ' + format_bytes(g.peak):<32}"
                         f"{format_bytes(d.persistent) + ' / ' + format_bytes(d.peak):<32}{mark}")
    lines.append("(ω is float32 in the general stage whatever alora_importance_dtype; the domain stage holds Ω in it.\n"
                 " factored: alora_importance_form: factored, beyond the paper; see README \"Memory\" for what it changes.)")
    return "\n".join(lines)
