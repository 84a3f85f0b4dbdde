"""`alora check CONFIG`: the plugin's checks on an Axolotl YAML without training.

Axolotl 0.19 drops unknown keys silently, so a config with alora_ keys but without the plugin in
`plugins:` trains plain LoRA with no warning; no plugin hook can see that case. This command can.
From 0.21 on, Axolotl loads every installed `axolotl.plugins` entry point (this package declares one),
so there the same config runs ALoRA; the command says so, and that the line is needed on 0.19.

Every problem is reported in one run. An error must be fixed before training; a note names what must
happen first (an importance file or a general text that an earlier step writes): `--strict` makes notes
errors. The importance file is read for its metadata only, whatever its size.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

PLUGIN = "axolotl_alora.AloraPlugin"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="an Axolotl YAML config")
    parser.add_argument("--model-config", metavar="PATH", help="config.json (or its folder) of the base model, when base_model is not a local folder")
    parser.add_argument("--ranks", default="1,2,8", help="data-parallel world sizes to show per-rank memory for (default 1,2,8)")
    parser.add_argument("--strict", action="store_true", help="treat notes (files an earlier step writes are missing) as errors")


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


def load_config(path: str) -> dict:
    """The YAML at `path` as a dict; a ValueError of one line when it is not valid YAML or not a mapping."""
    import yaml

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ValueError(f"{path} is not valid YAML: {where}{getattr(e, 'problem', None) or e}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not an Axolotl config: its top level is a {type(cfg).__name__}, not a mapping of keys.")
    return cfg


def check_config(cfg: dict, discovers: bool | None = None) -> tuple[list[str], list[str]]:
    """(errors, notes) for `cfg`'s ALoRA settings, each a human-readable line; both empty when it is fine (or uses
    no alora_ key). Notes name files an earlier step writes that do not exist yet.
    `discovers`: whether Axolotl finds the plugin through its entry point (default: what the installed one does)."""
    from .args import alora_problems, keys_in_use

    errors, notes = alora_problems(cfg), []
    given = keys_in_use(cfg)
    if not given:
        return errors, notes
    if not lists_plugin(cfg):
        if discovers_entry_points() if discovers is None else discovers:
            notes.append(f"`plugins:` does not list {PLUGIN}; this Axolotl finds it through its entry point, Axolotl 0.19 would "
                         "drop the alora_ keys. List it to run on both.")
        else:
            errors.insert(0, f"alora_ keys {sorted(given)} are set but `plugins:` does not list {PLUGIN}: Axolotl would drop them "
                             "silently and train plain LoRA. Add it under `plugins:`.")
    for finding in (importance_file_finding(cfg, given.get("alora_importance_path")), general_text_finding(given.get("alora_general_eval"))):
        if finding:
            (errors if finding[0] == "error" else notes).append(finding[1])
    return errors, notes


def budget_line(cfg) -> str | None:
    """What the forgetting budget will do, the mechanism's default resolved; None without a budget."""
    from .forgetting_budget import BudgetSpec

    spec = BudgetSpec.from_cfg(cfg)
    if spec is None:
        return None
    how = {"phi": "φ steered from alora_phi", "interpolation": "the largest α toward ν after training",
           "both": "φ steered from alora_phi, then the largest α toward ν"}[spec.mechanism]
    default = "" if cfg.get("alora_budget_by") else " (the default for this config)"
    return f"forgetting budget: {spec.describe()}, by {spec.mechanism}{default}: {how}"


def importance_file_finding(cfg: dict, path) -> tuple[str, str] | None:
    """("error" | "note", message) about the importance file at `path`, from its metadata alone; None when it is fine."""
    from .hub import is_hub_reference
    from .importance_file import ImportanceFileError, index_path, nonfinite_modules, read_metadata

    if not path:
        return None
    if is_hub_reference(path):
        path = cached_hub_file(path)
        if isinstance(path, tuple):
            return path
    elif not Path(path).is_file() and not index_path(path).is_file():
        return "note", not_written_yet(cfg, path)
    try:
        bad = nonfinite_modules(read_metadata(path))
    except ImportanceFileError as e:
        return "error", str(e)
    if bad:
        return "error", (f"{path}: Ω has NaN/Inf values in {len(bad)} module(s), e.g. {bad[0]}; the general stage diverged. "
                         "Re-run it (lower learning_rate, or max_grad_norm).")
    return None


