"""The README's memory table: what ALoRA adds per process for models given by their config.json (no weights).

    python -m alora_bench.memory_table \
        "Llama-3.2-3B q/v=tests/fixtures/model_configs/llama-3.2-3b:q_proj,v_proj" \
        "Llama-3.1-8B all-linear=tests/fixtures/model_configs/llama-3.1-8b:linear" \
        "Llama-3-70B all-linear=tests/fixtures/model_configs/llama-3-70b:linear" --rank 16 --ranks 1 8

Each argument is LABEL=CONFIG:TARGETS, TARGETS a comma list of module names or `linear` (lora_target_linear).
The figures are the plugin's memory model (axolotl_alora.memory, the one `alora check` prints), which
tests/test_memory.py checks against the measured peak of real runs.
"""

from __future__ import annotations

import argparse

from axolotl_alora.memory import STORAGE, _count, _size, config_module_sizes, domain_stage, general_stage, rank_share


def row(label: str, spec: str, rank: int, ranks: list[int]) -> list[str]:
    path, targets = spec.rsplit(":", 1)
    cfg = {"lora_r": rank, **({"lora_target_linear": True} if targets == "linear" else {"lora_target_modules": targets.split(",")})}
    sizes = config_module_sizes(cfg, path)
    n = sum(m.numel for m in sizes)
    cells = []
    for name, dtype, form in STORAGE:
        for world in ranks:
            share = rank_share(sizes, world)
            g, d = general_stage(share, dtype, form), domain_stage(share, dtype, form)
            cells.append(f"{_size(g.peak)} / {_size(d.peak)}")
    return [f"| {label} | {_count(n)} | {_size(4 * n)} | " + " | ".join(cells) + " |"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="LABEL=CONFIG:TARGETS")
    parser.add_argument("--rank", type=int, default=16, help="LoRA r")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8], help="data-parallel world sizes")
    args = parser.parse_args(argv)
    heads = [f"{label}, {world} rank{'s' if world > 1 else ''}" for label, _, _ in STORAGE for world in args.ranks]
    print("| model, targets | Ω elements | Ω float32 | " + " | ".join(heads) + " |")
    print("|---|---:|---:|" + "---:|" * len(heads))
    for model in args.models:
        label, spec = model.split("=", 1)
        print("\n".join(row(label, spec, args.rank, args.ranks)))
    print(f"\nEach cell: peak added per process on top of plain LoRA, general stage / domain stage (LoRA r {args.rank}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
