"""`alora check` and `alora inspect` read an importance file's metadata (and Ω one module at a time at most), never all of Ω.

Each command runs in a fresh interpreter, first on a small file (the interpreter's own peak with every import
done) and then on one with 419 MB of Ω; the second may add far less than Ω's size to the peak (Linux VmHWM).
"""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from alora_bench.peak_memory import vm_hwm_kib
from axolotl_alora.importance_file import ImportanceFile, write_importance_file

pytestmark = pytest.mark.skipif(vm_hwm_kib() is None, reason="needs Linux's /proc/<pid>/status VmHWM")

SIDE = 1024  # Ω of a module: SIDE×SIDE float32, 4 MiB
CHILD = """
import json, sys
from alora_bench.peak_memory import vm_hwm_kib
from axolotl_alora.cli import main
command, small, big = sys.argv[1:]
assert main([command, small]) == 0
baseline = vm_hwm_kib()
assert main([command, big]) == 0
print(json.dumps({"baseline_kib": baseline, "peak_kib": vm_hwm_kib()}))
"""


def _file(path, modules: int):
    """An importance file of `modules` modules with Ω_l = l + 1 everywhere; metadata without ΣΩ, as files written
    before it was recorded, so that `alora inspect` has to read every Ω (one module at a time)."""
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(modules)]
    omega = {n: torch.full((SIDE, SIDE), float(i + 1)) for i, n in enumerate(names)}
    entries = {n: {"kind": "lora", "layer": "linear", "shape": [SIDE, SIDE], "r": 2, "alpha": 4.0, "scaling": 2.0, "use_rslora": False,
                   "norm": float(i + 1) * SIDE} for i, n in enumerate(names)}
    data = ImportanceFile(omega, {n: torch.zeros(2, SIDE) for n in names}, {n: torch.zeros(SIDE, 2) for n in names},
                          {"source": "si", "modules": entries}, norms={n: 0.0 for n in names}, sums={n: 0.0 for n in names})
    write_importance_file(path, data)
    return path, sum(o.numel() * 4 for o in omega.values())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("peak")
    small, _ = _file(root / "small.safetensors", 2)
    big, omega_bytes = _file(root / "big.safetensors", 100)
    assert omega_bytes >= 400e6
    configs = []
    for path in (small, big):
        cfg = root / f"{path.stem}.yml"
        cfg.write_text(yaml.safe_dump({"base_model": str(root / "no-model"), "adapter": "lora", "plugins": ["axolotl_alora.AloraPlugin"],
                                       "alora_importance_path": str(path)}))
        configs.append(str(cfg))
    return {"check": configs, "inspect": [str(small), str(big)], "omega_bytes": omega_bytes}


def _peak_above_baseline(command: str, small: str, big: str) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", CHILD, command, small, big], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    return 1024 * (peaks["peak_kib"] - peaks["baseline_kib"]), out.stdout


@pytest.mark.parametrize("command", ["check", "inspect"])
def test_peak_memory_is_far_below_omega(files, command):
    added, stdout = _peak_above_baseline(command, *files[command])
    assert added < files["omega_bytes"] / 4, f"{command} added {added / 1e6:.0f} MB for {files['omega_bytes'] / 1e6:.0f} MB of Ω"
    if command == "inspect":  # and the figures are right: mean Ω of module l is l + 1
        row = next(line.split() for line in stdout.splitlines() if line.startswith("model.layers.99.mlp.down_proj"))
        assert float(row[2]) == pytest.approx(100 * SIDE, rel=1e-3) and float(row[3]) == 100
