"""Tables and plots of `eval/alora_bench/reproduce.py`, made from the lm-eval JSON in its results folder alone.

table1.md (the paper's Table 1: methods × tasks, general PPL ↓ and accuracy ↑, mean ± std over seeds),
table2.md (the ablations), costs.md (each stage's peak memory and wall time, from costs.json), sweep.md and
fig6_phi_sweep.png (the paper's Figure 6: general PPL and accuracy against φ), all from `<results>/lm-eval/**.json`,
whose `alora_reproduce` entry says which run each one is.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

# the last: the plugin's own general-text loss at the end of the stage (alora_general_eval), as a per-token perplexity
PPL = (("alora_wikitext2", "WikiText-2 PPL ↓"), ("alora_general_ppl", "General PPL ↓"), ("alora_general_eval", "General token PPL in training ↓"))
PPL_TASKS = {task for task, _ in PPL}
TASK_LABELS = {"sciq": "SciQ", "piqa": "PIQA", "medmcqa": "MedMCQA"}
SWEEP_COLUMNS = (("alora_wikitext2", "WikiText-2 PPL ↓"), ("alora_general_ppl", "General PPL ↓"),
                 ("alora_sciq_valid", "SciQ valid acc ↑"), ("alora_sciq", "SciQ test acc ↑"))


def load(results_dir: Path) -> list[dict]:
    """Every evaluated run: its `alora_reproduce` description plus `metrics` {lm-eval task: value}."""
    entries = []
    for path in sorted((results_dir / "lm-eval").rglob("*.json")):
        raw = json.loads(path.read_text())
        entry = dict(raw.get("alora_reproduce") or {})
        entry["metrics"] = {task: r.get("word_perplexity,none", r.get("token_perplexity,none", r.get("acc,none"))) for task, r in raw["results"].items()}
        entry["path"] = path
        entries.append(entry)
    return entries


def stats(values: list[float]) -> tuple[float, float | None, int]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def fmt(values: list[float], ppl: bool, seeds: int) -> str:
    if not values:
        return "–"
    mean, std, n = stats(values)
    digits = 2 if ppl else 1
    scale = 1 if ppl else 100  # accuracy in percent, like the paper
    text = f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if std is not None else "")
    return text + (f" (n={n})" if n < seeds else "")


def grid_entries(entries: list[dict], method, task: str, chosen: dict | None, seeds: list[int]) -> list[dict]:
    """The runs of one Table-1 cell: this method on this task, over the seeds, at the chosen φ / λ."""
    out = []
    for e in entries:
        if e.get("method") != method.name or e.get("task") != task or e.get("seed") not in seeds:
            continue
        if method.tuned:
            if chosen is None or e.get("normalization") != "mean" or e.get("phi") != chosen[method.tuned]:
                continue
        out.append(e)
    return out


def cells(entries: list[dict], method, task: str, chosen, seeds: list[int]) -> list[str]:
    if method.example is None:  # no domain stage: Base (one evaluation), or each seed's general adapter
        runs = [e for e in entries if e.get("method") == method.name and (not method.continues_general or e.get("seed") in seeds)]
    else:
        runs = grid_entries(entries, method, task, chosen, seeds)
    n = len(seeds) if method.example is not None or method.continues_general else 1
    columns = [*(ppl for ppl, _ in PPL), f"alora_{task}"]
    return [fmt([r["metrics"][c] for r in runs if r["metrics"].get(c) is not None], c in PPL_TASKS, n) for c in columns]


def table_head(tasks: list[str]) -> list[str]:
    head = "| method | " + " | ".join(f"{TASK_LABELS[t]} {label}" for t in tasks for label in [*(ppl for _, ppl in PPL), "acc ↑"]) + " |"
    return [head, "|---|" + "---:|" * ((len(PPL) + 1) * len(tasks))]


def table(entries, rows, tasks, chosen, seeds) -> str:
    lines = table_head(tasks)
    for method, label in rows:
        row = [c for t in tasks for c in cells(entries, method, t, chosen, seeds)]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def fmt_delta(diffs: list[float], ppl: bool) -> str:
    if not diffs:
        return "–"
    mean, std, n = stats(diffs)
    digits, scale = (2, 1) if ppl else (1, 100)
    better = sum(d < 0 for d in diffs) if ppl else sum(d > 0 for d in diffs)
    text = f"{mean * scale:+.{digits}f}" + (f" ± {std * scale:.{digits}f}" if std is not None else "")
    return text + f" ({better} of {n} {'lower' if ppl else 'higher'})"


def paired_table(entries, rows, tasks, chosen, seeds, reference) -> str:
    """Each method minus `reference` on the same seed and task. A seed fixes the data order and the LoRA
    initialisation for every method, and the general stage for those that continue it, so most of the spread
    across seeds cancels in the difference."""
    lines = table_head(tasks)
    for method, label in rows:
        if method.example is None or method is reference:
            continue
        row = []
        for task in tasks:
            ref = {e["seed"]: e["metrics"] for e in grid_entries(entries, reference, task, chosen, seeds)}
            runs = [(e["metrics"], ref[e["seed"]]) for e in grid_entries(entries, method, task, chosen, seeds) if e["seed"] in ref]
            for c in [*(ppl for ppl, _ in PPL), f"alora_{task}"]:
                diffs = [m[c] - r[c] for m, r in runs if m.get(c) is not None and r.get(c) is not None]
                row.append(fmt_delta(diffs, c in PPL_TASKS))
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def scale_line(results_dir: Path) -> str:
    scale = json.loads((results_dir / "scale.json").read_text())
    return ", ".join(f"{k} {v}" for k, v in scale.items())


def write_reports(results_dir: Path, methods, table2, chosen: dict | None, seeds: list[int], tasks: list[str]) -> list[Path]:
    entries = load(results_dir)
    by_name = {m.name: m for m in methods}
    note = (f"Mean ± sample std over seeds {', '.join(map(str, seeds))} (n=… where fewer seeds have finished); accuracy in %, "
            f"lm-eval `acc` on the test split; PPL is lm-eval `word_perplexity` on WikiText-2 test and the general held-out "
            f"slice after training on that column's task; \"in training\" is the plugin's `alora_general_loss` at the end of the stage "
            f"(`alora_general_eval`, a fixed sample of the same held-out text) as a per-token perplexity, – where a run predates it. "
            f"Base is deterministic (one evaluation). "
            f"\"General stage ν only\" is each seed's general adapter before any domain stage, so its numbers repeat across tasks. ")
    if chosen:
        note += f"ALoRA φ = {chosen['phi']:g} and EWCLoRA λ = {chosen['lambda']:g} (normalization mean), chosen by the sweep (sweep.md). "
    note += f"Scale: {scale_line(results_dir)}."
    written = []
    reference = by_name["lora_nu_mu"]
    paired_note = ("\n## Paired with LoRA(ν+μ): each method minus LoRA(ν+μ) on the same seed and task\n\n"
                   "Mean ± sample std of the per-seed differences, and on how many seeds the method was better (PPL lower, "
                   "accuracy higher). Within a seed every method shares the data order and LoRA initialisation, and ALoRA, "
                   "− layer and LoRA(ν+μ) share the general stage, whose variation across seeds dominates the std above.\n\n")
    t1 = table(entries, [(m, m.label) for m in methods], tasks, chosen, seeds)
    p1 = paired_table(entries, [(m, m.label) for m in methods], tasks, chosen, seeds, reference)
    beyond = [m for m in methods if getattr(m, "beyond_paper", False)]
    if beyond and "alora" in by_name:  # e.g. the factored form: what it changes against the paper's dense Ω
        p1 += ("\n\n## Beyond the paper, paired with ALoRA (dense Ω): each method minus ALoRA on the same seed and task\n\n"
               "Same general stage, data order, LoRA initialisation and φ; only the method's difference remains.\n\n"
               + paired_table(entries, [(m, m.label) for m in beyond], tasks, chosen, seeds, by_name["alora"]))
    written.append(_write(results_dir / "table1.md", "# Table 1: general PPL and domain accuracy per method\n\n" + t1 + "\n\n" + note
                          + "\n" + paired_note + p1 + "\n"))
    t2 = table(entries, [(by_name[n], label) for n, label in table2], tasks, chosen, seeds)
    p2 = paired_table(entries, [(by_name[n], label) for n, label in table2], tasks, chosen, seeds, reference)
    written.append(_write(results_dir / "table2.md", "# Table 2: ablations of ALoRA\n\n" + t2 + "\n\n" + note + "\n"
                          + paired_note + p2 + "\n"))
    costs_path = results_dir / "costs.json"
    if costs_path.is_file():
        costs = json.loads(costs_path.read_text())
        written.append(_write(results_dir / "costs.md", costs_markdown(entries, methods, tasks, chosen, seeds, costs)))
    sweep_rows = [e for e in entries if e.get("seed") == (chosen or {}).get("seed", seeds[0]) and e.get("task") == "sciq"]
    if chosen and "rule" in chosen and sweep_rows:  # a sweep ran (not just --phi / --ewc-lambda)
        written.append(_write(results_dir / "sweep.md", sweep_markdown(sweep_rows, chosen, results_dir)))
        written.append(plot_sweep(sweep_rows, chosen, results_dir / "fig6_phi_sweep.png"))
    return written


def fmt_count(values: list[float], digits: int = 0) -> str:
    if not values:
        return "–"
    mean, std, n = stats(values)
    return f"{mean:,.{digits}f}" + (f" ± {std:,.{digits}f}" if std is not None else "") + f" (n={n})"


def measured(records: list[dict | None]) -> list[dict]:
    """The cost records with the child's own peak memory (older records, made with ru_maxrss, had theirs removed)."""
    return [r for r in records if r and r.get("peak_rss_mib")]


