"""Forgetting while it happens: the mean token cross-entropy on a fixed sample of general text.

`alora_general_eval` names the text (a .txt or .jsonl file, or a dataset entry in Axolotl's `datasets:`
syntax); `alora_general_eval_samples` sequences of `sequence_len` tokens are drawn from it with the run's
seed. The plugin scores the sample once at the start for the reference points (the base model with the
adapter disabled; θ^ν rebuilt from the importance file in a domain stage that has one, else the adapter a
stage continuing an earlier one (`lora_model_dir`) starts from), then at every
evaluation (or at the end when the run has none), and ends with one line: base → ν → now, and the share
of the general stage's gain kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import TrainerCallback

from .args import setting
from .forgetting_budget import BudgetRun, BudgetSpec, default_scoring_interval, split_samples
from .regularizer import RegularizedModule

LOG = logging.getLogger("axolotl.alora")
GENERAL_EVAL_FILENAME = "alora_general_eval.json"


class GeneralEvalError(ValueError):
    """`alora_general_eval` names no usable text."""


# -- the sample ------------------------------------------------------------------------------------------
def read_documents(spec) -> list[str]:
    """The documents `spec` names: a .txt file (one document), a .jsonl/.json file (each row's `text`), or a
    dataset entry in Axolotl's `datasets:` syntax (a dict, loaded with Axolotl's own loader; `field` names the
    text column, default `text`)."""
    if isinstance(spec, dict):
        return _dataset_documents(spec)
    path = Path(str(spec))
    if not path.is_file():
        raise GeneralEvalError(f"alora_general_eval: {path} does not exist (give a .txt or .jsonl file, or a dataset entry).")
    if path.suffix == ".txt":
        documents = [path.read_text(encoding="utf-8")]
    elif path.suffix in (".jsonl", ".json"):
        documents = _dataset_documents({"path": str(path), "ds_type": "json"})
    else:
        raise GeneralEvalError(f"alora_general_eval: {path} is neither .txt nor .jsonl; use one of those or a dataset entry.")
    documents = [d for d in documents if d and d.strip()]
    if not documents:
        raise GeneralEvalError(f"alora_general_eval: {path} holds no text.")
    return documents


def _dataset_documents(entry: dict) -> list[str]:
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.dict import DictDefault

    field = entry.get("field") or "text"
    try:
        dataset = load_dataset_with_config(DictDefault({"split": "train", **entry}), use_auth_token=False)
    except Exception as e:  # noqa: BLE001 - any loader failure means the same thing to the user
        raise GeneralEvalError(f"alora_general_eval: could not load {entry}: {e}") from e
    if field not in dataset.column_names:
        raise GeneralEvalError(f"alora_general_eval: {entry.get('path')} has no column {field!r} (columns: {dataset.column_names}); set `field`.")
    documents = [d for d in dataset[field] if isinstance(d, str) and d.strip()]
    if not documents:
        raise GeneralEvalError(f"alora_general_eval: {entry.get('path')} holds no text in column {field!r}.")
    return documents


def token_windows(documents: list[str], tokenizer, sequence_len: int) -> Tensor:
    """The documents joined with EOS and cut into consecutive windows of `sequence_len` tokens: a windows×sequence_len
    LongTensor (the tail shorter than a window is dropped)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in documents:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    windows = len(ids) // sequence_len
    if windows == 0:
        raise GeneralEvalError(
            f"alora_general_eval: the text has {len(ids)} tokens, fewer than one sequence of sequence_len={sequence_len}; give more text."
        )
    return torch.tensor(ids[: windows * sequence_len], dtype=torch.long).view(windows, sequence_len)


def chosen_windows(windows: int, samples: int, seed: int) -> Tensor:
    """The indices of the `samples` windows (of `windows`) that `seed` draws, in order."""
    return torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[:samples].sort().values


def sample_sequences(documents: list[str], tokenizer, sequence_len: int, samples: int, seed: int) -> Tensor:
    """`samples` distinct windows of `sequence_len` tokens (or all there are, if fewer) from the documents joined
    with EOS and cut into consecutive windows, chosen by `seed`: a samples×sequence_len LongTensor."""
    table = token_windows(documents, tokenizer, sequence_len)
    if len(table) < samples:
        LOG.warning("ALoRA: alora_general_eval has %d sequences of %d tokens, fewer than alora_general_eval_samples=%d; scoring all of them",
                    len(table), sequence_len, samples)
    return table[chosen_windows(len(table), samples, seed)]


