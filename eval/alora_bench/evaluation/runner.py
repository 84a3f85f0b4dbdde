"""`alora eval`: lm-eval-harness on a base model and on each LoRA adapter, then one Table-1 markdown.

Every run is one `lm_eval.simple_evaluate(model="hf", model_args={pretrained, peft})` over the
tasks in `eval/alora_bench/tasks/` (plus lm-eval's stock tasks). lm-eval's results dict is saved as
`<out>/<run>.json`; `<out>/table.md` and `<out>/table.json` hold the side-by-side table.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from alora_bench.evaluation.table import write_table

HELP = "run lm-eval on a base model and adapters, write a Table-1 markdown"  # `alora eval` help
log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
DEFAULT_TASKS = ["alora"]
# lm-eval's default window is the model's maximum (SmolLM2: 8192). Rolling perplexity then batches 8 windows of
# up to 8192 tokens, whose fp32 logits over a 49k vocabulary alone take ~13 GB: the OOM killer ended a default
# run at 23.7 GB on a 24 GB machine. 1024 (the main job's window) keeps the same defaults under ~5 GB.
DEFAULT_MAX_LENGTH = 1024
BASE_RUN = "base"
RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def task_manager():
    """lm-eval's TaskManager with the repository's `eval/alora_bench/tasks/` folder added."""
    from lm_eval.tasks import TaskManager

    if not TASKS_DIR.is_dir():
        raise FileNotFoundError(f"lm-eval task folder not found: {TASKS_DIR} (install the repository with pip -e)")
    return TaskManager(include_path=str(TASKS_DIR))


def default_max_length(base: str | Path) -> int:
    """DEFAULT_MAX_LENGTH, or the model's own maximum (config.json's max_position_embeddings) when smaller."""
    from transformers import AutoConfig

    maximum = getattr(AutoConfig.from_pretrained(str(base)), "max_position_embeddings", None)
    return min(DEFAULT_MAX_LENGTH, maximum) if maximum else DEFAULT_MAX_LENGTH


def model_args(base: str | Path, adapter: str | Path | None, max_length: int | None = None) -> dict:
    args = {"pretrained": str(base)}
    if adapter is not None:
        args["peft"] = str(adapter)
    if max_length is not None:
        args["max_length"] = max_length  # lm-eval's context/rolling-window length (default: the model's maximum)
    return args


def evaluate_run(base, adapter, tasks, manager, limit=None, device="cpu", batch_size=8, max_length=None) -> dict:
    """lm-eval's results dict for one model (base + optional adapter), made JSON-serialisable."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args(base, adapter, max_length),
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        device=device,
        batch_size=batch_size,
        log_samples=False,
    )
    return json.loads(json.dumps(results, default=handle_non_serializable))


def evaluate(
    base: str | Path,
    adapters: dict[str, str | Path | None],
    tasks: list[str],
    out_dir: str | Path,
    limit: int | dict[str, int | None] | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict:
    """Evaluate one run per `adapters` entry (name -> adapter dir, or None for the base alone).

    Saves `<out_dir>/<name>.json` (lm-eval's results) per run and `<out_dir>/table.{md,json}`;
    returns `{name: results}`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manager = task_manager()
    results = {}
    for i, (name, adapter) in enumerate(adapters.items(), 1):
        log.info(
            "run %d/%d %r: base=%s adapter=%s tasks=%s limit=%s", i, len(adapters), name, base, adapter, tasks, limit
        )
        results[name] = evaluate_model(base, adapter, tasks, manager, limit, device, batch_size, max_length)
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(results[name], indent=2) + "\n")
        log.info("run %r done: %s", name, path)
    write_table(results, out_dir / "table.md")
    return results


def evaluate_model(base, adapter, tasks, manager, limit=None, device="cpu", batch_size=8, max_length=None) -> dict:
    """One model's lm-eval results over `tasks`; `limit` is one int for all tasks or a task -> int dict."""
    return _merge(
        [evaluate_run(base, adapter, group, manager, n, device, batch_size, max_length) for n, group in _limit_groups(tasks, limit)]
    )


def _limit_groups(tasks: list[str], limit) -> list[tuple[int | None, list[str]]]:
    """One (limit, tasks) group per distinct limit; `limit` is one int for all tasks or a task -> int dict."""
    if not isinstance(limit, dict):
        return [(limit, list(tasks))]
    groups: dict[int | None, list[str]] = {}
    for task in tasks:
        groups.setdefault(limit.get(task), []).append(task)
    return list(groups.items())


def _merge(parts: list[dict]) -> dict:
    """lm-eval results dicts of disjoint task sets, merged into one."""
    merged = parts[0]
    for part in parts[1:]:
        for key in ("results", "n-samples", "configs", "versions", "higher_is_better", "group_subtasks"):
            if isinstance(part.get(key), dict):
                merged.setdefault(key, {}).update(part[key])
    return merged


def _adapter(value: str) -> tuple[str, str]:
    """`NAME=DIR`, or a bare `DIR` named after its last path component."""
    name, sep, path = value.partition("=")
    if not sep:
        name, path = Path(value).name, value
    if not RUN_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"run name {name!r} must match {RUN_NAME.pattern}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="DIR", help="base model: Hugging Face directory (or hub id)")
    parser.add_argument(
        "--adapter", type=_adapter, action="append", default=[], metavar="NAME=DIR",
        help="a PEFT LoRA adapter to evaluate on top of --base (repeatable; NAME defaults to the folder name)",
    )
    parser.add_argument(
        "--tasks", nargs="+", default=DEFAULT_TASKS, metavar="TASK",
        help="lm-eval tasks or groups (default: alora = all five; alora_general, alora_domain, or single tasks)",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="score only the first N documents of each task")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (any torch device string)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="lm-eval batch size (default 8)")
    parser.add_argument(
        "--max-length", type=int, metavar="N",
        help=f"lm-eval's context length, i.e. the perplexity window (default {DEFAULT_MAX_LENGTH}, or the model's maximum "
        "if smaller; 0: the model's maximum, which needs far more memory: ~24 GB for SmolLM2's 8192 at batch 8)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for <run>.json, table.md, table.json")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs = {BASE_RUN: None}
    for name, path in args.adapter:
        if name in runs:
            log.error("duplicate run name %r; name adapters with NAME=DIR", name)
            return 2
        runs[name] = path
    max_length = default_max_length(args.base) if args.max_length is None else args.max_length or None
    results = evaluate(args.base, runs, args.tasks, args.out, args.limit, args.device, args.batch_size, max_length)
    out = Path(args.out)
    print((out / "table.md").read_text())
    print(f"lm-eval results: {', '.join(str(out / f'{name}.json') for name in results)}")
    print(f"table: {out / 'table.md'} and {out / 'table.json'}")
    return 0
