"""Per-step overhead of ALoRA, measured side by side in one process on one model and one batch.

Variants, interleaved in rotating order every repetition so machine noise hits all alike:
  plain        a LoRA step: forward, backward, AdamW
  track        + importance tracking (axolotl_alora.importance.OmegaTracker, eqs. 13-14)
  track-naive  + the same math written plainly (three products for g̃, two full products for Δθ)
  reg          + φ·L_reg (axolotl_alora.regularizer.Regularizer: one pass over Ω per update)
  reg-naive    + φ·L_reg by autograd on the dense s·B·A against a stored dense θ^ν
  track-factored, reg-factored   the same with alora_importance_form: factored (Ω ≈ u·vᵀ; beyond the paper)

Ratios are to `plain`. Absolute times mean something only on a GPU; on a shared CPU read the ratios.
  python -m alora_bench.bench_overhead                       # GPU: random Llama-3.2-3B shape, bf16, batch 8×512
  python -m alora_bench.bench_overhead --device cpu          # CPU: SmolLM2-135M shape, fp32, batch 2×128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from axolotl_alora.factored import FactoredOmega, FactoredTrackedModule
from axolotl_alora.importance import OmegaTracker, TrackedModule
from axolotl_alora.lora import adapted_modules
from axolotl_alora.regularizer import RegularizedModule, Regularizer

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128256),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "smollm2-4layer": (576, 1536, 4, 9, 3, 49152),
}
VARIANTS = ("plain", "track", "track-naive", "reg", "reg-naive", "track-factored", "reg-factored")


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--shape", choices=SHAPES, help="model shape (default: llama-3.2-3b on GPU, smollm2-4layer on CPU)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--reps", type=int, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="also write the markdown report here")
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.shape = args.shape or ("llama-3.2-3b" if on_gpu else "smollm2-135m")
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.batch = args.batch or (8 if on_gpu else 2)
    args.seq = args.seq or (512 if on_gpu else 128)
    args.reps = args.reps or (20 if on_gpu else 8)
    return args


def build_model(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    h, inter, layers, heads, kv, vocab = SHAPES[args.shape]
    config = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    lora = LoraConfig(r=args.rank, lora_alpha=32, lora_dropout=0.0, target_modules=args.targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1e-3)
    return model


class NaiveTracker:
    """eqs. 13-14 as written: the three products of g̃, Δθ from two full products."""

    def __init__(self, modules):
        self.modules = modules
        self.omega = [torch.zeros(m.shape, device=m.A.device) for m in modules]

    @torch.no_grad()
    def before_step(self, lr):
        self.saved = [(m.A.float().clone(), m.B.float().clone(), m.A.grad.float().clone(), m.B.grad.float().clone()) for m in self.modules]
        self.lr = lr

    @torch.no_grad()
    def after_step(self):
        for m, omega, (A, B, gA, gB) in zip(self.modules, self.omega, self.saved):
            g_tilde = gB @ A + B @ gA - self.lr * (gB @ gA)
            d_theta = m.scaling * (m.B.float() @ m.A.float() - B @ A)
            omega -= g_tilde * d_theta


def naive_reg(modules, omegas, refs):
    total = 0
    for m, omega, ref in zip(modules, omegas, refs):
        total = total + (omega * (m.scaling * (m.B.float() @ m.A.float()) - ref).square()).sum() / len(modules)
    return total


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    model = build_model(args)
    modules = adapted_modules(model)
    g = torch.Generator(device=device).manual_seed(1)
    omegas = [torch.rand(m.shape, device=device, generator=g) for m in modules]
    A_refs = [m.A.detach().float() + 1e-3 * torch.randn(m.A.shape, device=device, generator=g) for m in modules]
    B_refs = [m.B.detach().float() + 1e-3 * torch.randn(m.B.shape, device=device, generator=g) for m in modules]
    dense_refs = [m.scaling * (B @ A) for m, A, B in zip(modules, A_refs, B_refs)]
    regularizer = Regularizer([RegularizedModule(m.name, m.A, m.B, m.scaling, o, A, B, 1 / len(modules))
                               for m, o, A, B in zip(modules, omegas, A_refs, B_refs)])
    tracker = OmegaTracker([TrackedModule(m.name, m.A, m.B, m.scaling) for m in modules])
    factored = {"track": OmegaTracker([FactoredTrackedModule(m.name, m.A, m.B, m.scaling) for m in modules]),
                "reg": Regularizer([RegularizedModule(m.name, m.A, m.B, m.scaling, FactoredOmega.from_dense(o), A, B, 1 / len(modules))
                                    for m, o, A, B in zip(modules, omegas, A_refs, B_refs)])}
    naive = NaiveTracker(modules)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    lr = {m.name: 1e-4 for m in modules}
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device, generator=g)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(variant):
        loss = model(input_ids=batch, labels=batch).loss
        if variant == "reg":
            loss = loss + 1e-3 * regularizer()
        elif variant == "reg-factored":
            loss = loss + 1e-3 * factored["reg"]()
        elif variant == "reg-naive":
            loss = loss + 1e-3 * naive_reg(modules, omegas, dense_refs)
        loss.backward()
        if variant == "track":
            tracker.before_step(lr)
        elif variant == "track-factored":
            factored["track"].before_step(lr)
        elif variant == "track-naive":
            naive.before_step(1e-4)
        optimizer.step()
        if variant == "track":
            tracker.after_step()
        elif variant == "track-factored":
            factored["track"].after_step()
        elif variant == "track-naive":
            naive.after_step()
        optimizer.zero_grad(set_to_none=True)

    times = {v: [] for v in VARIANTS}
    peaks = {}
    for rep in range(args.warmup + args.reps):
        order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[: rep % len(VARIANTS)]
        for variant in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            step(variant)
            sync()
            if rep >= args.warmup:
                times[variant].append(time.perf_counter() - start)
                if device.type == "cuda":
                    peaks[variant] = max(peaks.get(variant, 0), torch.cuda.max_memory_allocated())
        print(f"rep {rep + 1}/{args.warmup + args.reps}" + (" (warm-up)" if rep < args.warmup else ""), file=sys.stderr, flush=True)

    components = time_components(modules, tracker, naive, regularizer, omegas, dense_refs, lr, sync, factored)
    omega_gb = sum(o.numel() for o in omegas) * 4 / 2**30
    lines = report(args, times, peaks, omega_gb, len(modules), argv, components)
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


def time_components(modules, tracker, naive, regularizer, omegas, dense_refs, lr, sync, factored, reps=15):
    """Median time of each method's own per-step work alone (gradients are set once, no model step)."""
    for m in modules:
        m.A.grad, m.B.grad = torch.randn_like(m.A) * 1e-3, torch.randn_like(m.B) * 1e-3

    def reg_ours():
        regularizer._key = None  # force the once-per-update pass
        (1e-3 * regularizer()).backward()

    def reg_naive():
        (1e-3 * naive_reg(modules, omegas, dense_refs)).backward()

    work = {
        "track": lambda: (tracker.before_step(lr), tracker.after_step()),
        "track-naive": lambda: (naive.before_step(1e-4), naive.after_step()),
        "reg": reg_ours,
        "reg-naive": reg_naive,
        "track-factored": lambda: (factored["track"].before_step(lr), factored["track"].after_step()),
        "reg-factored": lambda: (1e-3 * factored["reg"]()).backward(),
    }
    result = {}
    for name, fn in work.items():
        fn()
        samples = []
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - start)
        result[name] = statistics.median(samples)
    for m in modules:
        m.A.grad = m.B.grad = None
    return result


