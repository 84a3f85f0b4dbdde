"""The importance file (docs/METHOD.md §5): safetensors only, written atomically, validated on read.

Tensors, per LoRA module `<name>` (its peft module path without the `base_model.model.` prefix; kind "lora"):
    <name>.omega   Ω, d_out×d_in (float32 or bfloat16 storage); for an embedding LoRA, dim×vocab
    <name>.lora_A  reference A^ν, r×d_in, float32
    <name>.lora_B  reference B^ν, d_out×r, float32
per LoRA module kept in the factored form (`alora_importance_form: factored`, beyond the paper; kind "factored"):
    <name>.omega_u, <name>.omega_v   Ω ≈ u·vᵀ, u (d_out) and v (d_in), float32 or bfloat16 storage
    <name>.lora_A, <name>.lora_B     as above
per full trainable parameter `<name>` (its parameter path; kind "full"):
    <name>.omega      Ω, the parameter's shape
    <name>.reference  θ^ν, float32
plus `__base_fingerprint__`: a slice of the base model's input embeddings, to recognise the base model.
Safetensors metadata: `format` = "alora-importance", `format_version`, and `alora` = a JSON object.

A general stage sharded across W data-parallel ranks (`alora_shard_importance`) writes safetensors' sharded
convention instead: `alora_importance-0000k-of-0000W.safetensors`, one per rank with the modules it owns, and
`alora_importance.safetensors.index.json` = {format, format_version, alora (the whole run's metadata),
weight_map (tensor → shard)}. Readers take either the file or the index (or the file's path when only the
index exists), on any number of ranks: `keep` loads only some modules' tensors, while every module is
validated and its ‖Ω‖_F and ΣΩ are known to all (they decide the layer weights).

Format versions: 2 has g̃ with its outer factor s (eq. 13). Version 1 (axolotl-alora 0.1) left s out of
g̃, so an SI file's Ω was 1/s of the consistent value; it is read with each module's Ω multiplied by
its recorded scaling. (A Fisher file's Ω never involved g̃ and is read as is.)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .factored import FactoredOmega, factored_norm, factored_sum

FORMAT = "alora-importance"
FORMAT_VERSION = 2
FINGERPRINT_KEY = "__base_fingerprint__"
SUFFIXES = {"lora": ("omega", "lora_A", "lora_B"), "factored": ("omega_u", "omega_v", "lora_A", "lora_B"), "full": ("omega", "reference")}
INDEX_SUFFIX = ".index.json"
OMEGA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATS_BLOCK = 1 << 16  # elements widened to float64 at a time for ‖Ω‖_F and ΣΩ


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
    norms: dict[str, float] = field(default_factory=dict)  # n_l = ‖Ω_l‖_F of every module in the file, as read
    sums: dict[str, float] = field(default_factory=dict)  # ΣΩ_l of every module in the file, as read

    def __post_init__(self):
        for name, omega in self.omega.items():  # an ImportanceFile built in memory knows its own
            if name not in self.norms:
                self.norms[name], self.sums[name] = omega_stats(omega)

    @property
    def module_names(self) -> list[str]:
        return list(self.metadata["modules"]) if "modules" in self.metadata else list(self.omega)

    def kind(self, name: str) -> str:
        return module_kind(self.metadata["modules"][name])


def module_kind(entry: dict) -> str:
    return entry.get("kind", "lora")


def omega_stats(omega: Tensor | FactoredOmega) -> tuple[float, float]:
    """(‖Ω‖_F, ΣΩ) in float64, a block of elements at a time (no float64 copy of the whole tensor)."""
    if isinstance(omega, FactoredOmega):
        return float(factored_norm(omega.u, omega.v)), float(factored_sum(omega.u, omega.v))
    flat = omega.reshape(-1)
    squares = total = 0.0
    for start in range(0, flat.numel(), STATS_BLOCK):
        block = flat[start:start + STATS_BLOCK].double()
        squares += float(block.square().sum())
        total += float(block.sum())
    return math.sqrt(squares), total


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


def module_metadata(omega: Tensor | FactoredOmega, r: int, alpha: float, scaling: float, use_rslora: bool, layer: str = "linear") -> dict:
    """One entry of metadata["modules"] for a LoRA module: the LoRA shape the reference adapter belongs to, n_l = ‖Ω_l‖_F and ΣΩ_l."""
    norm, total = omega_stats(omega)
    return {
        "kind": "factored" if isinstance(omega, FactoredOmega) else "lora", "layer": layer, "shape": list(omega.shape),
        "r": int(r), "alpha": float(alpha), "scaling": float(scaling), "use_rslora": bool(use_rslora), "norm": norm, "sum": total,
    }


def parameter_metadata(omega: Tensor) -> dict:
    """One entry of metadata["modules"] for a full trainable parameter."""
    norm, total = omega_stats(omega)
    return {"kind": "full", "shape": list(omega.shape), "norm": norm, "sum": total}


def write_importance_file(path: str | os.PathLike, data: ImportanceFile, omega_dtype: str = "float32", shard: tuple[int, int] | None = None) -> Path:
    """Write `data` to `path` atomically: a temp file in the same directory, fsync, then rename.

    `shard=(rank, world_size)` writes this rank's shard of a sharded file instead (its modules, the whole
    run's metadata); `write_importance_index` completes it once every shard is written."""
    from safetensors.torch import save_file

    tensors = {}
    for name, omega in data.omega.items():
        parts = {"omega_u": omega.u, "omega_v": omega.v} if isinstance(omega, FactoredOmega) else {"omega": omega}
        for suffix, tensor in parts.items():
            tensors[f"{name}.{suffix}"] = tensor.detach().to("cpu", OMEGA_DTYPES[omega_dtype]).contiguous()
        refs = {"reference": data.reference[name]} if name in data.reference else {"lora_A": data.lora_A[name], "lora_B": data.lora_B[name]}
        for suffix, tensor in refs.items():
            tensors[f"{name}.{suffix}"] = tensor.detach().to("cpu", torch.float32).contiguous()
    if data.fingerprint is not None:
        tensors[FINGERPRINT_KEY] = data.fingerprint.detach().to("cpu", torch.float32).contiguous()
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "alora": json.dumps(_written_metadata(data.metadata, omega_dtype))}
    path = Path(path)
    target = shard_path(path, *shard) if shard else path
    _atomically(target, lambda tmp: save_file(tensors, tmp, metadata=header))
    if not shard and index_path(path).exists():
        index_path(path).unlink()  # a sharded file of an earlier run in the same place
    return target


