"""lm-eval tasks in eval/alora_bench/tasks/ and `alora eval` (alora_bench.evaluation), offline, on a tiny model."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from alora_bench import data  # noqa: E402
from alora_bench.evaluation import runner  # noqa: E402

PPL_TASKS = ["alora_wikitext2", "alora_general_ppl"]
MC_TASKS = ["alora_sciq", "alora_piqa", "alora_medmcqa"]
LIMIT = 2


def _metric(run: dict, task: str, metric: str):
    return run["results"][task][f"{metric},none"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model with random (non-zero) B, so it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=32, target_modules=modules, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eval_out(tiny_model_dir, adapter_dir, tmp_path_factory):
    """`alora eval` (default group `alora`) for the base and one adapter; returns the --out folder."""
    out = tmp_path_factory.mktemp("eval")
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    args = parser.parse_args(
        ["--base", str(tiny_model_dir), "--adapter", f"lora={adapter_dir}", "--limit", str(LIMIT), "--out", str(out)]
    )
    assert runner.run(args) == 0
    return out


@pytest.fixture(scope="module")
def manager():
    return runner.task_manager()


@pytest.fixture(scope="module")
def runs(eval_out):
    """lm-eval's saved JSON per run."""
    return {name: json.loads((eval_out / f"{name}.json").read_text()) for name in ("base", "lora")}


def test_all_tasks_load_and_score_offline(runs):
    for run in runs.values():
        assert run["n-samples"].keys() == set(PPL_TASKS + MC_TASKS)
        for task in PPL_TASKS + MC_TASKS:
            assert run["n-samples"][task]["effective"] == LIMIT
        for task in PPL_TASKS:
            for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
                value = _metric(run, task, metric)
                assert math.isfinite(value) and value > 0
        for task in MC_TASKS:
            for metric in ("acc", "acc_norm"):
                assert 0.0 <= _metric(run, task, metric) <= 1.0
                assert isinstance(run["results"][task][f"{metric}_stderr,none"], float)


def test_adapter_is_applied(runs, adapter_dir):
    assert "peft" not in runs["base"]["config"]["model_args"]
    assert runs["lora"]["config"]["model_args"]["peft"] == str(adapter_dir)
    for task in PPL_TASKS:
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            base, lora = _metric(runs["base"], task, metric), _metric(runs["lora"], task, metric)
            assert base != pytest.approx(lora, rel=1e-4)  # the change is ~1e-3 and up; float noise ~1e-7


def test_table_has_runs_and_columns(eval_out, runs):
    markdown = (eval_out / "table.md").read_text()
    lines = markdown.splitlines()
    assert lines[0] == (
        "| run | WikiText-2 PPL ↓ | General held-out PPL ↓ | SciQ acc ↑ | PIQA acc ↑ | MedMCQA acc ↑ |"
    )
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:4]]
    assert [row[0] for row in rows] == ["base", "lora"] and lines[4] == ""
    for name, *cells in rows:
        assert cells[0] == f"{_metric(runs[name], 'alora_wikitext2', 'word_perplexity'):.2f}"
        sciq = runs[name]["results"]["alora_sciq"]
        assert cells[2] == f"{sciq['acc,none']:.4f} ± {sciq['acc_stderr,none']:.4f}"
    table = json.loads((eval_out / "table.json").read_text())
    assert [c["task"] for c in table["columns"]] == PPL_TASKS + MC_TASKS
    assert [r["run"] for r in table["rows"]] == ["base", "lora"]
    assert table["rows"][0]["cells"]["alora_general_ppl"]["stderr"] is None  # lm-eval gives none for PPL
    assert table["samples"] == {task: LIMIT for task in PPL_TASKS + MC_TASKS}


def test_table_with_stock_tasks_and_missing_cells(tmp_path):
    from alora_bench.evaluation import write_table

    results = {
        "base": {
            "results": {
                "sciq": {"acc,none": 0.5, "acc_stderr,none": 0.125},
                "pile_10k": {"word_perplexity,none": 12.345, "word_perplexity_stderr,none": "N/A"},
            },
            "n-samples": {"sciq": {"original": 1000, "effective": 8}, "pile_10k": {"original": 10000, "effective": 3}},
        },
        "alora": {"results": {"sciq": {"acc,none": 0.75, "acc_stderr,none": 0.25}}, "n-samples": {}},
    }
    lines = write_table(results, tmp_path / "t.md").splitlines()
    assert lines[:4] == [
        "| run | pile_10k PPL ↓ | sciq acc ↑ |",
        "|---|---:|---:|",
        "| base | 12.35 | 0.5000 ± 0.1250 |",
        "| alora | – | 0.7500 ± 0.2500 |",
    ]
    assert "Documents scored: pile_10k 3, sciq 8." in lines[5]
    assert json.loads((tmp_path / "t.json").read_text())["rows"][1]["cells"]["pile_10k"] is None


