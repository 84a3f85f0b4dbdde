"""WiSE-FT between two LoRA adapters: ΔW(α) = (1 − α)·ΔW_ref + α·ΔW_end, exact as one PEFT adapter.

peft's `add_weighted_adapter(combination_type="cat")` stacks the factors: A = [w_ref·s_ref·A_ref; w_end·s_end·A_end],
B = [B_ref, B_end], rank r_ref + r_end, with the new adapter's scaling meant to be 1 (lora_alpha = r). It copies
the first adapter's config, rsLoRA flag included, which would make that scaling √r; `add_interpolation` clears the
flag first. A missing reference (no general stage) is ΔW_ref = 0. Used by `alora interpolate` and the harness.

    alora interpolate REF END OUT --alpha 0.5
    alora interpolate REF END OUT --keep 0.8 --general-eval heldout.jsonl   # the largest α that keeps 80% of REF's gain
    alora interpolate base END OUT --max-rise 0.05 --general-eval heldout.jsonl   # no general stage: ΔW_ref = 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch

HELP = "WiSE-FT: write (1 − α)·ΔW_ref + α·ΔW_end as one PEFT adapter, for a given α or the largest that meets a forgetting budget"

INTERPOLATED = "alora_interpolated"


def add_interpolation(model, ref: str | None, end: str, alpha: float, name: str = INTERPOLATED) -> str:
    """Add adapter `name` = (1 − α)·`ref` + α·`end` to a PeftModel holding both (ref None: ΔW_ref = 0) and make it
    active; checks every module's ΔW against the formula."""
    adapters, weights = ([ref, end], [1 - alpha, alpha]) if ref is not None else ([end], [alpha])
    first = model.peft_config[adapters[0]]
    model.peft_config[adapters[0]] = dataclasses.replace(first, use_rslora=False)  # the new adapter's scaling must be 1
    try:
        model.add_weighted_adapter(adapters, weights, name, combination_type="cat")
    finally:
        model.peft_config[adapters[0]] = first
    _refill_at_adapter_precision(model, adapters, weights, name)
    check_interpolation(model, ref, end, alpha, name)
    model.set_adapter(name)
    return name


@torch.no_grad()
def _refill_at_adapter_precision(model, adapters: list[str], weights: list[float], name: str) -> None:
    """peft gives the new adapter the base layer's dtype, so on an fp16 or bf16 base its factors would be rounded to
    16 bits. Redo peft's "cat" fill in the adapters' own precision (at least float32)."""
    for layer in model.modules():
        if factors(layer, name) is None:
            continue
        present = [(a, w, f) for a, w in zip(adapters, weights) if (f := factors(layer, a)) is not None]
        dtype = torch.promote_types(present[-1][2][0].dtype, torch.float32)
        A = torch.cat([w * layer.scaling[a] * fa.to(dtype) for a, w, (fa, _) in present])
        B = torch.cat([fb.to(dtype) for _, _, (_, fb) in present], dim=1)
        target_A, target_B = factors(layer, name)
        target_A.data = torch.zeros_like(target_A.data, dtype=dtype)
        target_B.data = torch.zeros_like(target_B.data, dtype=dtype)
        target_A.data[: len(A)] = A
        target_B.data[:, : B.shape[1]] = B


def factors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Adapter `name`'s (A, B) in one LoRA layer: a linear layer's lora_A/lora_B weights, or an embedding's
    lora_embedding_A/lora_embedding_B; None where the layer does not hold it. ΔW is s·B·A either way (an embedding's
    is its transpose)."""
    if name in getattr(layer, "lora_A", {}):
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    if name in getattr(layer, "lora_embedding_A", {}):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return None


def delta(layer, name: str) -> torch.Tensor:
    """s·B·A of adapter `name` in one LoRA layer, in float64."""
    A, B = factors(layer, name)
    return layer.scaling[name] * B.double() @ A.double()


@torch.no_grad()
def check_interpolation(model, ref: str | None, end: str, alpha: float, name: str) -> None:
    for module_name, layer in model.named_modules():
        if factors(layer, name) is None:
            continue
        expected = alpha * delta(layer, end) + ((1 - alpha) * delta(layer, ref) if ref is not None else 0)
        got = delta(layer, name)
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-7 * max(1.0, float(expected.abs().max()))):
            raise RuntimeError(f"ALoRA: the interpolated adapter differs from (1 − α)·ΔW_ref + α·ΔW_end in {module_name}")


def load_pair(base: str | Path, ref: str | Path | None, end: str | Path):
    """The base model with adapters "end" and (unless `ref` is None) "ref" loaded, in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(end), adapter_name="end")
    if ref is not None:
        model.load_adapter(str(ref), adapter_name="ref")
    return model


def interpolate_adapters(base: str | Path, ref: str | Path | None, end: str | Path, alpha: float, out: str | Path, model=None) -> Path:
    """Write ΔW(α) between the adapter folders `ref` (None: the base model, ΔW = 0) and `end` to `out` as one PEFT
    adapter that plain peft and Axolotl's `lora_model_dir` load; atomically (a temp folder, then a rename).
    `model`: the pair already loaded (`load_pair`)."""
    model = model if model is not None else load_pair(base, ref, end)
    add_interpolation(model, "ref" if ref is not None else None, "end", alpha)
    return save_adapter(model, INTERPOLATED, out)


