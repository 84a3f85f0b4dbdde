"""`alora fisher` (EWC baseline, docs/METHOD.md §6): the Fisher equals squared per-sample gradients computed
independently, the written file is a valid importance file with a zero reference, and it drives the regularizer."""

import argparse
import contextlib
import io
import json

import pytest
import torch

from axolotl_alora import fisher
from axolotl_alora.importance_file import read_importance_file
from axolotl_alora.lora import adapted_modules, base_fingerprint

from tiny import CORPUS

TEXTS = list(dict.fromkeys(CORPUS))  # 6 distinct texts of different lengths
NAMES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
R, ALPHA, MAX_LENGTH = 4, 8.0, 24  # truncates 4 of the 6 texts (18-29 tokens)


def _model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def _sequences(model_dir, texts, max_length=MAX_LENGTH):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [torch.tensor(tok(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]


def _reference_fisher(model_dir, sequences):
    """Independently: a fresh model with every parameter trainable, the model's own token-mean loss times the
    number of predicted tokens (= −Σ log p), .backward() one sequence at a time, square each W0's .grad, average."""
    model = _model(model_dir)
    model.eval()
    modules = dict(model.named_modules())
    total = {n: torch.zeros_like(modules[n].weight, dtype=torch.float64) for n in NAMES}
    for ids in sequences:
        model.zero_grad()
        loss = model(input_ids=ids[None], labels=ids[None]).loss * (len(ids) - 1)
        loss.backward()
        for n in NAMES:
            total[n] += modules[n].weight.grad.double() ** 2
    return {n: t / len(sequences) for n, t in total.items()}


def _parse(*argv):
    parser = argparse.ArgumentParser()
    fisher.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def fisher_run(tiny_model_dir, tmp_path_factory):
    """The command run once on the tiny model: (output path, data path, stdout)."""
    tmp = tmp_path_factory.mktemp("fisher")
    data = tmp / "general.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS + [" "]) + "\n")  # the blank text is skipped
    out = tmp / "fisher.safetensors"
    args = _parse("--base", str(tiny_model_dir), "--data", str(data), "--lora-r", str(R), "--lora-alpha", str(ALPHA),
                  "--samples", "100", "--max-length", str(MAX_LENGTH), "--out", str(out), "--no-progress")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert fisher.run(args) == 0
    return out, data, stdout.getvalue()


def test_fisher_equals_squared_per_sample_gradients(tiny_model_dir):
    sequences = _sequences(tiny_model_dir, TEXTS[:4])
    assert len({len(s) for s in sequences}) > 1  # sequences of different lengths
    model = _model(tiny_model_dir)
    weights = {n: m.weight for n, m in fisher.target_linears(model, ["q_proj", "v_proj"]).items()}
    assert list(weights) == NAMES

    ours = fisher.empirical_fisher(model, weights, sequences, progress=False)

    expected = _reference_fisher(tiny_model_dir, sequences)
    for n in NAMES:
        assert ours[n].dtype == torch.float32 and ours[n].shape == weights[n].shape
        torch.testing.assert_close(ours[n].double(), expected[n], rtol=1e-4, atol=1e-6 * float(expected[n].max()))
    assert all(p.requires_grad for p in model.parameters())  # the flags are restored afterwards


def test_fisher_is_a_mean_of_squares_not_a_squared_mean(tiny_model_dir):
    sequences = _sequences(tiny_model_dir, TEXTS[:3])
    model = _model(tiny_model_dir)
    weights = {n: m.weight for n, m in fisher.target_linears(model, ["v_proj"]).items()}
    ours = fisher.empirical_fisher(model, weights, sequences, progress=False)
    single = [fisher.empirical_fisher(model, weights, [s], progress=False) for s in sequences]
    for n in weights:  # F over N sequences = mean of the one-sequence F's
        torch.testing.assert_close(ours[n], sum(f[n] for f in single) / len(single), rtol=1e-5, atol=0)
    grads = []  # and it is larger than the square of the mean gradient (Jensen; equal only if all gradients agree)
    for s in sequences:
        model.zero_grad()
        fisher.sequence_log_likelihood(model, s).backward()
        grads.append(weights[NAMES[1]].grad.clone())
    squared_mean = (sum(grads) / len(grads)) ** 2
    assert float(ours[NAMES[1]].sum()) > 1.01 * float(squared_mean.sum())


def test_target_modules_must_match_a_linear_layer(tiny_model_dir):
    model = _model(tiny_model_dir)
    with pytest.raises(ValueError, match=r"no module of the model matches --target-modules \['qkv'\]"):
        fisher.target_linears(model, ["q_proj", "qkv"])
    with pytest.raises(ValueError, match="not a linear layer"):
        fisher.target_linears(model, ["mlp"])


def test_command_writes_a_fisher_importance_file(tiny_model_dir, fisher_run):
    out, _, stdout = fisher_run
    data = read_importance_file(out)
    meta = data.metadata
    assert data.module_names == NAMES
    assert meta["source"] == "fisher" and meta["xi"] is None and meta["clamped_fraction"] == 0.0 and meta["stages"] == 1
    assert meta["steps"] == len(TEXTS) and meta["effective_layers"] == pytest.approx(len(NAMES))
    model = _model(tiny_model_dir)
    modules = dict(model.named_modules())
    for n in NAMES:
        d_out, d_in = modules[n].weight.shape
        assert data.omega[n].shape == (d_out, d_in) and (data.omega[n] >= 0).all() and data.omega[n].sum() > 0
        assert data.lora_A[n].shape == (R, d_in) and data.lora_B[n].shape == (d_out, R)
        assert not data.lora_A[n].any() and not data.lora_B[n].any()
        m = meta["modules"][n]
        assert m["shape"] == [d_out, d_in] and (m["r"], m["alpha"], m["use_rslora"]) == (R, ALPHA, False)
        assert m["scaling"] == ALPHA / R
        assert m["norm"] == pytest.approx(float(data.omega[n].double().norm()))
    torch.testing.assert_close(data.fingerprint, base_fingerprint(model))

    from axolotl_alora.importance_file import base_metadata

    assert set(base_metadata("x", model, [])) <= set(meta)

    # Ω is the Fisher of exactly these texts, as tokenized by the command
    expected = _reference_fisher(tiny_model_dir, _sequences(tiny_model_dir, TEXTS))
    for n in NAMES:
        torch.testing.assert_close(data.omega[n].double(), expected[n], rtol=1e-4, atol=1e-6 * float(expected[n].max()))
    assert meta["tokens"] == sum(len(s) for s in _sequences(tiny_model_dir, TEXTS))
    assert "cost: wall" in stdout and "peak memory cpu_max_rss_mib" in stdout and "MiB" in stdout
    assert "alora_layer_weighting: none" in stdout


def test_bfloat16_storage(tiny_model_dir, fisher_run, tmp_path):
    out, data_path, _ = fisher_run
    args = _parse("--base", str(tiny_model_dir), "--data", str(data_path), "--lora-r", str(R), "--lora-alpha", str(ALPHA),
                  "--samples", "100", "--max-length", str(MAX_LENGTH), "--out", str(tmp_path / "bf16.safetensors"),
                  "--omega-dtype", "bfloat16", "--no-progress")
    with contextlib.redirect_stdout(io.StringIO()):
        fisher.run(args)
    bf16, fp32 = read_importance_file(tmp_path / "bf16.safetensors"), read_importance_file(out)
    assert bf16.metadata["omega_dtype"] == "bfloat16"
    for n in NAMES:
        torch.testing.assert_close(bf16.omega[n], fp32.omega[n], rtol=1e-2, atol=0)


def test_file_drives_the_regularizer_as_ewc(tiny_model_dir, fisher_run):
    from axolotl.utils.dict import DictDefault
    from peft import LoraConfig, get_peft_model

    from axolotl_alora.plugin import check_base_model, check_modules_match
    from axolotl_alora.regularizer import build_regularizer

    out, _, _ = fisher_run
    data = read_importance_file(out)
    torch.manual_seed(0)
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(_model(tiny_model_dir), config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # peft starts B at 0
    modules = adapted_modules(model)
    cfg = DictDefault(alora_importance_path=str(out), alora_phi=0.5, alora_layer_weighting="none", alora_softmax_temperature=1.0,
                      alora_importance_normalization="none", base_model=str(tiny_model_dir))
    check_modules_match(data, modules, out)
    check_base_model(data, base_fingerprint(model), cfg)
    reg = build_regularizer(data, modules, [], cfg.alora_layer_weighting, cfg.alora_softmax_temperature, cfg.alora_importance_normalization)
    value = reg()

    expected = 0.0  # EWC: Σ_l Σ_i F_i (θ_i − W0_i)² with θ − W0 = s·B·A, every layer weight 1
    for m in modules:
        assert m.scaling == ALPHA / R
        delta = m.scaling * m.B.detach().double() @ m.A.detach().double()
        expected += float((data.omega[m.name].double() * delta**2).sum())
    assert expected > 0
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)


def test_missing_data_file_is_named_before_loading_the_model(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nope" / "general_train.jsonl"
    argv = ["--base", str(tmp_path / "no-model"), "--data", str(missing)]
    with pytest.raises(FileNotFoundError, match="general_train.jsonl does not exist") as err:
        fisher.run(_parse(*argv))
    assert str(missing) in str(err.value) and "alora prepare-data" in str(err.value)

    from axolotl_alora import cli  # through the console script: one line naming the file, exit status 2

    monkeypatch.setitem(cli.SUBCOMMANDS, "fisher", ("axolotl_alora.fisher", "EWC baseline: Fisher importance file"))
    assert cli.main(["fisher", *argv]) == 2
    assert f"alora fisher: error: --data {missing} does not exist" in capsys.readouterr().err


def test_bad_data_lines_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"d.jsonl, line 3: expected an object with a string \"text\""):
        fisher.read_texts(path)
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        fisher.read_texts(path)


def test_sample_choice_is_seeded():
    a = fisher.select_samples(1000, 20, seed=1)
    assert a == fisher.select_samples(1000, 20, seed=1) and a == sorted(set(a)) and len(a) == 20
    assert a != fisher.select_samples(1000, 20, seed=2)
    assert fisher.select_samples(5, 20, seed=1) == [0, 1, 2, 3, 4]


def test_bad_options_are_refused(tmp_path):
    for flag, value in (("--samples", "0"), ("--max-length", "1"), ("--lora-r", "0")):
        with pytest.raises(ValueError, match=f"{flag} must be at least"):
            fisher.run(_parse("--base", "x", "--data", "y", flag, value))
