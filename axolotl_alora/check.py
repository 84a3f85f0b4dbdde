"""`alora check CONFIG`: the plugin's checks on an Axolotl YAML without training.

Axolotl 0.19 drops unknown keys silently, so a config with alora_ keys but without the plugin in
`plugins:` trains plain LoRA with no warning; no plugin hook can see that case. This command can.
From 0.21 on, Axolotl loads every installed `axolotl.plugins` entry point (this package declares one),
so there the same config runs ALoRA; the command says so, and that the line is needed on 0.19.
"""

from __future__ import annotations

import argparse

PLUGIN = "axolotl_alora.AloraPlugin"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="an Axolotl YAML config")
    parser.add_argument("--model-config", metavar="PATH", help="config.json (or its folder) of the base model, when base_model is not a local folder")
    parser.add_argument("--ranks", default="1,2,8", help="data-parallel world sizes to show per-rank memory for (default 1,2,8)")


def installed_axolotl() -> tuple[str, tuple[int, ...]] | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("axolotl")
    except PackageNotFoundError:
        return None
    return installed, tuple(int(part) for part in installed.split(".")[:2] if part.isdigit())


def discovers_entry_points() -> bool:
    """Whether the installed Axolotl loads every installed `axolotl.plugins` entry point (0.21 on)."""
    found = installed_axolotl()
    return found is not None and found[1] >= (0, 21)


def lists_plugin(cfg: dict) -> bool:
    return any(str(name).replace(":", ".") == PLUGIN for name in cfg.get("plugins") or [])


def check_config(cfg: dict, discovers: bool | None = None) -> list[str]:
    """Human-readable problems with `cfg`'s ALoRA settings; empty when it is fine (or uses no alora_ key).
    `discovers`: whether Axolotl finds the plugin through its entry point (default: what the installed one does)."""
    from .args import check_alora_settings
    from .importance_file import ImportanceFileError, read_importance_file

    given = {k: v for k, v in cfg.items() if k.startswith("alora_") and v is not None}
    if not given:
        return []
    problems = []
    if not lists_plugin(cfg) and not (discovers_entry_points() if discovers is None else discovers):
        problems.append(
            f"alora_ keys {sorted(given)} are set but `plugins:` does not list {PLUGIN}: Axolotl would drop them silently "
            "and train plain LoRA. Add it under `plugins:`."
        )
    try:
        check_alora_settings(cfg, given)
    except ValueError as e:
        problems.append(str(e))
    if given.get("alora_importance_path"):
        try:
            read_importance_file(given["alora_importance_path"])
        except ImportanceFileError as e:
            problems.append(str(e))
    if isinstance(given.get("alora_general_eval"), str):
        from .general_eval import GeneralEvalError, read_documents

        try:
            read_documents(given["alora_general_eval"])
        except GeneralEvalError as e:
            problems.append(str(e))
    return problems


def axolotl_behaviour() -> str:
    """The installed Axolotl's version and what it does with plugin keys and plugins."""
    found = installed_axolotl()
    if found is None:
        return "Axolotl is not installed here"
    installed, major_minor = found
    if major_minor < (0, 21):
        return (f"Axolotl {installed}: loads only the plugins listed under `plugins:` (an import failure is only logged) "
                "and drops keys no listed plugin declares, so alora_ keys without the plugin train plain LoRA")
    return (f"Axolotl {installed}: loads every installed `axolotl.plugins` entry point (this package's included) on every "
            "run and `plugins:` entries with required=True; alora_ keys are validated whenever the package is installed")


def run(args) -> int:
    import yaml

    print(axolotl_behaviour())
    with open(args.config) as f:
        cfg = yaml.safe_load(f) or {}
    problems = check_config(cfg)
    for p in problems:
        print(f"error: {p}")
    uses_alora = any(k.startswith("alora_") and v is not None for k, v in cfg.items())
    if not problems and uses_alora and not lists_plugin(cfg):
        print(f"note: `plugins:` does not list {PLUGIN}; this Axolotl finds it through its entry point, Axolotl 0.19 would "
              "drop the alora_ keys. List it to run on both.")
    if not problems:
        print(f"{args.config}: ALoRA settings OK" if uses_alora else f"{args.config}: no alora_ keys (plain Axolotl run)")
    if uses_alora and cfg.get("adapter") in ("lora", "qlora"):
        print_memory(cfg, args.model_config, [int(k) for k in str(args.ranks).split(",") if k.strip()])
    return 1 if problems else 0


def print_memory(cfg: dict, model_config: str | None, ranks: list[int]) -> None:
    """The memory table (README "Memory") for the config's model and targets, from config.json alone."""
    from .memory import config_module_sizes, memory_report

    source = model_config or cfg.get("base_model_config") or cfg.get("base_model")
    try:
        sizes = config_module_sizes(cfg, source)
    except Exception as e:  # no config.json here (a hub id without a local cache), or an architecture transformers lacks
        print(f"memory: cannot build {source!r} from its config.json here ({type(e).__name__}: {e}); pass --model-config PATH")
        return
    lora = [m for m in sizes if m.kind == "lora"]
    print(f"\nmemory: {len(lora)} LoRA modules (r={lora[0].r if lora else '-'}) and {len(sizes) - len(lora)} full parameters of {source} "
          "(from config.json, no weights)")
    print(memory_report(sizes, ranks))
