import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The packaged SmolLM2-135M-Instruct GGUF as a dense Hugging Face directory (`alora prepare-model`, ~1 min)."""
    from alora_bench import model_prep

    return model_prep.prepare_model(tmp_path_factory.mktemp("models") / "smollm2")