def shard_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """alora_importance.safetensors → alora_importance-0000{rank+1}-of-0000{world_size}.safetensors."""
    path = Path(path)
    return path.with_name(f"{path.stem}-{rank + 1:05d}-of-{world_size:05d}{path.suffix}")


def index_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.name.endswith(INDEX_SUFFIX) else path.with_name(path.name + INDEX_SUFFIX)


def write_importance_index(path: str | os.PathLike, metadata: dict, shard_tensors: list[list[str]], omega_dtype: str = "float32") -> Path:
    """The index of a sharded file: `shard_tensors[rank]` are the tensor keys in rank's shard. Removes a
    single file of the same name from an earlier run, which readers would otherwise take instead."""
    path = Path(path)
    world = len(shard_tensors)
    weight_map = {key: shard_path(path, rank, world).name for rank, keys in enumerate(shard_tensors) for key in keys}
    index = {"format": FORMAT, "format_version": FORMAT_VERSION, "alora": _written_metadata(metadata, omega_dtype), "weight_map": weight_map}
    target = index_path(path)
    _atomically(target, lambda tmp: Path(tmp).write_text(json.dumps(index)))
    if path.exists() and path != target:
        path.unlink()
    return target


def _written_metadata(metadata: dict, omega_dtype: str) -> dict:
    return {k: v for k, v in metadata.items() if k != "format_version"} | {"omega_dtype": omega_dtype}


