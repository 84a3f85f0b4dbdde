"""The frontier harness (eval/alora_bench/frontier.py, frontier_report.py): L2-SP's importance file, the replay mix's
token share, and the matched-accuracy interpolation, on a tiny model (WiSE-FT's adapters: tests/test_interpolate.py)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from alora_bench.frontier import Frontier, Point
from alora_bench.frontier_report import at_accuracy, curve, kept, write_report
from alora_bench.reproduce import Paths, Scale

from tiny import build_tiny_llama, write_text_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("frontier") / "model")


def _frontier(tmp_path, base) -> Frontier:
    paths = Paths(tmp_path / "work", tmp_path / "results", base)
    scale = Scale(2, 0, 2, 32, 10, 1, 64, 4, 32, "cpu")
    args = SimpleNamespace(seeds=[0], more_seeds=[], limit=10, ppl_limit=1)
    return Frontier(args, paths, scale, None, {"domain_steps": 8, "learning_rate": 1e-3})


def test_replay_mix_holds_the_share_of_tokens_from_general_training_text(tmp_path, base):
    frontier = _frontier(tmp_path, base)
    data = frontier.paths.data
    data.mkdir(parents=True)
    write_text_jsonl(data / "sciq_train.jsonl", 60, seed=1, tokenizer_dir=base, tokens=20)
    write_text_jsonl(data / "general_train.jsonl", 200, seed=2, tokenizer_dir=base, tokens=50)
    path = frontier.replay_file("sciq", 0.2, seed=0)
    stats = json.loads(path.with_suffix(".json").read_text())
    assert 0.2 <= stats["measured_share"] < 0.2 + 50 / (stats["general_tokens"] + stats["domain_tokens"])  # one row past the target
    general = {json.loads(line)["text"] for line in (data / "general_train.jsonl").read_text().splitlines()}
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(rows) == stats["rows"] and set(rows) <= general
    assert path == frontier.replay_file("sciq", 0.2, seed=0) and path.read_text() == "".join(json.dumps({"text": t}) + "\n" for t in rows)


def test_l2sp_file_is_the_general_stage_file_with_omega_one(tmp_path, base):
    from axolotl_alora.importance_file import ImportanceFile, read_importance_file, write_importance_file

    frontier = _frontier(tmp_path, base)
    general = frontier.paths.general(0)
    names = ["m.0.q_proj", "m.0.v_proj"]
    si = ImportanceFile({n: torch.rand(6, 5) for n in names}, {n: torch.randn(2, 5) for n in names}, {n: torch.randn(6, 2) for n in names},
                        {"modules": {n: {"kind": "lora", "shape": [6, 5], "r": 2, "alpha": 4.0, "scaling": 2.0, "use_rslora": False, "norm": 1.0}
                                     for n in names}, "source": "si"})
    write_importance_file(general / "alora_importance.safetensors", si)
    uniform = read_importance_file(frontier.uniform_file(0))
    for n in names:
        assert torch.equal(uniform.omega[n], torch.ones(6, 5))
        assert torch.equal(uniform.lora_A[n], si.lora_A[n]) and torch.equal(uniform.lora_B[n], si.lora_B[n])
        assert uniform.metadata["modules"][n]["norm"] == pytest.approx(math.sqrt(30))
    assert uniform.metadata["source"] == "uniform"


def _point(method, knob, acc, loss, seed=0):
    return {"method": method, "knob": knob, "seed": seed, "task": "sciq", "acc": acc, "acc_stderr": 0.02, "general_loss": loss,
            "general_ppl": 50.0, "wikitext2_ppl": 40.0, "in_training_loss": None, "train_wall_s": 10.0, "eval_wall_s": 5.0}


def test_matched_accuracy_interpolates_along_the_curve_and_wise_includes_its_ends(tmp_path):
    base, nu = _point("base", None, 0.60, 3.0), _point("general", None, 0.62, 2.5)
    lora = [_point("lora", 0.5, 0.70, 2.8), _point("lora", 1.0, 0.80, 2.95)]
    wise = [{**_point("wise_lora", 0.5, 0.72, 2.6), "end_knob": 1.0}]
    points = [base, nu, *lora, *wise]
    assert at_accuracy(lora, 0.75) == pytest.approx(2.875)  # halfway between (0.70, 2.8) and (0.80, 2.95)
    assert at_accuracy(lora, 0.65) is None  # below the curve: no extrapolation
    assert [p["knob"] for p in curve(points, "wise_lora")] == [0.0, 0.5, 1.0]  # ν, the α point, LoRA(ν+μ)'s end
    assert at_accuracy(curve(points, "wise_lora"), 0.76) == pytest.approx(2.6 + 0.5 * (2.95 - 2.6))
    assert kept({"general_loss": 2.75}, base, nu) == pytest.approx(0.5)
    results = tmp_path / "results"
    for p in points:
        out = results / "points" / f"s{p['seed']}" / "sciq" / f"{p['method']}-{p['knob']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(p))
    (results / "plan.json").write_text(json.dumps({"domain_steps": 8, "learning_rate": 1e-3, "general_steps": 2}))
    text = write_report(results).read_text()
    level = 0.62 + 0.75 * (0.80 - 0.62)  # the top level: ν + 0.75 × (LoRA(ν+μ)'s end − ν)
    expected = 2.8 + (level - 0.70) / 0.10 * 0.15
    assert f"{expected:.4f} ({100 * (3.0 - expected) / 0.5:.0f}%)" in text
    assert (results / "frontier.png").stat().st_size > 0
    assert Point("alora", 0.3).name == "s0/sciq/alora-0.3"


def test_matched_loss_reads_accuracy_where_each_curve_keeps_a_share_of_the_gain():
    from alora_bench.frontier_report import summary_at_kept

    base, nu = _point("base", None, 0.60, 3.0), _point("general", None, 0.62, 2.5)
    lora = [_point("lora", 0.5, 0.70, 2.8), _point("lora", 1.0, 0.80, 2.95)]
    wise = [{**_point("wise_lora", 0.5, 0.72, 2.6), "end_knob": 1.0}]
    table = "\n".join(summary_at_kept([base, nu, *lora, *wise], base, nu))
    # 90 / 75 / 50% kept are losses 2.55 / 2.625 / 2.75 (base 3.0, ν 2.5); both curves start at ν (0.62, 2.5)
    assert "| acc at 90% kept (loss 2.5500) | acc at 75% kept (loss 2.6250) | acc at 50% kept (loss 2.7500) |" in table
    assert "| LoRA(ν+μ), steps | 63.3% | 65.3% | 68.7% |" in table  # 0.62 + 0.08 × (loss − 2.5) / 0.3
    assert "| WiSE-FT of LoRA(ν+μ) | 67.0% | 72.6% | 75.4% |" in table  # then 0.72 + 0.08 × (loss − 2.6) / 0.35


def test_single_points_compare_with_alora_s_curve_and_the_best_curve_at_their_loss():
    from alora_bench.frontier_report import single_table, summary_at_kept

    base, nu = _point("base", None, 0.60, 3.0), _point("general", None, 0.62, 2.5)
    alora = [_point("alora", 3.0, 0.72, 2.7), _point("alora", 0.3, 0.78, 2.85)]
    l2sp = [_point("l2sp", 3.0, 0.76, 2.7), _point("l2sp", 0.3, 0.80, 2.9)]
    replay = _point("alora_replay", 3.0, 0.79, 2.75)
    points = [base, nu, *alora, *l2sp, replay]
    table = "\n".join(single_table(points, base, nu))
    # at loss 2.75: ALoRA's curve 0.72 + 0.06 / 3 = 74.0%; L2-SP's 0.76 + 0.04 / 4 = 77.0%, the best
    assert "| ALoRA + 5% replay, φ 3 | 79.0 ± 2.0 | 50% | 74.0 | 77.0 (L2-SP (Ω ≡ 1)) |" in table
    assert "ALoRA + 5% replay" not in "\n".join(summary_at_kept(points, base, nu))  # one point is not a curve


def test_the_plan_sweeps_first_then_alora_s_chosen_phi_then_middle_points(tmp_path, base):
    """Levels come from ν and LoRA(ν+μ)'s end; ALoRA's φ is the lowest general loss at or above the middle level, fixed
    in plan.json; the middle points (nearest the middle level) are rerun at later seeds and on MedMCQA."""
    frontier = _frontier(tmp_path, base)
    frontier.args.methods, frontier.args.first_values, frontier.args.more_seeds = ["lora", "alora", "alora_nolayer", "wise_alora"], 0, [1, 2]
    first = frontier.first_seed_points()
    assert first[:3] == [Point("base"), Point("general"), Point("lora", 1.0)]  # the end first: it fixes the levels
    assert [p.knob for p in first if p.method == "alora"] == [0.03, 0.3, 3.0, 30.0]
    assert frontier.chosen_points() == []  # nothing measured yet

    def put(point, acc, loss):
        from alora_bench.reproduce import write_json

        write_json(frontier.result_path(point), {**_point(point.method, point.knob, acc, loss, point.seed), "task": point.task})

    put(Point("general"), 0.60, 2.5)
    put(Point("lora", 1.0), 0.80, 3.0)
    for phi, acc, loss in ((0.03, 0.79, 2.9), (0.3, 0.75, 2.7), (3.0, 0.68, 2.6), (30.0, 0.62, 2.52)):
        put(Point("alora", phi), acc, loss)
    assert frontier.levels() == pytest.approx([0.65, 0.70, 0.75])
    chosen = frontier.chosen_points()  # φ 0.3: the lowest loss with acc ≥ 0.70
    assert chosen == ([Point("alora_nolayer", 0.3)] + [Point("wise_alora", a) for a in (0.25, 0.5, 0.75)]
                      + [Point("alora_nolayer", phi) for phi in (0.03, 3.0, 30.0)])
    assert json.loads((frontier.paths.results / "plan.json").read_text())["alora_phi"] == 0.3
    middle = frontier.middle_points()
    assert Point("alora", 3.0) in middle and Point("lora", 1.0) in middle  # |0.68 − 0.70| is the nearest
    assert Point("alora", 0.3) in middle  # the chosen φ too
    put(Point("alora_nolayer", 0.3), 0.79, 2.8)
    put(Point("alora_nolayer", 3.0), 0.69, 2.6)
    assert {Point("alora_nolayer", 3.0), Point("alora_nolayer", 0.3)} <= set(frontier.middle_points())  # nearest, and at the chosen φ
    later = frontier.later_points()
    assert Point("general", None, 1) in later and Point("alora", 3.0, 1) in later and Point("alora", 3.0, 0, "medmcqa") in later
    at = later.index
    assert at(Point("general", None, 1)) < at(Point("alora", 3.0, 1)) < at(Point("general", None, 2)) < at(Point("alora", 3.0, 2))
    assert at(Point("alora", 3.0, 2)) < at(Point("alora", 3.0, 0, "medmcqa"))  # one seed at a time, MedMCQA last


def test_budget_points_use_text_the_frontier_sample_never_reads(tmp_path, base):
    """The budget runs steer on held-out windows outside the frontier's general sample, from ALoRA's chosen φ."""
    from transformers import AutoTokenizer

    from alora_bench import frontier as fr

    frontier = _frontier(tmp_path, base)
    frontier.args.methods, frontier.args.seeds = list(fr.METHODS), [0]
    frontier.plan["alora_phi"] = 0.3
    data = frontier.paths.data
    data.mkdir(parents=True)
    write_text_jsonl(data / "general_heldout.jsonl", 120, seed=3, tokenizer_dir=base, tokens=40)
    yardstick = {tuple(row.tolist()) for row in fr.general_sample(base, frontier.paths, frontier.scale)}
    text = frontier.budget_text()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    rows = [json.loads(line)["text"] for line in text.read_text().splitlines()]
    assert len(yardstick) == fr.GENERAL_SAMPLES
    decoded_yardstick = {tokenizer.decode(list(w), skip_special_tokens=True) for w in yardstick}
    assert rows and not decoded_yardstick & set(rows)
    points = frontier.budget_points()
    assert {(p.method, p.knob) for p in points} == {(m, k) for m in ("budget_interpolation", "budget_phi", "budget_both", "budget_lora") for k in (0.5, 0.8)}
    (frontier.paths.general(0)).mkdir(parents=True, exist_ok=True)
    from unittest import mock

    with mock.patch("alora_bench.reproduce.ensure_general", return_value=frontier.paths.general(0)), \
            mock.patch("alora_bench.frontier.domain_config", side_effect=lambda *a, **k: {"datasets": [{}]}):
        cfg = frontier.config(fr.Point("budget_both", 0.8), tmp_path / "out")
        plain = frontier.config(fr.Point("budget_lora", 0.5), tmp_path / "out")
    # plain LoRA(ν+μ) under a budget: no importance file, so α between ν (its lora_model_dir) and the end
    assert plain["alora_keep"] == 0.5 and plain["alora_budget_by"] == "interpolation" and "alora_importance_path" not in plain
    assert cfg["alora_keep"] == 0.8 and cfg["alora_budget_by"] == "both" and cfg["alora_phi"] == 0.3
    assert cfg["alora_general_eval"] == str(text) and cfg["alora_general_eval_samples"] == fr.BUDGET_SAMPLES
    assert fr.Point("budget_phi", 0.5) not in frontier.later_points()


def test_budget_table_compares_with_the_best_fixed_knob_at_the_same_loss(tmp_path):
    from alora_bench.frontier_report import accuracy_at_loss, budget_table

    base, nu = _point("base", None, 0.60, 3.0), _point("general", None, 0.62, 2.5)
    lora = [_point("lora", 0.5, 0.70, 2.8), _point("lora", 1.0, 0.80, 2.95)]
    alora = [_point("alora", 3.0, 0.72, 2.7), _point("alora", 0.3, 0.78, 2.85)]
    run = {**_point("budget_interpolation", 0.5, 0.77, 2.75),
           "budget": {"phi_start": 0.3, "phi_trajectory": None, "alpha": 0.6, "report_kept_share": 0.52}}
    assert accuracy_at_loss(alora, 2.775) == pytest.approx(0.75)
    assert accuracy_at_loss(lora, 2.75) is None
    missed = {**_point("budget_phi", 0.8, 0.60, 2.6), "budget": {"phi_start": 0.3, "phi_trajectory": [[1, 1.2]], "alpha": None,
                                                                 "report_kept_share": 0.95}}
    table = "\n".join(budget_table([base, nu, *lora, *alora, run, missed], base, nu))
    assert "| interpolation | 0.5 | – | 0.6 | 52% | 50% | 77.0 ± 2.0 | 74.0 (ALoRA) | yes | yes |" in table
    # kept 95% against 80% asked; 60% against 64.7% on LoRA(ν+μ)'s curve (from ν at 2.5 to 0.70 at 2.8) at loss 2.6
    assert "| φ steered | 0.8 | 0.3 → 1.2 | – | 95% | 80% | 60.0 ± 2.0 | 64.7 (LoRA(ν+μ), steps) | no | no |" in table


def test_lora_curves_start_at_nu():
    """No domain step is ν itself: LoRA(ν+μ)'s steps and learning-rate curves include it, so the matched-accuracy
    levels between ν and its first checkpoint are inside the curve."""
    nu = _point("general", None, 0.62, 2.5)
    points = [nu, _point("lora", 0.25, 0.80, 2.9), _point("lora", 1.0, 0.82, 3.0), _point("lora_lr", 0.1, 0.7, 2.6)]
    assert [p["knob"] for p in curve(points, "lora")] == [0.0, 0.25, 1.0]
    assert at_accuracy(curve(points, "lora"), 0.71) == pytest.approx(2.7)
    assert [p["knob"] for p in curve(points, "lora_lr")] == [0.0, 0.1, 1.0]
    assert curve([nu, _point("lora", 1.0, 0.82, 3.0)], "lora_lr") == []  # anchors alone are not a curve
    replay = curve(points + [_point("replay", 0.05, 0.81, 2.9)], "replay")
    assert [(p["knob"], p["acc"]) for p in replay] == [(0.0, 0.82), (0.05, 0.81)]  # no replay is LoRA(ν+μ)'s end


def test_seeds_show_each_seed_and_pair_alora_with_each_middle_point():
    """Each seed's gain kept is against its own general stage; ALoRA's differences from a method subtract within a seed."""
    from alora_bench.frontier_report import against_alora, seeds_table

    base = _point("base", None, 0.60, 3.0)
    nus = [_point("general", None, 0.62, 2.5, seed=0), _point("general", None, 0.62, 2.6, seed=1)]
    alora = [_point("alora", 3.0, 0.80, 2.6, seed=0), _point("alora", 3.0, 0.84, 2.8, seed=1)]
    flat = [_point("alora_nolayer", 3.0, 0.81, 2.55, seed=0), _point("alora_nolayer", 3.0, 0.82, 2.7, seed=1)]
    lr = [_point("lora_lr", 0.1, 0.78, 2.7, seed=0), _point("lora_lr", 0.1, 0.80, 2.9, seed=1)]
    points = [base, *nus, *alora, *flat, *lr]
    table = "\n".join(seeds_table(points))
    # seed 0 keeps (3.0 − 2.6) / 0.5 = 80%, seed 1 (3.0 − 2.8) / 0.4 = 50%: mean 65, s.d. 21.2
    assert "| ALoRA | 3 | 2 | 80.0 / 84.0 | 82.0 ± 2.8 | 80 / 50 | 65 ± 21 | 2.7000 ± 0.1414 |" in table
    pairs = "\n".join(against_alora(points, 3.0))
    # − layer keeps 90% (seed 0) and 75% (seed 1): Δ kept −10 and −25; Δ acc −1 and +2
    assert "| ALoRA − layer | 3 | -1.0 / +2.0 | +0.5 ± 2.1 | -10 / -25 | -17.5 ± 10.6 | no |" in pairs
    # the learning rate keeps 60% and 25%: ALoRA ahead by 2 and 4 points of accuracy, 20 and 25 of the gain
    assert "| LoRA(ν+μ), learning rate | 0.1 | +2.0 / +4.0 | +3.0 ± 1.4 | +20 / +25 | +22.5 ± 3.5 | yes |" in pairs
    assert "| ALoRA | 3 |" not in pairs  # not against itself
    assert against_alora([base, *nus, alora[0], *flat], 3.0) == []  # one seed of ALoRA: nothing to pair


def test_medmcqa_names_each_letter_s_share_of_the_answers():
    """An accuracy equal to one letter's share is a model that always gives that letter: the report lists the shares."""
    from alora_bench.frontier_report import letter_note

    note = letter_note({"A": 0.332, "B": 0.248, "C": 0.224, "D": 0.196})
    assert "the scored items' answers are A 33.2%, B 24.8%, C 22.4%, D 19.6%" in note
    assert letter_note(None) == ""
