"""Model family adapters against stock diffusers: same embeddings, same noise maths, LoRAs that really load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffalign.errors import UserError
from diffalign.models import (
    LORA_WEIGHT_NAME,
    Conditioning,
    SDFamily,
    SDXLFamily,
    detect_family,
    family_class,
    load_family,
    load_lora_into_pipeline,
    load_pipeline,
)

PROMPTS = ["a red circle", ""]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core box they make the tests 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fams(tiny_pipelines):
    """Read-only adapters shared by the tests that do not change weights."""
    return {name: load_family(path) for name, path in tiny_pipelines.items()}


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_pipelines):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_pipelines["sdxl"])


def _noise_inputs(fam, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 16, 16, generator=g)
    noise = torch.randn(n, 4, 16, 16, generator=g)
    t = torch.tensor([0, 500, fam.num_train_timesteps - 1][:n])
    return x0, noise, t


# ---------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize(
    "name, cls, prediction",
    [("sd", SDFamily, "epsilon"), ("sd-v", SDFamily, "v_prediction"), ("sdxl", SDXLFamily, "epsilon")],
)
@pytest.mark.slow
def test_load_family_detects_family(fams, tiny_pipelines, name, cls, prediction):
    fam = fams[name]
    assert type(fam) is cls
    assert fam.prediction_type == prediction
    assert fam.num_train_timesteps == 1000 and fam.alphas_cumprod.shape == (1000,)
    assert detect_family(tiny_pipelines[name]) == cls.name
    # only the UNet may ever be trained
    assert not any(p.requires_grad for m in (fam.vae, *fam.text_encoders) for p in m.parameters())


def test_load_errors_are_one_line_user_errors(tiny_pipelines, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="does not exist") as info:
        load_family(missing)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "unet.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        load_family(plain)
    with pytest.raises(UserError, match="is a file"):
        load_family(plain / "unet.safetensors")
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        load_pipeline(plain)

    # a hub id while offline (conftest sets HF_HUB_OFFLINE=1): no network, a clear message
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        load_family("nobody-here/no-such-model")

    with pytest.raises(UserError, match="unknown model family 'pixart'.*sd, sdxl, cogvideox, sd3, flux"):
        load_family(tiny_pipelines["sd"], family="pixart")
    assert family_class("sd3").name == "sd3" and family_class("flux").name == "flux"  # issue 20 (test_flow.py)
    assert family_class("cogvideox").name == "cogvideox"  # implemented in issue 10 (tests/test_cogvideox.py)
    # forcing the wrong family names the missing component instead of failing deep in diffusers
    with pytest.raises(UserError, match="text_encoder_2"):
        load_family(tiny_pipelines["sd"], family="sdxl")

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="FluxPipeline"):
        load_family(odd)


@pytest.mark.slow
def test_load_pipeline_and_separate_vae(tiny_pipelines):
    from diffusers import StableDiffusionXLPipeline

    pipe = load_pipeline(tiny_pipelines["sdxl"], vae_path=tiny_pipelines["sd"] / "vae")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    sd_vae = load_family(tiny_pipelines["sd"]).vae
    # the given VAE replaced the pipeline's own (the tiny SD and SDXL VAEs have different random weights)
    for (name, a), b in zip(pipe.vae.state_dict().items(), sd_vae.state_dict().values()):
        assert torch.equal(a, b), name
    fam = load_family(tiny_pipelines["sdxl"], pretrained_vae_model_name_or_path=tiny_pipelines["sd"] / "vae")
    assert torch.equal(fam.vae.encoder.conv_in.weight, sd_vae.encoder.conv_in.weight)


# ---------------------------------------------------------------------------------------------------- prompts
def test_sd_encode_prompts_matches_pipeline(fams, tiny_pipelines):
    from diffusers import StableDiffusionPipeline

    cond = fams["sd"].encode_prompts(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 16, 32)
    assert cond.text_embeds is None and cond.time_ids is None
    assert fams["sd"].time_ids([(64, 64)]) is None
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd"])
    expected, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.prompt_embeds, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])


def test_sdxl_encode_prompts_matches_pipeline(fams, sdxl_pipe):
    fam = fams["sdxl"]
    cond = fam.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 16, 64)  # both encoders' 32 features, concatenated
    assert cond.text_embeds.shape == (2, 32)
    assert cond.time_ids.shape == (2, 6)
    embeds, neg, pooled, neg_pooled = sdxl_pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.text_embeds, pooled, rtol=0, atol=1e-6)
    # the pipeline's unconditional branch (no negative prompt) is zeros for SDXL: ours must be too
    uncond = fam.unconditional(2)
    assert torch.equal(uncond.prompt_embeds, neg) and torch.equal(uncond.text_embeds, neg_pooled)
    assert not torch.equal(fam.encode_prompts([""]).prompt_embeds, torch.zeros_like(uncond.prompt_embeds[:1]))


def test_sdxl_time_ids(fams, sdxl_pipe):
    fam = fams["sdxl"]
    ids = fam.time_ids([(40, 50), (64, 32)], [(3, 4), (0, 0)], (32, 32))
    assert ids.tolist() == [[40, 50, 3, 4, 32, 32], [64, 32, 0, 0, 32, 32]]
    expected = sdxl_pipe._get_add_time_ids(
        (40, 50), (3, 4), (32, 32), dtype=torch.float32, text_encoder_projection_dim=32
    )
    assert torch.equal(ids[:1], expected)
    cond = fam.encode_prompts(["a", "b"], original_sizes=[(40, 50), (64, 32)], crop_top_lefts=[(3, 4), (0, 0)])
    assert torch.equal(cond.time_ids, ids)
    # default: what the pipeline samples with (default resolution, no crop)
    assert fam.encode_prompts(["a"]).time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]


def test_conditioning_batch_helpers(fams):
    cond = fams["sdxl"].encode_prompts(PROMPTS)
    both = Conditioning.cat([cond, cond[1]])
    assert len(both) == 3 and torch.equal(both.prompt_embeds[2], cond.prompt_embeds[1])
    assert torch.equal(cond.repeat(2).time_ids[2:], cond.time_ids)
    with pytest.raises(ValueError):
        Conditioning.cat([cond, cond.replace(text_embeds=None)])


# ----------------------------------------------------------------------------------------------------- images
def test_encode_decode_images(fams, tiny_pipelines):
    fam = fams["sd"]
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = fam.encode_images(images, chunk_size=8)
    assert latents.shape == (5, 4, 16, 16)
    torch.testing.assert_close(fam.encode_images(images, chunk_size=2), latents, rtol=0, atol=1e-5)
    decoded = fam.decode_latents(latents)
    assert decoded.shape == (5, 3, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1

    a = fam.encode_images(images, generator=torch.Generator().manual_seed(1))
    b = fam.encode_images(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, latents)

    # scaling and shift factors from the VAE config are applied (the tiny VAE has scale 1, so change it)
    other = load_family(tiny_pipelines["sd"])
    other.vae.register_to_config(scaling_factor=0.5, shift_factor=0.1)
    mean = other.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(other.encode_images(images), (mean - 0.1) * 0.5, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        other.decode_latents(latents), other.vae.decode(latents / 0.5 + 0.1).sample.clamp(-1, 1), rtol=0, atol=1e-6
    )


# ------------------------------------------------------------------------------------------------ noise maths
@pytest.mark.parametrize("name", ["sd", "sd-v"])
def test_noise_target_and_pred_x0(fams, tiny_pipelines, name):
    from diffusers import DDPMScheduler

    fam = fams[name]
    x0, noise, t = _noise_inputs(fam)
    stock = DDPMScheduler.from_pretrained(tiny_pipelines[name], subfolder="scheduler")
    x_t = fam.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, stock.add_noise(x0, noise, t), rtol=0, atol=1e-6)

    a = fam.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - fam.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    target = fam.target(x0, noise, t)
    if name == "sd":
        assert torch.equal(target, noise)
    else:
        torch.testing.assert_close(target, a * noise - s * x0, rtol=0, atol=1e-6)
        torch.testing.assert_close(target, stock.get_velocity(x0, noise, t), rtol=0, atol=1e-6)
        assert not torch.allclose(target, noise, atol=1e-2)
    # the true target gives back x0 (to float32 precision; at t = T-1 eps dominates x_t)
    torch.testing.assert_close(fam.pred_x0(x_t, t, target), x0, rtol=0, atol=1e-4)
    # a scalar t broadcasts over the batch
    torch.testing.assert_close(fam.add_noise(x0, noise, 500), stock.add_noise(x0, noise, torch.tensor([500] * 3)))


def test_predict_matches_unet(fams, sdxl_pipe, tiny_pipelines):
    from diffusers import StableDiffusionPipeline

    fam = fams["sd"]
    x0, noise, t = _noise_inputs(fam, n=2)
    x_t = fam.add_noise(x0, noise, t)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd"])
    embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    with torch.no_grad():
        ours = fam.predict(x_t, t, fam.encode_prompts(PROMPTS))
        theirs = pipe.unet(x_t, t, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    fam = fams["sdxl"]
    embeds, _, pooled, _ = sdxl_pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    ids = sdxl_pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, 32).repeat(2, 1)
    with torch.no_grad():
        ours = fam.predict(x_t, t, fam.encode_prompts(PROMPTS))
        theirs = sdxl_pipe.unet(
            x_t, t, encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
        ).sample
        other_size = fam.predict(x_t, t, fam.encode_prompts(PROMPTS, original_sizes=[(64, 64)] * 2))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, other_size)  # the time ids reach the UNet


# ------------------------------------------------------------------------------------------------------- LoRA
def _generate(pipe, prompt="a red circle"):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.parametrize("name", ["sd", "sdxl"])
@pytest.mark.slow
def test_lora_round_trip_through_stock_pipeline(tiny_pipelines, tmp_path, name):
    path = tiny_pipelines[name]
    fam = load_family(path)
    x0, noise, t = _noise_inputs(fam, n=2)
    x_t, cond = fam.add_noise(x0, noise, t), fam.encode_prompts(PROMPTS)
    with torch.no_grad():
        base_out = fam.predict(x_t, t, cond)

    fam.add_lora(rank=4, alpha=8)  # alpha != rank: the scale must survive saving
    named = {n: p for n, p in fam.unet.named_parameters() if p.requires_grad}
    assert named and all("lora_" in n for n in named)
    assert len(fam.trainable_parameters()) == len(named)
    assert sum("lora_" not in n for n, _ in fam.unet.named_parameters()) > 0  # the base exists and is frozen
    with torch.no_grad():
        torch.testing.assert_close(fam.predict(x_t, t, cond), base_out)  # B = 0 at init: starts at the base
        g = torch.Generator().manual_seed(1)
        for p in named.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        lora_out = fam.predict(x_t, t, cond)
        with fam.lora_disabled():
            torch.testing.assert_close(fam.predict(x_t, t, cond), base_out)
    assert not torch.allclose(lora_out, base_out, atol=1e-3)

    out_dir = tmp_path / "lora"
    file = fam.save_lora(out_dir)
    assert file == out_dir / LORA_WEIGHT_NAME and file.is_file()
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") for k in keys)

    in_memory = _generate(fam.make_pipeline())
    stock = type(fam.make_pipeline()).from_pretrained(path)
    base = _generate(stock)
    stock.load_lora_weights(out_dir)
    loaded = _generate(stock)
    np.testing.assert_allclose(loaded, in_memory, rtol=0, atol=1e-5)
    assert np.abs(loaded - base).max() > 1e-3

    # and back into a fresh adapter
    fresh = load_family(path)
    assert fresh.load_lora(file) == "default"
    assert fresh.trainable_parameters() == []
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x_t, t, cond), lora_out, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_load_lora_into_pipeline_checks_that_something_loaded(tiny_pipelines, tmp_path):
    from diffusers import StableDiffusionPipeline

    fam = load_family(tiny_pipelines["sd"])
    fam.add_lora(rank=2)
    good = fam.save_lora(tmp_path / "good")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd"])
    assert load_lora_into_pipeline(pipe, good.parent, adapter_name="mine") == "mine"

    # keys for another model: diffusers only warns; we raise and show the keys
    foreign = tmp_path / "foreign.safetensors"
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8)}, str(foreign))
    with pytest.raises(UserError, match="foreign.safetensors.*matched no module.*transformer.blocks.0"):
        load_lora_into_pipeline(StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd"]), foreign)

    # the classic mistake: unet.save_lora_adapter writes keys without the 'unet.' prefix
    fam.unet.save_lora_adapter(str(tmp_path / "bare"))
    with pytest.raises(UserError, match="matched no module"):
        load_lora_into_pipeline(StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd"]), tmp_path / "bare")
    with pytest.raises(UserError, match="no weights for this UNet"):
        load_family(tiny_pipelines["sd"]).load_lora(tmp_path / "bare")

    with pytest.raises(UserError, match="does not exist"):
        load_lora_into_pipeline(pipe, tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no pytorch_lora_weights.safetensors"):
        load_lora_into_pipeline(pipe, tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ full tuning
@pytest.mark.slow
def test_full_finetune_trains_only_the_unet(tiny_pipelines):
    fam = load_family(tiny_pipelines["sdxl"])
    fam.enable_full_finetune()
    unet_params = list(fam.unet.parameters())
    assert all(p.requires_grad for p in unet_params)
    assert len(fam.trainable_parameters()) == len(unet_params)
    assert not any(p.requires_grad for m in (fam.vae, *fam.text_encoders) for p in m.parameters())

    with_lora = load_family(tiny_pipelines["sd"])
    with_lora.add_lora(rank=2)
    with pytest.raises(UserError, match="LoRA"):
        with_lora.enable_full_finetune()
