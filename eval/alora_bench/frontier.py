"""The forgetting frontier: SciQ accuracy against general-text loss, ALoRA against what a skeptic tries first.

    python -m alora_bench.frontier pilot    # general stage (200 steps), then one long LoRA(ν+μ) run scored at
                                            # checkpoints on SciQ *valid*: picks the domain steps (plan.json)
    python -m alora_bench.frontier run      # every point of the plan that is missing (resumable; --only, --max-minutes)
    python -m alora_bench.frontier report   # frontier.md and frontier.png from the points that exist (trains nothing)

Every number comes from the product: `axolotl train` on the YAMLs of examples/smollm2-cpu/, `alora fisher`, peft's
`add_weighted_adapter` for WiSE-FT, lm-eval for accuracy and perplexity, and the plugin's own general-text scoring
(`axolotl_alora.general_eval`) for the general held-out loss. A point whose JSON exists in --results is skipped;
adapters, logs and configs live in --work.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from alora_bench import reproduce, runs
from alora_bench.reproduce import REPO, Paths, Scale, write_json

FRONTIER_TASKS = ("alora_sciq", "alora_wikitext2", "alora_general_ppl")
PILOT_TASK = "alora_sciq_valid"  # the pilot chooses on validation items; test items only score frontier points
GENERAL_SAMPLES = 64  # the plugin's general-text sample: 64 sequences of sequence_len tokens
GENERAL_SAMPLE_SEED = 0  # one sample for every point and seed, so losses compare across seeds
LEVEL_SHARES = (0.25, 0.5, 0.75)  # matched-accuracy levels: ν + share × (LoRA(ν+μ)'s end − ν), fixed before any other method
# the pilot's criteria for the domain stage (a regime where forgetting is material)
MAX_KEPT = 0.20  # LoRA(ν+μ) gives back at least 80% of the general stage's gain
MIN_GAIN = 0.05  # and gains at least 5 points of SciQ accuracy over ν


def log(msg: str) -> None:
    runs.log(msg, "frontier")


# ------------------------------------------------------------------------------------------ points


@dataclass(frozen=True)
class Point:
    """One point of the frontier: a method, its knob, a seed and a task."""

    method: str  # lora, alora, alora_nolayer, l2sp, ewclora, replay, alora_replay, wise_lora, wise_alora
    knob: float | None = None  # φ, λ, replay share, α, learning-rate fraction or checkpoint fraction
    seed: int = 0
    task: str = "sciq"
    variant: str = ""  # lora: "ckpt" (a checkpoint of the one long run) or "lr" (a run at knob × the learning rate)

    @property
    def name(self) -> str:
        knob = "" if self.knob is None else f"-{self.variant}{self.knob:g}"
        return f"s{self.seed}/{self.task}/{self.method}{knob}"


# ------------------------------------------------------------------------------------------ the plugin's general loss


def general_sample(base: Path, paths: Paths, scale: Scale):
    from transformers import AutoTokenizer

    from axolotl_alora.general_eval import read_documents, sample_sequences

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    documents = read_documents(paths.data / "general_heldout.jsonl")
    return sample_sequences(documents, tokenizer, scale.sequence_len, GENERAL_SAMPLES, GENERAL_SAMPLE_SEED)


def general_loss(base: Path, adapter: Path | None, sequences) -> float:
    """Mean token cross-entropy of base (+ adapter) on the sample, with the plugin's own scorer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from axolotl_alora.general_eval import mean_token_loss

    model = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return mean_token_loss(model, sequences, batch_size=8)


# ------------------------------------------------------------------------------------------ the pilot


def pilot(args, paths: Paths, scale: Scale, manager) -> dict:
    """General stage, then one LoRA(ν+μ) run of --pilot-steps at --learning-rate saving every --pilot-every steps;
    each checkpoint is scored on SciQ valid and the general sample. The domain stage is the first checkpoint
    whose general-loss gain kept is ≤ MAX_KEPT and whose accuracy is ≥ ν's + MIN_GAIN."""
    plan_path = paths.results / "plan.json"
    if plan_path.is_file():
        return json.loads(plan_path.read_text())
    seed = args.seeds[0]
    general = reproduce.ensure_general(paths, scale, seed)
    sequences = general_sample(paths.base, paths, scale)
    scores = paths.results / "pilot"

    def score(name: str, adapter: Path | None) -> dict:
        out = scores / f"{name}.json"
        if out.is_file():
            return json.loads(out.read_text())
        from alora_bench.evaluation import evaluate_model

        start = time.time()
        res = evaluate_model(paths.base, adapter, [PILOT_TASK], manager, args.limit, scale.device, 8, scale.max_length)
        cell = res["results"][PILOT_TASK]
        point = {"acc": cell["acc,none"], "acc_stderr": cell["acc_stderr,none"], "general_loss": general_loss(paths.base, adapter, sequences),
                 "eval_wall_s": round(time.time() - start, 1)}
        write_json(out, point)
        log(f"pilot {name}: SciQ-valid {point['acc']:.3f} ± {point['acc_stderr']:.3f}, general loss {point['general_loss']:.4f}")
        return point

    base, nu = score("base", None), score("general", general)
    run_dir = paths.work / "runs" / f"s{seed}" / "pilot-lora"
    steps = list(range(args.pilot_every, args.pilot_steps + 1, args.pilot_every))
    if not all((run_dir / f"checkpoint-{s}" / "adapter_model.safetensors").is_file() for s in steps):
        cfg = lora_config(paths, scale, seed, "sciq", run_dir, args.pilot_steps, args.learning_rate)
        cfg.update(save_strategy="steps", save_steps=args.pilot_every, save_total_limit=None, save_only_model=True)
        reproduce.record_cost(paths, f"s{seed}/pilot-lora", reproduce.train(cfg, f"s{seed}/pilot-lora", paths, scale))
    table = []
    for s in steps:
        p = score(f"lora-step{s}", run_dir / f"checkpoint-{s}")
        kept = (base["general_loss"] - p["general_loss"]) / (base["general_loss"] - nu["general_loss"])
        table.append({"step": s, **p, "kept": kept, "gain": p["acc"] - nu["acc"]})
    ok = [row for row in table if row["kept"] <= MAX_KEPT and row["gain"] >= MIN_GAIN]
    chosen = ok[0]["step"] if ok else steps[-1]
    plan = {"general_steps": scale.general_steps, "domain_steps": chosen, "learning_rate": args.learning_rate,
            "criteria": {"max_kept": MAX_KEPT, "min_gain": MIN_GAIN}, "met": bool(ok), "base": base, "general": nu,
            "checkpoints": table, "seed": seed, "limit": args.limit, "task": PILOT_TASK}
    write_json(plan_path, plan)
    write_pilot_md(paths.results / "pilot.md", plan)
    log(f"pilot: domain stage {chosen} steps ({'criteria met' if ok else 'criteria NOT met: longest run taken'})")
    return plan


