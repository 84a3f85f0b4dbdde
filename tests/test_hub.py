"""Importance files referenced on the Hub (axolotl_alora/hub.py), resolved offline from a local Hub cache built here."""

import pytest
import torch

from axolotl_alora.hub import parse_hub_reference, resolve_importance_path
from axolotl_alora.importance_file import ImportanceFile, ImportanceFileError, read_importance_file, write_importance_file, write_importance_index

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def _data() -> ImportanceFile:
    g = torch.Generator().manual_seed(0)
    meta = {"modules": {n: {"kind": "lora", "shape": [6, 5], "r": 2, "alpha": 4.0, "scaling": 2.0, "use_rslora": False, "norm": 1.0} for n in NAMES},
            "source": "si"}
    return ImportanceFile({n: torch.rand(6, 5, generator=g) for n in NAMES}, {n: torch.randn(2, 5, generator=g) for n in NAMES},
                          {n: torch.randn(6, 2, generator=g) for n in NAMES}, meta)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hub cache holding org/adapter at COMMIT (refs/main points at it), as huggingface_hub lays it out."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--adapter"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_reference_syntax():
    assert parse_hub_reference("hf://org/adapter") == ("org/adapter", None, "alora_importance.safetensors")
    assert parse_hub_reference("hf://org/adapter@v2/stage1/imp.safetensors") == ("org/adapter", "v2", "stage1/imp.safetensors")
    with pytest.raises(ImportanceFileError, match="hf://<org>/<repo>"):
        parse_hub_reference("hf://adapter")
    assert resolve_importance_path("work/runs/general/alora_importance.safetensors") == "work/runs/general/alora_importance.safetensors"


def test_a_cached_file_resolves_offline_and_reads(hub_cache):
    data = _data()
    write_importance_file(hub_cache / "alora_importance.safetensors", data)
    path = resolve_importance_path("hf://org/adapter")
    assert path == str(hub_cache / "alora_importance.safetensors")
    assert torch.equal(read_importance_file(path).omega[NAMES[0]], data.omega[NAMES[0]])
    assert resolve_importance_path(f"hf://org/adapter@{COMMIT}/alora_importance.safetensors") == path


def test_a_sharded_file_resolves_with_its_index_and_shards(hub_cache):
    data = _data()
    keys = []
    for rank, name in enumerate(NAMES):
        part = ImportanceFile({name: data.omega[name]}, {name: data.lora_A[name]}, {name: data.lora_B[name]}, data.metadata)
        write_importance_file(hub_cache / "alora_importance.safetensors", part, shard=(rank, 2))
        keys.append([f"{name}.{s}" for s in ("omega", "lora_A", "lora_B")])
    write_importance_index(hub_cache / "alora_importance.safetensors", data.metadata, keys)
    path = resolve_importance_path("hf://org/adapter")
    read = read_importance_file(path)
    assert all(torch.equal(read.omega[n], data.omega[n]) for n in NAMES)


def test_not_cached_offline_is_a_clear_error(hub_cache):
    with pytest.raises(ImportanceFileError, match="not in the local Hugging Face cache.*huggingface-cli download org/adapter"):
        resolve_importance_path("hf://org/adapter")


def test_the_plugin_reads_a_hub_reference_before_the_model_loads(hub_cache):
    from axolotl.utils.dict import DictDefault

    from axolotl_alora.plugin import AloraPlugin

    write_importance_file(hub_cache / "alora_importance.safetensors", _data())
    cfg = DictDefault({"alora_importance_path": "hf://org/adapter", "alora_phi": 0.1, "adapter": "lora"})
    plugin = AloraPlugin()
    plugin.pre_model_load(cfg)
    assert cfg.alora_importance_path == str(hub_cache / "alora_importance.safetensors")
    assert sorted(plugin.previous.omega) == sorted(NAMES)


def test_the_end_of_training_push_uploads_the_importance_file(tmp_path, monkeypatch):
    """With `hub_model_id`, Axolotl ends training with Trainer.push_to_hub, which uploads output_dir. The importance
    file (written there at the end of training, before the push) and its shards match none of its ignore patterns."""
    from huggingface_hub.utils import filter_repo_objects
    from transformers import Trainer, TrainingArguments
    from transformers import trainer as trainer_module

    from tiny import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "model")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(str(model_dir)),
                      args=TrainingArguments(output_dir=str(out), hub_model_id="org/adapter", report_to=[]))
    trainer.hub_model_id = "org/adapter"
    write_importance_file(out / "alora_importance.safetensors", _data())
    write_importance_file(out / "alora_importance.safetensors", _data(), shard=(0, 2))
    (out / "checkpoint-5").mkdir()
    calls = []

    class FakeApi:
        def upload_folder(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(trainer_module, "hf_api", lambda: FakeApi())
    trainer.push_to_hub()
    (call,) = calls
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(files, ignore_patterns=call["ignore_patterns"]))
    assert call["folder_path"] == str(out) and call["repo_id"] == "org/adapter"
    assert {"alora_importance.safetensors", "alora_importance-00001-of-00002.safetensors"} <= uploaded
