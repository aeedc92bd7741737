"""push_to_hub against a local stand-in of the hub API (tests/hub_standin.py: an http.server answering the endpoints
HfApi.create_repo and upload_folder call, with HF_ENDPOINT pointed at it), and the model card."""

import re

import pytest
from hub_standin import USER, HubStandIn
from huggingface_hub import ModelCard

from diffalign.errors import UserError
from diffalign.toy.render_pairs import write_pairs_parquet

TOKEN = "hf_standinSECRETtoken0123456789"


@pytest.fixture(scope="module")
def style_pairs(tmp_path_factory):
    return write_pairs_parquet(tmp_path_factory.mktemp("pairs") / "style.parquet", 12, kind="style", seed=3)


def _cfg(model, data, out, **kw):
    from diffalign.training.config import TrainConfig

    base = dict(method="mapo", pretrained_model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out),
                resolution=32, train_batch_size=4, max_train_steps=3, learning_rate=1e-3, rank=4, seed=0,
                report_to="none", checkpointing_steps=1000)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest sets offline for the rest
    with HubStandIn() as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield standin


def _absolute_paths(text: str) -> list[str]:
    return re.findall(r"(?<![\w.:/~])(?:/|~/)[\w.-]+/[\w./-]*", text)


@pytest.mark.slow
def test_push_to_hub_uploads_weights_card_grid_and_checkpoint_weights(tiny_pipelines, style_pairs, tmp_path, hub,
                                                                       capsys):
    from diffalign.training.loop import train

    out = tmp_path / "run"
    cfg = _cfg(tiny_pipelines["sd"], style_pairs, out, push_to_hub=True, hub_model_id="toy-mapo",
               hub_push_checkpoints=True, checkpointing_steps=2, validation_prompts=["a red circle"],
               validation_steps=3, validation_num_inference_steps=2)
    train(cfg)
    repo = f"{USER}/toy-mapo"
    assert hub.repos == [repo]
    final = hub.commits[-1]
    assert final["repo"] == repo
    assert set(final["files"]) == {"pytorch_lora_weights.safetensors", "README.md", "validation/step-000003.png"}
    assert final["files"]["pytorch_lora_weights.safetensors"] == (out / "pytorch_lora_weights.safetensors").read_bytes()
    checkpoint_files = {path for c in hub.commits[:-1] for path in c["files"]}
    # the weights of each checkpoint (2, and the last one, 3); never the resume state (optimizer, ...)
    assert checkpoint_files == {"checkpoint-2/pytorch_lora_weights.safetensors",
                                "checkpoint-3/pytorch_lora_weights.safetensors"}
    assert hub.auth and set(hub.auth) == {f"Bearer {TOKEN}"}  # every request carried the token

    card = (out / "README.md").read_text()
    assert f'pipe.load_lora_weights("{repo}")' in card and "validation/step-000003.png" in card
    assert not _absolute_paths(card), _absolute_paths(card)
    assert f"hub_model_id: {repo}" in (out / "config.yaml").read_text()

    captured = capsys.readouterr()
    assert TOKEN not in captured.out and TOKEN not in captured.err
    assert f"push_to_hub: the weights go to the hub repo {repo}" in captured.out
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_push_to_hub_without_a_token_stops_before_training(tiny_pipelines, style_pairs, tmp_path, hub, monkeypatch):
    import huggingface_hub

    from diffalign.training.loop import train

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no stored login either
    out = tmp_path / "run"
    with pytest.raises(UserError, match="needs a hub token.*HF_TOKEN"):
        train(_cfg(tiny_pipelines["sd"], style_pairs, out, push_to_hub=True))
    assert hub.requests == [] and not (out / "pytorch_lora_weights.safetensors").exists()


def test_hub_keys_are_checked_and_the_token_is_never_a_config_key(tmp_path):
    from diffalign.config_loader import load_config
    from diffalign.training.config import TrainConfig

    common = ["--method=mapo", "--pretrained_model_name_or_path=toy", "--dataset_name=x.parquet",
              f"--output_dir={tmp_path / 'run'}"]
    with pytest.raises(UserError) as err:
        load_config(TrainConfig, None, [*common, f"--hub_token={TOKEN}"]).validate()
    assert "HF_TOKEN" in str(err.value) and TOKEN not in str(err.value)
    with pytest.raises(UserError, match="needs push_to_hub"):
        load_config(TrainConfig, None, [*common, "--hub_push_checkpoints=true"]).validate()
    with pytest.raises(UserError, match="not a hub repo id"):
        load_config(TrainConfig, None, [*common, "--push_to_hub=true", "--hub_model_id=a/b/c"]).validate()
    cfg = load_config(TrainConfig, None, [*common, "--push_to_hub=true"]).validate()
    from diffalign.training.hub_keys import default_hub_model_id

    assert default_hub_model_id(cfg) == "run"