def test_the_plugins_in_training_number_is_one_more_column(tmp_path):
    from alora_bench.evaluation import write_table
    from alora_bench.evaluation.table import IN_TRAINING, in_training_result

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "alora_general_eval.json").write_text(json.dumps({"final": 2.5, "final_ppl": 12.182, "kept_share": 0.754, "sequences": 64}))
    assert in_training_result(tmp_path) is None  # a run without the key
    ppl = {"alora_general_ppl": {"word_perplexity,none": 20.0}}
    results = {"base": {"results": ppl, "n-samples": {}},
               "alora": {"results": {**ppl, IN_TRAINING: in_training_result(run_dir)}, "n-samples": {}}}
    lines = write_table(results, tmp_path / "t.md").splitlines()
    assert lines[0] == "| run | General held-out PPL ↓ | General held-out, in training, token PPL ↓ (kept) |"
    assert lines[2:4] == ["| base | 20.00 | – |", "| alora | 20.00 | 12.18 (75%) |"]
    assert "64 sequences of held-out general text" in lines[-1]
    # a budget that interpolated: the budgeted adapter's loss on the control sample, which is the one evaluated
    budget = {"control": {"base": 3.0, "reference": 2.0, "end": 2.5, "chosen": 2.2}}
    (run_dir / "alora_general_eval.json").write_text(json.dumps({"final": 2.5, "final_ppl": 12.182, "kept_share": 0.5, "sequences": 64,
                                                                  "budget": budget}))
    got = in_training_result(run_dir)
    assert got["loss,none"] == 2.2 and got["kept_share,none"] == pytest.approx(0.8) and got["token_perplexity,none"] == pytest.approx(9.025, abs=1e-3)


def test_adapter_argument():
    assert runner._adapter("alora=/x/y") == ("alora", "/x/y")
    assert runner._adapter("/x/lora_run") == ("lora_run", "/x/lora_run")
    with pytest.raises(argparse.ArgumentTypeError):
        runner._adapter("a b=/x")


@pytest.fixture(scope="module")
def raw_answers() -> dict:
    """Correct answers read straight from the shared files (independent of alora_bench.data):
    SciQ `correct_answer`; PIQA `sol{label+1}` from valid-labels.lst; MedMCQA letter of 1-based `cop`."""
    root = data.data_dir()
    sciq_items = json.loads((root / "sciq/test.json").read_text())
    sciq = {(d["question"], d["support"]): d["correct_answer"] for d in sciq_items}
    piqa_items = [json.loads(line) for line in (root / "piqa/valid.jsonl").read_text().splitlines()]
    piqa_labels = (root / "piqa/valid-labels.lst").read_text().split()
    piqa = {(d["goal"], d["sol1"], d["sol2"]): (d["sol1"], d["sol2"])[int(y)] for d, y in zip(piqa_items, piqa_labels)}
    medmcqa_items = [json.loads(line) for line in (root / "medmcqa/dev.json").read_text().splitlines()]
    medmcqa = {d["id"]: "ABCD"[d["cop"] - 1] for d in medmcqa_items}
    return {
        "alora_sciq": lambda doc: sciq[(doc["question"], doc["support"])],
        "alora_piqa": lambda doc: piqa[(doc["goal"], doc["sol1"], doc["sol2"])],
        "alora_medmcqa": lambda doc: medmcqa[doc["id"]],
    }


