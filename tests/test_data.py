"""Local data: splits, lm-eval prompt agreement, prepare-data outputs and manifest (real shared data)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import pytest

from alora_bench import data as D

TASK_YAMLS = {"sciq": "sciq/sciq.yaml", "piqa": "piqa/piqa.yaml", "medmcqa": "medmcqa/medmcqa.yaml"}
# lm-eval's prompt fragment that ends each question, to pull questions back out of training texts
QUESTION_RE = re.compile(r"Question: (.*?)\n(?:Answer:|Choices:\n)", re.DOTALL)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    manifest = json.loads(D.prepare_data(out).read_text())
    return out, manifest


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="ascii").split("\n")[:-1]]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- lm-eval's own task configs


def lm_eval_config(task: str) -> dict:
    from lm_eval import tasks
    from lm_eval.utils import load_yaml_config

    return load_yaml_config(str(Path(tasks.__file__).parent / TASK_YAMLS[task]))


def lm_eval_render(config: dict, doc: dict) -> tuple[str, str]:
    """(prompt, correct choice) as lm-eval's ConfigurableTask derives them from a task config."""
    from lm_eval.utils import apply_template

    text = config["doc_to_text"]
    prompt = text(doc) if callable(text) else apply_template(text, doc)
    choice = config["doc_to_choice"]
    choices = choice if isinstance(choice, list) else ast.literal_eval(apply_template(choice, doc))
    target = config["doc_to_target"]
    index = target if isinstance(target, int) else doc[target]
    return prompt, choices[index]


def test_target_delimiter_is_lm_evals_default():
    from lm_eval.config.task import TaskConfig

    default = {f.name: f.default for f in dataclasses.fields(TaskConfig)}["target_delimiter"]
    assert D.TARGET_DELIMITER == default
    assert all("target_delimiter" not in lm_eval_config(task) for task in TASK_YAMLS)


@pytest.mark.parametrize("task", sorted(D.TASKS))
def test_prompts_and_answers_match_lm_eval(task):
    docs_fn, prompt_fn, answer_fn = D.TASKS[task]
    config = lm_eval_config(task)
    docs = docs_fn("test")
    for doc in docs[:50] + docs[-50:]:
        assert (prompt_fn(doc), answer_fn(doc)) == lm_eval_render(config, doc)


def test_sciq_prompt_without_support_starts_with_newline():
    doc = next(d for d in D.sciq_docs("test") if not d["support"])
    assert D.sciq_prompt(doc).startswith("\nQuestion: ")
    assert D.sciq_prompt(doc) == lm_eval_render(lm_eval_config("sciq"), doc)[0]


# ---------------------------------------------------------------- documents and splits


def test_split_sizes():
    sizes = {(task, split): len(D.TASKS[task][0](split)) for task in D.TASKS for split in D.TASK_SPLITS[task]}
    assert sizes[("piqa", "train")] + sizes[("piqa", "test")] == 1838
    assert sizes[("medmcqa", "train")] + sizes[("medmcqa", "test")] == 4183
    assert sizes[("piqa", "test")] >= 800 and sizes[("medmcqa", "test")] >= 800
    assert (sizes[("sciq", "valid")], sizes[("sciq", "test")]) == (1000, 1000)
    assert sizes[("sciq", "train")] <= 11679


def test_medmcqa_cop_is_zero_based():
    raw = json.loads((D.data_dir() / "medmcqa" / "dev.json").open().readline())
    doc = next(d for split in ("train", "test") for d in D.medmcqa_docs(split) if d["id"] == raw["id"])
    assert raw["cop"] == 1 and doc["cop"] == 0 and D.medmcqa_answer(doc) == "A"
    assert {k: v for k, v in doc.items() if k != "cop"} == {k: v for k, v in raw.items() if k != "cop"}
    assert {d["cop"] for d in D.medmcqa_docs("test")} == {0, 1, 2, 3}


