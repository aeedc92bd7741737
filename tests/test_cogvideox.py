"""CogVideoX (issue 10): the family against the stock CogVideoXPipeline, training end to end, LoRA round trip,
negative-branch guidance with dynamic CFG, video pairs and saved clips. All on tiny random-init models built
offline (tests/video_builders.py): '2b' (sinusoidal positions, SNR shift 3) and '5b' (rotary, shift 1)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffalign.errors import UserError
from diffalign.guidance import attach_negative_guidance, detach_negative_guidance, generate_videos
from diffalign.models import CogVideoXFamily, detect_family, load_family, load_lora_into_pipeline
from diffalign.models.lora import load_lora_into_unet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LATENT = (3, 16, 2, 4)  # (F', C, H/8, W/8) of the tiny model's native 9 x 16 x 32 clip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from video_builders import save_tiny_cogvideox

    return save_tiny_cogvideox(tmp_path_factory.mktemp("cogvideox"))


def _pipe(path):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora(path, out, seed):
    """A LoRA with random non-zero B, saved the way training saves it."""
    family = load_family(path)
    family.add_lora(4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in family.unet.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return family, family.save_lora(out)


@pytest.fixture(scope="module")
def neg_lora(tiny, tmp_path_factory):
    return _lora(tiny["5b"], tmp_path_factory.mktemp("neg"), 2)[1]


def test_detect_load_and_noise_schedule(tiny):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel, DDPMScheduler

    assert detect_family(tiny["2b"]) == "cogvideox"
    family = load_family(tiny["2b"])
    assert isinstance(family, CogVideoXFamily) and isinstance(family.transformer, CogVideoXTransformer3DModel)
    assert (family.num_frames, family.height, family.width) == (9, 16, 32)
    assert family.latent_shape() == LATENT and family.latent_shape(16) == (3, 16, 2, 2)
    assert family.prediction_type == "v_prediction"
    # The training schedule is the CogVideoX one (SNR shift 3, zero terminal SNR), not a DDPM from its config.
    assert isinstance(family.noise_scheduler, CogVideoXDDIMScheduler)
    abar = family.alphas_cumprod
    assert torch.equal(abar, _pipe(tiny["2b"]).scheduler.alphas_cumprod) and abar[-1] == 0
    assert not torch.allclose(abar.float(), DDPMScheduler.from_config(family.scheduler.config).alphas_cumprod, atol=1e-3)
    with pytest.raises(UserError, match="unet"):
        load_family(tiny["2b"], family="sd")
    with pytest.raises(UserError, match="4k\\+1 frames"):
        family.latent_shape(num_frames=8)


@pytest.mark.slow
def test_prompts_and_videos_encode_as_the_pipeline_does(tiny):
    family, pipe = load_family(tiny["2b"]), _pipe(tiny["2b"])
    prompts = ["a red circle", "a zebra on a bicycle"]  # the second one falls back to single letters
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, device="cpu")
    cond = family.encode_prompts(prompts)
    assert cond.prompt_embeds.shape == (2, 226, 32)
    assert torch.equal(cond.prompt_embeds, pos) and torch.equal(family.unconditional(2).prompt_embeds, neg)
    family.zero_unconditional = True
    assert not family.unconditional(1).prompt_embeds.any()

    video = torch.rand(2, 9, 3, 16, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = family.encode_videos(video)  # (B, F, 3, H, W)
    assert latents.shape == (2, *LATENT)
    with torch.no_grad():
        ref = family.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mean * family.vae.config.scaling_factor
    torch.testing.assert_close(latents, ref.permute(0, 2, 1, 3, 4))  # float32 defaults: chunks of 1 vs a batch
    torch.testing.assert_close(family.encode_videos(video.permute(0, 2, 1, 3, 4), chunk_size=2), latents)
    decoded = family.decode_latents(latents)
    assert decoded.shape == video.shape and decoded.abs().max() <= 1
    with torch.no_grad():
        ref_frames = pipe.decode_latents(latents).permute(0, 2, 1, 3, 4).clamp(-1, 1)
    torch.testing.assert_close(decoded, ref_frames)
    with pytest.raises(UserError, match="ambiguous"):
        family.encode_videos(torch.zeros(1, 3, 3, 16, 32))
    with pytest.raises(UserError, match="4k\\+1"):
        family.encode_videos(torch.zeros(1, 4, 3, 16, 32))
    with pytest.raises(UserError, match="5-D"):
        family.encode_videos(torch.zeros(3, 16, 32))


def test_v_prediction_maths_and_per_sample_errors(tiny):
    from diffalign.training.recipes import PairBatch, PreferenceRecipe

    family = load_family(tiny["2b"])
    sched = family.noise_scheduler
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, *LATENT, generator=gen), torch.randn(3, *LATENT, generator=gen)
    t = torch.tensor([0, 500, 999])
    x_t = family.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, sched.add_noise(x0, noise, t))
    torch.testing.assert_close(x_t[2], noise[2])  # zero terminal SNR: pure noise at T-1
    v = family.target(x0, noise, t)
    torch.testing.assert_close(v, sched.get_velocity(x0, noise, t))
    torch.testing.assert_close(family.pred_x0(x_t, t, v), x0, rtol=0, atol=1e-5)
    # Self-NPO's re-noising to s = T-1, where abar_s is exactly 0 here: pure noise, not 0 * inf = NaN.
    from diffalign.objectives import renoise

    z = torch.randn(2, *LATENT, generator=gen)
    x_s = renoise(x_t[:2], t[:2], torch.tensor([999, 999]), family.alphas_cumprod, z)
    assert torch.equal(x_s, z)

    # DPO on video pairs: one error per pair = the mean over frames, channels and pixels.
    cond = family.encode_prompts(["a red circle", "a blue square"])
    batch = PairBatch(x0[:2], x0[1:], cond, cond)
    recipe = PreferenceRecipe(family, "dpo", beta=5000.0)
    err_w, err_l = recipe.errors(batch, noise[:2], t[:2])
    with torch.no_grad():
        pred = family.predict(family.add_noise(x0[:2], noise[:2], t[:2]), t[:2], cond)
    manual = (pred - family.target(x0[:2], noise[:2], t[:2])).pow(2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(err_w.detach(), manual)
    family.add_lora(4)  # B = 0: the policy equals the reference, so the DPO loss is exactly log 2
    result = recipe(batch, noise[:2], t[:2])
    torch.testing.assert_close(result.losses.detach(), torch.full((2,), float(np.log(2.0))))


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_predict_equals_the_pipelines_transformer_call(tiny, variant):
    family, pipe = load_family(tiny[variant]), _pipe(tiny[variant])
    cond = family.encode_prompts(["a red circle", ""])
    t = torch.tensor([10, 900])
    for shape, (h, w) in ((LATENT, (16, 32)), (family.latent_shape(16), (16, 16))):
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
        rotary = (pipe._prepare_rotary_positional_embeddings(h, w, shape[0], "cpu")
                  if pipe.transformer.config.use_rotary_positional_embeddings else None)
        assert (rotary is not None) == (variant == "5b")
        with torch.no_grad():
            ours = family.predict(x, t, cond)
            ref = pipe.transformer(hidden_states=x, encoder_hidden_states=cond.prompt_embeds, timestep=t,
                                   image_rotary_emb=rotary, return_dict=False)[0]
        assert torch.equal(ours, ref)
    if variant == "5b":  # the embeddings matter: leaving them out changes the output
        with torch.no_grad():
            assert not torch.allclose(family.predict(x, t, cond, image_rotary_emb=None), ours)
    with pytest.raises(UserError, match="F', C, H', W'"):
        family.predict(torch.zeros(1, 16, 2, 4), t[:1], cond[:1])


@pytest.mark.slow
def test_lora_round_trip_through_the_pipeline(tiny, tmp_path):
    family, file = _lora(tiny["5b"], tmp_path / "lora", 1)
    keys = list(load_file(str(file)))
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)
    pipe = _pipe(tiny["5b"])
    args = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=6.0, output_type="latent")
    before = pipe(generator=torch.Generator().manual_seed(0), **args).frames
    assert load_lora_into_pipeline(pipe, tmp_path / "lora")
    after = pipe(generator=torch.Generator().manual_seed(0), **args).frames
    assert not torch.allclose(before, after)
    x, t = torch.randn(1, *LATENT), torch.tensor([500])
    cond = family.encode_prompts("a red circle")
    rotary = family.rotary_embeddings(*LATENT[:1], *LATENT[2:], "cpu")
    with torch.no_grad():
        loaded = pipe.transformer(hidden_states=x, encoder_hidden_states=cond.prompt_embeds, timestep=t,
                                  image_rotary_emb=rotary, return_dict=False)[0]
        torch.testing.assert_close(loaded, family.predict(x, t, cond), rtol=0, atol=1e-6)
        own = family.make_pipeline()(generator=torch.Generator().manual_seed(0), **args).frames
    torch.testing.assert_close(own, after, rtol=0, atol=1e-5)
    fresh = load_family(tiny["5b"])
    fresh.load_lora(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x, t, cond), loaded, rtol=0, atol=1e-6)
    # An SD LoRA (unet. keys) matches nothing in a CogVideoX pipeline: an error, not diffusers' silent warning.
    from safetensors.torch import save_file

    save_file({"unet.mid.to_q.lora_A.weight": torch.zeros(4, 8)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(UserError, match="matched no module.*'transformer.'"):
        load_lora_into_pipeline(_pipe(tiny["2b"]), tmp_path / "sd.safetensors")


def _video(pipe, **kw):
    args = dict(prompt=["a red circle"], negative_prompt=["a blue square"], num_inference_steps=2, guidance_scale=6.0,
                use_dynamic_cfg=True, output_type="np")
    args.update(kw)
    return pipe(generator=[torch.Generator().manual_seed(i) for i in range(len(args["prompt"]))], **args).frames


def test_zero_offset_weights_give_the_plain_pipeline_bit_for_bit(tiny, neg_lora):
    pipe = _pipe(tiny["5b"])
    plain = _video(pipe)
    info = attach_negative_guidance(pipe, negative=neg_lora, alpha=0.0, beta=0.0)
    assert info.fast and info.calls_per_step == 1
    np.testing.assert_array_equal(_video(pipe), plain)
    detach_negative_guidance(pipe)
    assert type(pipe.transformer).__name__ == "CogVideoXTransformer3DModel" and "encode_prompt" not in pipe.__dict__
    np.testing.assert_array_equal(_video(pipe), plain)


@pytest.mark.parametrize("two_calls", [False, True])
@pytest.mark.slow
def test_negative_half_runs_the_negative_weights_under_dynamic_cfg(tiny, neg_lora, two_calls):
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    pipe = _pipe(tiny["5b"])
    attach_negative_guidance(pipe, negative=neg_lora, beta=1.0, force_two_calls=two_calls)
    seen, steps = [], []
    pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out[0])), with_kwargs=True)
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda out, *a, **k: (steps.append((out, pipe.guidance_scale)), step(out, *a, **k))[1]
    _video(pipe, output_type="latent")
    # Reference, independent of diffalign.guidance: a base transformer and one with the LoRA loaded by diffusers.
    base = CogVideoXTransformer3DModel.from_pretrained(tiny["5b"], subfolder="transformer").eval()
    negative = CogVideoXTransformer3DModel.from_pretrained(tiny["5b"], subfolder="transformer").eval()
    load_lora_into_unet(negative, CogVideoXPipeline, neg_lora)
    assert len(seen) == len(steps) == 2
    scales = []
    for (kw, out), (guided, scale) in zip(seen, steps):
        half = {k: kw[k] for k in ("encoder_hidden_states", "timestep")}
        with torch.no_grad():
            uncond = negative(kw["hidden_states"][:1], **{k: v[:1] for k, v in half.items()},
                              image_rotary_emb=kw["image_rotary_emb"], return_dict=False)[0]
            cond = base(kw["hidden_states"][1:], **{k: v[1:] for k, v in half.items()},
                        image_rotary_emb=kw["image_rotary_emb"], return_dict=False)[0]
            plain_uncond = base(kw["hidden_states"][:1], **{k: v[:1] for k, v in half.items()},
                                image_rotary_emb=kw["image_rotary_emb"], return_dict=False)[0]
        torch.testing.assert_close(out, torch.cat([uncond, cond]), rtol=0, atol=1e-5)
        assert not torch.allclose(uncond, plain_uncond, atol=1e-3)  # the first half really used the LoRA
        torch.testing.assert_close(guided, (uncond + scale * (cond - uncond)).float(), rtol=0, atol=1e-4)
        scales.append(scale)
    assert len(set(scales)) == 2 and 6.0 not in scales  # dynamic CFG: a different scale each step
    if two_calls:
        return
    # Guidance off: two prompts in one batch are NOT a CFG batch; both must see the positive model only.
    off = _video(pipe, prompt=["a red circle", "a blue square"], negative_prompt=None, guidance_scale=1.0)
    detach_negative_guidance(pipe)
    plain = _video(pipe, prompt=["a red circle", "a blue square"], negative_prompt=None, guidance_scale=1.0)
    np.testing.assert_allclose(off, plain, atol=1e-6)


def test_guided_generation_writes_frames_and_a_clip(tiny, neg_lora, tmp_path):
    from diffalign.guidance.video import mp4_available

    pipe = _pipe(tiny["5b"])
    attach_negative_guidance(pipe, negative=neg_lora)
    results = generate_videos(pipe, ["a red circle"], tmp_path / "out", num_inference_steps=2, use_dynamic_cfg=True)
    frames, video = results[0]["frames"], results[0]["video"]
    assert [f.name for f in frames] == [f"frame_{i:03d}.png" for i in range(9)]
    assert Image.open(frames[0]).size == (32, 16)
    if mp4_available():
        assert video.suffix == ".mp4" and video.stat().st_size > 0
    else:
        with Image.open(video) as gif:
            assert video.suffix == ".gif" and gif.n_frames == 9


def _clip(value, frames=9, size=(20, 40)):
    buf = io.BytesIO()
    np.save(buf, np.full((frames, *size, 3), value, dtype=np.uint8))
    return buf.getvalue()


@pytest.fixture(scope="module")
def video_pairs(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("vpairs")
    np.save(root / "grey.npy", np.full((9, 16, 32, 3), 128, dtype=np.uint8))
    (root / "frames").mkdir()
    for i in range(9):
        Image.new("RGB", (32, 16), (0, 255, 0)).save(root / "frames" / f"{i:02d}.png")
    rows = [
        {"caption": "a red circle", "video_0": _clip(255), "video_1": _clip(0), "label_0": 1.0, "label_1": 0.0},
        {"caption": "a blue square", "video_0": _clip(0), "video_1": _clip(255), "label_0": 0.0, "label_1": 1.0},
        {"caption": "a tie", "video_0": _clip(9), "video_1": _clip(9), "label_0": 0.5, "label_1": 0.5},
        {"caption": "from paths", "video_0": "grey.npy", "video_1": "frames", "label_0": 1.0, "label_1": 0.0},
        {"caption": "too short", "video_0": _clip(1, frames=3), "video_1": _clip(2), "label_0": 1.0, "label_1": 0.0},
        {"caption": "a green triangle", "video_0": _clip(64), "video_1": _clip(192), "label_0": 1.0, "label_1": 0.0},
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "pairs.parquet")
    return root / "pairs.parquet"


def test_video_pair_source(video_pairs):
    from diffalign.data.video_pairs import VideoPairItems, VideoPairs

    pairs = VideoPairs(str(video_pairs))
    assert len(pairs) == 5 and pairs.report()["ties_dropped"] == 1
    items = VideoPairItems(pairs, num_frames=9, height=16, width=32, random_flip=False, seed=0)
    first = items.item(0, 0)
    assert first["pixel_w"].shape == (9, 3, 16, 32)
    ones = torch.ones(9, 3, 16, 32)
    torch.testing.assert_close(first["pixel_w"], ones)  # 255 -> 1 (resized from 20x40: equal up to rounding)
    torch.testing.assert_close(first["pixel_l"], -ones)
    torch.testing.assert_close(items.item(1, 0)["pixel_w"], ones)  # label_1 wins: the clips are swapped
    paths = items.item(2, 0)  # a .npy path and a folder of PNG frames, already at the training size
    torch.testing.assert_close(paths["pixel_w"], torch.full((9, 3, 16, 32), 128 / 127.5 - 1))
    assert torch.equal(paths["pixel_l"][:, 1], ones[:, 0]) and torch.equal(paths["pixel_l"][:, 0], -ones[:, 0])
    assert items.item(3, 0) is None and pairs.report()["skipped"] == 1
    with pytest.raises(UserError, match="no column"):
        VideoPairs(str(video_pairs), video_columns=("jpg_0", "jpg_1"))
    with pytest.raises(UserError, match="tie"):
        VideoPairs(str(video_pairs), ties="error")


def _assert_every_lora_weight_changed(out_dir, model, rank=4, seed=0):
    weights = load_file(str(out_dir / "pytorch_lora_weights.safetensors"))
    torch.manual_seed(seed)  # training seeds its LoRA init with the run's seed
    fresh = load_family(model)
    fresh.add_lora(rank)
    init = {k: v for k, v in fresh.unet.named_parameters() if v.requires_grad}
    assert len(init) == len(weights) > 0
    for name, value in init.items():
        module, which = name.split(".lora_")
        key = f"transformer.{module}.lora_{which[0]}.weight"
        assert not torch.equal(weights[key], value.detach()), f"{name} did not change"


@pytest.mark.slow
def test_selfnpo_from_a_config_and_mapo_on_video_pairs_train_end_to_end(tiny, video_pairs, tmp_path):
    from diffalign.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na large diamond\n")
    common = ["--train_batch_size=2", "--max_train_steps=2", "--learning_rate=1e-3", "--rank=4", "--report_to=none",
              "--checkpointing_steps=1000", "--validation_steps=1000", "--validation_num_inference_steps=2",
              "--mixed_precision=no", "--use_8bit_adam=false", "--train_mode=lora", "--gradient_accumulation_steps=1"]
    code = main(["train", str(CONFIGS / "cogvideox_5b_selfnpo.yaml"), f"--pretrained_model_name_or_path={tiny['5b']}",
                 f"--dataset_name={prompts}", f"--output_dir={tmp_path / 'selfnpo'}", "--ddim_grid=5",
                 "--teacher_steps=2", "--teacher_ema_decay=0.9", *common])
    assert code == 0
    code = main(["train", str(CONFIGS / "cogvideox_2b_mapo.yaml"), f"--pretrained_model_name_or_path={tiny['2b']}",
                 f"--dataset_name={video_pairs}", f"--output_dir={tmp_path / 'mapo'}", *common])
    assert code == 0
    for name, variant in (("selfnpo", "5b"), ("mapo", "2b")):
        out = tmp_path / name
        _assert_every_lora_weight_changed(out, tiny[variant])
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
        assert sorted(p.name for p in (out / "validation").iterdir())  # first/middle/last frames per prompt
        pipe = _pipe(tiny[variant])
        assert load_lora_into_pipeline(pipe, out)
    report = json.loads((tmp_path / "mapo" / "train_report.json").read_text())
    assert report["data"]["pairs"] == 5 and report["data"]["ties_dropped"] == 1
