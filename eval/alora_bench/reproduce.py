"""Reproduce the paper's Table 1, Table 2 and Figures 6–7 with the product, baselines included.

    python -m alora_bench.reproduce sweep    # φ (ALoRA) and λ (EWCLoRA) on SciQ, seed 0; picks both by RULE below
    python -m alora_bench.reproduce grid     # Base, LoRA(μ), LoRA(ν+μ), RSLoRA, EWCLoRA, ALoRA, ALoRA − layer × tasks × seeds
    python -m alora_bench.reproduce report   # rewrite tables and plots from the lm-eval JSON that exists (no training)
    python -m alora_bench.reproduce all      # sweep, grid, report (the default)

Everything runs through the product: `axolotl train` on the YAMLs of examples/smollm2-cpu/ (only paths, seed,
step budget, φ and normalization are set per run), `alora fisher` for EWCLoRA's importance, lm-eval through
`alora_bench.evaluation` for every number, `alora inspect --plot` for Figure 7. Every method of one seed gets
the same step budget and the same data order (the seed). A finished run's lm-eval JSON lives in --results and
is skipped next time, so the grid continues across sessions; adapters and logs live in --work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import yaml

from alora_bench import runs
from alora_bench.runs import axolotl_train, last_train_log, run_logged
from axolotl_alora.args import BUDGET_KEYS
from axolotl_alora.interpolate import INTERPOLATED

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "smollm2-cpu"
TASKS = ("sciq", "piqa", "medmcqa")
PPL_TASKS = ("alora_wikitext2", "alora_general_ppl")
SWEEP_TASK = "sciq"
SELECT_TASK = "alora_sciq_valid"  # the validation split the rule reads; test splits are never used for choosing
RULE = ("among the swept values whose SciQ-valid accuracy is at least LoRA(ν+μ)'s minus 1 point, the one with the "
        "lowest general held-out perplexity; if none qualifies, the smallest value swept")
PAPER_PHI = 1e-3


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    example: str | None  # examples/smollm2-cpu/<example>.yml; None: no domain stage (evaluated as it is)
    continues_general: bool = False  # starts from the seed's general-stage adapter (lora_model_dir); with no
    # example, it is that adapter, evaluated before any domain stage
    importance: str | None = None  # "si": the general stage's file; "fisher": `alora fisher`'s
    tuned: str | None = None  # "phi" (ALoRA's φ) or "lambda" (EWC's λ): the swept penalty weight it uses
    beyond_paper: bool = False  # not in the paper's tables: run and reported only when named in --methods


METHODS = (
    Method("base", "Base", None),
    Method("general", "General stage ν only", None, continues_general=True),
    Method("lora_mu", "LoRA(μ)", "domain-lora-mu"),
    Method("lora_nu_mu", "LoRA(ν+μ)", "domain-lora", continues_general=True),
    Method("rslora", "RSLoRA", "domain-rslora"),
    Method("ewclora", "EWCLoRA", "domain-ewc", importance="fisher", tuned="lambda"),
    Method("alora", "ALoRA", "domain-alora", continues_general=True, importance="si", tuned="phi"),
    Method("alora_nolayer", "ALoRA − layer", "domain-alora-nolayer", continues_general=True, importance="si", tuned="phi"),
    # beyond the paper: Ω ≈ u·vᵀ (alora_importance_form: factored), the same general stage's file factored on read
    Method("alora_factored", "ALoRA factored", "domain-alora-factored", continues_general=True, importance="si", tuned="phi",
           beyond_paper=True),
)
BY_NAME = {m.name: m for m in METHODS}
PAPER_METHODS = tuple(m for m in METHODS if not m.beyond_paper)
TABLE2 = (("alora", "ALoRA"), ("alora_nolayer", "− layer"), ("lora_nu_mu", "− layer, element (= LoRA(ν+μ))"))


@dataclass(frozen=True)
class Scale:
    """Everything that changes the numbers; results made at one scale are never mixed with another's."""

    general_steps: int
    domain_steps: int
    micro_batch_size: int
    sequence_len: int
    limit: int
    ppl_limit: int
    max_length: int
    fisher_samples: int
    fisher_max_length: int
    device: str
    epochs: float | None = None  # where a step budget is 0: train this many epochs (the main job's --epochs)


