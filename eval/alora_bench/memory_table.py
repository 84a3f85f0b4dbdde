"""The README's memory table: what ALoRA adds per process for models given by their config.json (no weights).

    python -m alora_bench.memory_table \
        "Llama-3.2-3B q/v=examples/model-configs/llama-3.2-3b:q_proj,v_proj" \
        "Llama-3.1-8B all-linear=examples/model-configs/llama-3.1-8b:linear" \
        "Llama-3-70B all-linear=examples/model-configs/llama-3-70b:linear" --rank 16 --ranks 1 8

Each argument is LABEL=CONFIG:TARGETS, TARGETS a comma list of module names or `linear` (lora_target_linear).
The figures are the plugin's memory model (axolotl_alora.memory, the one `alora check` prints), which
tests/test_memory.py checks against the measured peak of real runs.
"""

from __future__ import annotations

import argparse

from axolotl_alora.memory import STORAGE, config_module_sizes, domain_stage, format_bytes, format_count, general_stage, rank_share


def peaks(spec: str, rank: int, ranks: list[int]) -> tuple[int, dict]:
    """Ω's elements, and {(option, world size): (general peak, domain peak)} in bytes."""
    path, targets = spec.rsplit(":", 1)
    cfg = {"lora_r": rank, **({"lora_target_linear": True} if targets == "linear" else {"lora_target_modules": targets.split(",")})}
    sizes = config_module_sizes(cfg, path)
    out = {}
    for name, dtype, form in STORAGE:
        for world in ranks:
            share = rank_share(sizes, world)
            out[(name, world)] = (general_stage(share, dtype, form).peak, domain_stage(share, dtype, form).peak)
    return sum(m.numel for m in sizes), out


def row(label: str, n: int, figures: dict) -> str:
    cells = [f"{format_bytes(g)} / {format_bytes(d)}" for g, d in figures.values()]
    return f"| {label} | {format_count(n)} | {format_bytes(4 * n)} | " + " | ".join(cells) + " |"


def plot(models: dict[str, dict], path: str) -> None:
    """Domain-stage peak per process for each option and world size, log scale, one group of bars per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    options = list(next(iter(models.values())))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(options)
    for i, option in enumerate(options):
        ax.bar([k + i * width for k in range(len(models))], [figs[option][1] / 1e9 for figs in models.values()], width,
               label=f"{option[0]}, {option[1]} rank{'s' if option[1] > 1 else ''}")
    ax.set_yscale("log")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(models))], list(models))
    ax.set_ylabel("GB added per process (domain stage peak)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("ALoRA's memory on top of plain LoRA, by option (memory model)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="LABEL=CONFIG:TARGETS")
    parser.add_argument("--rank", type=int, default=16, help="LoRA r")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8], help="data-parallel world sizes")
    parser.add_argument("--plot", metavar="PNG", help="also draw the domain-stage peaks")
    args = parser.parse_args(argv)
    heads = [f"{label}, {world} rank{'s' if world > 1 else ''}" for label, _, _ in STORAGE for world in args.ranks]
    print("| model, targets | Ω elements | Ω float32 | " + " | ".join(heads) + " |")
    print("|---|---:|---:|" + "---:|" * len(heads))
    models = {}
    for model in args.models:
        label, spec = model.split("=", 1)
        n, figures = peaks(spec, args.rank, args.ranks)
        models[label] = figures
        print(row(label, n, figures))
    if args.plot:
        plot(models, args.plot)
    print(f"\nEach cell: peak added per process on top of plain LoRA, general stage / domain stage (LoRA r {args.rank}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