def _oracle_lm(answers: dict, prefer_correct: bool):
    """An lm-eval LM whose log-likelihood is 0 for the correct continuation and -10 for the others
    (or the reverse), so a correct task config must score acc 1.0 (or 0.0)."""
    from lm_eval.api.model import LM

    class OracleLM(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            scores = []
            for req in requests:
                _, continuation = req.args
                correct = continuation == " " + answers[req.task_name](req.doc)
                scores.append((0.0 if correct == prefer_correct else -10.0, False))
            return scores

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return OracleLM()


@pytest.mark.parametrize("prefer_correct, expected", [(True, 1.0), (False, 0.0)])
def test_known_answers_score_exactly(prefer_correct, expected, raw_answers, manager, tmp_path, monkeypatch):
    import lm_eval

    monkeypatch.chdir(tmp_path)  # the tasks must not depend on the working directory

    results = lm_eval.simple_evaluate(
        model=_oracle_lm(raw_answers, prefer_correct),
        tasks=["alora_domain"],
        task_manager=manager,
        limit=30,
        log_samples=False,
    )
    for task in MC_TASKS:
        assert results["n-samples"][task]["effective"] == 30
        assert _metric(results, task, "acc") == expected
        assert _metric(results, task, "acc_norm") == expected


WIKI_PAGE = " = Fox = \n The quick fox @-@ like dog ( a mammal ) jumps , he said . It 's 1 @,@ 000 km . \n"
WIKI_SCORED = " = Fox =\nThe quick fox-like dog (a mammal) jumps, he said. It's 1,000 km.\n"  # stock detokenizer
WIKI_WORDS = 27  # re.split(r"\s+") of the original page: 25 words + empty fields at both ends
GENERAL_PAGES = ["The quick brown fox jumps over the lazy dog.", "Photosynthesis turns light\nenergy into café ☕"]
GENERAL_WORDS = [9, 7]


def _hand_loglikelihood(model_dir, text: str) -> float:
    """log p(text | bos) summed over its tokens, with transformers alone (one window)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
    assert len(ids) <= model.config.max_position_embeddings
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()


def test_perplexity_matches_independent_computation(tiny_model_dir, manager, monkeypatch):
    import lm_eval

    monkeypatch.setattr(data, "wikitext2_test_docs", lambda data_dir=None: [{"page": WIKI_PAGE}])
    general = [{"doc_id": f"doc{i}", "page": page} for i, page in enumerate(GENERAL_PAGES)]
    monkeypatch.setattr(data, "general_docs", lambda split, data_dir=None: general)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_model_dir)},
        tasks=["alora_general"],
        task_manager=manager,
        device="cpu",
        batch_size=2,
        log_samples=False,
    )
    cases = {
        "alora_wikitext2": ([WIKI_SCORED], WIKI_WORDS, len(WIKI_PAGE.encode())),
        "alora_general_ppl": (GENERAL_PAGES, sum(GENERAL_WORDS), sum(len(p.encode()) for p in GENERAL_PAGES)),
    }
    for task, (texts, words, n_bytes) in cases.items():
        loglikelihood = sum(_hand_loglikelihood(tiny_model_dir, t) for t in texts)
        assert _metric(results, task, "word_perplexity") == pytest.approx(math.exp(-loglikelihood / words), rel=1e-4)
        assert _metric(results, task, "byte_perplexity") == pytest.approx(math.exp(-loglikelihood / n_bytes), rel=1e-4)
        bits = -loglikelihood / n_bytes / math.log(2)
        assert _metric(results, task, "bits_per_byte") == pytest.approx(bits, rel=1e-4)


@pytest.mark.e2e
def test_alora_eval_defaults_fit_the_machines_the_readme_targets(smollm2_dir, tmp_path):
    """`alora eval` with only --base, --limit and --out on SmolLM2 (whose own maximum is 8192 tokens): the
    default window is 1024, and the rolling perplexity at the default batch stays far from 24 GB. The child is
    killed at 10 GB, so a regression fails this test instead of the machine (measured here at limit 4: 4.4 GB with
    the 1024 default; with SmolLM2's 8192 the child passed 10 GB and was killed; all five tasks at limit 20 reached 23.7 GB)."""
    import subprocess
    import sys
    import time

    from alora_bench.peak_memory import vm_hwm_kib

    assert runner.default_max_length(smollm2_dir) == runner.DEFAULT_MAX_LENGTH == 1024
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "axolotl_alora.cli", "eval", "--base", str(smollm2_dir), "--tasks", "alora_wikitext2",
           "--limit", "4", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    peak_kib, ceiling_kib = 0, 10 * 2**20
    while proc.poll() is None:
        peak_kib = max(peak_kib, vm_hwm_kib(proc.pid) or 0)
        if peak_kib > ceiling_kib:
            proc.kill()
        time.sleep(0.2)
    log = proc.stdout.read()
    assert peak_kib <= ceiling_kib, f"killed at {peak_kib / 2**20:.1f} GB"
    assert proc.returncode == 0, log[-3000:]
    config = json.loads((out / "base.json").read_text())["config"]
    assert "max_length=1024" in str(config["model_args"]) or config["model_args"].get("max_length") == 1024
    assert peak_kib < 6 * 2**20, f"peak {peak_kib / 2**20:.1f} GB"