# -- scoring -----------------------------------------------------------------------------------------------
@torch.no_grad()
def mean_token_loss(model, sequences: Tensor, batch_size: int, rank: int = 0, world_size: int = 1) -> float:
    """Mean next-token cross-entropy over every predicted token of `sequences`, the model in eval mode.
    With world_size > 1 each rank scores every world_size-th sequence and the sums are all-reduced; a rank
    left with none (fewer sequences than ranks) scores nothing but still joins the all-reduce."""
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        mine = sequences[rank::world_size]
        for batch in mine.split(batch_size) if len(mine) else ():  # split() of an empty tensor yields one empty batch
            batch = batch.to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total += torch.stack([loss.double(), torch.tensor(targets.numel(), dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    if world_size > 1:
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1])


@contextlib.contextmanager
def reference_weights(modules, parameters) -> Iterator[None]:
    """The live adapter temporarily set to θ^ν (the regularizer's reference A^ν, B^ν and full parameters)."""
    saved = []
    with torch.no_grad():
        try:
            for m in modules:
                for live, ref in ((m.A, m.A_ref), (m.B, m.B_ref)):
                    saved.append((live, live.detach().clone()))
                    live.copy_(ref.to(live.dtype))
            for p in parameters:
                saved.append((p.param, p.param.detach().clone()))
                p.param.copy_(p.reference.to(p.param.dtype))
            yield
        finally:
            for live, value in saved:
                live.copy_(value)


def kept_share(base: float, reference: float, now: float) -> float:
    """The share of the general stage's gain (base − ν) still there now: (base − now) / (base − ν)."""
    return (base - now) / (base - reference)


@dataclass
class GeneralScores:
    base: float
    reference: float | None = None

    def kept(self, now: float) -> float | None:
        """kept_share, where it is defined: there is a ν and the general stage lowered the loss."""
        if self.reference is None or not self.base - self.reference > 0:
            return None
        return kept_share(self.base, self.reference, now)

    def verdict(self, now: float) -> str:
        if self.reference is None:
            return (f"ALoRA: general-text loss base {self.base:.4f} → now {now:.4f} "
                    f"({now - self.base:+.4f}, perplexity {math.exp(self.base):.2f} → {math.exp(now):.2f})")
        line = f"ALoRA: general-text loss base {self.base:.4f} → ν {self.reference:.4f} → now {now:.4f}"
        kept = self.kept(now)
        if kept is not None:
            return line + f"; {100 * kept:.0f}% of the general stage's gain kept"
        return line + f"; the general stage did not lower it, so no share is given ({now - self.base:+.4f} over the base)"


# -- the Trainer callback ----------------------------------------------------------------------------------
class GeneralEvalCallback(TrainerCallback):
    """Scores the sample at the start (base, ν), at every evaluation, and at the last step if no evaluation scores it."""

    def __init__(self, trainer, sequences: Tensor, regularizer=None, output_dir: str | None = None, settings: dict | None = None,
                 start_is_reference: bool = False, budget=None, interval: int | None = None):
        self.trainer, self.sequences, self.regularizer = trainer, sequences, regularizer
        self.budget = budget  # a forgetting_budget.BudgetRun; `sequences` is then its control sample
        self.interval = interval  # score every this many steps too (alora_general_eval_steps)
        self.start_is_reference = start_is_reference  # the stage continues an earlier adapter (lora_model_dir): that is ν
        self.output_dir, self.settings = output_dir, settings or {}
        self.scores: GeneralScores | None = None
        self.evaluations: list[dict] = []
        self.last: float | None = None
        self.last_step: int | None = None
        self.seconds = 0.0  # spent scoring, for its cost beside the training time

    def _score(self, model, sequences: Tensor | None = None) -> float:
        """The mean token loss of `sequences` (default: the sample that is logged), on every rank, all-reduced."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        start = time.perf_counter()
        with self.trainer.compute_loss_context_manager():  # the eval loop's precision (autocast where the Trainer uses it)
            loss = mean_token_loss(model, self.sequences if sequences is None else sequences, self.trainer.args.per_device_eval_batch_size,
                                   rank, world)
        self.seconds += time.perf_counter() - start
        return loss

    def _points(self, model, state, sequences: Tensor | None = None) -> GeneralScores:
        """The base model's loss and ν's (where there is a ν) on `sequences`."""
        with model.disable_adapter():
            base = self._score(model, sequences)
        reference = None
        swappable = swappable_references(self.regularizer)
        if swappable is not None:
            with reference_weights(*swappable):
                reference = self._score(model, sequences)
        elif self.start_is_reference and state.global_step == 0:  # not when resuming: the weights are a checkpoint's
            reference = self._score(model, sequences)
        return GeneralScores(base, reference)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.scores = self._points(model, state)
        if self.budget is not None:
            self.interval = self.interval or default_scoring_interval(self.budget.spec, state.max_steps)
            self.budget.start(self.scores, self._points(model, state, self.budget.report), args, state)
        if state.is_world_process_zero:
            LOG.info("ALoRA: general-text loss on %d sequences%s: base %.4f%s", len(self.sequences),
                     " (the budget's control sample)" if self.budget is not None else "", self.scores.base,
                     f", ν {self.scores.reference:.4f}" if self.scores.reference is not None else "")

    def _log_now(self, model, step: int, control, final: bool = False) -> None:
        if self.last_step == step:  # already scored (eval_strategy epoch evaluates after the last step's own score)
            return
        self.last, self.last_step = self._score(model), step
        self.evaluations.append({"step": step, "loss": self.last})
        logs = {"alora_general_loss": self.last, "alora_general_ppl": math.exp(self.last)}
        if self.budget is not None:
            self.budget.after_score(self.last, step)
            if final and not self.budget.finished:
                self._finish_budget(model)
                if self.budget.alpha is not None:
                    logs["alora_alpha"] = self.budget.alpha
        should_log = control.should_log
        self.trainer.log(logs)
        control.should_log = should_log  # Trainer.log clears it: the step's own log entry must still happen

    def _finish_budget(self, model) -> None:
        self.budget.finish(model, lambda sequences: self._score(model, sequences), self.last, self.regularizer)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._log_now(model, state.global_step, control, final=bool(state.max_steps) and state.global_step >= state.max_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        last = bool(state.max_steps) and state.global_step >= state.max_steps
        if control.should_evaluate:
            return  # on_evaluate scores this step
        # the last step: score it now, while the Trainer still logs and prints
        if last or (self.interval and state.global_step % self.interval == 0):
            self._log_now(model, state.global_step, control, final=last)

    def on_save(self, args, state, control, **kwargs):
        if self.budget is not None and state.is_world_process_zero:
            self.budget.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.last is None or self.last_step != state.global_step:  # stopped early, before any score of its last step
            self._log_now(model, state.global_step, control, final=True)
        elif self.budget is not None and not self.budget.finished:
            self._finish_budget(model)
        if state.is_world_process_zero:
            LOG.info(self.scores.verdict(self.last))
            if self.budget is not None:
                LOG.info(self.budget.verdict())
                note = self.budget.slack_note()
                if note:
                    LOG.warning(note)
            if self.output_dir:
                write_json_atomically(Path(self.output_dir) / GENERAL_EVAL_FILENAME, self.summary())

    def summary(self) -> dict:
        """What the run's general-text loss did (written to <output_dir>/GENERAL_EVAL_FILENAME)."""
        base, reference, now = self.scores.base, self.scores.reference, self.last
        return {**self.settings, "sequences": len(self.sequences), "base": base, "reference": reference,
                "evaluations": self.evaluations, "final": now, "final_ppl": math.exp(now), "rise_over_base": now - base,
                "kept_share": self.scores.kept(now),
                "budget": self.budget.summary() if self.budget is not None else None,
                "seconds": round(self.seconds, 2)}


def swappable_references(regularizer):
    """(LoRA modules, full parameters) whose θ^ν `reference_weights` can swap in; None without a regularizer, or when
    the importance file's reference adapter has another LoRA shape than the live one."""
    if regularizer is None:
        return None
    modules = [m for m in regularizer.references if isinstance(m, RegularizedModule)]
    parameters = [m for m in regularizer.references if not isinstance(m, RegularizedModule)]
    if any(m.A_ref.shape != m.A.shape or m.B_ref.shape != m.B.shape for m in modules):
        LOG.info("ALoRA: the importance file's reference adapter has another LoRA shape; no ν point for the general-text loss")
        return None
    return modules, parameters


def write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def general_eval_callback(cfg, trainer, documents: list[str] | None = None, regularizer=None) -> GeneralEvalCallback:
    """The callback for a run's config; samples the text now, so a text too short fails before training."""
    tokenizer = getattr(trainer, "processing_class", None) or trainer.tokenizer
    documents = documents if documents is not None else read_documents(cfg.alora_general_eval)
    seed = cfg.seed if cfg.seed is not None else 42
    sequences = sample_sequences(documents, tokenizer, int(cfg.sequence_len), int(setting(cfg, "alora_general_eval_samples")), seed)
    settings = {"source": str(cfg.alora_general_eval), "sequence_len": int(cfg.sequence_len), "seed": seed}
    spec = BudgetSpec.from_cfg(cfg)
    budget = None
    if spec is not None:
        if len(sequences) < 2:
            raise GeneralEvalError("alora_general_eval: a forgetting budget needs at least 2 sequences (a control and a report sample); give more text.")
        sequences, report = split_samples(sequences)
        budget = BudgetRun(spec, trainer, report, cfg.output_dir, reference_dir=cfg.lora_model_dir,
                           resume_from_checkpoint=cfg.resume_from_checkpoint)
        settings["samples"] = "control (even rows of the draw); the report sample is the odd rows"
    return GeneralEvalCallback(trainer, sequences, regularizer, output_dir=cfg.output_dir, settings=settings,
                               start_is_reference=bool(cfg.lora_model_dir), budget=budget,
                               interval=cfg.alora_general_eval_steps)