@dataclass(frozen=True)
class Run:
    method: Method
    task: str
    seed: int
    phi: float | None = None
    normalization: str | None = None
    budget: bool = False  # keep the example's forgetting budget (φ is its start); else its budget keys are removed

    @property
    def run_id(self) -> str:
        if self.method.tuned is None:
            return self.method.name
        return f"{self.method.name}-{self.normalization}-phi{self.phi:g}"


def log(msg: str) -> None:
    runs.log(msg, "reproduce")


class Paths:
    def __init__(self, work: Path, results: Path, base: Path | None):
        self.work, self.results = work, results
        self.base = base or work / "smollm2"
        self.data = work / "data"

    def general(self, seed: int) -> Path:
        return self.work / "runs" / f"s{seed}" / "general"

    def fisher(self, seed: int) -> Path:
        return self.work / "runs" / f"s{seed}" / "fisher" / "alora_fisher.safetensors"

    def run_dir(self, run: Run) -> Path:
        return self.work / "runs" / f"s{run.seed}" / run.task / run.run_id

    def general_name(self, seed: int) -> str:
        """The general stage's name for its config, log and cost entry."""
        return f"s{seed}/general"

    def run_name(self, run: Run) -> str:
        return f"s{run.seed}/{run.task}/{run.run_id}"

    def lm_eval(self, run: Run) -> Path:
        if run.method.name == "base":
            return self.results / "lm-eval" / "base.json"
        return self.results / "lm-eval" / f"s{run.seed}" / run.task / f"{run.run_id}.json"

    def importance(self, run: Run) -> Path | None:
        return {"si": self.general(run.seed) / "alora_importance.safetensors", "fisher": self.fisher(run.seed)}.get(
            run.method.importance)


# ------------------------------------------------------------------------------------------ running things


def write_json(path: Path, obj) -> None:
    """Atomically: a crash never leaves a half-written result that a later session would skip over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def record_cost(paths: Paths, key: str, cost: dict) -> None:
    """Add one entry to costs.json; locked, since two drivers may share a results folder (e.g. one per seed)."""
    import fcntl

    costs_path = paths.results / "costs.json"
    costs_path.parent.mkdir(parents=True, exist_ok=True)
    with (paths.results / ".costs.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        costs = json.loads(costs_path.read_text()) if costs_path.is_file() else {}
        costs[key] = cost
        write_json(costs_path, costs)


def train(cfg: dict, name: str, paths: Paths, scale: Scale) -> dict:
    if scale.device != "cpu":
        cfg.update(bf16=True, fp16=False)
    return axolotl_train(cfg, paths.work / "configs" / f"{name}.yml", paths.work / "logs" / f"{name}.log", paths.work, name)


def example(name: str, paths: Paths, scale: Scale, seed: int, output_dir: Path) -> dict:
    cfg = yaml.safe_load((EXAMPLES / f"{name}.yml").read_text())
    cfg.update(base_model=str(paths.base), dataset_prepared_path=str(paths.work / "prepared"), output_dir=str(output_dir),
               seed=seed, micro_batch_size=scale.micro_batch_size, sequence_len=scale.sequence_len)
    if cfg.get("alora_general_eval"):
        cfg["alora_general_eval"] = str(paths.data / "general_heldout.jsonl")
    return cfg


def ensure_general(paths: Paths, scale: Scale, seed: int) -> Path:
    """Stage ν for this seed: LoRA on general text recording SI importance (examples/smollm2-cpu/general.yml)."""
    out = paths.general(seed)
    if not (out / "alora_importance.safetensors").is_file():
        cfg = example("general", paths, scale, seed, out)
        cfg["datasets"][0]["path"] = str(paths.data / "general_train.jsonl")
        budget(cfg, scale.general_steps, scale)
        name = paths.general_name(seed)
        record_cost(paths, f"{name} (SI)", {**train(cfg, name, paths, scale), **file_cost(out / "alora_importance.safetensors")})
    return out


def ensure_fisher(paths: Paths, scale: Scale, seed: int) -> Path:
    """EWCLoRA's importance for this seed: `alora fisher` on the general training text."""
    out = paths.fisher(seed)
    if not out.is_file():
        cmd = [sys.executable, "-m", "axolotl_alora.cli", "fisher", "--base", str(paths.base),
               "--data", str(paths.data / "general_train.jsonl"), "--samples", str(scale.fisher_samples),
               "--max-length", str(scale.fisher_max_length), "--seed", str(seed), "--device", scale.device,
               "--out", str(out), "--no-progress"]
        cost = run_logged(cmd, paths.work / "logs" / f"s{seed}" / "fisher.log", paths.work, f"s{seed}/fisher")
        record_cost(paths, f"s{seed}/fisher (EWC)", {**cost, **file_cost(out)})
    return out


