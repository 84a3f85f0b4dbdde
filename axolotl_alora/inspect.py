"""`alora inspect FILE`: metadata, per-module ‖Ω_l‖_F and layer weights under every weighting, a summary per
module kind, heatmap (Figure 7).

Norms and shapes come from the file's metadata; a module whose metadata lacks its ΣΩ (for the mean) has its
Ω read alone and dropped, so the command holds one module's Ω at most, whatever the file's size.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

WEIGHTINGS = (("softmax τ=1", "softmax", 1.0), ("softmax τ=auto", "softmax", "auto"), ("uniform", "uniform", 1.0), ("none", "none", 1.0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="an importance file (alora_importance.safetensors)")
    parser.add_argument("--top", type=_positive, metavar="N", help="list only the N modules with the largest ‖Ω_l‖_F (the summary per kind covers all)")
    parser.add_argument("--plot", metavar="PNG", help="write a heatmap of log10 ‖Ω_l‖_F, layers × module type")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--top takes a whole number of modules >= 1, got {text!r}")
    return int(text)


@dataclass
class ModuleStats:
    name: str
    kind: str  # "lora", "factored" or "full" (importance_file.SUFFIXES)
    shape: tuple[int, ...]
    norm: float  # ‖Ω_l‖_F
    total: float  # ΣΩ_l

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def kind_label(self) -> str:
        """What the summary groups by: the module's type (q_proj, down_proj, …); a full parameter is its own."""
        return f"{self.name} (full)" if self.kind == "full" else layer_and_type(self.name)[1]


def read_stats(path) -> tuple[dict, int, list[ModuleStats]]:
    """(metadata, format version, each module's stats) of an importance file, Ω read only where the metadata lacks its stats.
    Version-1 SI files' Ω is shown multiplied by each module's scaling, as the plugin reads it."""
    from .importance_file import _open_metadata, module_kind

    meta, sources = _open_metadata(path)
    version = meta.pop("format_version")
    rescale = version == 1 and meta.get("source", "si") == "si"
    stats = []
    for name, entry in meta["modules"].items():
        kind = module_kind(entry)
        if all(key in entry for key in ("shape", "norm", "sum")):
            shape, norm, total = tuple(entry["shape"]), float(entry["norm"]), float(entry["sum"])
        else:
            shape, norm, total = _stats_from_tensors(sources, name, kind)
        scale = float(entry.get("scaling", 1.0)) if rescale else 1.0
        stats.append(ModuleStats(name, kind, shape, norm * scale, total * scale))
    return meta, version, stats


def _stats_from_tensors(sources: dict, name: str, kind: str) -> tuple[tuple[int, ...], float, float]:
    """(shape, ‖Ω‖_F, ΣΩ) of one module from its tensors, each file opened for this module only (its pages unmapped after)."""
    from safetensors import safe_open

    from .factored import FactoredOmega
    from .importance_file import omega_stats

    parts = []
    for key in (f"{name}.omega_u", f"{name}.omega_v") if kind == "factored" else (f"{name}.omega",):
        with safe_open(str(sources[key]), framework="pt") as f:
            parts.append(f.get_tensor(key).float())
    omega = FactoredOmega(*parts) if kind == "factored" else parts[0]
    return tuple(omega.shape), *omega_stats(omega)


def run(args) -> int:
    import torch

    from .cli import quiet_third_party
    from .regularizer import effective_layers, layer_weights, uniform_softmax_note

    quiet_third_party()
    meta, version, stats = read_stats(args.file)
    print(f"importance file  {args.file}")
    rescaled = version == 1 and meta.get("source", "si") == "si"
    version_note = " (written without g̃'s outer s: Ω shown multiplied by each module's scaling)" if rescaled else ""
    print(f"  {'format_version':<17}{version}{version_note}")
    for key in ("source", "base_model", "stages", "steps", "skipped_steps", "tokens", "xi", "clamped_fraction", "omega_dtype", "created_by", "created_at"):
        if key in meta:
            print(f"  {key:<17}{meta[key]}")
    norms = torch.tensor([m.norm for m in stats], dtype=torch.float64)
    weights = {label: layer_weights(norms, mode, tau).tolist() for label, mode, tau in WEIGHTINGS}
    varying = {label: w for label, w in weights.items() if not _constant(w)}
    print_modules(stats, varying, args.top)
    constant = [f"{label} {w[0]:.4g}" for label, w in weights.items() if label not in varying]
    if constant:
        print(f"layer weights equal for every module: {', '.join(constant)}")
    print_kinds(stats, varying)
    tensors = {label: torch.tensor(w) for label, w in weights.items()}
    print(f"\neffective number of layers (of {len(stats)}): " + ", ".join(f"{label} {effective_layers(w):.2f}" for label, w in tensors.items()))
    note = uniform_softmax_note(tensors["softmax τ=1"], "softmax", 1.0)
    if note:
        print(f"note: {note}")
    if args.plot:
        plot_heatmap([m.name for m in stats], norms.tolist(), args.plot)
        print(f"heatmap written to {args.plot}")
    return 0