@pytest.mark.parametrize("base", ["toy", "stabilityai/stable-diffusion-xl-base-1.0", "local"])
def test_model_card_parses_names_the_real_base_and_no_absolute_path(tmp_path, style_pairs, base):
    from diffalign.training.model_card import write_model_card

    out = tmp_path / "run"
    out.mkdir()
    local = tmp_path / "my-sd-pipeline"
    local.mkdir()
    model = str(local) if base == "local" else base
    cfg = _cfg(model, style_pairs, out, proportion_empty_prompts=0.1)
    summary = f"parquet '{style_pairs}': 12 rows -> 12 pairs"
    card_path = write_model_card(cfg, out, resolution=32, family="sd", data_summary=summary)
    card = ModelCard.load(card_path)
    meta = card.data.to_dict()
    assert meta["library_name"] == "diffusers"
    assert {"diffalign", "lora", "mapo", "text-to-image"} <= set(meta["tags"])
    assert meta.get("pipeline_tag") == "text-to-image"
    text = card_path.read_text()
    assert text.startswith("---\nlibrary_name: diffusers")
    assert not _absolute_paths(text), _absolute_paths(text)
    assert str(tmp_path) not in text and "style.parquet" in text and "12 rows -> 12 pairs" in text
    assert 'pipe.load_lora_weights(".")' in text  # not pushed: the folder holding the card
    if base == "toy":
        assert "base_model" not in meta and "shipped toy model" in text and "toy_model_path()" in text
    elif base == "local":
        assert "base_model" not in meta and "`my-sd-pipeline` (not a hub model)" in text
    else:
        assert meta["base_model"] == base and meta["base_model_relation"] == "adapter"
        assert f'DiffusionPipeline.from_pretrained("{base}")' in text
    assert "| method settings |" in text and "caption dropout | a share 0.1" in text


@pytest.mark.parametrize("family, folder, cls", [
    ("sd", "unet", "UNet2DConditionModel"), ("sdxl", "unet", "UNet2DConditionModel"),
    ("sd3", "transformer", "SD3Transformer2DModel"), ("flux", "transformer", "FluxTransformer2DModel"),
    ("cogvideox", "transformer", "CogVideoXTransformer3DModel")])
def test_full_finetune_cards_load_the_family_denoiser_from_its_folder(tmp_path, style_pairs, family, folder, cls):
    """A full fine-tune writes the network where a pipeline keeps it (unet/ or transformer/): the card's snippet
    loads it from there with the family's class, and the hub upload includes that folder."""
    from fnmatch import fnmatch

    from diffalign.training.hub import WEIGHT_PATTERNS
    from diffalign.training.model_card import write_model_card, write_selfnpo_model_card

    out = tmp_path / "run"
    out.mkdir()
    cfg = _cfg("toy", style_pairs, out, train_mode="full")
    text = write_model_card(cfg, out, resolution=32, family=family, data_summary="12 pairs").read_text()
    assert f"from diffusers import DiffusionPipeline, {cls}\n" in text
    assert f'pipe.{folder} = {cls}.from_pretrained(".", subfolder="{folder}")' in text
    assert f"| trained | full {'UNet' if folder == 'unet' else 'transformer'} |" in text
    cfg = _cfg("toy", style_pairs, out, method="selfnpo", train_mode="full", learning_rate=1e-4, use_ema=False)
    text = write_selfnpo_model_card(cfg, out, resolution=32, family=family, data_summary="1 prompt").read_text()
    assert f'neg.{folder} = {cls}.from_pretrained(".", subfolder="{folder}")' in text
    assert f"eps_neg from neg.{folder} with" in text and "UNet2DConditionModel" not in text.replace(cls, "")
    for sub in (folder, f"{folder}_raw"):
        assert any(fnmatch(f"{sub}/diffusion_pytorch_model.safetensors", p) for p in WEIGHT_PATTERNS)


def test_selfnpo_card_names_the_negative_model_and_no_absolute_path(tmp_path):
    from diffalign.training.model_card import write_selfnpo_model_card

    out = tmp_path / "neg"
    out.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    cfg = _cfg("toy", prompts, out, method="selfnpo", train_mode="full", learning_rate=1e-4, use_ema=False)
    path = write_selfnpo_model_card(cfg, out, resolution=32, family="sd", data_summary=f"prompts {prompts}: 1 prompt")
    meta = ModelCard.load(path).data.to_dict()
    assert {"diffalign", "selfnpo", "negative-model", "full-finetune", "text-to-image"} <= set(meta["tags"])
    text = path.read_text()
    assert "NEGATIVE model" in text and 'UNet2DConditionModel.from_pretrained(".", subfolder="unet")' in text
    assert not _absolute_paths(text) and str(tmp_path) not in text