def file_cost(path: Path) -> dict:
    return {"file_mib": round(path.stat().st_size / 2**20, 1)}


def domain_config(run: Run, paths: Paths, scale: Scale) -> dict:
    cfg = example(run.method.example, paths, scale, run.seed, paths.run_dir(run))
    cfg["datasets"][0]["path"] = str(paths.data / f"{run.task}_train.jsonl")
    budget(cfg, scale.domain_steps, scale)
    if "lora_model_dir" in cfg:
        cfg["lora_model_dir"] = str(paths.general(run.seed))
    if run.method.importance:
        cfg["alora_importance_path"] = str(paths.importance(run))
        cfg["alora_phi"] = run.phi
        cfg["alora_importance_normalization"] = run.normalization
    if not run.budget:
        without_budget(cfg)
    return cfg


def without_budget(cfg: dict) -> dict:
    """A fixed-knob run measures its knob: the example's forgetting budget (which would steer φ or interpolate) goes."""
    for key in (*BUDGET_KEYS, "alora_budget_by", "alora_general_eval_steps"):
        cfg.pop(key, None)
    return cfg


def budgeted(run_dir: Path) -> Path:
    """The adapter a run's user takes: the budget's interpolated adapter when the run wrote one, else the run's."""
    return run_dir / INTERPOLATED if (run_dir / INTERPOLATED / "adapter_config.json").is_file() else run_dir


def budget(cfg: dict, steps: int, scale: Scale) -> None:
    """`steps` optimizer steps, or with 0 and scale.epochs set, that many epochs."""
    if steps or not scale.epochs:
        cfg["max_steps"] = steps
    else:
        cfg.pop("max_steps", None)
        cfg["num_epochs"] = scale.epochs


def eval_tasks(task: str, select: bool) -> list[str]:
    return [*PPL_TASKS, f"alora_{task}", *([SELECT_TASK] if select else [])]