def test_piqa_labels_follow_lines():
    first = json.loads((D.data_dir() / "piqa" / "valid.jsonl").open().readline())
    doc = next(d for split in ("train", "test") for d in D.piqa_docs(split) if d["goal"] == first["goal"])
    assert doc["label"] == 0 and D.piqa_answer(doc) == first["sol1"]  # README: item 1 is sol1, label 0


@pytest.mark.parametrize("task", sorted(D.TASKS))
def test_no_test_question_in_same_task_train(task):
    docs_fn = D.TASKS[task][0]
    key = {"piqa": "goal"}.get(task, "question")
    train = {D.normalize(d[key]) for d in docs_fn("train")}
    held = [s for s in D.TASK_SPLITS[task] if s != "train"]
    assert not train & {D.normalize(d[key]) for s in held for d in docs_fn(s)}


def test_duplicate_questions_share_a_part():
    goals = {split: [D.normalize(d["goal"]) for d in D.piqa_docs(split)] for split in ("train", "test")}
    every = goals["train"] + goals["test"]
    assert len(set(every)) < len(every)  # PIQA's validation file repeats some goals
    assert set(goals["train"]).isdisjoint(goals["test"])


def shuffled_copy(tmp_path: Path) -> Path:
    """PIQA (lines and labels shuffled together) and MedMCQA with their lines in another order."""
    src, rng = D.data_dir(), random.Random(0)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "medmcqa").mkdir()
    items = (src / "piqa" / "valid.jsonl").read_text().splitlines()
    labels = (src / "piqa" / "valid-labels.lst").read_text().splitlines()
    pairs = list(zip(items, labels))
    rng.shuffle(pairs)
    (tmp_path / "piqa" / "valid.jsonl").write_text("".join(i + "\n" for i, _ in pairs))
    (tmp_path / "piqa" / "valid-labels.lst").write_text("".join(y + "\n" for _, y in pairs))
    lines = (src / "medmcqa" / "dev.json").read_text().splitlines()
    rng.shuffle(lines)
    (tmp_path / "medmcqa" / "dev.json").write_text("".join(line + "\n" for line in lines))
    return tmp_path


def test_split_invariant_to_reordering(tmp_path):
    copy = shuffled_copy(tmp_path)

    def canon(docs):
        return sorted(json.dumps(d, sort_keys=True) for d in docs)

    for docs_fn in (D.piqa_docs, D.medmcqa_docs):
        for split in ("train", "test"):
            assert canon(docs_fn(split, data_dir=copy)) == canon(docs_fn(split))


def test_wikitext2_articles():
    docs = D.wikitext2_test_docs()
    raw = (D.data_dir() / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    assert len(docs) == 60
    assert raw == " \n" + "\n".join(d["page"] for d in docs)
    assert docs[0]["page"].startswith(" = Robert Boulter = \n")
    formula = next(d["page"] for d in docs if " = 1 henry and capacitance C = \n" in d["page"])
    assert " = 1 rad / s and a nominal impedance k = \n" in formula
    assert sum(len(d["page"].split()) for d in docs) == 241211


def test_general_heldout_is_about_five_percent_and_disjoint():
    train, heldout = D.general_docs("train"), D.general_docs("heldout")
    assert {d["doc_id"] for d in train}.isdisjoint(d["doc_id"] for d in heldout)
    assert len({d["doc_id"] for d in train + heldout}) == len(train) + len(heldout)
    words = [sum(len(d["page"].split()) for d in docs) for docs in (train, heldout)]
    files = (D.data_dir() / "general").glob("*/text/**/*.txt")
    assert sum(words) == sum(len(p.read_text(encoding="utf-8").split()) for p in files)  # nothing lost or repeated
    assert 0.04 < words[1] / sum(words) < 0.06
    assert 0.04 < len(heldout) / (len(train) + len(heldout)) < 0.06
    assert {d["doc_id"].split("/")[0] for d in heldout} == set(D.GENERAL_CORPORA)


def test_passages_keep_every_word():
    text = "a b c\n\nd e\n" + " ".join(f"w{i}" for i in range(7)) + "\nlast"
    out = D.passages(text, 4)
    assert out == ["a b c\n\nd e", "w0 w1 w2 w3", "w4 w5 w6\nlast"]
    assert " ".join(out).split() == text.split()


def test_missing_file_error_names_the_file(tmp_path):
    shutil.copytree(D.data_dir() / "piqa", tmp_path / "piqa")
    (tmp_path / "piqa" / "valid-labels.lst").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "piqa" / "valid-labels.lst"))):
        D.piqa_docs("test", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="medmcqa/dev.json"):
        D.medmcqa_docs("test", data_dir=tmp_path)


