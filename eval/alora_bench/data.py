"""Local data: the one place that reads `../shared/data` (readers, splits, lm-eval prompts) and
the `alora prepare-data` subcommand that writes Axolotl-ready JSONL plus DATA_MANIFEST.json.

Split rules (documented in docs/DATA.md):
- PIQA and MedMCQA ship one labelled file each. An item is in the test part when
  int(sha256(normalize(question)), 16) % 100 < TEST_PERCENT, else in the train part, where
  normalize = Unicode NFKC, whitespace runs collapsed to one space, stripped, casefolded.
  The rule looks only at the question text, so reordering files never changes it, and items
  with identical (normalized) questions always land in the same part.
- SciQ keeps its own splits; its train split drops the items whose normalized question also
  occurs in valid or test.
- General corpora: documents (one file, or a block of CHUNK_LINES lines of the abc/webtext files,
  which hold many short items each) go to the held-out slice when
  int(sha256(doc_id), 16) % 100 < HELDOUT_PERCENT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import unicodedata
from pathlib import Path

HELP = "write Axolotl-ready JSONL from the local datasets (default ../shared/data)"  # `alora prepare-data` help
DATA_DIR_ENV = "ALORA_DATA_DIR"
TEST_PERCENT = 50
HELDOUT_PERCENT = 5
CHUNK_LINES = 50
GENERAL_CORPORA = ("abc", "brown", "inaugural", "movie_reviews", "state_union", "webtext")
CHUNKED_CORPORA = ("abc", "webtext")
DEFAULT_PASSAGE_WORDS = 200
TARGET_DELIMITER = " "  # lm-eval's default target_delimiter, between prompt and answer

SPLIT_RULE = {
    "normalize": "Unicode NFKC, whitespace runs -> one space, strip, casefold",
    "piqa": f"test iff int(sha256(normalize(goal)), 16) % 100 < {TEST_PERCENT}, else train",
    "medmcqa": f"test iff int(sha256(normalize(question)), 16) % 100 < {TEST_PERCENT}, else train",
    "sciq": "original train/valid/test; train minus items whose normalize(question) is in valid or test",
    "general": (
        f"documents = files, except abc and webtext files cut into blocks of {CHUNK_LINES} lines "
        f"(doc_id corpus/name#k); heldout iff int(sha256(doc_id), 16) % 100 < {HELDOUT_PERCENT}"
    ),
}


# ---------------------------------------------------------------- paths and files


def data_dir(path: str | Path | None = None) -> Path:
    """`path`, else $ALORA_DATA_DIR, else <repo root>/../shared/data; it must exist."""
    if path is None:
        path = os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    root = Path(path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data directory not found: {root} (pass --data-dir / data_dir=, or set ${DATA_DIR_ENV})"
        )
    return root


def _source(rel: str, data_dir_: str | Path | None) -> Path:
    """The data file `rel` under the data dir; a clear error naming it when it is missing."""
    path = data_dir(data_dir_) / rel
    if not path.is_file():
        raise FileNotFoundError(f"missing data file: {path}")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- split rules


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 100


def is_test_question(question: str) -> bool:
    """PIQA/MedMCQA split rule: True for the test part."""
    return _bucket(normalize(question)) < TEST_PERCENT


def is_heldout_doc(doc_id: str) -> bool:
    """General-corpus split rule: True for the held-out slice."""
    return _bucket(doc_id) < HELDOUT_PERCENT


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


def _hash_split(docs: list[dict], key: str, split: str) -> list[dict]:
    _check_split(split, ("train", "test"))
    want_test = split == "test"
    return [d for d in docs if is_test_question(d[key]) == want_test]


# ---------------------------------------------------------------- task documents


def sciq_docs(split: str, data_dir: str | Path | None = None) -> list[dict]:
    """SciQ in lm-eval's schema; "train" excludes questions that also occur in valid or test."""
    _check_split(split, ("train", "valid", "test"))

    def load(name: str) -> list[dict]:
        return json.loads(_source(f"sciq/{name}.json", data_dir).read_text(encoding="utf-8"))

    docs = load(split)
    if split != "train":
        return docs
    eval_questions = {normalize(d["question"]) for name in ("valid", "test") for d in load(name)}
    return [d for d in docs if normalize(d["question"]) not in eval_questions]


def piqa_docs(split: str, data_dir: str | Path | None = None) -> list[dict]:
    """PIQA validation file with its labels, hash-split into train/test; fields goal, sol1, sol2, label."""
    items = _read_jsonl(_source("piqa/valid.jsonl", data_dir))
    labels_path = _source("piqa/valid-labels.lst", data_dir)
    labels = [int(line) for line in labels_path.read_text(encoding="utf-8").split()]
    if len(labels) != len(items):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(items)} PIQA items")
    docs = [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in zip(items, labels)]
    return _hash_split(docs, "goal", split)


