"""Dataset loaders for the `alora_*` lm-eval tasks (`custom_dataset: !function loaders.<fn>`).

lm-eval imports this file by path from the YAML's folder, so the tasks work from any
working directory. Documents come from `alora_bench.data` (the package must be
installed), which reads `$ALORA_DATA_DIR` or `<repo>/../shared/data`. lm-eval calls each
loader with the task metadata and model arguments as keyword arguments; they are ignored.
The prompt and perplexity helpers imported below are lm-eval's own (re-exported for the
YAMLs' `!function`), so MedMCQA's prompt and WikiText's detokenisation/counting stay stock.
"""

from __future__ import annotations

import datasets
from lm_eval.tasks.medmcqa.utils_medmcqa import doc_to_text as medmcqa_doc_to_text  # noqa: F401
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results  # noqa: F401
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # noqa: F401

from alora_bench import data


def _test_split(docs: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def sciq_test(**_: object) -> datasets.DatasetDict:
    return _test_split(data.sciq_docs("test"))


def sciq_valid(**_: object) -> datasets.DatasetDict:
    return _test_split(data.sciq_docs("valid"))  # served as lm-eval's "test" split; only model selection reads it


def piqa_test(**_: object) -> datasets.DatasetDict:
    return _test_split(data.piqa_docs("test"))


def medmcqa_test(**_: object) -> datasets.DatasetDict:
    return _test_split(data.medmcqa_docs("test"))


def wikitext2_test(**_: object) -> datasets.DatasetDict:
    return _test_split(data.wikitext2_test_docs())


def general_heldout(**_: object) -> datasets.DatasetDict:
    return _test_split(data.general_docs("heldout"))
