"""Axolotl's own example configs (tests/fixtures/upstream/), adapted only as far as a CPU and a tiny local
model force, for tests/test_upstream_configs.py.

`adapt()` returns the config a test runs and a record of every key it changed, with the reason; the test
checks that nothing else differs from the upstream file.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import yaml

from tiny import CORPUS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "upstream"
REMOVE = object()  # marker: the key is deleted

# Why each key may change. A key not listed here must stay as upstream has it.
REASONS = {
    "base_model": "hub model → the tiny random Llama of tests/helpers/tiny.py (no network, CPU time)",
    "datasets": "hub dataset → local JSONL written by the test, same `type` and record format (no network)",
    "dataset_prepared_path": "a tmp dir (default ./last_run_prepared would write into the CWD; runs go in parallel)",
    "output_dir": "a tmp dir",
    "sequence_len": "2048/4096 → 256: CPU time on 2 cores (the alpaca / llama3 prompt scaffolding alone is "
    "~110 tokens with the tiny tokenizer, so 128 would drop most records)",
    "max_steps": "added, 3: CPU time (eval/save cadence is per epoch, i.e. a ratio of the steps: it scales by itself)",
    "bf16": "auto → false: on CPU `auto` becomes fp16 (fp16 weights), and `true` errors (transformers: no bf16 on CPU)",
    "fp16": "added, false: see bf16",
    "attn_implementation": "flash_attention_2 → sdpa: flash-attn needs CUDA",
    "lora_mlp_kernel": "added, false: Axolotl auto-enables these CUDA-only kernels, which crash on CPU",
    "lora_qkv_kernel": "added, false: as lora_mlp_kernel",
    "lora_o_kernel": "added, false: as lora_mlp_kernel",
    "lora_embedding_kernel": "added, false: as lora_mlp_kernel",
    "dataloader_num_workers": "added, 0: 2 cores, two trainings at once",
    "dataset_num_proc": "added, 1: on 2 cores, forking a worker pool for tokenizing and for every multipack "
    "packing pass (each eval with sample packing) costs seconds; one process packs the same bins",
    "special_tokens": "pad_token <|end_of_text|> (Llama 3's EOS) → </s> (the tiny tokenizer's EOS): "
    "the tiny tokenizer lacks it; adding it would resize the embeddings, which the real Llama 3 does not",
    "seed": "added, 7: the config has none, so Axolotl shuffles and splits the data at random per run; "
    "comparing the φ > 0 and φ = 0 domain runs needs equal data",
    "wandb_project": "removed (empty in upstream; no network)",
    "wandb_entity": "removed (empty in upstream)",
    "wandb_watch": "removed (empty in upstream)",
    "wandb_name": "removed (empty in upstream)",
    "wandb_log_model": "removed (empty in upstream)",
}

# What each stage adds: the plugin's keys, and continuing the general adapter.
STAGE_KEYS = {
    "plugins",
    "alora_general_eval",
    "alora_general_eval_samples",
    "alora_max_general_loss_rise",
    "alora_budget_by",
    "alora_record_importance",
    "lora_model_dir",
    "alora_importance_path",
    "alora_importance_normalization",
    "alora_phi",
}


def load(name: str) -> dict:
    return yaml.safe_load((FIXTURES / name).read_text())


def adapt(upstream: dict, *, model: Path, data: Path, out: Path, prepared: Path, max_steps: int = 3,
          sequence_len: int = 128, seed: int = 7) -> tuple[dict, dict]:
    """(config to run, {key: (upstream value, new value)}) — only keys of REASONS change."""
    cfg = copy.deepcopy(upstream)
    new = {
        "base_model": str(model),
        "datasets": [{**d, "path": str(data)} for d in upstream["datasets"]],
        "dataset_prepared_path": str(prepared),
        "output_dir": str(out),
        "sequence_len": sequence_len,
        "max_steps": max_steps,
        "bf16": False,
        "fp16": False,
        "attn_implementation": "sdpa",
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "lora_embedding_kernel": False,
        "dataloader_num_workers": 0,
        "dataset_num_proc": 1,
        "seed": seed,
    }
    if "special_tokens" in upstream:
        tokens = dict(upstream["special_tokens"])
        if tokens.get("pad_token") == "<|end_of_text|>":
            tokens["pad_token"] = "</s>"
        new["special_tokens"] = tokens
    for key in list(cfg):
        if key.startswith("wandb_"):
            new[key] = REMOVE
    changes = {}
    for key, value in new.items():
        assert key in REASONS, key
        old = upstream.get(key, REMOVE)
        if value is REMOVE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
        if old is not value and old != value:
            changes[key] = (old, value)
    return cfg, changes


def changed_keys(upstream: dict, cfg: dict) -> set[str]:
    return {k for k in set(upstream) | set(cfg) if upstream.get(k, REMOVE) != cfg.get(k, REMOVE)}


def _words(rng: random.Random, vocab: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))


def _vocab(seed: int) -> list[str]:
    """General and domain data draw from different halves of the corpus, so the two stages differ."""
    sentences = list(dict.fromkeys(CORPUS))
    half = sentences[: len(sentences) // 2] if seed % 2 else sentences[len(sentences) // 2 :]
    return " ".join(half).replace("\n", " ").split()


def write_alpaca_jsonl(path: Path, n: int, seed: int) -> Path:
    """Records of Axolotl's `type: alpaca` (teknium/GPT4-LLM-Cleaned's columns)."""
    rng, vocab = random.Random(seed), _vocab(seed)
    lines = []
    for i in range(n):
        record = {
            "instruction": _words(rng, vocab, 4, 10),
            "input": _words(rng, vocab, 2, 6) if i % 3 == 0 else "",
            "output": _words(rng, vocab, 4, 14),
        }
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_messages_jsonl(path: Path, n: int, seed: int) -> Path:
    """Records of Axolotl's `type: chat_template` with its default `field_messages: messages`
    (fozziethebeat/alpaca_messages_2k_test's format: role/content turns)."""
    rng, vocab = random.Random(seed), _vocab(seed)
    lines = []
    for _ in range(n):
        messages = [
            {"role": "user", "content": _words(rng, vocab, 4, 12)},
            {"role": "assistant", "content": _words(rng, vocab, 4, 14)},
        ]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


WRITERS = {"alpaca": write_alpaca_jsonl, "chat_template": write_messages_jsonl}


def write_data(upstream: dict, path: Path, n: int, seed: int) -> Path:
    (kind,) = {d["type"] for d in upstream["datasets"]}
    return WRITERS[kind](path, n, seed)