def medmcqa_docs(split: str, data_dir: str | Path | None = None) -> list[dict]:
    """MedMCQA dev file hash-split into train/test, in the HF schema: `cop` 0-based (raw file is 1-based)."""
    docs = [{**d, "cop": d["cop"] - 1} for d in _read_jsonl(_source("medmcqa/dev.json", data_dir))]
    return _hash_split(docs, "question", split)


def _is_wikitext_title(lines: list[str], i: int) -> bool:
    """A level-1 title " = T = " with a blank " " line on each side; the two formula lines that
    look like titles ("Prototype transformations") sit between text lines."""
    line = lines[i]
    return (
        line.startswith(" = ")
        and not line.startswith(" = = ")
        and line.endswith(" = ")
        and 0 < i < len(lines) - 1
        and lines[i - 1] == lines[i + 1] == " "
    )


def wikitext2_test_docs(data_dir: str | Path | None = None) -> list[dict]:
    """WikiText-2 raw test as whole articles [{"page": ...}] (60): each page is the file's lines
    from its title line up to the next title line (or the end), joined with "\\n"."""
    lines = _source("wikitext2/wiki.test.raw", data_dir).read_text(encoding="utf-8").split("\n")
    starts = [i for i in range(len(lines)) if _is_wikitext_title(lines, i)]
    bounds = zip(starts, starts[1:] + [len(lines)])
    return [{"page": "\n".join(lines[a:b])} for a, b in bounds]


def _corpus_files(corpus: str, data_dir_: str | Path | None) -> tuple[Path, list[Path]]:
    text_dir = data_dir(data_dir_) / "general" / corpus / "text"
    files = sorted(text_dir.rglob("*.txt"))
    if not files:
        raise FileNotFoundError(f"missing data files: no *.txt under {text_dir}")
    return text_dir, files


def _documents(corpus: str, path: Path, text_dir: Path) -> list[dict]:
    """One file -> documents: the whole file, or blocks of CHUNK_LINES lines for abc/webtext."""
    name = f"{corpus}/{path.relative_to(text_dir).with_suffix('').as_posix()}"
    text = path.read_text(encoding="utf-8")
    if corpus not in CHUNKED_CORPORA:
        return [{"doc_id": name, "page": text.strip()}]
    lines = text.split("\n")
    blocks = ("\n".join(lines[i : i + CHUNK_LINES]).strip() for i in range(0, len(lines), CHUNK_LINES))
    return [{"doc_id": f"{name}#{k}", "page": page} for k, page in enumerate(blocks) if page]


def general_docs(split: str, data_dir: str | Path | None = None) -> list[dict]:
    """General corpora as whole documents [{"doc_id", "page"}] in corpus and file order;
    "heldout" is about 5% of them (chosen by hash of doc_id), "train" the rest."""
    _check_split(split, ("train", "heldout"))
    want_heldout = split == "heldout"
    docs = []
    for corpus in GENERAL_CORPORA:
        text_dir, files = _corpus_files(corpus, data_dir)
        for path in files:
            docs += [d for d in _documents(corpus, path, text_dir) if is_heldout_doc(d["doc_id"]) == want_heldout]
    return docs


# ---------------------------------------------------------------- lm-eval prompts and answers


def sciq_prompt(doc: dict) -> str:
    return f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"


def piqa_prompt(doc: dict) -> str:
    return f"Question: {doc['goal']}\nAnswer:"


def medmcqa_prompt(doc: dict) -> str:
    options = "".join(f"{letter}. {doc[key]}\n" for letter, key in zip("ABCD", ("opa", "opb", "opc", "opd")))
    return f"Question: {doc['question']}\nChoices:\n{options}Answer:"


def sciq_answer(doc: dict) -> str:
    return doc["correct_answer"]


def piqa_answer(doc: dict) -> str:
    return (doc["sol1"], doc["sol2"])[doc["label"]]


def medmcqa_answer(doc: dict) -> str:
    return "ABCD"[doc["cop"]]


TASKS = {  # name -> (docs, prompt, answer)
    "sciq": (sciq_docs, sciq_prompt, sciq_answer),
    "piqa": (piqa_docs, piqa_prompt, piqa_answer),
    "medmcqa": (medmcqa_docs, medmcqa_prompt, medmcqa_answer),
}


def training_text(task: str, doc: dict) -> str:
    """One training example: lm-eval's prompt, the target delimiter, the correct choice."""
    _, prompt, answer = TASKS[task]
    return prompt(doc) + TARGET_DELIMITER + answer(doc)


# ---------------------------------------------------------------- passages


