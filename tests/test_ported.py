"""Keys users bring from the diffusers training scripts, the tracker checks and the tracker project name."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.config_loader import load_config
from diffalign.errors import UserError
from diffalign.toy.render_pairs import write_pairs_parquet
from diffalign.training.config import TrainConfig


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs_parquet(tmp_path_factory.mktemp("pairs") / "style.parquet", 8, kind="style", seed=3)


def _yaml(tmp_path, model, data, method="dpo", extra=""):
    config = tmp_path / "c.yaml"
    config.write_text(f"method: {method}\npretrained_model_name_or_path: {model}\nresolution: 32\ndataset_name: {data}\n"
                      f"train_batch_size: 2\nmax_train_steps: 2\nlearning_rate: 1.0e-3\nrank: 4\nreport_to: none\n"
                      f"checkpointing_steps: 1000\n{extra}")
    return config


@pytest.mark.slow
def test_beta_dpo_trains_exactly_as_twice_the_beta(tiny_pipelines, pairs, tmp_path, capsys):
    model = tiny_pipelines["sd"]
    assert main(["train", str(_yaml(tmp_path, model, pairs)), f"--output_dir={tmp_path / 'beta'}", "--beta=5000"]) == 0
    assert main(["train", str(_yaml(tmp_path, model, pairs)), f"--output_dir={tmp_path / 'ported'}",
                 "--beta_dpo=2500"]) == 0
    assert "beta_dpo 2500 (the diffusers script's convention, no 0.5 in the logit) trains as beta 5000" in \
        capsys.readouterr().out
    a = load_file(tmp_path / "beta" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "ported" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recorded = (tmp_path / "ported" / "config.yaml").read_text()
    assert "beta: 5000.0" in recorded and "beta_dpo: 2500.0" in recorded


def test_beta_dpo_conflicts_and_other_methods_are_refused(tmp_path):
    base = dict(method="dpo", pretrained_model_name_or_path="m", dataset_name="d", output_dir=str(tmp_path))
    with pytest.raises(UserError, match="beta=4000.0 and beta_dpo=2500.0 disagree"):
        TrainConfig(**base, beta=4000.0, beta_dpo=2500.0).validate()
    assert TrainConfig(**base, beta=5000.0, beta_dpo=2500.0).validate().beta == 5000.0
    with pytest.raises(UserError, match="beta_dpo=2500.0 only applies to method=dpo"):
        TrainConfig(**{**base, "method": "mapo"}, beta_dpo=2500.0).validate()


@pytest.mark.parametrize("given,expected", [
    ("--no_hflip=true", {"random_flip": False}), ("--no_hflip=false", {"random_flip": True}),
    ("--random_crop=true", {"center_crop": False}), ("--random_crop=false", {"center_crop": True}),
    ("--allow_tf32=true", {"allow_tf32": True}),
])
def test_diffusers_script_keys_mean_what_they_mean_there(given, expected):
    cfg = load_config(TrainConfig, None, [given])
    assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("key,instead", [("num_train_epochs", "max_train_steps"), ("validation_epochs", "validation_steps"),
                                         ("snr_gamma", "remove it"), ("noise_offset", "remove it"),
                                         ("prediction_type", "scheduler config")])
def test_diffusers_script_keys_without_an_equivalent_say_what_to_use(key, instead, tmp_path):
    with pytest.raises(UserError, match=f"{key}.*diffusers-script key.*{instead}"):
        load_config(TrainConfig, None, [f"--{key}=1"])
    (tmp_path / "c.yaml").write_text(f"{key}: 1\n")  # the same from a YAML file
    with pytest.raises(UserError, match=f"{key}' in '.*c.yaml' is a diffusers-script key"):
        load_config(TrainConfig, tmp_path / "c.yaml")
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):  # other unknown keys: as before
        load_config(TrainConfig, None, ["--learnng_rate=1"])


def test_missing_tracker_package_stops_before_training_with_the_install_line(tiny_pipelines, pairs, tmp_path,
                                                                             monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = _yaml(tmp_path, tiny_pipelines["sd"], pairs, extra="beta: 5000\n")
    assert main(["train", str(config), f"--output_dir={tmp_path / 'w'}", "--report_to=wandb"]) == 2
    err = capsys.readouterr().err
    assert "report_to: wandb needs the wandb package" in err and "pip install wandb" in err
    assert not (tmp_path / "w" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow
def test_tracker_project_name_names_the_tensorboard_run(tiny_pipelines, pairs, tmp_path):
    config = _yaml(tmp_path, tiny_pipelines["sd"], pairs, extra="beta: 5000\n")
    assert main(["train", str(config), f"--output_dir={tmp_path / 't'}", "--report_to=tensorboard",
                 "--tracker_project_name=my-dpo", "--max_train_steps=1"]) == 0
    assert any((tmp_path / "t" / "logs" / "my-dpo").rglob("events.out.tfevents*"))
    assert json.loads((tmp_path / "t" / "train_report.json").read_text())["steps"] == 1