def ensure_run(run: Run, paths: Paths, scale: Scale, manager, select: bool = False, tasks: list[str] | None = None) -> dict:
    """Train (unless its lm-eval JSON exists) and evaluate one cell; returns its lm-eval results.
    `select`: the sweep's runs are also scored on the validation split that the rule reads.
    `tasks`: evaluate these instead of the method's usual set (the main job's preset)."""
    out = paths.lm_eval(run)
    if out.is_file():
        return json.loads(out.read_text())
    adapter = None
    if run.method.example is None and run.method.continues_general:
        ensure_general(paths, scale, run.seed)
        adapter = paths.general(run.seed)
    elif run.method.example is not None:
        if run.method.continues_general or run.method.importance == "si":
            ensure_general(paths, scale, run.seed)
        if run.method.importance == "fisher":
            ensure_fisher(paths, scale, run.seed)
        adapter = paths.run_dir(run)
        name = paths.run_name(run)
        if not (adapter / "adapter_model.safetensors").is_file():
            record_cost(paths, name, train(domain_config(run, paths, scale), name, paths, scale))
    if tasks is None and run.method.example is not None:
        tasks = eval_tasks(run.task, select)
    elif tasks is None:  # every task once; Base also on the validation split, as the sweep's reference point
        tasks = [*PPL_TASKS, *(f"alora_{t}" for t in TASKS), *([SELECT_TASK] if adapter is None else [])]
    limits = {t: (scale.ppl_limit if t in PPL_TASKS else scale.limit) or None for t in tasks}
    log(f"lm-eval {run.run_id} (seed {run.seed}, {run.task}): {', '.join(tasks)}")
    from alora_bench.evaluation import evaluate_model
    from alora_bench.evaluation.table import IN_TRAINING, in_training_result

    start = time.time()
    results = evaluate_model(paths.base, adapter and budgeted(adapter), tasks, manager, limits, scale.device, 8, scale.max_length or None)
    watched = in_training_result(adapter) if adapter is not None else None
    if watched is not None:  # the plugin's general-text loss at the end of training, beside lm-eval's numbers
        results["results"][IN_TRAINING] = watched
    results["alora_reproduce"] = {"run": run.run_id, "method": run.method.name, "task": run.task, "seed": run.seed,
                                  "phi": run.phi, "normalization": run.normalization, "scale": asdict(scale),
                                  "eval_wall_s": round(time.time() - start, 1),
                                  "last_train_log": last_train_log(paths.work / "logs" / f"{name}.log")
                                  if run.method.example is not None else None}
    write_json(out, results)
    return results


# ------------------------------------------------------------------------------------------ reading results


def metric(results: dict, task: str) -> float | None:
    cell = results.get("results", {}).get(task, {})
    key = "word_perplexity,none" if task in PPL_TASKS else "acc,none"
    return cell.get(key)


def mean_omega(path: Path) -> float:
    from safetensors import safe_open

    total, count = 0.0, 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.endswith(".omega"):
                omega = f.get_tensor(key).double()
                total, count = total + float(omega.sum()), count + omega.numel()
    return total / count


def select(candidates: dict[float, dict], reference: dict) -> tuple[float, str]:
    """RULE, applied to {value: lm-eval results}; returns the value and why."""
    floor = metric(reference, SELECT_TASK) - 0.01
    ok = {v: r for v, r in candidates.items() if metric(r, SELECT_TASK) >= floor - 1e-12}
    if not ok:
        return min(candidates), f"no value kept SciQ-valid accuracy ≥ {floor:.3f}; the smallest swept"
    best = min(ok, key=lambda v: (metric(ok[v], "alora_general_ppl"), v))
    return best, f"{len(ok)} of {len(candidates)} values kept SciQ-valid accuracy ≥ {floor:.3f}; lowest general held-out PPL"


# ------------------------------------------------------------------------------------------ the three jobs


def sweep(args, paths: Paths, scale: Scale, manager) -> dict:
    """Figure 6: φ for ALoRA (normalization mean, plus raw Ω at the paper's 1e-3) and λ for EWCLoRA (mean) on SciQ
    with the first seed; picks φ and λ by RULE and writes chosen.json (a later call with the same values reads it)."""
    seed = args.seeds[0]
    done = paths.results / "chosen.json"
    if done.is_file():
        chosen = json.loads(done.read_text())
        if (chosen["phis"], chosen["ewc_lambdas"], chosen["seed"]) == (args.phis, args.ewc_lambdas, seed):
            log(f"sweep done: {done} (φ {chosen['phi']:g}, λ {chosen['lambda']:g}); delete it to sweep again")
            return chosen

    def swept(method: str, phi=None, normalization=None) -> dict:
        return ensure_run(Run(BY_NAME[method], SWEEP_TASK, seed, phi, normalization), paths, scale, manager, select=True)

    reference = swept("lora_nu_mu")
    swept("lora_mu")
    alora = {phi: swept("alora", phi, "mean") for phi in args.phis}
    ewc = {lam: swept("ewclora", lam, "mean") for lam in args.ewc_lambdas}
    omega_mean = mean_omega(paths.general(seed) / "alora_importance.safetensors")
    if not omega_mean > 0:
        raise SystemExit(f"the seed-{seed} general stage recorded no importance (mean Ω {omega_mean}); train it longer (--general-steps)")
    raw = [PAPER_PHI]  # the paper's φ on raw Ω (`mean` at φ is raw at φ / mean Ω: the same penalty, so not re-run)
    for phi in raw:
        swept("alora", phi, "none")
    phi, phi_why = select(alora, reference)
    lam, lam_why = select(ewc, reference)
    chosen = {"phi": phi, "phi_normalization": "mean", "phi_reason": phi_why, "lambda": lam, "lambda_normalization": "mean",
              "lambda_reason": lam_why, "rule": RULE, "seed": seed, "task": SWEEP_TASK, "mean_omega_seed0": omega_mean,
              "phis": args.phis, "ewc_lambdas": args.ewc_lambdas, "raw_phis": raw}
    write_json(paths.results / "chosen.json", chosen)
    log(f"chosen: ALoRA φ {phi} ({phi_why}); EWCLoRA λ {lam} ({lam_why})")
    return chosen


