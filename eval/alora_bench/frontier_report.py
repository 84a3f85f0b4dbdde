"""frontier.md and frontier.png from the frontier's point files alone (`python -m alora_bench.frontier report`).

Each point file (`<results>/points/s<seed>/<task>/<method>[-<knob>].json`) holds one adapter's SciQ (or MedMCQA)
accuracy, its general held-out loss (the plugin's scorer on a fixed sample), lm-eval's perplexities and its costs.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from alora_bench.frontier import KEPT_LEVELS, LEVEL_SHARES, METHODS

ANCHORED = {"wise_lora", "wise_alora"}  # WiSE-FT's α = 0 is ν and α = 1 its end point: both belong to its curve
BUDGET = tuple(m for m in METHODS if m.startswith("budget_"))  # operating points chosen by the plugin, not swept knobs
SINGLE = tuple(m for m in METHODS if not METHODS[m].values)  # one point each, at ALoRA's chosen φ: compared, not interpolated
CURVES = tuple(m for m in METHODS if m not in BUDGET + SINGLE)
TASK_LABELS = {"sciq": "SciQ", "medmcqa": "MedMCQA"}


def load(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "points").rglob("*.json"))]


def find(points: list[dict], method: str, seed: int = 0, task: str = "sciq", knob=None) -> dict | None:
    for p in points:
        if (p["method"], p["seed"], p["task"]) == (method, seed, task) and (knob is None or _same(p["knob"], knob)):
            return p
    return None


def _same(a, b) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)


def kept(point: dict, base: dict, nu: dict) -> float | None:
    """The share of the general stage's gain in general loss still there: (base − now) / (base − ν)."""
    gain = base["general_loss"] - nu["general_loss"]
    return (base["general_loss"] - point["general_loss"]) / gain if gain > 0 else None


def curve(points: list[dict], method: str, seed: int = 0, task: str = "sciq") -> list[dict]:
    """The method's points at one seed and task, in knob order; WiSE-FT with ν (α 0) and its end point (α 1); the
    learning-rate and replay curves with LoRA(ν+μ)'s end (full rate, no replay)."""
    found = sorted((p for p in points if (p["method"], p["seed"], p["task"]) == (method, seed, task)), key=lambda p: p["knob"])
    if not found:
        return []  # a method's curve needs a point of its own; the anchors below are shared
    if method in ANCHORED:
        nu = find(points, "general", seed, task)
        end = find(points, "lora", seed, task, 1.0) if method == "wise_lora" else find(points, "alora", seed, task, found[0].get("end_knob"))
        found = ([{**nu, "knob": 0.0}] if nu else []) + found + ([{**end, "knob": 1.0}] if end else [])
    if method in ("lora_lr", "replay"):  # the full-rate run, with no replay, is LoRA(ν+μ)'s end
        end = find(points, "lora", seed, task, 1.0)
        anchor = [{**end, "knob": 1.0 if method == "lora_lr" else 0.0}] if end else []
        found = found + anchor if method == "lora_lr" else anchor + found
    if method in ("lora", "lora_lr"):  # no domain step (or a learning rate of 0) is ν itself
        nu = find(points, "general", seed, task)
        found = ([{**nu, "knob": 0.0}] if nu else []) + found
    return found


def along(points: list[dict], given: str, value: float, wanted: str, tie) -> float | None:
    """`wanted` at `given` = `value` on the curve, linear between the two points (sorted by `given`) that bracket it;
    None outside the curve (no extrapolation). `tie` picks between two points at the same `given`."""
    ordered = sorted(points, key=lambda p: p[given])
    for a, b in zip(ordered, ordered[1:]):
        if a[given] <= value <= b[given]:
            if b[given] == a[given]:
                return tie(a[wanted], b[wanted])
            t = (value - a[given]) / (b[given] - a[given])
            return a[wanted] + t * (b[wanted] - a[wanted])
    return None


def at_accuracy(points: list[dict], level: float) -> float | None:
    """General loss at `level` accuracy (the lower of two points at the same accuracy)."""
    return along(points, "acc", level, "general_loss", min)


