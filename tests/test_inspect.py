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
    assert float(cells[2]) == float(f"{norms[-1]:.4g}")
    assert float(cells[4]) == float(f"{softmax[-1]:.4g}")  # softmax τ=1
    assert float(cells[6]) == float(f"{1 / 6:.4g}") and float(cells[7]) == 1.0  # uniform, none
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