def test_missing_data_dir_names_path_and_env(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(missing))}.*{D.DATA_DIR_ENV}"):
        D.data_dir(missing)
    monkeypatch.setenv(D.DATA_DIR_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        D.sciq_docs("test")


# ---------------------------------------------------------------- prepare-data outputs


def test_training_text_is_prompt_delimiter_answer(prepared):
    out, _ = prepared
    for task, (docs_fn, prompt_fn, answer_fn) in D.TASKS.items():
        texts = read_texts(out / f"{task}_train.jsonl")
        assert texts == [prompt_fn(d) + " " + answer_fn(d) for d in docs_fn("train")]


def test_no_test_question_in_any_train_file(prepared):
    out, _ = prepared
    trained = set()
    for path in sorted(out.glob("*_train.jsonl")):
        if path.name == "general_train.jsonl":
            continue  # passages of the general corpora: no prompts
        for text in read_texts(path):
            (question,) = QUESTION_RE.findall(text)  # exactly one prompt per example
            trained.add(D.normalize(question))
    assert len(trained) > 10_000
    tests = [D.sciq_docs(s) for s in ("valid", "test")] + [D.medmcqa_docs("test")]
    test_questions = {D.normalize(d["question"]) for docs in tests for d in docs}
    test_questions |= {D.normalize(d["goal"]) for d in D.piqa_docs("test")}
    assert trained.isdisjoint(test_questions)


def test_general_outputs_are_passages_of_the_split(prepared):
    out, _ = prepared
    for split in ("train", "heldout"):
        texts = read_texts(out / f"general_{split}.jsonl")
        docs = D.general_docs(split)
        assert texts == [p for d in docs for p in D.passages(d["page"], D.DEFAULT_PASSAGE_WORDS)]
        assert 150 < sum(len(t.split()) for t in texts) / len(texts) < 250


def test_manifest(prepared):
    out, manifest = prepared
    root = D.data_dir()
    for rel, digest in manifest["sources"]["files_sha256"].items():
        assert digest == sha256(root / rel)
    for corpus, entry in manifest["sources"]["general_corpora"].items():
        files = sorted((root / "general" / corpus / "text").rglob("*.txt"))
        listing = "".join(f"{sha256(p)}  {p.relative_to(root).as_posix()}\n" for p in files)
        assert entry == {"files": len(files), "sha256_of_listing": hashlib.sha256(listing.encode()).hexdigest()}
    assert sorted(manifest["outputs"]) == sorted(p.name for p in out.glob("*.jsonl"))
    for name, stats in manifest["outputs"].items():
        assert stats["sha256"] == sha256(out / name)
        assert stats["examples"] == len(read_texts(out / name))
    assert manifest["split_sizes"]["piqa/test"] == len(D.piqa_docs("test"))
    assert manifest["split_rule"] == D.SPLIT_RULE
    assert not list(out.glob(".*"))  # no temp files left behind


def test_cli_missing_source_names_it(tmp_path):
    parser = argparse.ArgumentParser()
    D.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "out"), "--data-dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="sciq/train.json"):
        D.run(args)
    assert not (tmp_path / "out").exists()