def chosen_values(args, paths: Paths) -> dict:
    path = paths.results / "chosen.json"
    chosen = json.loads(path.read_text()) if path.is_file() else {}
    phi = args.phi if args.phi is not None else chosen.get("phi")
    lam = args.ewc_lambda if args.ewc_lambda is not None else chosen.get("lambda")
    if phi is None or lam is None:
        raise SystemExit(f"no φ/λ chosen yet: run `python -m alora_bench.reproduce sweep` first (writes {path}), or pass --phi and --ewc-lambda")
    return {"phi": phi, "lambda": lam}


def grid_runs(args, values: dict | None) -> list[Run]:
    methods = [m for m in METHODS if m.name in args.methods]
    runs = [Run(BY_NAME["base"], "all", 0)] if "base" in args.methods else []
    for seed in args.seeds:
        if "general" in args.methods:
            runs.append(Run(BY_NAME["general"], "all", seed))
        for task in args.tasks:
            for m in methods:
                if m.example is not None:
                    value = values[m.tuned] if m.tuned else None
                    runs.append(Run(m, task, seed, value, "mean" if m.tuned else None))
    return runs


def grid(args, paths: Paths, scale: Scale, manager) -> None:
    tuned = any(BY_NAME[name].tuned for name in args.methods)
    values = chosen_values(args, paths) if tuned else None
    runs = grid_runs(args, values)
    for i, run in enumerate(runs, 1):
        done = paths.lm_eval(run).is_file()
        log(f"grid {i}/{len(runs)}: {run.method.label} on {run.task}, seed {run.seed}{' (done)' if done else ''}")
        ensure_run(run, paths, scale, manager)


def report(args, paths: Paths) -> None:
    from alora_bench.reproduce_report import write_reports  # tables and plots from the JSON alone

    path = paths.results / "chosen.json"
    chosen = json.loads(path.read_text()) if path.is_file() else {}
    if chosen or (args.phi is not None and args.ewc_lambda is not None):
        chosen.update(chosen_values(args, paths))
    chosen = chosen or None  # no φ / λ yet: the penalised rows stay empty
    methods = [m for m in METHODS if not m.beyond_paper or m.name in args.methods]
    for written in write_reports(paths.results, methods, TABLE2, chosen, args.seeds, args.tasks):
        log(f"wrote {written}")
    general = paths.general(args.seeds[0]) / "alora_importance.safetensors"
    if general.is_file():
        subprocess.run([sys.executable, "-m", "axolotl_alora.cli", "inspect", str(general), "--plot",
                        str(paths.results / "fig7_heatmap.png")], check=True, stdout=subprocess.DEVNULL)
        log(f"wrote {paths.results / 'fig7_heatmap.png'} (Figure 7)")


