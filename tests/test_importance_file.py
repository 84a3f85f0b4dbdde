"""docs/METHOD.md §5: the importance file — round trip, storage dtype, atomic writes, and clear errors."""

import json
import os

import pytest
import torch

from axolotl_alora import importance_file as f
from axolotl_alora.importance_file import ImportanceFile, ImportanceFileError, read_importance_file, read_metadata, write_importance_file


def _data(nan=False, negative=False):
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    omega = {n: torch.rand(6, 5, generator=g) for n in names}
    if nan:
        omega[names[1]][2, 3] = float("nan")
    if negative:
        omega[names[0]][0, 0] = -1.0
    modules = {n: {"kind": "lora", "shape": [6, 5], "r": 2, "alpha": 4, "scaling": 2.0, "use_rslora": False, "norm": 1.0} for n in names}
    return ImportanceFile(
        omega=omega,
        lora_A={n: torch.randn(2, 5, generator=g) for n in names},
        lora_B={n: torch.randn(6, 2, generator=g) for n in names},
        metadata={"source": "si", "modules": modules, "steps": 3},
        fingerprint=torch.randn(16, generator=g),
    )


def test_round_trip(tmp_path):
    data = _data()
    path = write_importance_file(tmp_path / "imp.safetensors", data)
    back = read_importance_file(path)
    for n in data.omega:
        assert torch.equal(back.omega[n], data.omega[n])
        assert torch.equal(back.lora_A[n], data.lora_A[n]) and torch.equal(back.lora_B[n], data.lora_B[n])
    assert torch.equal(back.fingerprint, data.fingerprint)
    assert back.metadata["steps"] == 3 and back.metadata["omega_dtype"] == "float32"


def test_written_file_has_the_usual_permissions(tmp_path):
    import stat

    mask = os.umask(0o022)
    try:
        path = write_importance_file(tmp_path / "imp.safetensors", _data())
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_bfloat16_storage_halves_omega_and_reads_back_fp32(tmp_path):
    from safetensors import safe_open

    data = _data()
    path = write_importance_file(tmp_path / "imp.safetensors", data, omega_dtype="bfloat16")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.omega").dtype == torch.bfloat16
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.lora_A").dtype == torch.float32
    back = read_importance_file(path)
    name = "model.layers.0.self_attn.q_proj"
    assert back.omega[name].dtype == torch.float32
    torch.testing.assert_close(back.omega[name], data.omega[name], rtol=1e-2, atol=1e-3)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = write_importance_file(tmp_path / "imp.safetensors", _data())
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        write_importance_file(path, _data())
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["imp.safetensors"]


def test_missing_file(tmp_path):
    with pytest.raises(ImportanceFileError, match="nope.safetensors does not exist.*alora_record_importance"):
        read_importance_file(tmp_path / "nope.safetensors")


def test_not_safetensors(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00" * 64 + b"not a tensor file")
    with pytest.raises(ImportanceFileError, match="garbage.safetensors is not a readable safetensors file"):
        read_importance_file(path)


def test_pickle_is_refused(tmp_path):
    path = tmp_path / "importance.pt"
    torch.save({"omega": torch.ones(2)}, path)
    with pytest.raises(ImportanceFileError, match="not a readable safetensors file"):
        read_importance_file(path)


def test_truncated(tmp_path):
    path = write_importance_file(tmp_path / "imp.safetensors", _data())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ImportanceFileError, match="imp.safetensors"):
        read_importance_file(path)


def test_safetensors_that_is_not_an_importance_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "adapter_model.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(ImportanceFileError, match="not an ALoRA importance file"):
        read_metadata(path)


def test_nan_in_omega_names_the_module(tmp_path):
    path = write_importance_file(tmp_path / "imp.safetensors", _data(nan=True))
    with pytest.raises(ImportanceFileError, match="v_proj.omega has 1 NaN/Inf"):
        read_importance_file(path)


def test_negative_omega(tmp_path):
    path = write_importance_file(tmp_path / "imp.safetensors", _data(negative=True))
    with pytest.raises(ImportanceFileError, match="negative"):
        read_importance_file(path)


def test_metadata_listing_a_module_without_tensors(tmp_path):
    data = _data()
    data.metadata["modules"]["model.layers.9.mlp.up_proj"] = data.metadata["modules"]["model.layers.0.self_attn.q_proj"]
    path = write_importance_file(tmp_path / "imp.safetensors", data)
    with pytest.raises(ImportanceFileError, match="tensors missing.*layers.9"):
        read_importance_file(path)


def test_newer_format_version_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "future.safetensors"
    save_file({"x": torch.ones(1)}, str(path), metadata={"format": f.FORMAT, "format_version": "99", "alora": json.dumps({})})
    with pytest.raises(ImportanceFileError, match="format_version 99"):
        read_metadata(path)


