"""What holding Ω in bfloat16 (`alora_importance_dtype: bfloat16`) changes, against float32, in one run each:
the logged L_reg at every logging step and the trained adapter, on the main job's domain stage (SmolLM2, SciQ).

    python -m alora_bench.omega_dtype --work work --out eval/results/omega_dtype.md

Needs the main job's general stage (work/runs/general, from `bash scripts/main.sh`); writes the two domain
stages under work/runs/omega-<dtype> and a markdown table. Both runs are launched side by side, so their
wall-time ratio is measured under the same load.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import sys
from pathlib import Path

import yaml

from .runs import axolotl_train

DTYPES = ("float32", "bfloat16")


def train_logs(path: Path) -> list[dict]:
    """The `{'loss': ...}` lines Axolotl printed, as numbers (it prints 4 significant digits)."""
    import ast

    entries = [ast.literal_eval(line.strip()) for line in path.read_text().splitlines() if line.startswith("{'loss'")]
    return [{k: float(v) for k, v in e.items() if _number(v)} for e in entries]


def _number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def config(work: Path, dtype: str, steps: int) -> dict:
    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "smollm2-cpu" / "domain-alora.yml").read_text())
    for key in ("alora_general_eval", "alora_general_eval_samples"):
        cfg.pop(key, None)
    return {**cfg, "output_dir": f"./runs/omega-{dtype}", "alora_importance_dtype": dtype, "max_steps": steps, "logging_steps": 1,
            "base_model": "./smollm2", "datasets": [{**cfg["datasets"][0], "path": "./data/sciq_train.jsonl"}],
            "dataset_prepared_path": "./prepared", "lora_model_dir": "./runs/general",
            "alora_importance_path": "./runs/general/alora_importance.safetensors"}


def adapter_difference(a: Path, b: Path) -> tuple[float, float]:
    """(‖a − b‖ / ‖b‖ over all adapter tensors, the same for the change from the general adapter)."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    start = load_file(str(b.parent / "general" / "adapter_model.safetensors"))
    diff = math.sqrt(sum(float((x[k].double() - y[k].double()).square().sum()) for k in y))
    norm = math.sqrt(sum(float(y[k].double().square().sum()) for k in y))
    moved = math.sqrt(sum(float((y[k].double() - start[k].double()).square().sum()) for k in y))
    return diff / norm, diff / moved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="work")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="eval/results/omega_dtype.md")
    parser.add_argument("--force", action="store_true", help="train again even where both runs finished")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    if not (work / "runs" / "general" / "alora_importance.safetensors").is_file():
        raise SystemExit(f"{work}/runs/general has no importance file: run the main job first (bash scripts/main.sh)")
    costs = work / "logs" / "omega-costs.json"
    done = all((work / "runs" / f"omega-{d}" / "adapter_model.safetensors").is_file() for d in DTYPES) and costs.is_file()
    if args.force or not done:
        with cf.ThreadPoolExecutor(len(DTYPES)) as pool:
            jobs = {d: pool.submit(axolotl_train, config(work, d, args.steps), work / "configs" / f"omega-{d}.yml",
                                   work / "logs" / f"omega-{d}.log", work, f"Ω {d}", "omega-dtype") for d in DTYPES}
            costs.write_text(json.dumps({d: j.result() for d, j in jobs.items()}))
    cost = json.loads(costs.read_text())
    logs = {d: train_logs(work / "logs" / f"omega-{d}.log") for d in DTYPES}
    rel, of_move = adapter_difference(work / "runs" / "omega-bfloat16", work / "runs" / "omega-float32")
    rows = ["| step | L_reg float32 | L_reg bfloat16 | relative difference | task loss float32 | task loss bfloat16 |", "|---:|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for step, (a, b) in enumerate(zip(logs["float32"], logs["bfloat16"]), start=1):
        r32, r16 = a["alora_reg_loss"], b["alora_reg_loss"]
        change = abs(r16 - r32) / r32 if r32 else 0.0
        worst = max(worst, change)
        rows.append(f"| {step} | {r32:.4g} | {r16:.4g} | {change:.1e} | {a['loss']:.4g} | {b['loss']:.4g} |")
    text = "\n".join([
        "# Ω held in bfloat16 against float32 (domain stage)",
        "",
        f"Command: `python -m alora_bench.omega_dtype {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"(the main job's domain-alora stage, {args.steps} steps, general-text loss off; both runs side by side).",
        "",
        f"- largest relative difference in the logged L_reg: {worst:.1e} (Axolotl prints 4 significant digits, so 1e-4 is its resolution)",
        f"- trained adapters: ‖A_bf16 − A_fp32‖ / ‖A_fp32‖ = {rel:.2e}; that is {of_move:.2e} of how far the domain stage moved the adapter",
        f"- peak RSS: float32 {cost['float32']['peak_rss_mib']} MiB, bfloat16 {cost['bfloat16']['peak_rss_mib']} MiB; "
        f"wall time bfloat16/float32 = {cost['bfloat16']['wall_s'] / cost['float32']['wall_s']:.2f} (side by side)",
        "",
        *rows,
        "",
    ])
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