# ------------------------------------------------------------------------------------------ command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Rule for φ and λ (fixed before any test number is read): " + RULE + ".")
    p.add_argument("job", nargs="?", choices=("all", "sweep", "grid", "report"), default="all")
    p.add_argument("--work", default=str(REPO / "work" / "reproduce"), help="adapters, logs, configs (default ./work/reproduce)")
    p.add_argument("--results", default=str(REPO / "eval" / "results" / "reproduce"), help="lm-eval JSON, tables, plots")
    p.add_argument("--base-model", help="a Hugging Face model directory instead of the packaged SmolLM2")
    p.add_argument("--data-dir", help="shared data folder (default ../shared/data or $ALORA_DATA_DIR)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (the sweep uses the first)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--methods", nargs="+", choices=list(BY_NAME), default=[m.name for m in PAPER_METHODS],
                   help="grid methods (default: the paper's; those without a penalty need no sweep first)")
    p.add_argument("--phis", type=float, nargs="+", default=[0.03, 0.3, 3.0, 30.0], help="ALoRA φ swept (normalization mean)")
    p.add_argument("--ewc-lambdas", type=float, nargs="+", default=[0.003, 0.03, 0.3, 3.0], help="EWCLoRA λ swept (normalization mean)")
    p.add_argument("--phi", type=float, help="ALoRA φ for the grid instead of the sweep's choice")
    p.add_argument("--ewc-lambda", type=float, help="EWCLoRA λ for the grid instead of the sweep's choice")
    s = p.add_argument_group("scale (recorded in scale.json; results of another scale are refused)")
    s.add_argument("--general-steps", type=int, default=30)
    s.add_argument("--domain-steps", type=int, default=30)
    s.add_argument("--micro-batch-size", type=int, default=4)
    s.add_argument("--sequence-len", type=int, default=256)
    s.add_argument("--limit", type=int, default=100, help="items per accuracy task (0: all)")
    s.add_argument("--ppl-limit", type=int, default=3, help="documents per perplexity task (0: all)")
    s.add_argument("--max-length", type=int, default=1024, help="lm-eval context / perplexity window (0: the model's)")
    s.add_argument("--fisher-samples", type=int, default=64)
    s.add_argument("--fisher-max-length", type=int, default=256)
    s.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def scale_of(args) -> Scale:
    return Scale(args.general_steps, args.domain_steps, args.micro_batch_size, args.sequence_len, args.limit,
                 args.ppl_limit, args.max_length, args.fisher_samples, args.fisher_max_length, args.device)


def check_scale(paths: Paths, scale: Scale) -> None:
    path = paths.results / "scale.json"
    if path.is_file():
        # a field added later compares as its default in records written before it
        defaults = {f.name: f.default for f in fields(Scale) if f.default is not MISSING}
        recorded = {**defaults, **json.loads(path.read_text())}
        if recorded != asdict(scale):
            diff = {k: (recorded.get(k), v) for k, v in asdict(scale).items() if recorded.get(k) != v}
            raise SystemExit(f"{paths.results} holds results made at another scale ({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in diff.items())}); "
                             "pass the same scale flags, or another --results")
    else:
        write_json(path, asdict(scale))


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = Paths(Path(args.work).resolve(), Path(args.results).resolve(), Path(args.base_model).resolve() if args.base_model else None)
    scale = scale_of(args)
    if args.job != "report":
        check_scale(paths, scale)
        prepare(paths, args)
        from alora_bench.evaluation import task_manager

        manager = task_manager()
        started = time.time()
        if args.job in ("all", "sweep"):
            sweep(args, paths, scale, manager)
        if args.job in ("all", "grid"):
            grid(args, paths, scale, manager)
        log(f"{args.job} finished in {(time.time() - started) / 60:.1f} min")
    report(args, paths)
    return 0


def prepare(paths: Paths, args) -> None:
    from alora_bench.data import prepare_data
    from alora_bench.model_prep import prepare_model

    if not args.base_model:
        prepare_model(paths.base)
    if not (paths.data / "DATA_MANIFEST.json").is_file():
        prepare_data(paths.data, args.data_dir)


if __name__ == "__main__":
    sys.exit(main())
