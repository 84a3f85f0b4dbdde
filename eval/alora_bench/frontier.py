"""The forgetting frontier: SciQ accuracy against general-text loss, ALoRA against what a skeptic tries first.

    python -m alora_bench.frontier pilot    # general stage (200 steps), then one long LoRA(ν+μ) run scored at
                                            # checkpoints on SciQ *valid*: picks the domain steps (plan.json)
    python -m alora_bench.frontier run      # every point of the plan that is missing, in order (resumable; --max-minutes)
    python -m alora_bench.frontier report   # frontier.md and frontier.png from the points that exist (trains nothing)

Methods and their knobs (one seed first; then three seeds at each method's point nearest the middle accuracy level,
and each method's middle point on MedMCQA):
    lora           LoRA(ν+μ): checkpoints at 25/50/75/100% of one run's steps
    lora_lr        LoRA(ν+μ) at 1/3 and 1/10 of the learning rate
    alora          ALoRA, φ swept (dense Ω as recorded, normalization mean, softmax layer weights, τ auto)
    alora_nolayer  ALoRA − layer (uniform layer weights): at ALoRA's chosen φ first, then φ swept like ALoRA's
    l2sp           L2-SP toward ν: Ω ≡ 1 (an importance file of ones), uniform layer weights, φ swept
    ewclora        EWCLoRA: a fresh adapter, `alora fisher`'s Ω, λ swept
    replay         LoRA(ν+μ) with 1/5/20% of the domain stage's tokens drawn from general training text
    wise_lora      WiSE-FT: ΔW(α) = (1 − α)·ΔW_ν + α·ΔW_end between ν and LoRA(ν+μ)'s end, α swept
    wise_alora     the same between ν and ALoRA's end at its chosen φ
    alora_replay   ALoRA at its chosen φ with 5% replay
    budget_*       ALoRA at its chosen φ under a forgetting budget (alora_keep 0.5 and 0.8), met by interpolation, by
                   steering φ, or both; steered on held-out text that excludes the frontier's general sample;
                   budget_lora: plain LoRA(ν+μ) under the same budgets, met by interpolation toward ν

Every number comes from the product: `axolotl train` on the YAMLs of examples/smollm2-cpu/, `alora fisher`, peft's
`add_weighted_adapter` for WiSE-FT, lm-eval for accuracy and perplexity, and the plugin's own general-text scoring
(`axolotl_alora.general_eval`) for the general held-out loss. A point whose JSON exists in --results is skipped;
adapters, logs and configs live in --work.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from alora_bench import reproduce, runs
from alora_bench.reproduce import REPO, Paths, Scale, write_json
from axolotl_alora.interpolate import interpolate_adapters

FRONTIER_TASKS = ("alora_sciq", "alora_wikitext2", "alora_general_ppl")
PILOT_TASK = "alora_sciq_valid"  # the pilot chooses on validation items; test items only score frontier points
GENERAL_SAMPLES = 64  # the plugin's general-text sample: 64 sequences of sequence_len tokens
GENERAL_SAMPLE_SEED = 0  # one sample for every point and seed, so losses compare across seeds
LEVEL_SHARES = (0.25, 0.5, 0.75)  # matched-accuracy levels: ν + share × (LoRA(ν+μ)'s end − ν), fixed before any other method
KEPT_LEVELS = (0.9, 0.75, 0.5)  # matched-loss levels: these shares of ν's gain in general loss kept
# the pilot's criteria for the domain stage (a regime where forgetting is material)
MAX_KEPT = 0.20  # LoRA(ν+μ) gives back at least 80% of the general stage's gain
MIN_GAIN = 0.05  # and gains at least 5 points of SciQ accuracy over ν


def log(msg: str) -> None:
    runs.log(msg, "frontier")


# ------------------------------------------------------------------------------------------ points


@dataclass(frozen=True)
class Point:
    """One point of the frontier: a method, its knob, a seed and a task."""

    method: str  # a key of METHODS
    knob: float | None = None  # the method's knob (METHODS[method].knob); None for base and ν
    seed: int = 0
    task: str = "sciq"

    @property
    def name(self) -> str:
        return f"s{self.seed}/{self.task}/{self.method}" + ("" if self.knob is None else f"-{self.knob:g}")


@dataclass(frozen=True)
class Method:
    label: str
    knob: str  # what is swept, for tables
    values: tuple[float, ...]  # the sweep at the first seed (empty: set from the plan, e.g. ALoRA's chosen φ)
    example: str | None = None  # examples/smollm2-cpu/<example>.yml that it trains; None: derived, no training


METHODS = {
    "lora": Method("LoRA(ν+μ), steps", "share of steps", (1.0, 0.5, 0.25, 0.75), "domain-lora"),  # the end first: it fixes the levels
    "lora_lr": Method("LoRA(ν+μ), learning rate", "lr fraction", (1 / 3, 1 / 10), "domain-lora"),
    "alora": Method("ALoRA", "φ", (0.03, 0.3, 3.0, 30.0), "domain-alora"),
    "alora_nolayer": Method("ALoRA − layer", "φ", (0.03, 0.3, 3.0, 30.0), "domain-alora-nolayer"),
    "l2sp": Method("L2-SP (Ω ≡ 1)", "φ", (0.03, 0.3, 3.0, 30.0), "domain-alora-nolayer"),
    "ewclora": Method("EWCLoRA", "λ", (0.003, 0.03, 0.3, 3.0), "domain-ewc"),
    "replay": Method("Replay", "general share", (0.01, 0.05, 0.2), "domain-lora"),
    "wise_lora": Method("WiSE-FT of LoRA(ν+μ)", "α", (0.25, 0.5, 0.75)),
    "wise_alora": Method("WiSE-FT of ALoRA", "α", (0.25, 0.5, 0.75)),
    "alora_replay": Method("ALoRA + 5% replay", "φ", (), "domain-alora"),
    "budget_interpolation": Method("Budget: interpolation", "keep", (0.5, 0.8), "domain-alora"),
    "budget_phi": Method("Budget: φ steered", "keep", (0.5, 0.8), "domain-alora"),
    "budget_both": Method("Budget: φ steered, then interpolation", "keep", (0.5, 0.8), "domain-alora"),
    "budget_lora": Method("Budget: interpolation of plain LoRA(ν+μ)", "keep", (0.5, 0.8), "domain-lora"),
}
REPLAY_WITH_ALORA = 0.05
BUDGET_SAMPLES = 128  # the budget runs' alora_general_eval_samples: 64 control + 64 report sequences


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

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return mean_token_loss(model, sequences, batch_size=8)


# ------------------------------------------------------------------------------------------ the pilot


def pilot(args, paths: Paths, scale: Scale, manager) -> dict:
    """General stage, then one LoRA(ν+μ) run of --pilot-steps at --learning-rate saving every --pilot-every steps;
    the checkpoints are scored in order on SciQ valid and the general sample. The domain stage is the first
    checkpoint whose general-loss gain kept is ≤ MAX_KEPT and whose accuracy is ≥ ν's + MIN_GAIN (later ones are
    not scored); if none does, the last."""
    plan_path, lr = paths.results / "plan.json", args.learning_rate
    if plan_path.is_file() and json.loads(plan_path.read_text())["learning_rate"] == lr:
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
        res = evaluate_model(paths.base, adapter, [PILOT_TASK], manager, args.pilot_limit, scale.device, 8, scale.max_length)
        cell = res["results"][PILOT_TASK]
        point = {"acc": cell["acc,none"], "acc_stderr": cell["acc_stderr,none"], "general_loss": general_loss(paths.base, adapter, sequences),
                 "eval_wall_s": round(time.time() - start, 1)}
        write_json(out, point)
        log(f"pilot {name}: SciQ-valid {point['acc']:.3f} ± {point['acc_stderr']:.3f}, general loss {point['general_loss']:.4f}")
        return point

    base, nu = score("base", None), score("general", general)
    name = f"pilot-lora-lr{lr:g}"  # a pilot at another --learning-rate is another run
    run_dir = paths.work / "runs" / f"s{seed}" / name
    steps = list(range(args.pilot_every, args.pilot_steps + 1, args.pilot_every))
    if not all((run_dir / f"checkpoint-{s}" / "adapter_config.json").is_file() for s in steps):
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = domain_config("domain-lora", paths, scale, seed, "sciq", run_dir, args.pilot_steps, lr)
        # Axolotl keeps 4 checkpoints unless told otherwise
        cfg.update(save_strategy="steps", save_steps=args.pilot_every, save_total_limit=len(steps) + 1, save_only_model=True)
        reproduce.record_cost(paths, f"s{seed}/{name}", reproduce.train(cfg, f"s{seed}/{name}", paths, scale))
    table = []
    for s in steps:  # in order, up to the first checkpoint that meets both criteria
        p = score(f"lora-lr{lr:g}-step{s}", run_dir / f"checkpoint-{s}")
        kept = (base["general_loss"] - p["general_loss"]) / (base["general_loss"] - nu["general_loss"])
        table.append({"step": s, **p, "kept": kept, "gain": p["acc"] - nu["acc"]})
        if kept <= MAX_KEPT and p["acc"] - nu["acc"] >= MIN_GAIN:
            break
    ok = [row for row in table if row["kept"] <= MAX_KEPT and row["gain"] >= MIN_GAIN]
    chosen = ok[0]["step"] if ok else steps[-1]
    domain_steps = 4 * round(chosen / 4)  # the lora run saves at 25/50/75/100% of its steps
    plan = {"general_steps": scale.general_steps, "pilot_step": chosen, "domain_steps": domain_steps, "learning_rate": lr,
            "run_steps": args.pilot_steps,
            "criteria": {"max_kept": MAX_KEPT, "min_gain": MIN_GAIN}, "met": bool(ok), "base": base, "general": nu,
            "checkpoints": table, "seed": seed, "limit": args.pilot_limit, "task": PILOT_TASK, "sequence_len": scale.sequence_len}
    write_json(plan_path, plan)  # the latest pilot's plan is the frontier's
    write_json(scores / f"plan-lr{lr:g}.json", plan)
    write_pilot_md(paths.results / "pilot.md", [json.loads(f.read_text()) for f in sorted(scores.glob("plan-lr*.json"))], plan)
    log(f"pilot: domain stage {chosen} steps ({'criteria met' if ok else 'criteria NOT met: longest run taken'})")
    return plan


def write_pilot_md(path: Path, pilots: list[dict], plan: dict) -> None:
    """Every pilot (one per learning rate tried), then the plan the frontier follows (the latest pilot's)."""
    base, nu = plan["base"], plan["general"]
    lines = [
        "# Frontier pilot: how long the domain stage runs",
        "",
        f"Command: `python -m alora_bench.frontier pilot [--learning-rate LR]` (seed {plan['seed']}). General stage {plan['general_steps']} "
        "steps; then, per learning rate tried, one LoRA(ν+μ) run on SciQ, cosine schedule, saved along the way. Each checkpoint is "
        f"scored on {plan['limit']} SciQ **validation** items (test items are not read for this choice) and on the general held-out "
        f"sample ({GENERAL_SAMPLES} × {plan.get('sequence_len', 256)} tokens, the plugin's scorer).",
        "",
        f"Criteria: the general-loss gain kept ≤ {100 * plan['criteria']['max_kept']:.0f}% and SciQ-valid accuracy ≥ ν's + "
        f"{100 * plan['criteria']['min_gain']:.0f} points; the first checkpoint meeting both is the frontier's domain stage.",
        "",
        "| point | learning rate | run length | SciQ-valid acc | general loss | kept | gain over ν |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| base | – | – | {base['acc']:.3f} ± {base['acc_stderr']:.3f} | {base['general_loss']:.4f} | – | – |",
        f"| ν (general stage) | – | – | {nu['acc']:.3f} ± {nu['acc_stderr']:.3f} | {nu['general_loss']:.4f} | 100% | – |",
    ]
    for pilot_plan in pilots:
        for row in pilot_plan["checkpoints"]:
            end = "(end)" if row["step"] == pilot_plan.get("run_steps") else ""
            lines.append(f"| LoRA(ν+μ) step {row['step']} {end} | {pilot_plan['learning_rate']:g} | {pilot_plan.get('run_steps', '?')} | "
                         f"{row['acc']:.3f} ± {row['acc_stderr']:.3f} | {row['general_loss']:.4f} | {100 * row['kept']:.0f}% | {100 * row['gain']:+.1f} |")
    verdict = (f"Chosen: **{plan['domain_steps']} domain steps at learning rate {plan['learning_rate']:g}** (checkpoint {plan['pilot_step']}, "
               "rounded to a multiple of 4)." if plan["met"] else
               f"At learning rate {plan['learning_rate']:g} no checkpoint met both criteria; the longest ({plan['domain_steps']} steps) is taken "
               "for now: a pilot at a higher --learning-rate is the next step.")
    full = plan.get("run_steps") == plan["pilot_step"]
    lines += ["", verdict + (" It is the end of a full run of that length, as the frontier trains it." if full else
                             " A checkpoint of a longer cosine schedule has seen a higher learning rate than the end of a run of "
                             "that length, so a run of the chosen length forgets less than its row shows: check it with a pilot of "
                             "that length (`--pilot-steps N --pilot-every N`)."), ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------ configs


def domain_config(example: str, paths: Paths, scale: Scale, seed: int, task: str, out: Path, steps: int, lr: float) -> dict:
    """An examples/smollm2-cpu/ domain config with this run's paths, seed, steps and learning rate, without the
    example's forgetting budget (the budget points set their own)."""
    cfg = reproduce.without_budget(reproduce.example(example, paths, scale, seed, out))
    cfg["datasets"][0]["path"] = str(paths.data / f"{task}_train.jsonl")
    cfg.update(max_steps=steps, learning_rate=lr)
    if "lora_model_dir" in cfg:
        cfg["lora_model_dir"] = str(paths.general(seed))
    return cfg


class Frontier:
    """The plan's points: how each is trained or built, evaluated and stored."""

    def __init__(self, args, paths: Paths, scale: Scale, manager, plan: dict):
        self.args, self.paths, self.scale, self.manager, self.plan = args, paths, scale, manager, plan
        self.steps, self.lr = plan["domain_steps"], plan["learning_rate"]
        self._sequences = None

    # -- where things live
    def result_path(self, point: Point) -> Path:
        return self.paths.results / "points" / f"{point.name}.json"

    def run_dir(self, point: Point) -> Path:
        return self.paths.work / "runs" / point.name

    def result(self, point: Point) -> dict | None:
        path = self.result_path(point)
        return json.loads(path.read_text()) if path.is_file() else None

    # -- the adapter a point evaluates (training or building it when missing); returns (adapter dir, cost)
    def adapter(self, point: Point) -> tuple[Path | None, dict]:
        if point.method == "base":
            return None, {}
        if point.method == "general":
            return reproduce.ensure_general(self.paths, self.scale, point.seed), {}
        if point.method == "lora":  # a checkpoint of the one run at the full learning rate
            end = Point("lora", 1.0, point.seed, point.task)
            run, cost = self.trained(end)
            return (run if point.knob == 1.0 else run / f"checkpoint-{round(point.knob * self.steps)}"), cost
        if point.method.startswith("wise_"):
            return self.wise(point)
        if point.method.startswith("budget_"):  # interpolation writes the budgeted adapter beside the trained one
            run, cost = self.trained(point)
            return (run if point.method == "budget_phi" else run / "alora_interpolated"), cost
        return self.trained(point)

    def trained(self, point: Point) -> tuple[Path, dict]:
        out = self.run_dir(point)
        cost_path = out / "frontier_cost.json"
        if not (out / "adapter_model.safetensors").is_file() or not cost_path.is_file():
            cfg = self.config(point, out)
            cost = reproduce.train(cfg, point.name, self.paths, self.scale)
            write_json(cost_path, cost)
        return out, json.loads(cost_path.read_text())

    def config(self, point: Point, out: Path) -> dict:
        method = METHODS[point.method]
        lr = self.lr * (point.knob if point.method == "lora_lr" else 1.0)
        cfg = domain_config(method.example, self.paths, self.scale, point.seed, point.task, out, self.steps, lr)
        if point.method == "lora":
            cfg.update(save_strategy="steps", save_steps=self.steps // 4, save_total_limit=5, save_only_model=True)  # Axolotl's default keeps 4
        share = point.knob if point.method == "replay" else REPLAY_WITH_ALORA if point.method == "alora_replay" else None
        if share is not None:
            cfg["datasets"].append({"path": str(self.replay_file(point.task, share, point.seed)), "ds_type": "json", "type": "completion"})
        if point.method in ("alora", "alora_nolayer", "alora_replay"):
            cfg.update(alora_importance_path=str(self.paths.general(point.seed) / "alora_importance.safetensors"),
                       alora_phi=point.knob, alora_importance_normalization="mean")
            reproduce.ensure_general(self.paths, self.scale, point.seed)
        elif point.method == "budget_lora":  # no importance file: interpolation between ν (lora_model_dir) and the end
            cfg.update(alora_keep=point.knob, alora_budget_by="interpolation", alora_general_eval=str(self.budget_text()),
                       alora_general_eval_samples=BUDGET_SAMPLES)
            reproduce.ensure_general(self.paths, self.scale, point.seed)
        elif point.method.startswith("budget_"):
            cfg.update(alora_importance_path=str(self.paths.general(point.seed) / "alora_importance.safetensors"),
                       alora_phi=self.plan["alora_phi"], alora_importance_normalization="mean", alora_keep=point.knob,
                       alora_budget_by=point.method.removeprefix("budget_"), alora_general_eval=str(self.budget_text()),
                       alora_general_eval_samples=BUDGET_SAMPLES)
            reproduce.ensure_general(self.paths, self.scale, point.seed)
        elif point.method == "l2sp":
            cfg.update(alora_importance_path=str(self.uniform_file(point.seed)), alora_phi=point.knob, alora_importance_normalization="mean")
        elif point.method == "ewclora":
            cfg.update(alora_importance_path=str(reproduce.ensure_fisher(self.paths, self.scale, point.seed)), alora_phi=point.knob,
                       alora_importance_normalization="mean")
        else:
            reproduce.ensure_general(self.paths, self.scale, point.seed)
        return cfg

    # -- L2-SP's importance: Ω ≡ 1 with the general stage's reference θ^ν
    def uniform_file(self, seed: int) -> Path:
        import torch

        from axolotl_alora.importance_file import read_importance_file, write_importance_file

        out = self.paths.work / "runs" / f"s{seed}" / "l2sp" / "alora_importance.safetensors"
        if not out.is_file():
            data = read_importance_file(reproduce.ensure_general(self.paths, self.scale, seed) / "alora_importance.safetensors")
            for name, omega in data.omega.items():
                data.omega[name] = torch.ones_like(omega)
                data.metadata["modules"][name]["norm"] = float(omega.numel()) ** 0.5
            data.metadata["source"] = "uniform"
            write_importance_file(out, data)
        return out

    # -- the budget's general text: held-out windows the frontier's general loss never reads
    def budget_text(self) -> Path:
        """Every window of general_heldout.jsonl (joined with EOS and cut into sequence_len tokens, as the plugin's
        sampler does) except the GENERAL_SAMPLES windows of the frontier's general sample, one decoded window per row:
        the budget steers and reports on text that the frontier's yardstick does not contain."""
        out = self.paths.work / "budget_general.jsonl"
        if out.is_file():
            return out
        from transformers import AutoTokenizer

        from axolotl_alora.general_eval import chosen_windows, read_documents, token_windows

        tokenizer = AutoTokenizer.from_pretrained(str(self.paths.base))
        table = token_windows(read_documents(self.paths.data / "general_heldout.jsonl"), tokenizer, self.scale.sequence_len)
        yardstick = set(chosen_windows(len(table), GENERAL_SAMPLES, GENERAL_SAMPLE_SEED).tolist())
        rows = [tokenizer.decode(window, skip_special_tokens=True) for w, window in enumerate(table.tolist()) if w not in yardstick]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        tmp.replace(out)
        return out

    # -- replay: general training text mixed into the domain data through Axolotl's `datasets:` list
    def replay_file(self, task: str, share: float, seed: int) -> Path:
        """General-training passages (the held-out documents are never among them) whose tokens are `share` of the
        mixed dataset's, each truncated at sequence_len as Axolotl does; drawn with the seed."""
        out = self.paths.work / "replay" / f"{task}-{share:g}-s{seed}.jsonl"
        if out.is_file():
            return out
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.paths.base))

        def tokens(texts: list[str]) -> list[int]:
            return [min(len(ids), self.scale.sequence_len) for ids in tokenizer(texts)["input_ids"]]

        domain = [json.loads(line)["text"] for line in (self.paths.data / f"{task}_train.jsonl").read_text().splitlines()]
        general = [json.loads(line)["text"] for line in (self.paths.data / "general_train.jsonl").read_text().splitlines()]
        random.Random(seed).shuffle(general)
        want = share / (1 - share) * sum(tokens(domain))
        chosen, total = [], 0
        for text, n in zip(general, tokens(general)):
            if total >= want:
                break
            chosen.append(text)
            total += n
        if total < want:
            raise SystemExit(f"not enough general training text for a {share:.0%} replay share on {task}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in chosen))
        tmp.replace(out)
        write_json(out.with_suffix(".json"), {"share": share, "general_tokens": total, "domain_tokens": sum(tokens(domain)),
                                              "rows": len(chosen), "measured_share": total / (total + sum(tokens(domain)))})
        return out

    # -- WiSE-FT: one PEFT adapter of rank r_ν + r_end (axolotl_alora.interpolate)
    def wise(self, point: Point) -> tuple[Path, dict]:
        end_point = self.wise_end(point)
        end, cost = self.trained(end_point) if end_point.method != "lora" else self.adapter(end_point)
        out = self.run_dir(point)
        if not (out / "adapter_model.safetensors").is_file():
            start = time.time()
            interpolate_adapters(self.paths.base, reproduce.ensure_general(self.paths, self.scale, point.seed), end, point.knob, out)
            write_json(out / "frontier_cost.json", {"wall_s": round(time.time() - start, 1)})
        built = json.loads((out / "frontier_cost.json").read_text())
        return out, {"wall_s": round(cost.get("wall_s", 0) + built["wall_s"], 1), "peak_rss_mib": cost.get("peak_rss_mib")}

    def budget_summary(self, point: Point) -> dict:
        """What the plugin's budget did in the run (`alora_general_eval.json`): target, φ's trajectory, α, share kept."""
        from axolotl_alora.general_eval import GENERAL_EVAL_FILENAME

        return json.loads((self.run_dir(point) / GENERAL_EVAL_FILENAME).read_text())["budget"]

    def wise_end(self, point: Point) -> Point:
        if point.method == "wise_lora":
            return Point("lora", 1.0, point.seed, point.task)
        return Point("alora", self.plan["alora_phi"], point.seed, point.task)

    # -- evaluation
    def sequences(self):
        if self._sequences is None:
            self._sequences = general_sample(self.paths.base, self.paths, self.scale)
        return self._sequences

    def evaluate(self, point: Point) -> dict:
        done = self.result(point)
        if done is not None:
            return done
        from alora_bench.evaluation import evaluate_model
        from alora_bench.evaluation.table import in_training_result

        adapter, cost = self.adapter(point)
        accuracy = f"alora_{point.task}"
        tasks = [accuracy, "alora_wikitext2", "alora_general_ppl"]
        limits = {accuracy: self.args.limit or None, "alora_wikitext2": self.args.ppl_limit or None, "alora_general_ppl": self.args.ppl_limit or None}
        log(f"evaluate {point.name}")
        start = time.time()
        res = evaluate_model(self.paths.base, adapter, tasks, self.manager, limits, self.scale.device, 8, self.scale.max_length or None)
        loss = general_loss(self.paths.base, adapter, self.sequences())
        checkpoint = point.method == "lora" and point.knob != 1.0  # the plugin scores a run's end, not its checkpoints
        watched = in_training_result(self.run_dir(point) if point.method.startswith("budget_") else adapter) if adapter is not None and not checkpoint else None
        cells = res["results"]
        result = {**asdict(point), "label": METHODS[point.method].label if point.method in METHODS else point.method,
                  "acc": cells[accuracy]["acc,none"], "acc_stderr": cells[accuracy]["acc_stderr,none"], "items": res["n-samples"][accuracy]["effective"],
                  "general_loss": loss, "general_ppl": cells["alora_general_ppl"]["word_perplexity,none"],
                  "wikitext2_ppl": cells["alora_wikitext2"]["word_perplexity,none"],
                  "in_training_loss": watched and watched.get("loss,none"), "train_wall_s": cost.get("wall_s"),
                  "train_peak_rss_mib": cost.get("peak_rss_mib"), "eval_wall_s": round(time.time() - start, 1),
                  "adapter": str(adapter) if adapter is not None else None, "domain_steps": self.steps, "learning_rate": self.lr,
                  **({"budget": self.budget_summary(point)} if point.method.startswith("budget_") else {}),
                  **({"end_knob": self.wise_end(point).knob} if point.method.startswith("wise_") else {})}
        write_json(self.result_path(point), result)
        log(f"{point.name}: acc {result['acc']:.3f} ± {result['acc_stderr']:.3f}, general loss {loss:.4f}")
        return result

    # -- the plan, in the order it runs
    def levels(self, seed: int = 0, task: str = "sciq") -> list[float] | None:
        """Accuracy levels fixed before any method but LoRA(ν+μ) is read: ν + share × (LoRA(ν+μ)'s end − ν)."""
        nu, end = self.result(Point("general", None, seed, task)), self.result(Point("lora", 1.0, seed, task))
        if nu is None or end is None:
            return None
        return [nu["acc"] + share * (end["acc"] - nu["acc"]) for share in LEVEL_SHARES]

    def first_seed_points(self, task: str = "sciq") -> list[Point]:
        seed = self.args.seeds[0]
        points = [Point("base", None, seed, task), Point("general", None, seed, task)]
        methods = [m for m in ("lora", "alora", "l2sp", "replay", "wise_lora", "lora_lr", "ewclora") if m in self.args.methods]
        points += [Point(m, v, seed, task) for m in methods for v in self.sweep(m)]
        return points

    def sweep(self, method: str) -> tuple[float, ...]:
        return METHODS[method].values[: self.args.first_values or None]

    def chosen_phi(self) -> float | None:
        """ALoRA's φ for − layer, WiSE-FT of ALoRA and + replay: among its first-seed points reaching the middle level,
        the lowest general loss; if none reaches it, the most accurate. Fixed in plan.json once chosen."""
        if "alora_phi" in self.plan:
            return self.plan["alora_phi"]
        levels = self.levels()
        points = [self.result(Point("alora", phi)) for phi in self.sweep("alora")]
        if levels is None or any(p is None for p in points):
            return None
        reaching = [p for p in points if p["acc"] >= levels[1]]
        best = min(reaching, key=lambda p: p["general_loss"]) if reaching else max(points, key=lambda p: p["acc"])
        self.plan.update(alora_phi=best["knob"], alora_phi_reason="lowest general loss at or above the middle level" if reaching
                         else "no φ reached the middle level: the most accurate", levels=levels)
        write_json(self.paths.results / "plan.json", self.plan)
        return best["knob"]

    def chosen_points(self) -> list[Point]:
        phi = self.chosen_phi()
        if phi is None:
            return []
        seed = self.args.seeds[0]
        points = [Point("alora_nolayer", phi, seed), Point("alora_replay", phi, seed)]
        points += [Point("wise_alora", a, seed) for a in self.sweep("wise_alora")]
        points += [Point("alora_nolayer", v, seed) for v in self.sweep("alora_nolayer") if v != phi]  # its own curve, last
        return [p for p in points if p.method in self.args.methods]

    def budget_points(self) -> list[Point]:
        """The forgetting budget at each keep and mechanism, from ALoRA's chosen φ (first seed)."""
        if self.chosen_phi() is None:
            return []
        return [Point(m, keep, self.args.seeds[0]) for m in METHODS if m.startswith("budget_") and m in self.args.methods
                for keep in METHODS[m].values]

    def middle_points(self) -> list[Point]:
        """Each method's first-seed point nearest the middle accuracy level (for seeds and MedMCQA), and ALoRA and
        ALoRA − layer at ALoRA's chosen φ as well: the plugin's default, the end that WiSE-FT of ALoRA interpolates
        toward, and a pair that says, seed by seed, what the layer weights do."""
        levels = self.levels()
        if levels is None:
            return []
        out = []
        for method in (m for m in METHODS if m in self.args.methods and not m.startswith("budget_")):
            found = [r for r in (self.result(p) for p in self.points_of(method)) if r is not None]
            if found:
                best = min(found, key=lambda r: abs(r["acc"] - levels[1]))
                out.append(Point(method, best["knob"], self.args.seeds[0]))
                if method in ("alora", "alora_nolayer") and self.plan.get("alora_phi") is not None:
                    chosen = Point(method, self.plan["alora_phi"], self.args.seeds[0])
                    out += [chosen] if chosen not in out else []
        return out

    def points_of(self, method: str) -> list[Point]:
        seed = self.args.seeds[0]
        values = METHODS[method].values or ((self.plan["alora_phi"],) if "alora_phi" in self.plan else ())
        return [Point(method, v, seed) for v in values]

    def later_points(self) -> list[Point]:
        """One seed at a time (its general stage, then every middle point), so each chunk completes a seed's rows;
        then MedMCQA at the first seed."""
        middle = self.middle_points()
        points = [q for s in self.args.more_seeds for q in (Point("general", None, s), *(replace(p, seed=s) for p in middle))]
        points += [Point("base", None, self.args.seeds[0], "medmcqa"), Point("general", None, self.args.seeds[0], "medmcqa")]
        points += [replace(p, task="medmcqa") for p in middle]
        return points


def run(args, paths: Paths, scale: Scale, manager) -> None:
    plan_path = paths.results / "plan.json"
    if not plan_path.is_file():
        raise SystemExit(f"no plan yet: run `python -m alora_bench.frontier pilot` first (writes {plan_path})")
    frontier = Frontier(args, paths, scale, manager, json.loads(plan_path.read_text()))
    if not frontier.plan["met"]:
        log("warning: the pilot's criteria were not met (pilot.md): forgetting may not be material in this regime")
    started = time.time()
    stages = {"first": frontier.first_seed_points, "chosen": frontier.chosen_points, "budget": frontier.budget_points,
              "later": frontier.later_points}
    for stage in (stages[name] for name in args.stages):
        for point in stage():
            if frontier.result(point) is not None:
                continue
            if args.max_minutes and (time.time() - started) / 60 > args.max_minutes:
                log(f"stopping: {args.max_minutes} min budget spent; run again to continue")
                return
            frontier.evaluate(point)
            from alora_bench.frontier_report import write_report

            write_report(paths.results)
    log("every point of the plan exists")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", choices=("pilot", "run", "report"))
    p.add_argument("--work", default=str(REPO / "work" / "frontier"))
    p.add_argument("--results", default=str(REPO / "eval" / "results" / "frontier"))
    p.add_argument("--data-dir", help="shared data folder (default ../shared/data or $ALORA_DATA_DIR)")
    p.add_argument("--base-model", help="a Hugging Face model directory instead of the packaged SmolLM2")
    p.add_argument("--seeds", type=int, nargs=1, default=[0], help="the first seed (every sweep)")
    p.add_argument("--more-seeds", type=int, nargs="*", default=[1, 2], help="seeds for each method's middle point")
    p.add_argument("--max-minutes", type=float, default=0, help="start no new point after this many minutes (0: no limit)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="run only these methods' points")
    p.add_argument("--first-values", type=int, default=0, help="only the first N values of each sweep (0: all; for a quick try)")
    p.add_argument("--stages", nargs="+", choices=("first", "chosen", "budget", "later"), default=["first", "chosen", "budget", "later"],
                   help="first: every sweep at the first seed; chosen: the points at ALoRA's chosen φ; budget: the forgetting budget "
                        "at keep 0.5 and 0.8 by each mechanism; later: seeds and MedMCQA")
    p.add_argument("--general-steps", type=int, default=200)
    p.add_argument("--learning-rate", type=float, default=8e-4)
    p.add_argument("--pilot-steps", type=int, default=240, help="the pilot's one LoRA(ν+μ) run")
    p.add_argument("--pilot-every", type=int, default=40, help="the pilot scores a checkpoint every this many steps")
    p.add_argument("--pilot-limit", type=int, default=300, help="SciQ validation items per pilot checkpoint")
    p.add_argument("--limit", type=int, default=500, help="accuracy items scored per point")
    p.add_argument("--ppl-limit", type=int, default=3, help="documents per perplexity task")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--sequence-len", type=int, default=256)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = Paths(Path(args.work).resolve(), Path(args.results).resolve(), Path(args.base_model).resolve() if args.base_model else None)
    if args.job == "report":
        from alora_bench.frontier_report import write_report

        log(f"wrote {write_report(paths.results)}")
        return 0
    scale = Scale(args.general_steps, 0, args.micro_batch_size, args.sequence_len, args.limit, args.ppl_limit, args.max_length,
                  64, 256, args.device)
    reproduce.check_scale(paths, scale)
    reproduce.prepare(paths, args)
    from alora_bench.evaluation import task_manager

    manager = task_manager()
    started = time.time()
    (pilot if args.job == "pilot" else run)(args, paths, scale, manager)
    log(f"{args.job} finished in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