def _as_version_1(path):
    """Rewrite a file's header as axolotl-alora 0.1 wrote it: format_version 1, no `kind` in the module entries."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        header = handle.metadata()
    meta = json.loads(header["alora"])
    for entry in meta["modules"].values():
        entry.pop("kind", None)
    save_file(tensors, str(path), metadata={**header, "format_version": "1", "alora": json.dumps(meta)})
    return path


def test_written_files_are_version_2(tmp_path):
    path = write_importance_file(tmp_path / "imp.safetensors", _data())
    assert read_importance_file(path).format_version == 2 == f.FORMAT_VERSION


@pytest.mark.parametrize("scaling", [2.0, 0.5])
def test_version_1_si_file_is_read_with_omega_times_its_scaling(tmp_path, scaling):
    """Version 1 left the outer s out of g̃ (Ω was 1/s of the consistent value): multiply it back on read."""
    data = _data()
    for entry in data.metadata["modules"].values():
        entry.update(alpha=2 * scaling, scaling=scaling)  # r = 2
    path = _as_version_1(write_importance_file(tmp_path / "imp.safetensors", data))
    back = read_importance_file(path)
    assert back.format_version == 1
    for n, omega in data.omega.items():
        torch.testing.assert_close(back.omega[n], omega * scaling)
        assert back.metadata["modules"][n]["norm"] == pytest.approx(float(torch.linalg.vector_norm((omega * scaling).double())))
        assert torch.equal(back.lora_A[n], data.lora_A[n])


def test_version_1_fisher_file_is_read_as_is(tmp_path):
    data = _data()
    data.metadata["source"] = "fisher"  # F of W0 never went through g̃
    path = _as_version_1(write_importance_file(tmp_path / "imp.safetensors", data))
    back = read_importance_file(path)
    for n, omega in data.omega.items():
        assert torch.equal(back.omega[n], omega)


def test_inspect_says_which_version_it_read(tmp_path, capsys):
    from axolotl_alora.cli import main

    path = write_importance_file(tmp_path / "imp.safetensors", _data())
    assert main(["inspect", str(path)]) == 0
    assert "format_version   2\n" in capsys.readouterr().out
    _as_version_1(path)
    assert main(["inspect", str(path)]) == 0
    assert "format_version   1 (written without g̃'s outer s: Ω shown multiplied by each module's scaling)" in capsys.readouterr().out


@pytest.mark.parametrize("edit, message", [
    ({"scaling": 3.0}, "records scaling 3.0 but r=2, alpha=4.0, use_rslora=False give 2"),
    ({"scaling": float("nan")}, "records scaling nan"),
    ({"use_rslora": True}, "give 2.82843"),  # alpha/√r
    ({"scaling": "two"}, "lacks a numeric scaling"),
])
def test_each_module_scaling_is_validated_on_read(tmp_path, edit, message):
    data = _data()
    data.metadata["modules"]["model.layers.0.self_attn.v_proj"].update(edit)
    path = write_importance_file(tmp_path / "imp.safetensors", data)
    with pytest.raises(ImportanceFileError, match=message.replace("(", r"\(")):
        read_importance_file(path)


def test_full_parameter_round_trip_and_validation(tmp_path):
    data = _data()
    name = "lm_head.modules_to_save.default.weight"
    data.omega[name] = torch.rand(7, 3)
    data.reference[name] = torch.randn(7, 3)
    data.metadata["modules"][name] = f.parameter_metadata(data.omega[name])
    back = read_importance_file(write_importance_file(tmp_path / "imp.safetensors", data))
    assert back.kind(name) == "full" and back.kind("model.layers.0.self_attn.q_proj") == "lora"
    assert torch.equal(back.reference[name], data.reference[name]) and name not in back.lora_A
    data.reference[name] = torch.randn(7, 4)
    with pytest.raises(ImportanceFileError, match=f"inconsistent shapes for {name}"):
        read_importance_file(write_importance_file(tmp_path / "bad.safetensors", data))


def test_shards_and_index_read_as_the_single_file_on_any_number_of_ranks(tmp_path):
    from axolotl_alora.sharding import Shard

    data = _data()
    single = read_importance_file(write_importance_file(tmp_path / "one" / "imp.safetensors", data))
    path = tmp_path / "two" / "imp.safetensors"
    names = list(data.omega)
    shares = [Shard.of({n: 30 for n in names}, k, 2).owned for k in range(2)]
    keys = []
    for rank, owned in enumerate(shares):
        part = ImportanceFile({n: data.omega[n] for n in owned}, {n: data.lora_A[n] for n in owned}, {n: data.lora_B[n] for n in owned},
                              data.metadata, data.fingerprint if rank == 0 else None)
        write_importance_file(path, part, shard=(rank, 2))
        keys.append([f"{n}.{s}" for n in owned for s in ("omega", "lora_A", "lora_B")] + (["__base_fingerprint__"] if rank == 0 else []))
    index = f.write_importance_index(path, data.metadata, keys)
    assert index.name == "imp.safetensors.index.json" and not path.exists()
    assert sorted(p.name for p in path.parent.glob("imp-*.safetensors")) == ["imp-00001-of-00002.safetensors", "imp-00002-of-00002.safetensors"]
    for given in (path, index):  # the file's name (as a config names it) or the index itself
        back = read_importance_file(given)
        assert list(back.omega) == names and torch.equal(back.fingerprint, data.fingerprint)
        for n in names:
            assert torch.equal(back.omega[n], single.omega[n]) and torch.equal(back.lora_B[n], single.lora_B[n])
        assert back.norms == single.norms and back.sums == single.sums
    # one rank's share: Ω of its modules only, every module's norm, sum and reference
    mine = read_importance_file(path, keep=shares[1], omega_dtype="bfloat16")
    assert set(mine.omega) == set(shares[1]) and all(o.dtype == torch.bfloat16 for o in mine.omega.values())
    assert mine.norms == single.norms and set(mine.lora_A) == set(names)
    # a missing shard is named
    (path.parent / "imp-00002-of-00002.safetensors").unlink()
    with pytest.raises(ImportanceFileError, match="imp-00002-of-00002.safetensors is missing"):
        read_importance_file(path)


def test_a_single_file_replaces_an_earlier_index(tmp_path):
    data = _data()
    path = tmp_path / "imp.safetensors"
    f.write_importance_index(path, data.metadata, [[], []])
    write_importance_file(path, data)
    assert not (tmp_path / "imp.safetensors.index.json").exists() and read_importance_file(path).metadata["steps"] == 3
