"""`alora fisher`: the EWC baseline's importance file (EWCLoRA, Xiang et al. 2024; docs/METHOD.md §6).

Ω = the diagonal empirical Fisher of the frozen weights W0 of the LoRA-targeted linear modules,

    F_i = (1/N) Σ_n (∂ log p(x_n) / ∂W_i)²

over N general-text sequences, one sequence per backward pass, with log p(x_n) the *sum* of the
sequence's token log-probabilities under the causal LM. The reference adapter is zero
(A^ν = 0, B^ν = 0, so θ^ν = W0 and θ − θ^ν = s·B·A), and the domain stage uses it with
`alora_layer_weighting: none` and `alora_phi` as EWC's λ. Same file format and regularizer as
ALoRA's SI importance: the two differ only in where Ω comes from.

Module-level imports stay light (the `alora` CLI imports this module to build its parser);
torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

DEFAULT_OUT = "alora_fisher.safetensors"
DEFAULT_TARGETS = ("q_proj", "v_proj")
DEFAULT_SAMPLES = 200  # EWCLoRA used 20,000 Pile documents
DEFAULT_MAX_LENGTH = 256  # EWCLoRA used 800


# -- the math ---------------------------------------------------------------------------------


def target_linears(model, target_modules) -> dict:
    """{module name: nn.Linear} for every linear layer peft's LoRA would wrap for this list of
    `target_modules` (a name matches a target if it equals it or ends with `.<target>`), in model order.
    The names are the ones the plugin reads from a peft model (its module path without `base_model.model.`)."""
    from torch import nn

    from .lora import module_name

    found, used = {}, set()
    for name, module in model.named_modules():
        hits = [t for t in target_modules if name == t or name.endswith(f".{t}")]
        if not hits:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target module {name} is {type(module).__name__}, not a linear layer; ALoRA and EWC support LoRA on linear layers only.")
        used.update(hits)
        found[module_name(name)] = module
    missing = [t for t in target_modules if t not in used]
    if missing:
        raise ValueError(f"no module of the model matches --target-modules {missing}; the model's linear layers end in e.g. "
                         f"{sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})}.")
    return found


@contextmanager
def only_requiring_grad(model, params):
    """Within the block, only `params` require grad (every other parameter is frozen); restores the flags after."""
    previous = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)


def sequence_log_likelihood(model, input_ids):
    """log p(x) = Σ_{t≥1} log p(x_t | x_<t) for one sequence (1-D token ids) under a causal LM, in fp32."""
    import torch

    logits = model(input_ids=input_ids.unsqueeze(0), use_cache=False).logits[0, :-1].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(-1, input_ids[1:].unsqueeze(-1)).sum()


def empirical_fisher(model, weights: dict, sequences, progress: bool = True) -> dict:
    """Diagonal empirical Fisher F = (1/N) Σ_n (∂ log p(x_n)/∂W)² of each weight in `weights` ({name: W0}).

    `sequences`: N 1-D LongTensors of token ids (each at least 2 tokens: the first token is only
    context). log p(x_n) is the SUM of the sequence's token log-probabilities (docs/METHOD.md §6's
    ∂ log p(x_n)), not the token mean: a longer sequence weighs more, as its likelihood does.
    One sequence per backward pass, so F is a mean of per-sample squared gradients, never the
    square of a batch-mean gradient. Only the given weights require grad during the passes;
    F is accumulated in fp32, in place, under no_grad. Returns {name: F} (fp32, on the weights' device).
    """
    import torch
    from tqdm.auto import tqdm

    sequences = list(sequences)
    if not sequences:
        raise ValueError("empirical_fisher needs at least one sequence")
    short = [i for i, s in enumerate(sequences) if s.numel() < 2]
    if short:
        raise ValueError(f"sequences {short[:5]} have fewer than 2 tokens: they have no predicted token")
    names, params = list(weights), list(weights.values())
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in weights.items()}
    device = params[0].device
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model's own log-likelihood
    try:
        with only_requiring_grad(model, params):
            for ids in tqdm(sequences, desc="fisher", unit="seq", disable=not progress):
                log_p = sequence_log_likelihood(model, ids.to(device))
                grads = torch.autograd.grad(log_p, params)
                with torch.no_grad():
                    for n, g in zip(names, grads):
                        g = g.float()
                        fisher[n].addcmul_(g, g)
    finally:
        model.train(was_training)
    with torch.no_grad():
        for f in fisher.values():
            f.div_(len(sequences))
    return fisher


def select_samples(n_available: int, n: int, seed: int) -> list[int]:
    """`min(n, n_available)` distinct indices, chosen by `seed` alone, in ascending order."""
    if n >= n_available:
        return list(range(n_available))
    return sorted(random.Random(seed).sample(range(n_available), n))


def fisher_importance(fisher: dict, r: int, lora_alpha: float, use_rslora: bool, metadata: dict, fingerprint=None, tokens: int = 0, steps: int = 0):
    """An ImportanceFile with Ω = F and the zero reference adapter of rank `r` (θ^ν = W0)."""
    import torch

    from .importance_file import ImportanceFile, module_metadata
    from .regularizer import effective_layers, layer_weights

    scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
    omega, refs_A, refs_B, module_meta = {}, {}, {}, {}
    for name, f in fisher.items():
        d_out, d_in = f.shape
        omega[name] = f.detach().cpu()
        refs_A[name] = torch.zeros(r, d_in)
        refs_B[name] = torch.zeros(d_out, r)
        module_meta[name] = module_metadata(omega[name], r, lora_alpha, scaling, use_rslora)
    norms = torch.tensor([m["norm"] for m in module_meta.values()])
    meta = {
        **metadata,
        "source": "fisher",
        "modules": module_meta,
        "xi": None,
        "steps": steps,  # backward passes = sequences
        "tokens": tokens,
        "clamped_fraction": 0.0,
        "layer_weighting": "none",  # the EWC penalty: use alora_layer_weighting: none with this file
        "effective_layers": effective_layers(layer_weights(norms, "none")),
        "stages": 1,
    }
    return ImportanceFile(omega, refs_A, refs_B, meta, fingerprint)


# -- data -------------------------------------------------------------------------------------


def read_texts(path: str | os.PathLike) -> list[str]:
    """The non-empty `text` fields of a JSONL file, in file order; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--data {path} does not exist. Give a JSONL file with one {{\"text\": ...}} per line, e.g. the "
            f"general_train.jsonl written by `alora prepare-data --out DIR`."
        )
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--data {path}, line {lineno}: not JSON ({e}).") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"--data {path}, line {lineno}: expected an object with a string \"text\" field.")
            if row["text"].strip():
                texts.append(row["text"])
    if not texts:
        raise ValueError(f"--data {path} holds no non-empty \"text\" field.")
    return texts


def tokenize(tokenizer, texts: list[str], max_length: int) -> list:
    """1-D token id tensors, tokenized as the tokenizer does by default, truncated to `max_length`;
    sequences of fewer than 2 tokens (nothing to predict) are dropped."""
    import torch

    out = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            out.append(torch.tensor(ids, dtype=torch.long))
    return out


# -- the command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model: a Hugging Face model directory (the domain stage's base_model)")
    parser.add_argument("--data", required=True, help='general-text JSONL, one {"text": ...} per line (e.g. general_train.jsonl from `alora prepare-data`)')
    parser.add_argument("--target-modules", nargs="+", default=list(DEFAULT_TARGETS), metavar="NAME",
                        help="linear modules to compute the Fisher for: the domain stage's lora_target_modules (default: %(default)s)")
    parser.add_argument("--lora-r", type=int, default=8, help="the domain stage's lora_r: the zero reference adapter's rank (default %(default)s)")
    parser.add_argument("--lora-alpha", type=float, default=32,
                        help="the domain stage's lora_alpha, for the scaling s stored in the file (default %(default)s)")
    parser.add_argument("--use-rslora", action="store_true", help="the domain stage uses rsLoRA (s = alpha/sqrt(r))")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="number of sequences N, drawn without replacement by --seed (default %(default)s; EWCLoRA: 20000)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per sequence, truncated (default %(default)s; EWCLoRA: 800)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample choice (default %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="importance file to write (default %(default)s)")
    parser.add_argument("--omega-dtype", choices=("float32", "bfloat16"), default="float32", help="storage dtype of Ω (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_args(args) -> None:
    for flag, value, low in (("--samples", args.samples, 1), ("--max-length", args.max_length, 2), ("--lora-r", args.lora_r, 1)):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}.")
    if not args.lora_alpha > 0:
        raise ValueError(f"--lora-alpha must be > 0, got {args.lora_alpha}.")


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .importance_file import base_metadata, write_importance_file
    from .lora import base_fingerprint

    _check_args(args)
    texts = read_texts(args.data)  # before loading the model: a wrong path fails at once
    started = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).to(device)
    weights = {n: m.weight for n, m in target_linears(model, args.target_modules).items()}

    chosen = select_samples(len(texts), args.samples, args.seed)
    sequences = tokenize(tokenizer, [texts[i] for i in chosen], args.max_length)
    if not sequences:
        raise ValueError(f"--data {args.data}: none of the {len(chosen)} chosen texts has 2 or more tokens.")
    tokens = sum(s.numel() for s in sequences)
    _log(f"{len(sequences)} sequences ({tokens} tokens, max length {args.max_length}) from {args.data}; "
         f"Fisher of {len(weights)} modules ({sum(w.numel() for w in weights.values()) / 1e6:.2f} M weights) on {device}")

    compute_started = time.time()
    fisher = empirical_fisher(model, weights, sequences, progress=not args.no_progress)
    compute_s = time.time() - compute_started

    metadata = {
        **base_metadata(args.base, model, args.target_modules),
        "fisher": {"data": str(args.data), "samples": len(sequences), "max_length": args.max_length, "seed": args.seed,
                   "log_likelihood": "sum over tokens"},
    }
    data = fisher_importance(fisher, args.lora_r, args.lora_alpha, args.use_rslora, metadata,
                             fingerprint=base_fingerprint(model), tokens=tokens, steps=len(sequences))
    path = write_importance_file(args.out, data, args.omega_dtype)
    _print_summary(path, data, args, device, wall_s=time.time() - started, compute_s=compute_s)
    return 0


