"""eval/alora_bench/reproduce.py: the selection rule, the scale guard, and the whole driver on the tiny model (2-step budget)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alora_bench import reproduce

REPO = Path(__file__).resolve().parents[1]


def _results(valid_acc, general_ppl):
    return {"results": {"alora_sciq_valid": {"acc,none": valid_acc}, "alora_general_ppl": {"word_perplexity,none": general_ppl}}}


def test_rule_takes_lowest_general_ppl_within_one_point_of_the_reference():
    reference = _results(0.50, 40.0)
    candidates = {0.1: _results(0.52, 30.0), 1.0: _results(0.495, 25.0), 10.0: _results(0.40, 20.0)}
    value, why = reproduce.select(candidates, reference)
    assert value == 1.0  # 10.0 has the lowest PPL but lost 10 points; 0.1 keeps accuracy but forgets more
    assert "2 of 3" in why


def test_rule_falls_back_to_the_weakest_penalty():
    value, why = reproduce.select({3.0: _results(0.30, 20.0), 0.3: _results(0.35, 25.0)}, _results(0.50, 40.0))
    assert value == 0.3 and "smallest" in why


def test_results_of_another_scale_are_refused(tmp_path):
    paths = reproduce.Paths(tmp_path / "work", tmp_path / "results", None)
    args = reproduce.parse_args(["grid"])
    reproduce.check_scale(paths, reproduce.scale_of(args))
    reproduce.check_scale(paths, reproduce.scale_of(args))  # the same scale: fine
    with pytest.raises(SystemExit, match="domain_steps: 30 there, 5 now"):
        reproduce.check_scale(paths, reproduce.scale_of(reproduce.parse_args(["grid", "--domain-steps", "5"])))


def test_grid_covers_every_method_task_and_seed_at_the_chosen_values():
    args = reproduce.parse_args(["grid", "--seeds", "0", "1", "--tasks", "sciq", "piqa"])
    runs = reproduce.grid_runs(args, {"phi": 0.3, "lambda": 3.0})
    assert len(runs) == 1 + 2 * (1 + 2 * 6)  # Base once; per seed the general adapter, then 6 trained methods per task
    assert [(r.seed, r.task, r.run_id) for r in runs[:3]] == [(0, "all", "base"), (0, "all", "general"), (0, "sciq", "lora_mu")]
    ids = {(r.seed, r.task, r.run_id) for r in runs[1:]}
    assert (1, "all", "general") in ids
    assert (1, "piqa", "alora-mean-phi0.3") in ids and (0, "sciq", "ewclora-mean-phi3") in ids
    assert (0, "sciq", "alora_nolayer-mean-phi0.3") in ids and (1, "sciq", "rslora") in ids
    untuned = reproduce.grid_runs(reproduce.parse_args(["grid", "--seeds", "1", "--methods", "lora_mu", "rslora"]), None)
    assert [(r.task, r.run_id) for r in untuned] == [(t, m) for t in reproduce.TASKS for m in ("lora_mu", "rslora")]


SCALE = ["--general-steps", "2", "--domain-steps", "2", "--micro-batch-size", "2", "--sequence-len", "64", "--limit", "2",
         "--ppl-limit", "1", "--max-length", "128", "--fisher-samples", "2", "--fisher-max-length", "32"]


def _run(args, tmp_path):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "AXOLOTL_DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "alora_bench.reproduce", *args], env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.e2e
def test_driver_runs_sweep_grid_and_report_then_skips_what_exists(tiny_model_dir, tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    common = ["--base-model", str(tiny_model_dir), "--work", str(work), "--results", str(results), "--seeds", "0",
              "--tasks", "sciq", "--phis", "0.3", "--ewc-lambdas", "3", *SCALE]
    _run(["all", *common], tmp_path)

    chosen = json.loads((results / "chosen.json").read_text())
    assert chosen["phi"] == 0.3 and chosen["lambda"] == 3.0 and chosen["rule"] == reproduce.RULE
    for name in ("lora_mu", "lora_nu_mu", "rslora", "ewclora-mean-phi3", "alora-mean-phi0.3", "alora_nolayer-mean-phi0.3",
                 "alora-none-phi0.001"):
        raw = json.loads((results / "lm-eval" / "s0" / "sciq" / f"{name}.json").read_text())
        assert {"alora_wikitext2", "alora_general_ppl", "alora_sciq"} <= set(raw["results"])
        assert ("alora_sciq_valid" in raw["results"]) == (name not in ("rslora", "alora_nolayer-mean-phi0.3"))  # sweep runs only
        assert raw["alora_reproduce"]["scale"]["domain_steps"] == 2
    base = json.loads((results / "lm-eval" / "base.json").read_text())
    assert {"alora_sciq", "alora_piqa", "alora_medmcqa", "alora_wikitext2"} <= set(base["results"])
    general = json.loads((results / "lm-eval" / "s0" / "all" / "general.json").read_text())
    assert {"alora_sciq", "alora_piqa", "alora_medmcqa", "alora_wikitext2"} <= set(general["results"])
    assert general["results"]["alora_wikitext2"] != base["results"]["alora_wikitext2"]  # the adapter was loaded

    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (work / "configs" / "s0" / "sciq").glob("*.yml")}
    assert len(configs) == 7  # 6 methods, and ALoRA on raw Ω at the paper's φ
    assert {c["seed"] for c in configs.values()} == {0} and {c["max_steps"] for c in configs.values()} == {2}
    assert {c["datasets"][0]["path"] for c in configs.values()} == {str(work / "data" / "sciq_train.jsonl")}
    general = str(work / "runs" / "s0" / "general")
    assert configs["lora_nu_mu"]["lora_model_dir"] == general and "lora_model_dir" not in configs["lora_mu"]
    assert configs["rslora"]["use_rslora"] is True and "lora_model_dir" not in configs["rslora"]
    ewc = configs["ewclora-mean-phi3"]
    assert ewc["alora_importance_path"].endswith("fisher/alora_fisher.safetensors") and ewc["alora_layer_weighting"] == "none"
    assert "lora_model_dir" not in ewc and ewc["alora_phi"] == 3.0
    assert configs["alora_nolayer-mean-phi0.3"]["alora_layer_weighting"] == "uniform"
    assert configs["alora-mean-phi0.3"]["alora_importance_normalization"] == "mean"
    assert "ALoRA: regularizing" in (work / "logs" / "s0" / "sciq" / "alora-mean-phi0.3.log").read_text()
    assert "ALoRA: regularizing" not in (work / "logs" / "s0" / "sciq" / "lora_mu.log").read_text()
    raw = json.loads((results / "lm-eval" / "s0" / "sciq" / "alora-mean-phi0.3.json").read_text())
    assert raw["results"]["alora_general_eval"]["kept_share,none"] is not None  # the plugin's in-training number, beside lm-eval's

    table1 = (results / "table1.md").read_text()
    for method in reproduce.PAPER_METHODS:
        row = next(line for line in table1.splitlines() if line.startswith(f"| {method.label} |"))
        # every cell has a number, but Base's in-training one (it never trains)
        assert row.count("–") == (1 if method.name == "base" else 0), row
    assert "(n=1)" not in table1  # one seed asked, one seed done
    assert "− layer, element (= LoRA(ν+μ))" in (results / "table2.md").read_text()
    sweep = (results / "sweep.md").read_text()
    assert "| alora ✔ | mean | 0.3 |" in sweep and "| ewclora ✔ | mean | 3 |" in sweep and "| alora | none | 0.001 |" in sweep
    for png in ("fig6_phi_sweep.png", "fig7_heatmap.png"):
        assert (results / png).read_bytes()[:4] == b"\x89PNG"
    costs = json.loads((results / "costs.json").read_text())
    assert costs["s0/general (SI)"]["file_mib"] > 0 and costs["s0/fisher (EWC)"]["peak_rss_mib"] > 0
    alora_costs = next(line for line in (results / "costs.md").read_text().splitlines() if line.startswith("| ALoRA |"))
    assert "–" not in alora_costs and "(n=1)" in alora_costs  # the domain stage's own peak and wall time, one seed

    again = _run(["all", *common], tmp_path)  # every output exists: nothing is trained or evaluated again
    assert "axolotl.cli.train" not in again.stdout and "lm-eval " not in again.stdout and "sweep done" in again.stdout
    assert again.stdout.count("(done)") == 8  # Base, the general adapter and 6 trained methods


def _fake_run(results, method, seed, phi, wikitext, acc, task="sciq", normalization="mean"):
    path = results / "lm-eval" / f"s{seed}" / task / f"{method}-{phi}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "results": {"alora_wikitext2": {"word_perplexity,none": wikitext}, "alora_general_ppl": {"word_perplexity,none": 2 * wikitext},
                    "alora_general_eval": {"token_perplexity,none": wikitext / 2, "kept_share,none": 0.5},  # the plugin's in-training number
                    f"alora_{task}": {"acc,none": acc}},
        "alora_reproduce": {"run": f"{method}-{phi}", "method": method, "task": task, "seed": seed, "phi": phi,
                            "normalization": normalization}}))


def test_table_cells_are_mean_and_sample_std_over_seeds_at_the_chosen_phi(tmp_path):
    from alora_bench.reproduce_report import write_reports

    (tmp_path / "scale.json").write_text(json.dumps({"domain_steps": 2}))
    _fake_run(tmp_path, "alora", 0, 0.3, 30.0, 0.80)
    _fake_run(tmp_path, "alora", 1, 0.3, 34.0, 0.90)
    _fake_run(tmp_path, "alora", 1, 3.0, 99.0, 0.10)  # another φ of the sweep: not in Table 1
    _fake_run(tmp_path, "lora_mu", 0, None, 40.0, 0.70, normalization=None)
    for seed, wikitext in ((0, 33.0), (1, 35.0)):  # the general adapter alone: one evaluation per seed, on every task
        path = tmp_path / "lm-eval" / f"s{seed}" / "all" / "general.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"results": {"alora_wikitext2": {"word_perplexity,none": wikitext}, "alora_sciq": {"acc,none": 0.5},
                                                "alora_general_ppl": {"word_perplexity,none": 2 * wikitext}},
                                    "alora_reproduce": {"run": "general", "method": "general", "task": "all", "seed": seed}}))
    chosen = {"phi": 0.3, "lambda": 0.03}
    write_reports(tmp_path, reproduce.PAPER_METHODS, reproduce.TABLE2, chosen, [0, 1], ["sciq"])
    means = (tmp_path / "table1.md").read_text().split("## Paired")[0]
    rows = {line.split(" | ")[0][2:]: line for line in means.splitlines() if line.startswith("| ")}
    # mean 32, sample std of (30, 34) = 2.83; accuracy 85.0 ± 7.1 (in %); general PPL 64 ± 5.66; in training 16 ± 1.41
    assert rows["ALoRA"] == "| ALoRA | 32.00 ± 2.83 | 64.00 ± 5.66 | 16.00 ± 1.41 | 85.0 ± 7.1 |"
    assert rows["LoRA(μ)"] == "| LoRA(μ) | 40.00 (n=1) | 80.00 (n=1) | 20.00 (n=1) | 70.0 (n=1) |"  # one of two seeds done
    assert rows["EWCLoRA"] == "| EWCLoRA | – | – | – | – |"
    assert rows["General stage ν only"] == "| General stage ν only | 34.00 ± 1.41 | 68.00 ± 2.83 | – | 50.0 ± 0.0 |"
    assert "General token PPL in training ↓" in means.splitlines()[2]


def test_paired_differences_are_taken_within_each_seed(tmp_path):
    from alora_bench.reproduce_report import write_reports

    (tmp_path / "scale.json").write_text(json.dumps({"domain_steps": 2}))
    # the seeds differ by far more than the methods do; ALoRA is 0.5 and 1.5 PPL below LoRA(ν+μ) on its own seed
    _fake_run(tmp_path, "lora_nu_mu", 0, None, 30.0, 0.80, normalization=None)
    _fake_run(tmp_path, "lora_nu_mu", 1, None, 50.0, 0.80, normalization=None)
    _fake_run(tmp_path, "alora", 0, 0.3, 29.5, 0.82)
    _fake_run(tmp_path, "alora", 1, 0.3, 48.5, 0.79)
    _fake_run(tmp_path, "lora_mu", 1, None, 51.0, 0.90, normalization=None)  # seed 0 missing: one pair only
    write_reports(tmp_path, reproduce.PAPER_METHODS, reproduce.TABLE2, {"phi": 0.3, "lambda": 0.03}, [0, 1], ["sciq"])
    text = (tmp_path / "table1.md").read_text()
    paired = text[text.index("## Paired"):]
    rows = {line.split(" | ")[0][2:]: line for line in paired.splitlines() if line.startswith("| ")}
    # differences -0.5 and -1.5: mean -1.00, std 0.71; general PPL (2x) -2.00 ± 1.41; accuracy +2 and -1: +0.5 ± 2.1
    assert rows["ALoRA"] == ("| ALoRA | -1.00 ± 0.71 (2 of 2 lower) | -2.00 ± 1.41 (2 of 2 lower) | -0.50 ± 0.35 (2 of 2 lower) "
                             "| +0.5 ± 2.1 (1 of 2 higher) |")
    assert rows["LoRA(μ)"] == "| LoRA(μ) | +1.00 (0 of 1 lower) | +2.00 (0 of 1 lower) | +0.50 (0 of 1 lower) | +10.0 (1 of 1 higher) |"
    assert "| LoRA(ν+μ) |" not in paired and "| Base |" not in paired


def test_costs_table_averages_measured_peaks_of_the_chosen_runs_only(tmp_path):
    from alora_bench.reproduce_report import write_reports

    (tmp_path / "scale.json").write_text(json.dumps({"domain_steps": 2}))
    _fake_run(tmp_path, "alora", 0, 0.3, 30.0, 0.80)
    _fake_run(tmp_path, "alora", 1, 0.3, 34.0, 0.90)
    _fake_run(tmp_path, "alora", 2, 0.3, 34.0, 0.90)
    _fake_run(tmp_path, "alora", 1, 3.0, 99.0, 0.10)  # not the chosen φ
    (tmp_path / "costs.json").write_text(json.dumps({
        "s0/sciq/alora-0.3": {"wall_s": 999.0},  # recorded before VmHWM: no peak, left out
        "s1/sciq/alora-0.3": {"wall_s": 100.0, "peak_rss_mib": 3400},
        "s2/sciq/alora-0.3": {"wall_s": 120.0, "peak_rss_mib": 3600},
        "s1/sciq/alora-3.0": {"wall_s": 5.0, "peak_rss_mib": 9999},
        "s1/general (SI)": {"wall_s": 170.0, "peak_rss_mib": 3612, "file_mib": 52.4}}))
    write_reports(tmp_path, reproduce.PAPER_METHODS, reproduce.TABLE2, {"phi": 0.3, "lambda": 0.03}, [0, 1, 2], ["sciq"])
    rows = {line.split(" | ")[0][2:]: line for line in (tmp_path / "costs.md").read_text().splitlines() if line.startswith("| ")}
    assert rows["ALoRA"] == "| ALoRA | 3,500 ± 141 (n=2) | 110 ± 14 (n=2) |"  # std of (3400, 3600) = 141.4
    assert rows["general (SI)"] == "| general (SI) | 3,612 (n=1) | 170 (n=1) | 52.4 (n=1) |"
    assert rows["LoRA(μ)"] == "| LoRA(μ) | – | – |"


def test_peak_memory_is_the_childs_own_not_the_parents(tmp_path):
    import numpy as np

    ballast = np.ones(300 * 2**20 // 8)  # this process holds 300 MiB; a forked child's ru_maxrss would include it
    # (the child holds its 100 MiB for 1.5 s: the poll, every 0.2 s, sees a peak that lasts; real runs take minutes)
    cost = reproduce.run_logged([sys.executable, "-c", "import numpy, time; x = numpy.ones(100 * 2**20 // 8); time.sleep(1.5); print(x.sum())"],
                                tmp_path / "child.log", tmp_path, "child")
    assert 100 <= cost["peak_rss_mib"] < 250, cost  # 100 MiB array + the interpreter, without the parent's 300 MiB
    assert ballast.sum() > 0


def test_a_method_beyond_the_paper_is_paired_with_dense_alora(tmp_path):
    from alora_bench.reproduce_report import write_reports

    (tmp_path / "scale.json").write_text(json.dumps({"domain_steps": 2}))
    _fake_run(tmp_path, "alora", 0, 0.3, 30.0, 0.80)
    _fake_run(tmp_path, "alora", 1, 0.3, 50.0, 0.85)
    _fake_run(tmp_path, "alora_factored", 0, 0.3, 31.0, 0.81)
    _fake_run(tmp_path, "alora_factored", 1, 0.3, 52.0, 0.82)
    write_reports(tmp_path, reproduce.METHODS, reproduce.TABLE2, {"phi": 0.3, "lambda": 0.03}, [0, 1], ["sciq"])
    text = (tmp_path / "table1.md").read_text()
    beyond = text.split("## Beyond the paper")[1]
    row = next(line for line in beyond.splitlines() if line.startswith("| ALoRA factored |"))
    # WikiText-2 +1 and +2 (mean +1.50 ± 0.71, lower on 0 seeds); accuracy +1 and −3 points (−1.0 ± 2.8, higher on 1)
    assert row.startswith("| ALoRA factored | +1.50 ± 0.71 (0 of 2 lower) |") and row.endswith("| -1.0 ± 2.8 (1 of 2 higher) |")
    assert "| ALoRA factored |" not in (tmp_path / "table2.md").read_text()


def test_fixed_knob_runs_drop_the_examples_forgetting_budget(tmp_path):
    """The ALoRA example sets a budget; the sweep, grid and frontier measure fixed knobs, so its keys go there, and
    only the main job's run (budget=True) keeps them, with the run's φ as the start."""
    from alora_bench.frontier import domain_config as frontier_config

    example = yaml.safe_load((REPO / "examples" / "smollm2-cpu" / "domain-alora.yml").read_text())
    assert example["alora_keep"] == 0.8 and "alora_phi" not in example  # the example names a budget, not a φ
    paths, scale = reproduce.Paths(tmp_path, tmp_path / "results", None), reproduce.Scale(2, 2, 2, 64, 2, 1, 128, 2, 32, "cpu")
    fixed = reproduce.Run(reproduce.BY_NAME["alora"], "sciq", 0, 0.3, "mean")
    cfg = reproduce.domain_config(fixed, paths, scale)
    assert cfg["alora_phi"] == 0.3 and not {"alora_keep", "alora_budget_by", "alora_max_general_loss_rise"} & set(cfg)
    budgeted = reproduce.domain_config(reproduce.Run(reproduce.BY_NAME["alora"], "sciq", 0, 3.0, "mean", budget=True), paths, scale)
    assert budgeted["alora_keep"] == 0.8 and budgeted["alora_phi"] == 3.0
    assert "alora_keep" not in frontier_config("domain-alora", paths, scale, 0, "sciq", tmp_path / "out", 4, 1e-3)
    (tmp_path / "run" / "alora_interpolated").mkdir(parents=True)
    assert reproduce.budgeted(tmp_path / "run") == tmp_path / "run"  # no adapter written there
    (tmp_path / "run" / "alora_interpolated" / "adapter_config.json").write_text("{}")
    assert reproduce.budgeted(tmp_path / "run") == tmp_path / "run" / "alora_interpolated"