def write_pilot_md(path: Path, plan: dict) -> None:
    base, nu = plan["base"], plan["general"]
    lines = [
        "# Frontier pilot: how long the domain stage runs",
        "",
        f"Command: `python -m alora_bench.frontier pilot` (seed {plan['seed']}). General stage {plan['general_steps']} steps; then one "
        f"LoRA(ν+μ) run on SciQ at learning rate {plan['learning_rate']:g}, cosine schedule, saved along the way. Each checkpoint is "
        f"scored on {plan['limit']} SciQ **validation** items (test items are not read for this choice) and on the general held-out "
        "sample (64 × 256 tokens, the plugin's scorer).",
        "",
        f"Criteria: the general-loss gain kept ≤ {100 * plan['criteria']['max_kept']:.0f}% and SciQ-valid accuracy ≥ ν's + "
        f"{100 * plan['criteria']['min_gain']:.0f} points; the first checkpoint meeting both is the frontier's domain stage.",
        "",
        "| point | SciQ-valid acc | general loss | kept | gain over ν |",
        "|---|---:|---:|---:|---:|",
        f"| base | {base['acc']:.3f} ± {base['acc_stderr']:.3f} | {base['general_loss']:.4f} | – | – |",
        f"| ν (general stage) | {nu['acc']:.3f} ± {nu['acc_stderr']:.3f} | {nu['general_loss']:.4f} | 100% | – |",
    ]
    for row in plan["checkpoints"]:
        lines.append(f"| LoRA(ν+μ) step {row['step']} | {row['acc']:.3f} ± {row['acc_stderr']:.3f} | {row['general_loss']:.4f} | "
                     f"{100 * row['kept']:.0f}% | {100 * row['gain']:+.1f} |")
    verdict = (f"Chosen: **{plan['domain_steps']} domain steps**." if plan["met"] else
               f"No checkpoint met both criteria; the longest ({plan['domain_steps']} steps) is taken.")
    lines += ["", verdict + " A checkpoint of a longer cosine schedule has seen a higher learning rate than the end of a run of "
              "that length, so a run of the chosen length forgets somewhat less than its row shows.", ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------ configs


def lora_config(paths: Paths, scale: Scale, seed: int, task: str, out: Path, steps: int, lr: float, example: str = "domain-lora") -> dict:
    cfg = reproduce.example(example, paths, scale, seed, out)
    cfg["datasets"][0]["path"] = str(paths.data / f"{task}_train.jsonl")
    cfg.update(max_steps=steps, learning_rate=lr)
    if "lora_model_dir" in cfg:
        cfg["lora_model_dir"] = str(paths.general(seed))
    return cfg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", choices=("pilot", "run", "report"))
    p.add_argument("--work", default=str(REPO / "work" / "frontier"))
    p.add_argument("--results", default=str(REPO / "eval" / "results" / "frontier"))
    p.add_argument("--data-dir", help="shared data folder (default ../shared/data or $ALORA_DATA_DIR)")
    p.add_argument("--base-model", help="a Hugging Face model directory instead of the packaged SmolLM2")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--general-steps", type=int, default=200)
    p.add_argument("--learning-rate", type=float, default=8e-4)
    p.add_argument("--pilot-steps", type=int, default=400)
    p.add_argument("--pilot-every", type=int, default=50)
    p.add_argument("--limit", type=int, default=500, help="SciQ items scored per point")
    p.add_argument("--ppl-limit", type=int, default=3)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--sequence-len", type=int, default=256)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = Paths(Path(args.work).resolve(), Path(args.results).resolve(), Path(args.base_model).resolve() if args.base_model else None)
    scale = Scale(args.general_steps, 0, args.micro_batch_size, args.sequence_len, args.limit, args.ppl_limit, args.max_length,
                  64, 256, args.device)
    reproduce.prepare(paths, args)
    from alora_bench.evaluation import task_manager

    manager = task_manager()
    started = time.time()
    if args.job == "pilot":
        pilot(args, paths, scale, manager)
    log(f"{args.job} finished in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