def _constant(values: list[float]) -> bool:
    return max(values) - min(values) <= 1e-12 * max(abs(v) for v in values)


def print_modules(stats: list[ModuleStats], weights: dict[str, list[float]], top: int | None) -> None:
    """One row per module (file order), or the `top` modules with the largest ‖Ω_l‖_F (largest first)."""
    rows = list(range(len(stats)))
    if top is not None:
        rows = sorted(rows, key=lambda i: -stats[i].norm)[:top]
        print(f"\nthe {len(rows)} modules of {len(stats)} with the largest ‖Ω_l‖_F")
    print(f"\n{'module':<44}{'shape':>12}{'‖Ω‖_F':>12}{'mean Ω':>11}" + "".join(f"{label:>16}" for label in weights))
    for i in rows:
        m = stats[i]
        cells = "".join(f"{w[i]:>16.4g}" for w in weights.values())
        print(f"{m.name:<44}{'×'.join(map(str, m.shape)):>12}{m.norm:>12.4g}{m.total / m.numel:>11.3g}{cells}")


def print_kinds(stats: list[ModuleStats], weights: dict[str, list[float]]) -> None:
    """Per module kind: count, Ω's elements, ‖Ω‖_F of the kind's Ω together and per module on average, mean layer weights."""
    from .memory import format_count

    kinds: dict[str, list[int]] = {}
    for i, m in enumerate(stats):
        kinds.setdefault(m.kind_label, []).append(i)
    print(f"\n{'module kind':<28}{'count':>7}{'Ω elements':>13}{'‖Ω‖_F':>12}{'mean ‖Ω_l‖_F':>14}{'mean Ω':>11}"
          + "".join(f"{'mean ' + label:>21}" for label in weights))
    for kind, members in kinds.items():
        elements = sum(stats[i].numel for i in members)
        norm = math.sqrt(sum(stats[i].norm ** 2 for i in members))
        mean_norm = sum(stats[i].norm for i in members) / len(members)
        mean = sum(stats[i].total for i in members) / elements
        cells = "".join(f"{sum(w[i] for i in members) / len(members):>21.4g}" for w in weights.values())
        print(f"{kind:<28}{len(members):>7}{format_count(elements):>13}{norm:>12.4g}{mean_norm:>14.4g}{mean:>11.3g}{cells}")


def layer_and_type(name: str) -> tuple[int, str]:
    """(layer index, module type) from a peft module path like model.layers.7.self_attn.v_proj."""
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return (int(match.group(1)) if match else -1), name.rsplit(".", 1)[-1]


def plot_heatmap(names: list[str], norms: list[float], path: str | Path) -> None:
    """Log-scaled ‖Ω_l‖_F: rows = module type, columns = layer, like the paper's Figure 7."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {layer_and_type(n): v for n, v in zip(names, norms)}
    layers = sorted({layer for layer, _ in cells})
    types = sorted({kind for _, kind in cells})
    grid = [[math.log10(cells[(layer, kind)]) if cells.get((layer, kind), 0) > 0 else float("nan") for layer in layers] for kind in types]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 2), 0.6 * len(types) + 1.6))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_yticks(range(len(types)), types)
    ax.set_xlabel("layer")
    ax.set_title("log10 ‖Ω_l‖_F (importance per adapted module)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(str(path), dpi=150)
    plt.close(fig)
