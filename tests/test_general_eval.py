"""The general-text loss (axolotl_alora/general_eval.py) against independent computations on a tiny model."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_alora.general_eval import (
    GeneralEvalCallback,
    GeneralEvalError,
    GeneralScores,
    kept_share,
    mean_token_loss,
    read_documents,
    reference_weights,
    sample_sequences,
)

from tiny import build_tiny_llama, write_text_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("general_eval")
    model_dir = build_tiny_llama(root / "model")
    return model_dir, AutoTokenizer.from_pretrained(str(model_dir)), write_text_jsonl(root / "general.jsonl", 40, seed=3, tokenizer_dir=model_dir)


def test_documents_from_txt_jsonl_and_a_dataset_entry(tmp_path, tiny):
    _, _, jsonl = tiny
    rows = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    assert read_documents(str(jsonl)) == rows
    assert read_documents({"path": str(jsonl), "ds_type": "json"}) == rows  # Axolotl's own loader
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"body": r}) + "\n" for r in rows[:3]))
    assert read_documents({"path": str(renamed), "ds_type": "json", "field": "body"}) == rows[:3]
    txt = tmp_path / "general.txt"
    txt.write_text("one long document\nwith two lines")
    assert read_documents(str(txt)) == ["one long document\nwith two lines"]


@pytest.mark.parametrize("case", ["missing", "empty", "blank_rows", "suffix", "no_column"])
def test_bad_text_is_a_clear_error_naming_the_key(tmp_path, case):
    path = tmp_path / "x.jsonl"
    if case == "empty":
        path.write_text("")
        path = tmp_path / "x.txt"
        path.write_text("  \n")
    elif case == "blank_rows":
        path.write_text(json.dumps({"text": " "}) + "\n")
    elif case == "suffix":
        path = tmp_path / "x.csv"
        path.write_text("text\nhello\n")
    elif case == "no_column":
        path.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(GeneralEvalError, match="alora_general_eval"):
        read_documents(str(path))


def test_sequences_are_windows_of_the_joined_text_chosen_by_the_seed(tiny):
    _, tok, jsonl = tiny
    docs = read_documents(str(jsonl))
    ids = [i for d in docs for i in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    windows = [ids[k: k + 16] for k in range(0, len(ids) - 15, 16)]
    a = sample_sequences(docs, tok, 16, 8, seed=1)
    assert a.shape == (8, 16)
    rows = [r.tolist() for r in a]
    assert all(r in windows for r in rows) and len({tuple(r) for r in rows}) == 8
    assert torch.equal(a, sample_sequences(docs, tok, 16, 8, seed=1))
    assert not torch.equal(a, sample_sequences(docs, tok, 16, 8, seed=2))
    everything = sample_sequences(docs, tok, 16, 10_000, seed=1)  # fewer windows than asked: all of them
    assert sorted(r.tolist() for r in everything) == sorted(windows)
    with pytest.raises(GeneralEvalError, match="alora_general_eval.*sequence_len=100000"):
        sample_sequences(docs, tok, 100_000, 8, seed=1)


def test_mean_token_loss_is_the_mean_next_token_cross_entropy(tiny):
    model_dir, tok, jsonl = tiny
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    seqs = sample_sequences(read_documents(str(jsonl)), tok, 16, 6, seed=0)
    # transformers' own shifted loss, one sequence at a time (every sequence has 15 predicted tokens)
    with torch.no_grad():
        independent = sum(float(model(input_ids=s[None], labels=s[None]).loss) for s in seqs) / len(seqs)
    model.train()
    for batch_size in (1, 4, 6):
        assert mean_token_loss(model, seqs, batch_size) == pytest.approx(independent, rel=1e-6)
    assert model.training, "the model's mode is restored"


def test_reference_weights_swap_in_and_restore():
    A, B = torch.nn.Parameter(torch.randn(2, 5)), torch.nn.Parameter(torch.randn(4, 2))
    p = torch.nn.Parameter(torch.randn(3))

    class M:
        pass

    m, q = M(), M()
    m.A, m.B, m.A_ref, m.B_ref = A, B, torch.zeros(2, 5), torch.ones(4, 2)
    q.param, q.reference = p, torch.full((3,), 7.0)
    before = [t.detach().clone() for t in (A, B, p)]
    with reference_weights([m], [q]):
        assert torch.equal(A, m.A_ref) and torch.equal(B, m.B_ref) and torch.equal(p, q.reference)
    assert all(torch.equal(t, b) for t, b in zip((A, B, p), before))


def test_kept_share_and_the_closing_line():
    # the general stage lowered the loss from 3.0 to 2.0; the domain stage is at 2.25: 75% of that gain kept
    assert kept_share(3.0, 2.0, 2.25) == pytest.approx(0.75)
    assert kept_share(3.0, 2.0, 2.0) == pytest.approx(1.0) and kept_share(3.0, 2.0, 3.5) == pytest.approx(-0.5)
    line = GeneralScores(3.0, 2.0).verdict(2.25)
    assert "base 3.0000 → ν 2.0000 → now 2.2500" in line and "75% of the general stage's gain kept" in line
    rise = GeneralScores(3.0).verdict(3.1)
    assert "+0.1000" in rise and f"{math.exp(3.0):.2f} → {math.exp(3.1):.2f}" in rise
    assert "no share" in GeneralScores(3.0, 3.2).verdict(3.3)


def _ranked_loss(rank, world, rendezvous, model_dir, seqs, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        torch.save(torch.tensor(mean_token_loss(model, seqs, 4, rank, world)), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_fewer_sequences_than_ranks_a_rank_with_none_still_joins(tmp_path, tiny):
    """DDP with one sequence and two ranks: rank 1 scores nothing (it fed an empty batch to the model before), and
    both ranks get the loss of that one sequence."""
    import torch.multiprocessing as mp

    model_dir, tok, jsonl = tiny
    seqs = sample_sequences(read_documents(str(jsonl)), tok, 16, 1, seed=0)
    expected = mean_token_loss(AutoModelForCausalLM.from_pretrained(str(model_dir)), seqs, 4)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ranked_loss, args=(k, 2, str(tmp_path / "rdv"), model_dir, seqs, str(tmp_path / "loss"))) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for k in range(2):
        assert float(torch.load(f"{tmp_path / 'loss'}.{k}", weights_only=True)) == pytest.approx(expected, rel=1e-6)


def test_the_last_step_is_scored_once_when_an_epoch_evaluation_follows(tiny):
    """eval_strategy epoch: the Trainer evaluates after the last step's on_step_end, which has scored it already."""
    import contextlib
    from types import SimpleNamespace

    model_dir, tok, jsonl = tiny
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    logged = []
    trainer = SimpleNamespace(compute_loss_context_manager=contextlib.nullcontext, args=SimpleNamespace(per_device_eval_batch_size=4),
                              log=logged.append)
    callback = GeneralEvalCallback(trainer, sample_sequences(read_documents(str(jsonl)), tok, 16, 4, seed=0))
    state, control = SimpleNamespace(global_step=3, max_steps=3), SimpleNamespace(should_evaluate=False, should_log=False)
    callback.on_step_end(None, state, control, model=model)
    callback.on_evaluate(None, state, control, model=model)
    assert [e["step"] for e in callback.evaluations] == [3] and len(logged) == 1
    state.global_step = 4  # a later evaluation is scored
    callback.on_evaluate(None, state, control, model=model)
    assert [e["step"] for e in callback.evaluations] == [3, 4]