def peak_memory(device) -> dict:
    """Peak resident memory of this process (MiB), and peak CUDA memory allocated on `device` when it is a GPU.
    Linux's VmHWM where there is one: ru_maxrss would include the high-water mark of a process that forked this one."""
    import resource

    import torch

    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peak = {"cpu_max_rss_mib": kib / 1024}
    if device.type == "cuda":
        peak["gpu_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def _print_summary(path: Path, data, args, device, wall_s: float, compute_s: float) -> None:
    meta = data.metadata
    norms = [m["norm"] for m in meta["modules"].values()]
    total = sum(o.numel() for o in data.omega.values())
    mean = sum(float(o.double().sum()) for o in data.omega.values()) / total
    print(f"wrote {path}: Fisher importance (source fisher) for {len(norms)} modules")
    print(f"  sequences {meta['steps']}, tokens {meta['tokens']}, mean Ω {mean:.3g}, ‖Ω_l‖_F {min(norms):.3g} … {max(norms):.3g}")
    print(f"  reference adapter: zeros, r={args.lora_r}, s={next(iter(meta['modules'].values()))['scaling']:g}")
    memory = ", ".join(f"{k} {v:.0f}" for k, v in peak_memory(device).items())
    print(f"cost: wall {wall_s:.1f} s (Fisher passes {compute_s:.1f} s, {compute_s / max(meta['steps'], 1):.3f} s/seq), "
          f"peak memory {memory}, file {path.stat().st_size / 2**20:.1f} MiB")
    print("use it in the domain stage with: alora_importance_path: " + str(path) +
          ", alora_layer_weighting: none, alora_phi: <EWC's lambda>; same lora_r/lora_alpha/lora_target_modules as here")


def _log(msg: str) -> None:
    print(f"[fisher] {msg}", file=sys.stderr, flush=True)
