"""Tiny random Llama models and tokenizers for tests (built offline, in seconds)."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What do plants need to grow?\nAnswer: sunlight and water",
    "Photosynthesis turns light energy into chemical energy in plants.",
    "A patient with fever and cough was given antibiotics by the doctor.",
    "To open a jar, twist the lid counterclockwise while holding the base.",
    "In 1789 Washington gave the first inaugural address of the republic.",
] * 4


def build_tokenizer(out_dir: str | Path):
    """A byte-level BPE tokenizer (any text encodes) with Llama-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(out_dir: str | Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Save a random LlamaForCausalLM (fp32, safetensors) with its tokenizer into `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def write_text_jsonl(path: str | Path, n: int, seed: int = 0, tokenizer_dir: str | Path | None = None, tokens: int = 20) -> Path:
    """`n` lines of {"text": ...}; with `tokenizer_dir`, every text is exactly `tokens` tokens long,
    so batches need no padding and any micro-batch/accumulation split sees the same token mean."""
    import random

    tok = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rng = random.Random(seed)
    vocab = " ".join(CORPUS).replace("\n", " ").split()
    lines = []
    while len(lines) < n:
        text = " ".join(rng.choice(vocab) for _ in range(tokens // 2 if tok else tokens))
        if tok is not None:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) < tokens:
                continue
            text = tok.decode(ids[:tokens])
            if len(tok(text, add_special_tokens=False)["input_ids"]) != tokens:
                continue
        lines.append(json.dumps({"text": text}))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def pretrain(model_dir: str | Path, text_jsonl: str | Path, steps: int = 60, lr: float = 3e-3, seed: int = 0) -> Path:
    """Train every weight of the tiny model at `model_dir` on `text_jsonl` in place, so that it knows that text: a
    random model is so poor on any text that whatever it is trained on lowers its loss there, and nothing is forgotten."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    texts = [json.loads(line)["text"] for line in Path(text_jsonl).read_text().splitlines() if line.strip()]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return Path(model_dir)
