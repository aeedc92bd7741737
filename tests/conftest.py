import os

# Tests never reach a model hub: everything is built locally or shipped in the repo.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """Paths of tiny random-init pipelines saved to disk: {'sd', 'sd-v', 'sdxl'}."""
    from diffalign.toy.builders import save_tiny_pipelines

    return save_tiny_pipelines(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def seen_run(monkeypatch):
    """A dict that gets the training run's model family ("family") when `train` starts the run."""
    from diffalign.training import setup

    seen = {}
    real_start = setup.start_run

    def spy(cfg):
        run = real_start(cfg)
        seen["family"] = run.family
        return run

    monkeypatch.setattr("diffalign.training.loop.start_run", spy)  # the one loop of every method
    return seen
