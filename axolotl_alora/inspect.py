"""`alora inspect FILE`: metadata, per-module ‖Ω_l‖_F and layer weights under every weighting, heatmap (Figure 7)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

WEIGHTINGS = (("softmax τ=1", "softmax", 1.0), ("softmax τ=auto", "softmax", "auto"), ("uniform", "uniform", 1.0), ("none", "none", 1.0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="an importance file (alora_importance.safetensors)")
    parser.add_argument("--plot", metavar="PNG", help="write a heatmap of log10 ‖Ω_l‖_F, layers × module type")


def run(args) -> int:

    import torch

    from .importance_file import read_importance_file
    from .regularizer import effective_layers, layer_weights, uniform_softmax_note

    data = read_importance_file(args.file)
    meta = data.metadata
    print(f"importance file  {args.file}")
    rescaled = data.format_version == 1 and meta.get("source", "si") == "si"
    version_note = " (written without g̃'s outer s: Ω shown multiplied by each module's scaling)" if rescaled else ""
    print(f"  {'format_version':<17}{data.format_version}{version_note}")
    for key in ("source", "base_model", "stages", "steps", "skipped_steps", "tokens", "xi", "clamped_fraction", "omega_dtype", "created_by", "created_at"):
        if key in meta:
            print(f"  {key:<17}{meta[key]}")
    names = data.module_names
    norms = torch.tensor([data.norms[n] for n in names], dtype=torch.float64)
    weights = {label: layer_weights(norms, mode, tau) for label, mode, tau in WEIGHTINGS}
    print(f"\n{'module':<44}{'shape':>12}{'‖Ω‖_F':>12}{'mean Ω':>11}" + "".join(f"{label:>16}" for label, _, _ in WEIGHTINGS))
    for i, name in enumerate(names):
        shape = "×".join(map(str, data.omega[name].shape))
        mean = data.sums[name] / data.omega[name].numel()
        row = "".join(f"{float(w[i]):>16.4g}" for w in weights.values())
        print(f"{name:<44}{shape:>12}{float(norms[i]):>12.4g}{mean:>11.3g}{row}")
    print(f"\neffective number of layers (of {len(names)}): " + ", ".join(f"{label} {effective_layers(w):.2f}" for label, w in weights.items()))
    note = uniform_softmax_note(weights["softmax τ=1"], "softmax", 1.0)
    if note:
        print(f"note: {note}")
    if args.plot:
        plot_heatmap(names, norms.tolist(), args.plot)
        print(f"heatmap written to {args.plot}")
    return 0


def layer_and_type(name: str) -> tuple[int, str]:
    """(layer index, module type) from a peft module path like model.layers.7.self_attn.v_proj."""
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return (int(match.group(1)) if match else -1), name.rsplit(".", 1)[-1]


def plot_heatmap(names: list[str], norms: list[float], path: str | Path) -> None:
    """Log-scaled ‖Ω_l‖_F: rows = module type, columns = layer, like the paper's Figure 7."""
    import math

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
