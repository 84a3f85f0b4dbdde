"""The `alora` console script.

Each subcommand lives in the module that owns its concept; that module exposes
`add_arguments(parser)` and `run(args) -> int`, and imports torch, Axolotl or lm-eval
only inside `run`, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "inspect": ("axolotl_alora.inspect", "show an importance file: metadata, per-module norms, layer weights, heatmap"),
    "check": ("axolotl_alora.check", "check an Axolotl YAML's ALoRA settings (and that the plugin is listed) without training"),
    "fisher": ("axolotl_alora.fisher", "EWC baseline: write an importance file from the diagonal empirical Fisher of the base model"),
    "prepare-model": ("axolotl_alora.model_prep", "turn the packaged SmolLM2 GGUF into a Hugging Face model directory"),
    "prepare-data": ("axolotl_alora.data", "write Axolotl-ready JSONL from ../shared/data"),
    "eval": ("axolotl_alora.evaluation.runner", "run lm-eval on a base model and adapters, write a Table-1 markdown"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (FileNotFoundError, ValueError) as e:  # ImportanceFileError is a ValueError: say what is wrong, no traceback
        print(f"alora {args.command}: error: {e}", file=sys.stderr)
        return 2


def _click_inspect():
    import click

    @click.command(name="alora-inspect", context_settings={"ignore_unknown_options": True})
    @click.argument("argv", nargs=-1, type=click.UNPROCESSED)
    def inspect_command(argv):
        """ALoRA: show an importance file (same as `alora inspect`)."""
        sys.exit(main(["inspect", *argv]))

    return inspect_command


inspect_command = _click_inspect()

if __name__ == "__main__":
    sys.exit(main())