def costs_markdown(entries, methods, tasks, chosen, seeds, costs: dict) -> str:
    """Peak resident memory (VmHWM of the child process) and wall time of every stage, per Table-1 cell."""
    lines = ["# Cost of each stage: peak resident memory (MiB) and wall time (s)", "",
             "Mean ± sample std over the runs of each cell whose peak memory was recorded (n = how many). Peak memory is the "
             "VmHWM of the `axolotl train` / `alora fisher` process itself; wall time includes its start-up and was measured on "
             "a shared 2-core machine, so compare it only roughly.", "",
             "| stage | peak MiB | wall s | file MiB |", "|---|---:|---:|---:|"]
    for stage in ("general (SI)", "fisher (EWC)"):
        recs = measured([costs.get(f"s{seed}/{stage}") for seed in seeds])
        lines.append(f"| {stage} | {fmt_count([r['peak_rss_mib'] for r in recs])} | {fmt_count([r['wall_s'] for r in recs])} | "
                     f"{fmt_count([r['file_mib'] for r in recs if 'file_mib' in r], 1)} |")
    lines += ["", "Domain stages (`axolotl train` only; lm-eval not included):", "",
              "| method | " + " | ".join(f"{TASK_LABELS[t]} peak MiB | {TASK_LABELS[t]} wall s" for t in tasks) + " |",
              "|---|" + "---:|" * (2 * len(tasks))]
    for method in methods:
        if method.example is None:
            continue
        row = []
        for task in tasks:
            recs = measured([costs.get(f"s{e['seed']}/{task}/{e.get('run')}") for e in grid_entries(entries, method, task, chosen, seeds)])
            row += [fmt_count([r["peak_rss_mib"] for r in recs]), fmt_count([r["wall_s"] for r in recs])]
        lines.append(f"| {method.label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _sweep_key(e: dict) -> tuple:
    order = {"lora_nu_mu": 0, "lora_mu": 1, "alora": 2, "ewclora": 3}
    return order.get(e["method"], 9), e.get("normalization") or "", e.get("phi") or 0


def sweep_markdown(rows: list[dict], chosen: dict, results_dir: Path) -> str:
    mean_omega = chosen["mean_omega_seed0"]
    lines = ["# φ sweep (Figure 6): ALoRA's φ and EWCLoRA's λ on SciQ, seed " + str(chosen["seed"]), "",
             f"Rule, fixed before reading any test number: {chosen['rule']}.  ",
             f"Chosen: ALoRA φ = {chosen['phi']:g} ({chosen['phi_reason']}); EWCLoRA λ = {chosen['lambda']:g} ({chosen['lambda_reason']}).  ",
             f"Mean Ω of the seed-{chosen['seed']} general stage: {mean_omega:.3g}, so raw φ = φ_mean / {mean_omega:.3g} "
             "(normalization `mean` divides Ω by its mean: the same penalty).", "",
             "| run | normalization | φ / λ | φ on the mean scale | φ·L_reg/L_task (last log) | "
             + " | ".join(label for _, label in SWEEP_COLUMNS) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(SWEEP_COLUMNS)]
    for e in sorted((r for r in rows if r["method"] in ("lora_nu_mu", "lora_mu", "alora", "ewclora")), key=_sweep_key):
        phi, norm = e.get("phi"), e.get("normalization")
        on_mean = "–" if phi is None else f"{phi:g}" if norm == "mean" or e["method"] == "ewclora" else f"{phi * mean_omega:.3g}"
        ratio = (e.get("last_train_log") or {}).get("alora_reg_ratio")
        mark = " ✔" if (e["method"] == "alora" and phi == chosen["phi"] and norm == "mean") or (
            e["method"] == "ewclora" and phi == chosen["lambda"]) else ""
        vals = [fmt([e["metrics"][t]] if e["metrics"].get(t) is not None else [], t in PPL_TASKS, 1) for t, _ in SWEEP_COLUMNS]
        lines.append(f"| {e['method']}{mark} | {norm or '–'} | {'–' if phi is None else f'{phi:g}'} | {on_mean} | "
                     f"{'–' if ratio is None else f'{ratio:.3g}'} | " + " | ".join(vals) + " |")
    lines += ["", "✔ = chosen for Table 1. Accuracy in %. " + f"Scale: {scale_line(results_dir)}.", ""]
    return "\n".join(lines)


def plot_sweep(rows: list[dict], chosen: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean_omega = chosen["mean_omega_seed0"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("alora_wikitext2", "WikiText-2 PPL ↓"), ("alora_general_ppl", "general held-out PPL ↓"), ("alora_sciq", "SciQ test acc ↑"))
    for ax, (task, title) in zip(axes, panels):
        for method, label, marker in (("alora", "ALoRA (φ)", "o-"), ("ewclora", "EWCLoRA (λ)", "s--")):
            pts = sorted((e["phi"], e["metrics"][task]) for e in rows if e["method"] == method and e.get("normalization") == "mean"
                         and e["metrics"].get(task) is not None)
            if pts:
                ax.plot(*zip(*pts), marker, label=label)
        raw = [(e["phi"] * mean_omega, e["metrics"][task]) for e in rows if e["method"] == "alora" and e.get("normalization") == "none"
               and e["metrics"].get(task) is not None]
        if raw:
            ax.plot(*zip(*raw), "x", color="k", markersize=9, label="ALoRA raw Ω (at φ·mean Ω)")
        for method, label, style in (("lora_nu_mu", "LoRA(ν+μ)", ":"), ("lora_mu", "LoRA(μ)", "-.")):
            ref = [e["metrics"][task] for e in rows if e["method"] == method and e["metrics"].get(task) is not None]
            if ref:
                ax.axhline(ref[0], linestyle=style, color="gray", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("φ (λ) with normalization mean")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"φ sweep on SciQ, seed {chosen['seed']} (paper's φ = 1e-3 on raw Ω sits at {1e-3 * mean_omega:.1e} here)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
