"""How the factored form's penalty compares with the dense one at the same weights: the φ guidance for it.

    python -m alora_bench.factored_scale --work work/memory --seeds 0 1 2

For each seed, the general stage's importance file read dense and factored (as a domain stage with
`alora_importance_form: factored` reads it), and the dense ALoRA SciQ run's final adapter: L_reg (eqs. 16-17,
softmax τ = auto, normalization mean, as in examples/smollm2-cpu/domain-alora.yml) under each form, at the same
θ − θ^ν. Their ratio is the factor by which φ would have to change for the factored penalty to weigh what the
dense one weighs there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def penalties(general: Path, adapter: Path) -> tuple[float, float]:
    from safetensors.torch import load_file

    from axolotl_alora.importance_file import read_importance_file
    from axolotl_alora.regularizer import RegularizedModule, Regularizer, build_regularizer

    trained = load_file(str(adapter / "adapter_model.safetensors"))
    values = []
    for form in ("dense", "factored"):
        data = read_importance_file(general / "alora_importance.safetensors", omega_form=form)
        modules = []
        for name, entry in data.metadata["modules"].items():
            A = trained[f"base_model.model.{name}.lora_A.weight"].float()
            B = trained[f"base_model.model.{name}.lora_B.weight"].float()
            modules.append(_Lora(name, A, B, float(entry["scaling"])))
        reg: Regularizer = build_regularizer(data, modules, [], "softmax", "auto", "mean")
        assert all(isinstance(m, RegularizedModule) for m in reg.modules)
        values.append(float(reg()))
    return values[0], values[1]


class _Lora:
    def __init__(self, name, A, B, scaling):
        self.name, self.A, self.B, self.scaling = name, A, B, scaling

    @property
    def shape(self):
        return (self.B.shape[0], self.A.shape[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="work/memory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run", default="alora-mean-phi0.03", help="the dense run whose adapter is evaluated")
    args = parser.parse_args(argv)
    work = Path(args.work)
    print("| seed | L_reg dense | L_reg factored | factored / dense |\n|---:|---:|---:|---:|")
    ratios = []
    for seed in args.seeds:
        with torch.no_grad():
            dense, factored = penalties(work / "runs" / f"s{seed}" / "general", work / "runs" / f"s{seed}" / "sciq" / args.run)
        ratios.append(factored / dense)
        print(f"| {seed} | {dense:.4g} | {factored:.4g} | {factored / dense:.3f} |")
    print(f"\nmean factored / dense = {sum(ratios) / len(ratios):.3f} over {len(ratios)} seeds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
