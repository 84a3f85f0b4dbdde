"""`alora inspect`: per-module norms and layer weights (checked against a direct computation) and the heatmap."""

import math

import torch

from axolotl_alora.cli import main
from axolotl_alora.importance_file import ImportanceFile, module_metadata, write_importance_file
from axolotl_alora.inspect import layer_and_type


def _file(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    omega = {n: torch.rand(4, 3, generator=g) * (k + 1) for k, n in enumerate(names)}
    data = ImportanceFile(omega, {n: torch.zeros(2, 3) for n in names}, {n: torch.zeros(4, 2) for n in names},
                          {"source": "si", "steps": 5, "modules": {n: module_metadata(omega[n], 2, 4.0, 2.0, False) for n in names}})
    return write_importance_file(tmp_path / "imp.safetensors", data), omega


def test_table_and_effective_layers(tmp_path, capsys):
    path, omega = _file(tmp_path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    norms = [float(o.double().norm()) for o in omega.values()]
    e = [math.exp(n) for n in norms]
    softmax = [v / sum(e) for v in e]
    row = next(line for line in out.splitlines() if line.startswith("model.layers.2.self_attn.v_proj"))
    cells = row.split()
    assert len(cells) == 6  # module, shape, norm, mean, softmax τ=1, softmax τ=auto: uniform and none are the same for all
    assert float(cells[2]) == float(f"{norms[-1]:.4g}")
    assert float(cells[3]) == float(f"{float(omega['model.layers.2.self_attn.v_proj'].double().mean()):.3g}")
    assert float(cells[4]) == float(f"{softmax[-1]:.4g}")  # softmax τ=1
    assert "layer weights equal for every module: uniform 0.1667, none 1" in out
    n_eff = 1 / sum(w * w for w in softmax)
    assert f"softmax τ=1 {n_eff:.2f}" in out and "uniform 6.00" in out
    assert "steps            5" in out


def test_heatmap_png(tmp_path, capsys):
    path, _ = _file(tmp_path)
    png = tmp_path / "heat.png"
    assert main(["inspect", str(path), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert layer_and_type("model.layers.17.self_attn.v_proj") == (17, "v_proj")


def test_bad_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_text("nope")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "alora inspect: error:" in err and "x.safetensors is not a readable safetensors file" in err


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.startswith("model.layers.")]


def test_top_lists_the_largest_norms_first(tmp_path, capsys):
    path, omega = _file(tmp_path)
    assert main(["inspect", str(path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    largest = sorted(omega, key=lambda n: -float(omega[n].double().norm()))[:2]
    assert [r[0] for r in _rows(out)] == largest and "the 2 modules of 6 with the largest" in out
    assert main(["inspect", str(path)]) == 0
    assert [r[0] for r in _rows(capsys.readouterr().out)] == list(omega)  # without --top: every module, in file order


def test_top_must_be_positive(tmp_path, capsys):
    import pytest

    path, _ = _file(tmp_path)
    with pytest.raises(SystemExit):
        main(["inspect", str(path), "--top", "0"])
    assert "--top takes a whole number of modules >= 1" in capsys.readouterr().err


def test_summary_per_module_kind(tmp_path, capsys):
    from axolotl_alora.regularizer import layer_weights

    path, omega = _file(tmp_path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("v_proj "))
    members = [n for n in omega if n.endswith("v_proj")]
    norms = [float(omega[n].double().norm()) for n in members]
    softmax = layer_weights(torch.tensor([float(o.double().norm()) for o in omega.values()]), "softmax", 1.0).tolist()
    assert row[1] == "3" and row[2] == "36"  # count, Ω elements
    assert float(row[3]) == float(f"{math.sqrt(sum(n * n for n in norms)):.4g}")  # ‖Ω‖_F of the kind's Ω together
    assert float(row[4]) == float(f"{sum(norms) / 3:.4g}")  # mean ‖Ω_l‖_F
    assert float(row[5]) == float(f"{float(torch.cat([omega[n].flatten() for n in members]).double().mean()):.3g}")  # mean Ω
    v_weights = [w for n, w in zip(omega, softmax) if n.endswith("v_proj")]
    assert float(row[6]) == float(f"{sum(v_weights) / 3:.4g}")  # mean softmax τ=1 weight


def test_stats_without_metadata_are_read_from_the_tensors(tmp_path, capsys):
    """A file whose metadata lacks ΣΩ (written before it was recorded) shows the same table: Ω read one module at a time."""
    from axolotl_alora.importance_file import read_importance_file

    path, omega = _file(tmp_path)
    assert main(["inspect", str(path)]) == 0
    with_sums = capsys.readouterr().out
    data = read_importance_file(path)
    for entry in data.metadata["modules"].values():
        del entry["sum"], entry["norm"]
    write_importance_file(tmp_path / "old.safetensors", data)
    assert main(["inspect", str(tmp_path / "old.safetensors")]) == 0
    assert _rows(capsys.readouterr().out) == _rows(with_sums)