def accuracy_at_loss(points: list[dict], loss: float) -> float | None:
    """Accuracy at general loss `loss` (the higher of two points at the same loss)."""
    return along(points, "general_loss", loss, "acc", max)


def best_at_loss(points: list[dict], loss: float) -> tuple[float, str] | None:
    """The highest accuracy any swept curve reaches at general loss `loss`, and whose curve it is."""
    found = [(accuracy_at_loss(curve(points, m), loss), METHODS[m].label) for m in CURVES]
    found = [(a, label) for a, label in found if a is not None]
    return max(found) if found else None


def single_table(points: list[dict], base: dict, nu: dict) -> list[str]:
    """The single points at ALoRA's chosen φ (SINGLE: + replay) against ALoRA's own φ curve and the best curve at the same loss."""
    rows = [p for m in SINGLE for p in points if (p["method"], p["seed"], p["task"]) == (m, 0, "sciq")]
    if not rows:
        return []
    lines = ["| point | SciQ acc % ± s.e. | ν's gain kept | ALoRA's φ curve at that loss | best curve at that loss |", "|---|---:|---:|---:|---|"]
    for p in rows:
        share, own, best = kept(p, base, nu), accuracy_at_loss(curve(points, "alora"), p["general_loss"]), best_at_loss(points, p["general_loss"])
        lines.append(f"| {METHODS[p['method']].label}, φ {p['knob']:g} | {100 * p['acc']:.1f} ± {100 * p['acc_stderr']:.1f} | "
                     f"{_f(share and 100 * share, '.0f')}{'%' if share is not None else ''} | {_f(own and 100 * own, '.1f')} | "
                     f"{f'{100 * best[0]:.1f} ({best[1]})' if best else 'outside every curve'} |")
    return lines


def budget_table(points: list[dict], base: dict, nu: dict) -> list[str]:
    """Each budget run: the share it was asked to keep, what it kept (on the plugin's report sample and on the
    frontier's own sample), its accuracy, and the best fixed-knob method's accuracy at the same general loss; then
    the two criteria: kept share on the report sample within 10 points of the target, accuracy no more than one
    standard error below the best fixed knob's."""
    rows = sorted((p for p in points if p["method"] in BUDGET and (p["seed"], p["task"]) == (0, "sciq")), key=lambda p: (p["method"], p["knob"]))
    if not rows:
        return []
    lines = ["| mechanism | keep | φ start → end | α | kept, report sample | kept, frontier sample | SciQ acc % ± s.e. | "
             "best fixed knob at that loss | share within 10 points | accuracy within 1 s.e. |", "|---|---:|---:|---:|---:|---:|---:|---|:-:|:-:|"]
    for p in rows:
        b = p.get("budget") or {}
        trajectory = b.get("phi_trajectory") or []
        phi = f"{b['phi_start']:.3g} → {trajectory[-1][1]:.3g}" if trajectory else "–"
        best = best_at_loss(points, p["general_loss"])
        share = kept(p, base, nu)
        report = b.get("report_kept_share")
        lines.append(f"| {METHODS[p['method']].label.removeprefix('Budget: ')} | {p['knob']:g} | {phi} | {_f(b.get('alpha'), '.3g')} | "
                     f"{_f(report and 100 * report, '.0f')}{'%' if report is not None else ''} | {_f(share and 100 * share, '.0f')}"
                     f"{'%' if share is not None else ''} | {100 * p['acc']:.1f} ± {100 * p['acc_stderr']:.1f} | "
                     f"{f'{100 * best[0]:.1f} ({best[1]})' if best else 'outside every curve'} | "
                     f"{_mark(report is not None and abs(report - p['knob']) <= 0.10)} | "
                     f"{_mark(best[0] - p['acc'] <= p['acc_stderr']) if best else '–'} |")
    return lines


def levels(points: list[dict], plan: dict) -> list[float] | None:
    if plan.get("levels"):
        return plan["levels"]
    nu, end = find(points, "general"), find(points, "lora", knob=1.0)
    return [nu["acc"] + s * (end["acc"] - nu["acc"]) for s in LEVEL_SHARES] if nu and end else None