def save_adapter(model, name: str, out: str | Path) -> Path:
    """Write adapter `name` of a PeftModel to the folder `out` alone, atomically (a temp folder, then a rename)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=[name])
    saved = tmp / name if (tmp / name).is_dir() else tmp
    shutil.rmtree(out, ignore_errors=True)
    saved.replace(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- the command ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", help="the reference adapter folder (ν: the general stage's output_dir), or `base` for ΔW_ref = 0")
    parser.add_argument("end", help="the end adapter folder (the domain stage's output_dir)")
    parser.add_argument("out", help="folder to write the interpolated adapter to")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--alpha", type=float, help="α in [0, 1]: 0 is the reference, 1 the end adapter")
    how.add_argument("--keep", type=float, help="the share of REF's gain in general-text loss over the base to keep: the largest α that does")
    how.add_argument("--max-rise", type=float, help="the largest general-text loss rise over the base model allowed, nats per token")
    parser.add_argument("--general-eval", help="general text for --keep / --max-rise (.txt or .jsonl, as alora_general_eval)")
    parser.add_argument("--base", help="base model folder (default: the end adapter's base_model_name_or_path)")
    parser.add_argument("--samples", type=int, default=64, help="sequences in each of the two disjoint samples, control and report (default %(default)s)")
    parser.add_argument("--sequence-len", type=int, default=256, help="tokens per sequence (default %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the samples (default %(default)s)")


def _check_args(args) -> None:
    if args.alpha is not None and not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.keep is not None and not 0 < args.keep <= 1:
        raise ValueError(f"--keep must be in (0, 1], got {args.keep}")
    if args.max_rise is not None and not args.max_rise > 0:
        raise ValueError(f"--max-rise must be > 0 nats per token, got {args.max_rise}")
    if args.alpha is None and not args.general_eval:
        raise ValueError("--keep and --max-rise need --general-eval: the general text the budget is measured on")
    if args.keep is not None and args.ref == "base":
        raise ValueError("--keep is a share of REF's gain over the base model: give REF an adapter, or use --max-rise with `base`")
    for name in ("ref", "end"):
        folder = getattr(args, name)
        if not (name == "ref" and folder == "base") and not (Path(folder) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{name.upper()} {folder} is not a PEFT adapter folder (no adapter_config.json)")


def run(args) -> int:
    from .budget import budget_loss, kept_share_text, largest_alpha

    _check_args(args)
    ref = None if args.ref == "base" else args.ref
    base = args.base or json.loads((Path(args.end) / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = load_pair(base, ref, args.end)
    if args.alpha is not None:
        print(f"alora interpolate: wrote {interpolate_adapters(base, ref, args.end, args.alpha, args.out, model)} (α {args.alpha:g})")
        return 0
    control, report = _samples(args, base)
    scores = _scorer(model, ref)
    base_loss, ref_loss = scores(None, control), (scores(0.0, control) if ref is not None else None)
    target, _ = budget_loss(base_loss, ref_loss, keep=args.keep, max_rise=args.max_rise)
    alpha, scored = largest_alpha(lambda a: scores(a, control), target)
    interpolate_adapters(base, ref, args.end, alpha, args.out, model)
    reported = {"base": scores(None, report), "ref": scores(0.0, report) if ref is not None else None, "chosen": scores(alpha, report)}
    summary = {"alpha": alpha, "target_loss": target, "control": {"base": base_loss, "ref": ref_loss, "scored": scored},
               "report": reported, "keep": args.keep, "max_rise": args.max_rise, "samples": args.samples, "sequence_len": args.sequence_len,
               "seed": args.seed}
    (Path(args.out) / "alora_interpolation.json").write_text(json.dumps(summary, indent=1))
    at_alpha = scored[alpha] if alpha in scored else scores(alpha, control)
    met = "meets the budget" if at_alpha <= target else "cannot meet the budget (even α = 0 exceeds it)"
    print(f"alora interpolate: α {alpha:.4g} {met}; on the report sample: {kept_share_text(reported['base'], reported['ref'], reported['chosen'])}; "
          f"wrote {args.out}")
    return 0


def _samples(args, base):
    """Two disjoint samples of general text: the control sample the search reads and the report sample it does not."""
    from transformers import AutoTokenizer

    from .forgetting_budget import split_samples
    from .general_eval import read_documents, sample_sequences

    sequences = sample_sequences(read_documents(args.general_eval), AutoTokenizer.from_pretrained(str(base)), args.sequence_len,
                                 2 * args.samples, args.seed)
    return split_samples(sequences)


def _scorer(model, ref: str | None):
    """loss(α, sample): the base (α None), or ΔW(α) between "ref" and "end" (α 0 is the reference itself)."""
    from .general_eval import mean_token_loss

    def loss(alpha: float | None, sample) -> float:
        if alpha is None:
            with model.disable_adapter():
                return mean_token_loss(model, sample, 8)
        name = add_interpolation(model, "ref" if ref is not None else None, "end", alpha, name="alora_candidate")
        try:
            return mean_token_loss(model, sample, 8)
        finally:
            model.set_adapter("end")
            model.delete_adapter(name)

    return loss
