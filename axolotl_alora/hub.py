"""Importance files on the Hugging Face Hub: `alora_importance_path: hf://<repo_id>[@<revision>][/<file>]`.

Adapters travel through the Hub and are continued with `lora_model_dir`; the importance file travels with them
(Axolotl's `hub_model_id` push uploads the whole `output_dir`, the importance file included). A reference is
resolved with huggingface_hub, so the local cache serves it again, offline (`HF_HUB_OFFLINE=1`) too.
"""

from __future__ import annotations

from pathlib import Path

from .args import IMPORTANCE_FILENAME
from .importance_file import INDEX_SUFFIX, ImportanceFileError

HUB_PREFIX = "hf://"


def is_hub_reference(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(HUB_PREFIX)


def parse_hub_reference(spec: str) -> tuple[str, str | None, str]:
    """(repo_id, revision, file in the repo) of `hf://org/name[@revision][/path/to/file]`; the file defaults to
    alora_importance.safetensors."""
    parts = spec[len(HUB_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ImportanceFileError(f"alora_importance_path {spec!r}: a Hub reference is hf://<org>/<repo>[@<revision>][/<file>].")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None, "/".join(parts[2:]) or IMPORTANCE_FILENAME


def resolve_importance_path(spec) -> str:
    """A local path as it is; a Hub reference as the local path of its file (downloaded, or found in the cache).
    A sharded file (its `.index.json` and shards) is fetched whole; the path returned is the one readers take."""
    if not is_hub_reference(spec):
        return spec
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, revision, filename = parse_hub_reference(spec)

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, revision=revision))

    try:
        try:
            return str(fetch(filename))
        except (EntryNotFoundError, LocalEntryNotFoundError) as single_missing:
            try:
                index = fetch(filename + INDEX_SUFFIX)
            except (EntryNotFoundError, LocalEntryNotFoundError):
                raise single_missing from None
            import json

            for shard in sorted(set(json.loads(index.read_text()).get("weight_map", {}).values())):
                fetch(str(Path(filename).parent / shard) if "/" in filename else shard)
            return str(index.with_name(Path(filename).name))
    except LocalEntryNotFoundError:
        raise ImportanceFileError(
            f"alora_importance_path {spec}: {filename} of {repo_id} is not in the local Hugging Face cache and the Hub cannot be "
            f"reached (offline, or HF_HUB_OFFLINE=1). Download it once where the Hub is reachable "
            f"(`huggingface-cli download {repo_id} {filename}`), or point alora_importance_path at a local file."
        ) from None
    except EntryNotFoundError:
        raise ImportanceFileError(
            f"alora_importance_path {spec}: {repo_id} has no {filename} (nor a sharded {filename}{INDEX_SUFFIX}). "
            "Push the general stage's output_dir with the adapter, or name the file: hf://<org>/<repo>/<file>."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ImportanceFileError(f"alora_importance_path {spec}: {e.__class__.__name__}: {e}. Check the repo id, revision and access token.") from None