def _line_pieces(line: str, n_words: int) -> list[str]:
    """A line, or pieces of at most `n_words` words when it is longer."""
    words = line.split()
    if len(words) <= n_words:
        return [line]
    return [" ".join(words[i : i + n_words]) for i in range(0, len(words), n_words)]


def passages(text: str, n_words: int) -> list[str]:
    """Cut a document into passages of about `n_words` words: whole lines are added until a
    passage reaches `n_words` (lines longer than that are cut into `n_words`-word pieces first);
    line breaks are kept; the last passage may be shorter."""
    out, buf, count = [], [], 0
    for line in text.split("\n"):
        for piece in _line_pieces(line, n_words):
            buf.append(piece)
            count += len(piece.split())
            if count >= n_words:
                out.append("\n".join(buf).strip())
                buf, count = [], 0
    if count:
        out.append("\n".join(buf).strip())
    return out


# ---------------------------------------------------------------- prepare-data


def _log(msg: str) -> None:
    print(f"[prepare-data] {msg}", file=sys.stderr, flush=True)


def _write_jsonl(path: Path, texts: list[str]) -> dict:
    """Write {"text": t} lines (ASCII JSON, so only "\\n" ends a line) atomically (temp file, then
    os.replace); returns the file's stats."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)
    _log(f"wrote {path} ({len(texts)} examples)")
    return {
        "examples": len(texts),
        "words": sum(len(t.split()) for t in texts),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


TASK_SOURCES = {
    "sciq": ["sciq/train.json", "sciq/valid.json", "sciq/test.json"],
    "piqa": ["piqa/valid.jsonl", "piqa/valid-labels.lst"],
    "medmcqa": ["medmcqa/dev.json"],
}
TASK_SPLITS = {"sciq": ("train", "valid", "test"), "piqa": ("train", "test"), "medmcqa": ("train", "test")}


def general_digest(corpus: str, source_dir: str | Path | None = None) -> dict:
    """A corpus' files and their SHA-256 folded into one digest: sha256 of its `sha256sum`-style
    listing ("<sha256>  general/<corpus>/text/<file>\\n" per file, sorted by path)."""
    root = data_dir(source_dir)
    _, files = _corpus_files(corpus, root)
    listing = "".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files)
    return {"files": len(files), "sha256_of_listing": hashlib.sha256(listing.encode("utf-8")).hexdigest()}


def _sources(root: Path) -> dict:
    files = {rel: sha256_file(_source(rel, root)) for rels in TASK_SOURCES.values() for rel in rels}
    corpora = {corpus: general_digest(corpus, root) for corpus in GENERAL_CORPORA}
    return {"files_sha256": files, "general_corpora": corpora}


def prepare_data(
    out_dir: str | Path, source_dir: str | Path | None = None, passage_words: int = DEFAULT_PASSAGE_WORDS
) -> Path:
    """Write the training JSONL files and DATA_MANIFEST.json into `out_dir` from the data dir
    `source_dir` (see `data_dir`); returns the manifest path."""
    root = data_dir(source_dir)
    out = Path(out_dir)
    _log(f"data dir {root}, output dir {out.resolve()}; hashing sources")
    sources = _sources(root)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "data_dir": str(root),
        "sources": sources,
        "split_rule": SPLIT_RULE,
        "passage_words": passage_words,
        "split_sizes": {},
        "outputs": {},
    }
    for split in ("train", "heldout"):
        docs = general_docs(split, root)
        words = sum(len(d["page"].split()) for d in docs)
        manifest["split_sizes"][f"general/{split}"] = {"documents": len(docs), "words": words}
        texts = [p for d in docs for p in passages(d["page"], passage_words)]
        manifest["outputs"][f"general_{split}.jsonl"] = _write_jsonl(out / f"general_{split}.jsonl", texts)
    for task, (docs_fn, _, _) in TASKS.items():
        for split in TASK_SPLITS[task]:
            manifest["split_sizes"][f"{task}/{split}"] = len(docs_fn(split, root))
        texts = [training_text(task, d) for d in docs_fn("train", root)]
        manifest["outputs"][f"{task}_train.jsonl"] = _write_jsonl(out / f"{task}_train.jsonl", texts)
    manifest_path = out / "DATA_MANIFEST.json"
    tmp = manifest_path.with_name(f".{manifest_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    _log(f"wrote {manifest_path}")
    return manifest_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory for the JSONL files")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"shared data directory (default: ${DATA_DIR_ENV}, else <repo>/../shared/data)")
    parser.add_argument("--passage-words", type=int, default=DEFAULT_PASSAGE_WORDS,
                        help="approximate words per general-text passage (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    if args.passage_words < 1:
        raise SystemExit("--passage-words must be at least 1")
    prepare_data(args.out, args.data_dir, args.passage_words)
    return 0