def _atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_metadata(path: str | os.PathLike) -> dict:
    """The file's `alora` metadata, after checking it is a readable importance file (no tensor is loaded).

    The key `format_version` is added: the version the file was written with."""
    return _open_metadata(path)[0]


def _open_metadata(path) -> tuple[dict, dict[str, Path]]:
    """Validated metadata (with `format_version`) and where each tensor lives: {key: file}."""
    from safetensors import safe_open

    path = _existing(path)
    if path.name.endswith(INDEX_SUFFIX):
        return _open_index(path)
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
    version = _version(path, header.get("format_version"))
    try:
        meta = json.loads(header["alora"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ImportanceFileError(f"{path}: its `alora` metadata is missing or not JSON ({e}).") from None
    _check_keys(path, meta, keys)
    _check_scalings(path, meta)
    meta["format_version"] = version
    return meta, {key: path for key in keys}


def _open_index(path: Path) -> tuple[dict, dict[str, Path]]:
    try:
        index = json.loads(path.read_text())
        meta, weight_map = index["alora"], index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ImportanceFileError(f"{path}: not a readable importance index ({e}); re-run the general stage.") from None
    if index.get("format") != FORMAT:
        raise ImportanceFileError(f"{path} is not an ALoRA importance index (format={index.get('format')!r}, expected {FORMAT!r}).")
    version = _version(path, index.get("format_version"))
    missing = sorted({path.parent / f for f in weight_map.values() if not (path.parent / f).is_file()})
    if missing:
        raise ImportanceFileError(f"{path}: shard {missing[0]} is missing ({len(missing)} of {len(set(weight_map.values()))}); "
                                  "keep every alora_importance-*-of-*.safetensors beside the index, or re-run the general stage.")
    _check_keys(path, meta, list(weight_map))
    _check_scalings(path, meta)
    meta["format_version"] = version
    return meta, {key: path.parent / f for key, f in weight_map.items()}


def _version(path: Path, value) -> int:
    try:
        version = int(value)
    except (TypeError, ValueError):
        version = -1
    if version > FORMAT_VERSION or version < 1:
        raise ImportanceFileError(f"{path} has format_version {value}; this plugin reads 1 to {FORMAT_VERSION}. Upgrade axolotl-alora.")
    return version


def read_importance_file(path: str | os.PathLike, device: str | torch.device = "cpu", keep=None, omega_dtype: str = "float32",
                         omega_form: str = "dense") -> ImportanceFile:
    """Load and validate: every module has Ω, A^ν, B^ν of consistent shapes; Ω finite and ≥ 0.

    Modules are read one at a time. Every module is validated and gets its norm and sum in `norms`, `sums`,
    and its reference (small next to Ω); only those in `keep` (default: all) keep Ω, in `omega_dtype`. `omega_form: factored` turns a dense LoRA module's Ω
    into the rank-1 u·vᵀ with its row and column sums (`FactoredOmega.from_dense`) as it is read.

    Version-1 SI files (axolotl-alora 0.1) left g̃'s outer s out, so their Ω was 1/s of the version-2 value;
    each module's Ω is multiplied by its recorded scaling. (A Fisher file's Ω never involved g̃.)"""
    from safetensors import safe_open

    meta, sources = _open_metadata(path)
    path = Path(path)
    data = ImportanceFile({}, {}, {}, meta, format_version=meta.pop("format_version"))
    rescale = data.format_version == 1 and meta.get("source", "si") == "si"
    with ExitStack() as stack:
        handles = {}

        def get(key: str) -> Tensor:
            source = sources[key]
            if source not in handles:
                handles[source] = stack.enter_context(safe_open(str(source), framework="pt", device=str(device)))
            return handles[source].get_tensor(key)

        try:
            for name, entry in meta["modules"].items():
                _read_module(path, data, name, entry, get, rescale, keep is None or name in keep, OMEGA_DTYPES[omega_dtype], omega_form)
            if FINGERPRINT_KEY in sources:
                data.fingerprint = get(FINGERPRINT_KEY).clone()
        except ImportanceFileError:
            raise
        except Exception as e:
            raise ImportanceFileError(f"{path} could not be read completely ({e}); is it truncated? Re-run the general stage.") from None
    _release_freed_memory()
    return data


def _release_freed_memory() -> None:
    """Hand the reading's freed temporaries back to the OS (glibc keeps freed heap pages resident otherwise), so
    that what stays resident is what the file's tensors take; a no-op where the C library has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _read_module(path: Path, data: ImportanceFile, name: str, entry: dict, get, rescale: bool, keep: bool, dtype: torch.dtype,
                 form: str = "dense") -> None:
    # copies that own their memory: a tensor safetensors returns may map the file, and would keep it mapped
    if module_kind(entry) == "factored":
        omega = FactoredOmega(get(f"{name}.omega_u").to(torch.float32, copy=True), get(f"{name}.omega_v").to(torch.float32, copy=True))
    else:
        omega = get(f"{name}.omega").to(torch.float32, copy=True)
    if module_kind(entry) == "full":
        reference = get(f"{name}.reference").to(torch.float32, copy=True)
        _check_parameter(path, name, omega, reference)
    else:
        A, B = get(f"{name}.lora_A").to(torch.float32, copy=True), get(f"{name}.lora_B").to(torch.float32, copy=True)
        _check_module(path, name, omega, A, B)
    if "shape" in entry and list(omega.shape) != list(entry["shape"]):
        raise ImportanceFileError(f"{path}: {name}.omega has shape {tuple(omega.shape)}, its metadata says {tuple(entry['shape'])}; the file is damaged.")
    if rescale:
        omega.mul_(float(entry["scaling"]))
    data.norms[name], data.sums[name] = omega_stats(omega)
    if rescale:
        entry["norm"] = data.norms[name]
    if keep and form == "factored" and module_kind(entry) == "lora":
        omega = FactoredOmega.from_dense(omega)
    if keep:
        data.omega[name] = omega.to(dtype)  # float32: the copy itself
    del omega
    if module_kind(entry) == "full":
        data.reference[name] = reference
    else:
        data.lora_A[name], data.lora_B[name] = A, B


def _existing(path) -> Path:
    """The file, or the index of a sharded file of that name."""
    path = Path(path)
    if not path.is_file() and index_path(path).is_file():
        return index_path(path)
    if not path.is_file():
        raise ImportanceFileError(
            f"importance file {path} does not exist. Run the general stage with `alora_record_importance: true` "
            f"(it writes <output_dir>/alora_importance.safetensors, or its shards and an .index.json under data parallelism) "
            f"and set alora_importance_path to that file."
        )
    return path


def nonfinite_modules(meta: dict) -> list[str]:
    """Modules whose recorded ‖Ω_l‖ or ΣΩ_l is NaN/Inf, from the metadata alone: the general stage diverged there."""
    import math

    def bad(value) -> bool:
        return isinstance(value, (int, float)) and not math.isfinite(value)

    return sorted(n for n, e in meta["modules"].items() if bad(e.get("norm")) or bad(e.get("sum")))


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
        if module_kind(e) == "full":
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


def _check_module(path: Path, name: str, omega: Tensor | FactoredOmega, A: Tensor, B: Tensor) -> None:
    factored = isinstance(omega, FactoredOmega)
    if (factored and (omega.u.dim() != 1 or omega.v.dim() != 1)) or (not factored and omega.dim() != 2) \
            or A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or omega.shape != (B.shape[0], A.shape[1]):
        raise ImportanceFileError(
            f"{path}: inconsistent shapes for {name}: omega {tuple(omega.shape)}, lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}."
        )
    for part in (omega.u, omega.v) if factored else (omega,):
        _check_omega(path, name, part)
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
    theirs = {n: tuple(o.shape) for n, o in data.omega.items()}  # and, read with `keep`, the modules held elsewhere:
    theirs |= {n: tuple(e["shape"]) for n, e in data.metadata.get("modules", {}).items() if "shape" in e and n not in theirs}
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