def _mark(ok: bool) -> str:
    return "yes" if ok else "no"


def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def point_row(p: dict, base: dict, nu: dict, knob: str) -> str:
    k = kept(p, base, nu) if base and nu else None
    rise = p["general_loss"] - base["general_loss"] if base else None
    wall = (p.get("train_wall_s") or 0) + p["eval_wall_s"]
    return (f"| {knob} | {100 * p['acc']:.1f} ± {100 * p['acc_stderr']:.1f} | {p['general_loss']:.4f} | {_f(rise, '+.4f')} | "
            f"{_f(k and 100 * k, '.0f')}{'%' if k is not None else ''} | {p['general_ppl']:.2f} | {p['wikitext2_ppl']:.2f} | "
            f"{_f(p.get('in_training_loss'), '.4f')} | {_f(p.get('train_wall_s'), '.0f')} | {wall:.0f} |")


HEAD = ("| {knob} | SciQ acc % ± s.e. | general loss ↓ | rise over base | ν's gain kept | lm-eval general PPL ↓ | WikiText-2 PPL ↓ | "
        "in-training general loss | train s | train + eval s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def method_tables(points: list[dict], base: dict, nu: dict) -> list[str]:
    lines = []
    for name, method in METHODS.items():
        found = sorted((p for p in points if (p["method"], p["seed"], p["task"]) == (name, 0, "sciq")), key=lambda p: p["knob"])
        if not found:
            continue
        lines += [f"### {method.label}", "", HEAD.format(knob=method.knob)]
        lines += [point_row(p, base, nu, f"{p['knob']:.3g}") for p in found]
        lines.append("")
    return lines


def summary(points: list[dict], lv: list[float], base: dict, nu: dict) -> list[str]:
    head = " | ".join(f"loss at {100 * x:.1f}% (kept)" for x in lv)
    lines = [f"| method | {head} |", "|---|" + "---:|" * len(lv)]
    for name in CURVES:
        c = curve(points, name)
        if not c:
            continue
        cells = []
        for x in lv:
            loss = at_accuracy(c, x)
            share = kept({"general_loss": loss}, base, nu) if loss is not None else None
            cells.append("outside its curve" if loss is None else f"{loss:.4f} ({100 * share:.0f}%)" if share is not None else f"{loss:.4f}")
        lines.append(f"| {METHODS[name].label} | " + " | ".join(cells) + " |")
    return lines


def summary_at_kept(points: list[dict], base: dict, nu: dict) -> list[str]:
    """The other reading of the same curves: the accuracy each method reaches where it keeps KEPT_LEVELS of ν's gain."""
    losses = [base["general_loss"] - share * (base["general_loss"] - nu["general_loss"]) for share in KEPT_LEVELS]
    head = " | ".join(f"acc at {100 * s:.0f}% kept (loss {x:.4f})" for s, x in zip(KEPT_LEVELS, losses))
    lines = [f"| method | {head} |", "|---|" + "---:|" * len(losses)]
    for name in CURVES:
        c = curve(points, name)
        if not c:
            continue
        cells = [accuracy_at_loss(c, x) for x in losses]
        lines.append(f"| {METHODS[name].label} | " + " | ".join("outside its curve" if a is None else f"{100 * a:.1f}%" for a in cells) + " |")
    return lines


def seeds_table(points: list[dict]) -> list[str]:
    """Each rerun middle point, seed by seed and as mean ± sample standard deviation: SciQ accuracy and ν's gain kept
    (each seed against its own general stage)."""
    lines = ["| method | knob | seeds | SciQ acc %, per seed | mean ± s.d. | ν's gain kept, per seed | mean ± s.d. | general loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    any_row = False
    for name, method in METHODS.items():
        for knob in rerun_knobs(points, name):
            rows = sorted((p for p in points if p["method"] == name and p["task"] == "sciq" and _same(p["knob"], knob)),
                          key=lambda p: p["seed"])
            accs, shares = [100 * p["acc"] for p in rows], [100 * s for s in (_kept_own(points, p) for p in rows) if s is not None]
            lines.append(f"| {method.label} | {knob:.3g} | {len(rows)} | {' / '.join(f'{a:.1f}' for a in accs)} | {_ms(accs, '.1f')} | "
                         f"{' / '.join(f'{s:.0f}' for s in shares)} | {_ms(shares, '.0f')} | {_ms([p['general_loss'] for p in rows], '.4f')} |")
            any_row = True
    return lines if any_row else []


def rerun_knobs(points: list[dict], method: str) -> list[float]:
    """The method's knobs rerun with more seeds than the first (its SciQ middle points), in order."""
    return sorted({p["knob"] for p in points if p["method"] == method and p["task"] == "sciq" and p["seed"] != 0})


def _kept_own(points: list[dict], p: dict) -> float | None:
    """ν's gain kept, against the general stage of the point's own seed (the base model is the same for every seed)."""
    b, n = find(points, "base"), find(points, "general", p["seed"])
    return kept(p, b, n) if b and n else None


def against_alora(points: list[dict], phi: float | None) -> list[str]:
    """ALoRA at its chosen φ against each other rerun middle point, seed by seed: ALoRA's accuracy minus the
    method's, and its share of ν's gain kept minus the method's, each seed against its own general stage (so the
    seed's general stage and data order cancel). "Ahead on both" where both differences are ≥ 0 on every seed."""
    seeds = sorted({p["seed"] for p in points if p["method"] == "alora" and p["task"] == "sciq" and _same(p["knob"], phi)})
    if len(seeds) < 2:
        return []
    lines = ["| method | knob | Δ acc, per seed | mean ± s.d. | Δ gain kept, per seed | mean ± s.d. | ALoRA ahead on both, every seed |",
             "|---|---:|---:|---:|---:|---:|:-:|"]
    for name, method in METHODS.items():
        for knob in (k for k in rerun_knobs(points, name) if not (name == "alora" and _same(k, phi))):
            d_acc, d_kept = [], []
            for seed in seeds:
                a, m = find(points, "alora", seed, knob=phi), find(points, name, seed, knob=knob)
                ka, km = (_kept_own(points, a), _kept_own(points, m)) if m else (None, None)
                if ka is not None and km is not None:
                    d_acc.append(100 * (a["acc"] - m["acc"]))
                    d_kept.append(100 * (ka - km))
            if len(d_acc) < 2:
                continue
            ahead = all(x >= 0 for x in d_acc + d_kept)
            lines.append(f"| {method.label} | {knob:.3g} | {' / '.join(f'{x:+.1f}' for x in d_acc)} | {_ms(d_acc, '+.1f')} | "
                         f"{' / '.join(f'{x:+.0f}' for x in d_kept)} | {_ms(d_kept, '+.1f')} | {_mark(ahead)} |")
    return lines if len(lines) > 2 else []


def _ms(values: list[float], fmt: str) -> str:
    if not values:
        return "–"
    text = format(statistics.fmean(values), fmt)
    return text + (f" ± {format(statistics.stdev(values), fmt.lstrip('+'))}" if len(values) > 1 else "")


def medmcqa_table(points: list[dict]) -> list[str]:
    base, nu = find(points, "base", task="medmcqa"), find(points, "general", task="medmcqa")
    rows = [p for p in points if p["task"] == "medmcqa" and p["method"] in METHODS and p["seed"] == 0]
    if not rows:
        return []
    lines = [HEAD.format(knob="method (knob)").replace("SciQ", "MedMCQA")]
    for ref in (base, nu):
        if ref:
            lines.append(point_row(ref, base, nu, "base" if ref is base else "ν"))
    lines += [point_row(p, base, nu, f"{METHODS[p['method']].label} ({p['knob']:.3g})") for p in rows]
    return lines


def letter_shares(limit) -> dict[str, float] | None:
    """The share of each answer letter among the MedMCQA test items the frontier scores (None without the data)."""
    from alora_bench.data import medmcqa_docs

    try:
        docs = medmcqa_docs("test")[: limit if isinstance(limit, int) else None]
    except FileNotFoundError:
        return None
    return {letter: sum(d["cop"] == i for d in docs) / len(docs) for i, letter in enumerate("ABCD")}


def letter_note(shares: dict[str, float] | None) -> str:
    """lm-eval scores MedMCQA by the answer letter: a model that always gives one letter scores that letter's share."""
    if not shares:
        return ""
    listed = ", ".join(f"{letter} {100 * share:.1f}%" for letter, share in shares.items())
    return (f"lm-eval scores MedMCQA by the likelihood of the answer letter; the scored items' answers are {listed}. A model "
            "that always gives one letter scores that letter's share: an accuracy at one of these shares is no evidence of "
            "domain ability. The general-loss columns still measure forgetting.")


def plot(points: list[dict], lv: list[float] | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colors = plt.get_cmap("tab20").colors  # more methods than the default cycle's 10 colours
    for i, (name, method) in enumerate(METHODS.items()):
        c = curve(points, name)
        if not c:
            continue
        ax.errorbar([100 * p["acc"] for p in c], [p["general_loss"] for p in c], xerr=[100 * p["acc_stderr"] for p in c],
                    marker="D" if name in BUDGET else "P" if name in SINGLE else "o", ms=4 if name in CURVES else 7,
                    lw=1.2 if name in CURVES else 0, capsize=0,
                    elinewidth=0.4, color=colors[i % len(colors)], label=method.label + (" (keep 0.5, 0.8)" if name in BUDGET else ""))
    for ref, marker in (("base", "s"), ("general", "*")):
        p = find(points, ref)
        if p:
            ax.plot(100 * p["acc"], p["general_loss"], marker, color="black", ms=10, label="base" if ref == "base" else "ν (general stage)")
    for x in lv or []:
        ax.axvline(100 * x, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("SciQ test accuracy (%)  →  more domain learning")
    ax.set_ylabel("general held-out loss (nats/token)  ↓  less forgetting")
    ax.set_title("Forgetting frontier (SmolLM2-135M, seed 0); dotted: matched-accuracy levels")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_report(results: Path) -> Path:
    points = load(results)
    plan = json.loads((results / "plan.json").read_text()) if (results / "plan.json").is_file() else {}
    scale = json.loads((results / "scale.json").read_text()) if (results / "scale.json").is_file() else {}
    base, nu = find(points, "base"), find(points, "general")
    lv = levels(points, plan)
    batch, seq, items, docs = (scale.get(k, "?") for k in ("micro_batch_size", "sequence_len", "limit", "ppl_limit"))
    lines = [
        "# The forgetting frontier: SciQ accuracy against general-text loss",
        "",
        "Command: `python -m alora_bench.frontier run` (resumable; `report` rewrites this file from `points/`). "
        f"The domain stage's length and learning rate come from the pilot ([pilot.md](pilot.md)): {plan.get('domain_steps', '?')} steps at "
        f"{plan.get('learning_rate', '?')}, after a general stage of {plan.get('general_steps', '?')} steps; micro-batch {batch} × {seq} tokens, "
        f"{scale.get('device', '?')}.",
        "",
        f"Every point is one adapter. Accuracy: lm-eval on the first {items} SciQ test items (± one standard error). General loss: "
        f"the mean token cross-entropy of the plugin's general-text scorer on one fixed sample of held-out general text "
        f"(64 × {seq} tokens, the same for every point and seed); rise over base is peft's measure of forgetting; "
        f"ν's gain kept is (base − now) / (base − ν). lm-eval's general and WikiText-2 perplexities are on {docs} documents each. "
        "The in-training loss is the plugin's `alora_general_loss` at the end of the run (its sample is drawn with the run's seed).",
        "",
    ]
    if base and nu:
        lines += ["| reference | SciQ acc % ± s.e. | general loss | lm-eval general PPL | WikiText-2 PPL |", "|---|---:|---:|---:|---:|"]
        for label, p in (("base", base), ("ν (general stage)", nu)):
            lines.append(f"| {label} | {100 * p['acc']:.1f} ± {100 * p['acc_stderr']:.1f} | {p['general_loss']:.4f} | "
                         f"{p['general_ppl']:.2f} | {p['wikitext2_ppl']:.2f} |")
        lines.append("")
    if lv and base and nu:
        lines += ["## At matched accuracy", "",
                  "General loss (and ν's gain kept) each method reaches at three accuracy levels fixed before any method but "
                  f"LoRA(ν+μ) was read: ν + {', '.join(f'{s:g}' for s in LEVEL_SHARES)} × (LoRA(ν+μ)'s end − ν). Linear between the two "
                  "points of a method's curve that bracket the level; \"outside its curve\" where no pair does. WiSE-FT's curves "
                  "include their exact ends (α 0 = ν, α 1 = the end adapter); LoRA(ν+μ)'s curves include ν (no domain step, or a "
                  "learning rate of 0), the learning-rate curve the full-rate run, and the replay curve that run as its 0%.", ""]
        lines += summary(points, lv, base, nu) + [""]
    if base and nu:
        lines += ["## At matched general loss", "",
                  "The same curves read the other way: the SciQ accuracy each method reaches where it keeps "
                  f"{', '.join(f'{100 * s:.0f}%' for s in KEPT_LEVELS)} of ν's gain in general loss (linear along its curve). "
                  "One standard error of a point's accuracy is 1.3–1.9 points.", ""]
        lines += summary_at_kept(points, base, nu) + [""]
    single = single_table(points, base, nu) if base and nu else []
    if single:
        lines += ["## Changes to ALoRA at its chosen φ", "",
                  "One point each: its accuracy against the accuracy ALoRA's φ curve, and the best swept curve, reach at the "
                  "same general loss (linear along the curve).", ""] + single + [""]
    lines += ["![frontier](frontier.png)", "", "## Every point (seed 0)", ""]
    lines += method_tables(points, base, nu)
    budget = budget_table(points, base, nu) if base and nu else []
    if budget:
        lines += ["## A forgetting budget", "",
                  "ALoRA at its chosen φ with `alora_keep` 0.5 and 0.8, met by each mechanism (`alora_budget_by`). The plugin steers "
                  "and reports on held-out general text that excludes the frontier's sample (two disjoint halves: control and report); "
                  "\"kept, frontier sample\" is the same share on the frontier's own sample, which the run never read. The last column is "
                  "the highest accuracy a fixed-knob method's curve reaches at the run's general loss (linear along the curve).", ""] + budget + [""]
    seeds = seeds_table(points)
    if seeds:
        lines += ["## Three seeds at each method's middle point", "",
                  "Each method's seed-0 point nearest the middle level, rerun with seeds 1 and 2 (each with its own general stage). "
                  "Mean ± sample standard deviation over the seeds that exist; ν's gain kept is against each seed's own general "
                  "stage.", ""] + seeds + [""]
    pairs = against_alora(points, plan.get("alora_phi"))
    if pairs:
        lines += [f"### ALoRA (φ {plan.get('alora_phi'):g}) against each middle point, paired by seed", "",
                  "ALoRA's SciQ accuracy minus the method's, and ALoRA's share of ν's gain kept minus the method's (points), on each "
                  "seed, both from that seed's general stage and data order. Points at different accuracies: a method can be "
                  "behind on one and ahead on the other and still be on the frontier. One standard error of a single accuracy "
                  "is about 1.4 points. ALoRA − layer is the layer weights' ablation (uniform w_l, the same Ω).", ""] + pairs + [""]
    med = medmcqa_table(points)
    if med:
        lines += ["## MedMCQA: each method's middle point, seed 0", "",
                  "The same domain-stage settings, on MedMCQA's training split instead of SciQ's. " + letter_note(letter_shares(scale.get("limit"))),
                  "", *med, ""]
    path = results / "frontier.md"
    path.write_text("\n".join(lines))
    plot(points, lv, results / "frontier.png")
    return path
