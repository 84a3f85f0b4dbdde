"""The paper's Table 1 shape from lm-eval results: rows = runs, columns = general PPL, domain acc.

`results` everywhere is `{run name: lm-eval results dict}` (what `simple_evaluate` returns,
or the per-run JSON `alora eval` saves). A column is one task: perplexity tasks show
lm-eval's `word_perplexity` (lower is better), the others its `acc` (higher is better),
each with lm-eval's standard error where it reports one (it reports none for perplexity).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PPL_METRIC = "word_perplexity"
ACC_METRIC = "acc"
TOKEN_PPL_METRIC = "token_perplexity"  # the plugin's in-training number (alora_general_eval), not lm-eval's
IN_TRAINING = "alora_general_eval"  # its entry in a run's "results", beside the lm-eval tasks
FILTER = "none"  # lm-eval's filter name for tasks without filters
LABELS = {
    "alora_wikitext2": "WikiText-2",
    "alora_general_ppl": "General held-out",
    IN_TRAINING: "General held-out, in training,",
    "alora_sciq": "SciQ",
    "alora_sciq_valid": "SciQ valid",
    "alora_piqa": "PIQA",
    "alora_medmcqa": "MedMCQA",
}


def in_training_result(run_dir: str | Path) -> dict | None:
    """A run's `alora_general_eval.json` as an entry of its results: exp(final token loss) and the share kept; for a
    run whose forgetting budget interpolated, the budgeted adapter's (the one evaluated) on the same sample."""
    from axolotl_alora.forgetting_budget import BudgetRun
    from axolotl_alora.general_eval import GENERAL_EVAL_FILENAME

    path = Path(run_dir) / GENERAL_EVAL_FILENAME
    if not path.is_file():
        return None
    watched = json.loads(path.read_text())
    loss, kept = watched["final"], watched["kept_share"]
    control = (watched.get("budget") or {}).get("control") or {}
    if control.get("chosen") is not None:
        loss, kept = control["chosen"], BudgetRun.kept(control, "chosen")
    return {f"{TOKEN_PPL_METRIC},{FILTER}": math.exp(loss), f"loss,{FILTER}": loss, f"kept_share,{FILTER}": kept,
            "sequences": watched["sequences"]}


def _metric(task_result: dict) -> str | None:
    for metric in (PPL_METRIC, TOKEN_PPL_METRIC, ACC_METRIC):
        if f"{metric},{FILTER}" in task_result:
            return metric
    return None


def _columns(results: dict) -> list[dict]:
    """One column per task that reports word_perplexity or acc in any run; PPL first."""
    found: dict[str, str] = {}
    for run in results.values():
        for task, task_result in run["results"].items():
            metric = _metric(task_result)
            if metric and task not in found:
                found[task] = metric
    tasks = sorted(found, key=lambda task: _column_order(task, found[task]))
    return [{"task": task, "metric": found[task], "label": _label(task, found[task])} for task in tasks]


def _column_order(task: str, metric: str) -> tuple:
    """Perplexity columns before accuracy ones; known tasks in LABELS order, then by name."""
    known = list(LABELS)
    return (metric == ACC_METRIC, known.index(task) if task in known else len(known), task)


def _label(task: str, metric: str) -> str:
    unit = {PPL_METRIC: "PPL ↓", TOKEN_PPL_METRIC: "token PPL ↓ (kept)", ACC_METRIC: "acc ↑"}[metric]
    return f"{LABELS.get(task, task)} {unit}"


def _cell(run: dict, task: str, metric: str) -> dict | None:
    task_result = run["results"].get(task, {})
    if f"{metric},{FILTER}" not in task_result:
        return None
    stderr = task_result.get(f"{metric}_stderr,{FILTER}")
    cell = {"value": task_result[f"{metric},{FILTER}"], "stderr": stderr if isinstance(stderr, (int, float)) else None}
    if metric == TOKEN_PPL_METRIC:
        cell["kept_share"] = task_result.get(f"kept_share,{FILTER}")
    return cell


def build_table(results: dict) -> dict:
    """The table as data: columns, one row per run, and documents scored per task."""
    columns = _columns(results)
    rows = [
        {"run": name, "cells": {c["task"]: _cell(run, c["task"], c["metric"]) for c in columns}}
        for name, run in results.items()
    ]
    samples = {}
    for run in results.values():
        for task, n in run.get("n-samples", {}).items():
            samples.setdefault(task, n["effective"])
        if IN_TRAINING in run["results"]:
            samples.setdefault(IN_TRAINING, run["results"][IN_TRAINING]["sequences"])
    return {"columns": columns, "rows": rows, "samples": {c["task"]: samples.get(c["task"]) for c in columns}}


def _format(cell: dict | None, metric: str) -> str:
    if cell is None:
        return "–"
    text = f"{cell['value']:.4f}" if metric == ACC_METRIC else f"{cell['value']:.2f}"
    if cell["stderr"] is not None:
        text += f" ± {cell['stderr']:.4f}"
    if cell.get("kept_share") is not None:
        text += f" ({100 * cell['kept_share']:.0f}%)"
    return text


def to_markdown(table: dict) -> str:
    columns = table["columns"]
    lines = [
        "| run | " + " | ".join(c["label"] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row in table["rows"]:
        cells = [_format(row["cells"][c["task"]], c["metric"]) for c in columns]
        lines.append(f"| {row['run']} | " + " | ".join(cells) + " |")
    counted = ", ".join(f"{c['task']} {table['samples'][c['task']]}" for c in columns if c["task"] != IN_TRAINING)
    lines += [
        "",
        f"PPL: lm-eval `{PPL_METRIC}` (rolling log-likelihood, per whitespace word). "
        f"acc: lm-eval `{ACC_METRIC}` ± its standard error. Documents scored: {counted}.",
    ]
    if any(c["task"] == IN_TRAINING for c in columns):
        lines.append(
            "In training: the plugin's `alora_general_loss` at the end of each stage (`alora_general_eval`: "
            f"{table['samples'].get(IN_TRAINING)} sequences of held-out general text), as a per-token perplexity; in brackets, "
            "the share of the general stage's gain in that loss the domain stage kept."
        )
    return "\n".join(lines) + "\n"


def write_table(results: dict, path: str | Path) -> str:
    """Write the markdown table to `path` and the same table as JSON beside it; return the markdown."""
    path = Path(path)
    table = build_table(results)
    markdown = to_markdown(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown)
    path.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n")
    return markdown
