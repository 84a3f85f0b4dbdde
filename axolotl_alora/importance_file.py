"""The importance file (docs/METHOD.md §5): safetensors only, written atomically, validated on read.

Tensors, per LoRA module `<name>` (its peft module path without the `base_model.model.` prefix; kind "lora"):
    <name>.omega   Ω, d_out×d_in (float32 or bfloat16 storage); for an embedding LoRA, dim×vocab
    <name>.lora_A  reference A^ν, r×d_in, float32
    <name>.lora_B  reference B^ν, d_out×r, float32
per full trainable parameter `<name>` (its parameter path; kind "full"):
    <name>.omega      Ω, the parameter's shape
    <name>.reference  θ^ν, float32
plus `__base_fingerprint__`: a slice of the base model's input embeddings, to recognise the base model.
Safetensors metadata: `format` = "alora-importance", `format_version`, and `alora` = a JSON object.

Format versions: 2 has g̃ with its outer factor s (eq. 13). Version 1 (axolotl-alora 0.1) left s out of
g̃, so an SI file's Ω was 1/s of the consistent value; it is read with each module's Ω multiplied by
its recorded scaling. (A Fisher file's Ω never involved g̃ and is read as is.)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

FORMAT = "alora-importance"
FORMAT_VERSION = 2
FINGERPRINT_KEY = "__base_fingerprint__"
SUFFIXES = {"lora": ("omega", "lora_A", "lora_B"), "full": ("omega", "reference")}


class ImportanceFileError(ValueError):
    """The importance file is missing, unreadable, inconsistent or does not match the model."""


@dataclass
class ImportanceFile:
    omega: dict[str, Tensor]
    lora_A: dict[str, Tensor]
    lora_B: dict[str, Tensor]
    metadata: dict = field(default_factory=dict)
    fingerprint: Tensor | None = None
    reference: dict[str, Tensor] = field(default_factory=dict)  # θ^ν of full parameters
    format_version: int = FORMAT_VERSION  # as read; files are always written at FORMAT_VERSION

    @property
    def module_names(self) -> list[str]:
        return list(self.omega)

    def kind(self, name: str) -> str:
        return module_kind(self.metadata["modules"][name])


def module_kind(entry: dict) -> str:
    return entry.get("kind", "lora")


def base_metadata(base_model: str, model, target_modules) -> dict:
    """Metadata identifying the base model and the writer, shared by every producer of importance files."""
    from datetime import datetime, timezone

    from . import __version__

    config = getattr(model, "config", None)
    fields = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return {
        "base_model": str(base_model),
        "base_model_config": {k: getattr(config, k, None) for k in fields},
        "lora_target_modules": list(target_modules or []),
        "created_by": f"axolotl-alora {__version__}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def module_metadata(omega: Tensor, r: int, alpha: float, scaling: float, use_rslora: bool, layer: str = "linear") -> dict:
    """One entry of metadata["modules"] for a LoRA module: the LoRA shape the reference adapter belongs to, and n_l = ‖Ω_l‖_F."""
    return {
        "kind": "lora", "layer": layer, "shape": list(omega.shape), "r": int(r), "alpha": float(alpha), "scaling": float(scaling),
        "use_rslora": bool(use_rslora), "norm": float(torch.linalg.vector_norm(omega.double())),
    }


def parameter_metadata(omega: Tensor) -> dict:
    """One entry of metadata["modules"] for a full trainable parameter."""
    return {"kind": "full", "shape": list(omega.shape), "norm": float(torch.linalg.vector_norm(omega.double()))}


def write_importance_file(path: str | os.PathLike, data: ImportanceFile, omega_dtype: str = "float32") -> Path:
    """Write `data` to `path` atomically: a temp file in the same directory, fsync, then rename."""
    from safetensors.torch import save_file

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[omega_dtype]
    tensors = {}
    for name in data.omega:
        tensors[f"{name}.omega"] = data.omega[name].detach().to("cpu", dtype).contiguous()
        refs = {"reference": data.reference[name]} if name in data.reference else {"lora_A": data.lora_A[name], "lora_B": data.lora_B[name]}
        for suffix, tensor in refs.items():
            tensors[f"{name}.{suffix}"] = tensor.detach().to("cpu", torch.float32).contiguous()
    if data.fingerprint is not None:
        tensors[FINGERPRINT_KEY] = data.fingerprint.detach().to("cpu", torch.float32).contiguous()
    meta = {k: v for k, v in data.metadata.items() if k != "format_version"} | {"omega_dtype": omega_dtype}
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "alora": json.dumps(meta)}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_metadata(path: str | os.PathLike) -> dict:
    """The file's `alora` metadata, after checking it is a readable importance file (no tensor is loaded).

    The key `format_version` is added: the version the file was written with."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise ImportanceFileError(
            f"{path} is not a readable safetensors file ({e}). Importance files are written by a general "
            f"stage with `alora_record_importance: true`; point alora_importance_path at one."
        ) from None
    if header.get("format") != FORMAT:
        raise ImportanceFileError(
            f"{path} is a safetensors file but not an ALoRA importance file (metadata format="
            f"{header.get('format')!r}, expected {FORMAT!r}). Point alora_importance_path at the "
            f"alora_importance.safetensors written by the general stage."
        )
    version = int(header.get("format_version", -1))
    if version > FORMAT_VERSION or version < 1:
        raise ImportanceFileError(f"{path} has format_version {header.get('format_version')}; this plugin reads 1 to {FORMAT_VERSION}. Upgrade axolotl-alora.")
    try:
        meta = json.loads(header["alora"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ImportanceFileError(f"{path}: its `alora` metadata is missing or not JSON ({e}).") from None
    _check_keys(path, meta, keys)
    _check_scalings(path, meta)
    meta["format_version"] = version
    return meta


def read_importance_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> ImportanceFile:
    """Load and validate: every module has Ω, A^ν, B^ν of consistent shapes; Ω finite and ≥ 0."""
    from safetensors import safe_open

    meta = read_metadata(path)
    path = Path(path)
    data = ImportanceFile({}, {}, {}, meta, format_version=meta.pop("format_version"))
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name, entry in meta["modules"].items():
                data.omega[name] = f.get_tensor(f"{name}.omega").float()
                if module_kind(entry) == "full":
                    data.reference[name] = f.get_tensor(f"{name}.reference").float()
                else:
                    data.lora_A[name] = f.get_tensor(f"{name}.lora_A").float()
                    data.lora_B[name] = f.get_tensor(f"{name}.lora_B").float()
            if FINGERPRINT_KEY in f.keys():
                data.fingerprint = f.get_tensor(FINGERPRINT_KEY)
    except ImportanceFileError:
        raise
    except Exception as e:
        raise ImportanceFileError(f"{path} could not be read completely ({e}); is it truncated? Re-run the general stage.") from None
    for name in data.omega:
        if name in data.reference:
            _check_parameter(path, name, data.omega[name], data.reference[name])
        else:
            _check_module(path, name, data.omega[name], data.lora_A[name], data.lora_B[name])
    if data.format_version == 1 and meta.get("source", "si") == "si":
        _add_outer_scaling(data)
    return data


def _add_outer_scaling(data: ImportanceFile) -> None:
    """A version-1 SI file: its g̃ lacked the outer s, so Ω was 1/s of the version-2 value."""
    for name, omega in data.omega.items():
        entry = data.metadata["modules"][name]
        omega.mul_(float(entry["scaling"]))
        entry["norm"] = float(torch.linalg.vector_norm(omega.double()))


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ImportanceFileError(
            f"importance file {path} does not exist. Run the general stage with `alora_record_importance: true` "
            f"(it writes <output_dir>/alora_importance.safetensors) and set alora_importance_path to that file."
        )
    return path


def _check_keys(path: Path, meta: dict, keys: list[str]) -> None:
    modules = meta.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ImportanceFileError(f"{path}: metadata lists no modules; the file is damaged. Re-run the general stage.")
    unknown = sorted(n for n, e in modules.items() if module_kind(e) not in SUFFIXES)
    if unknown:
        raise ImportanceFileError(f"{path}: modules of unknown kind, e.g. {unknown[:3]}; upgrade axolotl-alora or re-run the general stage.")
    expected = {f"{n}.{s}" for n, e in modules.items() for s in SUFFIXES[module_kind(e)]}
    missing = sorted(expected - set(keys))
    if missing:
        raise ImportanceFileError(f"{path}: tensors missing for listed modules, e.g. {missing[:3]}; the file is damaged.")


def _check_scalings(path: Path, meta: dict) -> None:
    """Each LoRA module's recorded s must be what peft applies for its r and alpha: the penalty and θ^ν use it."""
    import math

    for name, e in meta["modules"].items():
        if module_kind(e) != "lora":
            continue
        try:
            s, r, alpha = float(e["scaling"]), int(e["r"]), float(e["alpha"])
        except (KeyError, TypeError, ValueError):
            raise ImportanceFileError(f"{path}: module {name} lacks a numeric scaling, r or alpha in its metadata; the file is damaged.") from None
        expected = alpha / (math.sqrt(r) if e.get("use_rslora") else r) if r > 0 else float("nan")
        if not (math.isfinite(s) and s > 0 and math.isclose(s, expected, rel_tol=1e-6)):
            raise ImportanceFileError(
                f"{path}: module {name} records scaling {s} but r={r}, alpha={alpha}, use_rslora={bool(e.get('use_rslora'))} "
                f"give {expected:g}; the file is damaged or was edited. Re-run the general stage."
            )


def _check_module(path: Path, name: str, omega: Tensor, A: Tensor, B: Tensor) -> None:
    if omega.dim() != 2 or A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or omega.shape != (B.shape[0], A.shape[1]):
        raise ImportanceFileError(
            f"{path}: inconsistent shapes for {name}: omega {tuple(omega.shape)}, lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}."
        )
    _check_omega(path, name, omega)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ImportanceFileError(f"{path}: the reference adapter of {name} has NaN/Inf values; re-run the general stage.")


def _check_parameter(path: Path, name: str, omega: Tensor, reference: Tensor) -> None:
    if omega.shape != reference.shape:
        raise ImportanceFileError(f"{path}: inconsistent shapes for {name}: omega {tuple(omega.shape)}, reference {tuple(reference.shape)}.")
    _check_omega(path, name, omega)
    if not torch.isfinite(reference).all():
        raise ImportanceFileError(f"{path}: the reference value of {name} has NaN/Inf values; re-run the general stage.")


def _check_omega(path: Path, name: str, omega: Tensor) -> None:
    bad = (~torch.isfinite(omega)).sum().item()
    if bad:
        raise ImportanceFileError(
            f"{path}: {name}.omega has {bad} NaN/Inf values; the general stage diverged. Re-run it (lower learning_rate, or max_grad_norm)."
        )
    if (omega < 0).any():
        raise ImportanceFileError(f"{path}: {name}.omega has negative values; importance must be ≥ 0 (docs/METHOD.md §1 clamps it).")


def check_modules_match(data: ImportanceFile, modules: list, path) -> None:
    """The file's modules and shapes must be exactly the model's LoRA modules and full parameters; name the first mismatches."""
    shapes = {m.name: tuple(m.shape) for m in modules}
    theirs = {n: tuple(o.shape) for n, o in data.omega.items()}
    problems = [f"{n}: in the model, not in the file" for n in shapes if n not in theirs]
    problems += [f"{n}: in the file, not in the model" for n in theirs if n not in shapes]
    problems += [f"{n}: shape {tuple(shapes[n])} in the model, {theirs[n]} in the file" for n in shapes if n in theirs and tuple(shapes[n]) != theirs[n]]
    if problems:
        raise ImportanceFileError(
            f"{path} does not match this model's LoRA modules and trainable parameters ({len(problems)} differences; first: "
            + "; ".join(problems[:3])
            + "). Use the same base model, lora_target_modules and lora_modules_to_save as the general stage (or its lora_model_dir)."
        )


def check_base_model(data: ImportanceFile, fingerprint, cfg) -> None:
    """The file's base-model fingerprint must match this run's model, unless alora_allow_base_model_mismatch."""
    import logging

    from .lora import same_base_model

    if data.fingerprint is None or same_base_model(data.fingerprint, fingerprint):
        return
    message = (
        f"{cfg.alora_importance_path} was recorded on base model {data.metadata.get('base_model')!r}, whose weights "
        f"differ from this run's base_model {cfg.base_model!r}. Importance is only meaningful for the model it was "
        "recorded on: run the general stage on this base model"
    )
    if not cfg.alora_allow_base_model_mismatch:
        raise ImportanceFileError(message + ", or set alora_allow_base_model_mismatch: true to use it anyway.")
    logging.getLogger("axolotl.alora").warning("ALoRA: %s; continuing because alora_allow_base_model_mismatch is set.", message)
