"""Running real `axolotl train` subprocesses on a tiny model (helpers for the end-to-end tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def base_config(model_dir, data_path, out_dir, prepared_dir, **overrides) -> dict:
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data_path), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(prepared_dir),
        "val_set_size": 0,
        "output_dir": str(out_dir),
        "sequence_len": 64,
        "sample_packing": False,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "v_proj"],
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "learning_rate": 0.01,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
        "weight_decay": 0.01,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "lora_embedding_kernel": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 7,
        "dataloader_num_workers": 0,
        "dataset_num_proc": 1,  # a worker pool for tokenizing a few dozen rows costs more than it saves
        "plugins": ["axolotl_alora.AloraPlugin"],
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def train(cfg: dict, cfg_path: Path, launcher: list[str] | None = None, check: bool = True, timeout: int = 600, env: dict | None = None):
    """Write `cfg` as YAML and run Axolotl's training CLI on it; returns the CompletedProcess."""
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "helpers"), str(REPO / "tests"), str(REPO)]),
        "AXOLOTL_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        **(env or {}),
    }
    cmd = (launcher or [sys.executable, "-m", "axolotl.cli.train"]) + [str(cfg_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    (cfg_path.parent / (cfg_path.stem + ".log")).write_text(proc.stdout + "\n" + proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"axolotl train failed ({proc.returncode}) for {cfg_path}:\n{proc.stderr[-6000:]}")
    return proc


def adapter_deltas(adapter: Path) -> dict:
    """s·B·A per module (float64), from a saved adapter's files and adapter_config.json alone (s = α/r, or α/√r with
    rsLoRA): an independent view of what peft applies."""
    import json
    import math

    from safetensors.torch import load_file

    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    tensors = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    deltas = {k.replace(".lora_A.weight", ""): s * tensors[k.replace("lora_A", "lora_B")].double() @ tensors[k].double()
              for k in tensors if k.endswith("lora_A.weight")}
    return deltas | {k.replace(".lora_embedding_A", ""): s * tensors[k.replace("_A", "_B")].double() @ tensors[k].double()
                     for k in tensors if k.endswith("lora_embedding_A")}  # an embedding's ΔW, transposed


def train_logs(text: str) -> list[dict]:
    """The per-step dicts the Trainer prints ({'loss': '5.9', ...}), values as floats where they are numbers."""
    import ast

    logs = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{'loss'"):
            entry = ast.literal_eval(line)
            logs.append({k: _number(v) for k, v in entry.items()})
    return logs


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


IMPORTANCE_FILE = "alora_importance.safetensors"
# Ω as recorded and τ = 1 (the paper's scale), for the runs whose φ was set for it (φ = 3e5 on a tiny model's raw Ω)
RAW_OMEGA = {"alora_importance_normalization": "none", "alora_softmax_temperature": 1.0}


@dataclass
class Run:
    """One finished `axolotl train` run: its output folder, exit code and log."""

    out: Path
    returncode: int
    log: str

    @property
    def logs(self):
        return train_logs(self.log)

    def adapter(self):
        from safetensors.torch import load_file

        return load_file(str(self.out / "adapter_model.safetensors"))

    def importance(self):
        """Every tensor of the run's importance file, or of all its shards when it wrote them."""
        import json

        from safetensors.torch import load_file

        index = self.out / (IMPORTANCE_FILE + ".index.json")
        if not (self.out / IMPORTANCE_FILE).exists() and index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(str(self.out / shard)).items()}
        return load_file(str(self.out / IMPORTANCE_FILE))

    def metadata(self):
        from axolotl_alora.importance_file import read_metadata

        return read_metadata(self.out / IMPORTANCE_FILE)


class Runs:
    """A tiny Llama with general and domain text, and `axolotl train` runs on it submitted to a thread pool;
    each run waits only for the runs it names in `after`. `defaults` are config overrides every run gets."""

    def __init__(self, root: Path, pool, launcher: list[str] | None = None, model: dict | None = None, **defaults):
        from tiny import build_tiny_llama, write_text_jsonl

        self.root, self.pool, self.futures, self.launcher, self.defaults = root, pool, {}, launcher, defaults
        self.model = build_tiny_llama(root / "model", **(model or {}))
        self.general = write_text_jsonl(root / "general.jsonl", 48, seed=1, tokenizer_dir=self.model)
        self.domain = write_text_jsonl(root / "domain.jsonl", 48, seed=2, tokenizer_dir=self.model)

    importance_defaults: dict = {}  # overrides for every run that reads an importance file (RAW_OMEGA: the paper's scale)

    def submit(self, name, data, after=(), launcher=None, env=None, check=True, **overrides):
        if "alora_importance_path" in overrides:
            overrides = {**self.importance_defaults, **overrides}

        def job():
            for dep in after:
                self.get(dep)
            out = self.root / name
            cfg = base_config(self.model, data, out, self.root / f"prepared_{name}", **{**self.defaults, **overrides})
            proc = train(cfg, self.root / f"{name}.yml", launcher=launcher or self.launcher, check=check, env=env)
            return Run(out, proc.returncode, proc.stdout + "\n" + proc.stderr)

        self.futures[name] = self.pool.submit(job)

    def get(self, name) -> Run:
        return self.futures[name].result()

    def out(self, name) -> Path:
        return self.root / name