def cached_hub_file(spec: str) -> str | tuple[str, str]:
    """The local path of a Hub reference's file when the Hugging Face cache holds it, else a finding (the check never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    from .hub import parse_hub_reference
    from .importance_file import ImportanceFileError

    try:
        repo_id, revision, filename = parse_hub_reference(spec)
    except ImportanceFileError as e:
        return "error", str(e)
    cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    if isinstance(cached, str):
        return cached
    return "note", f"alora_importance_path {spec}: not in the local Hugging Face cache; training downloads it (the Hub must be reachable then)."


def from_fisher(cfg: dict, path) -> bool:
    """Whether the importance file is the EWC baseline's, which `alora fisher` writes: named so, or read without layer weights."""
    from .args import setting

    return "fisher" in Path(path).name.lower() or setting(cfg, "alora_layer_weighting") == "none"


def not_written_yet(cfg: dict, path) -> str:
    if from_fisher(cfg, path):
        return (f"importance file {path} does not exist yet; `alora fisher` writes it (run it first: alora fisher --base "
                f"{cfg.get('base_model') or '<base model>'} --data <general text> --out {path}).")
    from .args import IMPORTANCE_FILENAME

    where = f" and output_dir: {Path(path).parent}" if Path(path).name == IMPORTANCE_FILENAME else ", then point alora_importance_path at its file"
    return (f"importance file {path} does not exist yet; the general stage writes it (run it first: axolotl train on a config "
            f"with alora_record_importance: true{where}).")


def general_text_finding(spec) -> tuple[str, str] | None:
    """("error" | "note", message) about alora_general_eval when it names a file; None when it is fine (or a dataset entry)."""
    if not isinstance(spec, str):
        return None
    if not Path(spec).is_file():
        return "note", f"alora_general_eval: {spec} does not exist yet; write it before training (a .txt file, or a .jsonl with a `text` field)."
    from .general_eval import GeneralEvalError, read_documents

    try:
        read_documents(spec)
    except GeneralEvalError as e:
        return "error", str(e)
    return None


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
    from .args import keys_in_use
    from .cli import quiet_third_party

    quiet_third_party()
    cfg = load_config(args.config)
    print(axolotl_behaviour())
    errors, notes = check_config(cfg)
    if args.strict:
        errors, notes = errors + notes, []
    for line in errors:
        print(f"error: {line}")
    for line in notes:
        print(f"note: {line}")
    in_use = bool(keys_in_use(cfg))
    if not errors:
        print(f"{args.config}: ALoRA settings OK" if in_use else f"{args.config}: no alora_ keys in use (plain Axolotl run)")
        budget = budget_line(cfg) if in_use else None
        if budget:
            print(budget)
    if in_use and cfg.get("adapter") in ("lora", "qlora"):
        print_memory(cfg, args.model_config, [int(k) for k in str(args.ranks).split(",") if k.strip()])
    return 1 if errors else 0


def print_memory(cfg: dict, model_config: str | None, ranks: list[int]) -> None:
    """The memory table (README "Memory") for the config's model and targets, from config.json alone; the rows of the
    config's Ω storage are marked (only that of its world size when WORLD_SIZE is set)."""
    from .memory import config_module_sizes, memory_report, storage_label

    source = model_config or cfg.get("base_model_config") or cfg.get("base_model")
    config = local_model_config(source)
    if isinstance(config, str):
        print(f"memory: {config}; pass --model-config PATH (a config.json or its folder) for the memory table")
        return
    try:
        sizes = config_module_sizes(cfg, config)
    except Exception as e:  # an architecture transformers or peft cannot build, targets the model lacks
        print(f"memory: cannot build {source!r} from its config.json ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "pass --model-config PATH")
        return
    world = int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE", "").isdigit() else None
    ranks = sorted({*ranks, world} - {None})
    lora = [m for m in sizes if m.kind == "lora"]
    print(f"\nmemory: {len(lora)} LoRA modules (r={lora[0].r if lora else '-'}) and {len(sizes) - len(lora)} full parameters of {source} "
          "(from config.json, no weights)")
    print(memory_report(sizes, ranks, used=storage_label(cfg), world=world))


def local_model_config(source):
    """The transformers config of `source` (a local config.json or its folder, or a hub id already in the local cache),
    or a one-line reason why there is none here. Never downloads."""
    from transformers import AutoConfig

    if not source:
        return "the config names no base_model"
    local = Path(str(source)).exists()
    try:
        return AutoConfig.from_pretrained(str(source), local_files_only=True)
    except Exception as e:  # OSError (no config.json), ValueError (an unknown model_type, or not a hub id)
        if not local:
            return f"{source!r} is neither a local folder nor a model in the Hugging Face cache here, so its config.json is not available"
        return f"cannot read the config.json of {source!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
