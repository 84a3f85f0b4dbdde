"""The `alora` console script.

Each subcommand lives in the module that owns its concept; that module exposes
`add_arguments(parser)` and `run(args) -> int`, and imports torch, Axolotl or lm-eval
only inside `run`, so building the parser stays fast. Other installed packages add
subcommands through the `alora.commands` entry-point group (name = module path; the
module's HELP string is its help): the harness adds prepare-model,
prepare-data and eval that way, so the plugin never imports it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "inspect": ("axolotl_alora.inspect", "show an importance file: metadata, per-module norms, layer weights, heatmap"),
    "check": ("axolotl_alora.check", "check an Axolotl YAML's ALoRA settings (and that the plugin is listed) without training"),
    "fisher": ("axolotl_alora.fisher", "EWC baseline: write an importance file from the diagonal empirical Fisher of the base model"),
    "interpolate": ("axolotl_alora.interpolate", "WiSE-FT: interpolate two adapters as one PEFT adapter, at α or the largest α meeting a forgetting budget"),
}
COMMANDS_GROUP = "alora.commands"


def subcommands() -> dict[str, tuple[str, str | None]]:
    """The plugin's own subcommands, then those other packages register (help: their module docstring)."""
    found = dict(SUBCOMMANDS)
    for ep in entry_points(group=COMMANDS_GROUP):
        found.setdefault(ep.name, (ep.value, None))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in subcommands().items():
        module = importlib.import_module(module_name)
        help_text = help_text or getattr(module, "HELP", name)
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module_name)
        module.add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (FileNotFoundError, ValueError) as e:  # ImportanceFileError is a ValueError: say what is wrong, no traceback
        print(f"alora {args.command}: error: {e}", file=sys.stderr)
        return 2


# loggers and warning sources that print on import in a CPU-only environment (torchao's and bitsandbytes' missing
# kernels, torch's deprecation of Enum constants torchao registers): noise in a command's output
NOISY_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")
NOISY_WARNINGS = r"(torchao|bitsandbytes|kernels)(\.|$)"


def quiet_third_party() -> None:
    """Hide what third-party packages log or warn while they are imported (errors still show)."""
    import logging
    import warnings

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=NOISY_WARNINGS)


def _click_command(subcommand: str, help_text: str):
    """`axolotl alora-<subcommand>`: the same as `alora <subcommand>`, for Axolotl's `axolotl.cli_commands` group."""
    import click

    @click.command(name=f"alora-{subcommand}", help=f"ALoRA: {help_text} (same as `alora {subcommand}`).",
                   context_settings={"ignore_unknown_options": True, "help_option_names": []})
    @click.argument("argv", nargs=-1, type=click.UNPROCESSED)
    def command(argv):
        sys.exit(main([subcommand, *argv]))

    return command


inspect_command = _click_command("inspect", SUBCOMMANDS["inspect"][1])
check_command = _click_command("check", SUBCOMMANDS["check"][1])

if __name__ == "__main__":
    sys.exit(main())