def report(args, times, peaks, omega_gb, n_modules, argv, components):
    base = statistics.median(times["plain"])
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    cmd = "python -m alora_bench.bench_overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# ALoRA step overhead: {args.shape}, {args.dtype}, batch {args.batch}×{args.seq}, LoRA r {args.rank} on {'/'.join(args.targets)}",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Device: {device_name}; torch {torch.__version__}; {n_modules} adapted modules; Ω {omega_gb:.2f} GiB fp32; "
        f"{args.reps} timed steps per variant, interleaved.",
        "",
        "| variant | median step | vs plain | overhead |" + (" peak memory |" if peaks else ""),
        "|---|---:|---:|---:|" + ("---:|" if peaks else ""),
    ]
    for v in VARIANTS:
        med = statistics.median(times[v])
        shown = f"{med * 1e3:.1f} ms" if args.device.startswith("cuda") else "(CPU: ratio only)"
        row = f"| {v} | {shown} | {med / base:.3f} | {100 * (med / base - 1):+.1f}% |"
        if peaks:
            row += f" {peaks[v] / 2**30:.2f} GiB |"
        lines.append(row)
    lines += ["", "Overhead = median step time of the variant / median plain step − 1, from the same run.", "",
              "The method's own per-step work timed alone (median of 15; less noisy than whole-step differences):", "",
              "| work | ours | naive | ours / naive |", "|---|---:|---:|---:|"]
    for what in ("track", "reg"):
        ours, naive = components[what], components[f"{what}-naive"]
        lines.append(f"| {what} | {100 * ours / base:.2f}% of a plain step | {100 * naive / base:.2f}% | {ours / naive:.2f} |")
    lines += ["", "The factored form's work alone, against the dense form's (the `ours` column above):", "",
              "| work | factored | dense | factored / dense |", "|---|---:|---:|---:|"]
    for what in ("track", "reg"):
        ours, dense = components[f"{what}-factored"], components[what]
        lines.append(f"| {what} | {100 * ours / base:.2f}% of a plain step | {100 * dense / base:.2f}% | {ours / dense:.3f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
