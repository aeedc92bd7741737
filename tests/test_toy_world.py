import numpy as np
import pytest
import torch

from diffalign.toy import world
from diffalign.toy.render import RESOLUTION, render, to_tensor, to_uint8
from diffalign.toy.tokenizer import MODEL_MAX_LENGTH, load_tokenizer, write_tokenizer_files


def test_render_shapes_and_determinism():
    scenes = world.sample_scenes(16, np.random.default_rng(1))
    a = render(scenes, np.random.default_rng(2))
    b = render(scenes, np.random.default_rng(2))
    assert a.shape == (16, RESOLUTION, RESOLUTION, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    # The shape covers some pixels and leaves background: not a blank image.
    assert all(img.std() > 10 for img in a)


def test_render_ground_truth_attributes():
    centre = dict(cx=0.5, cy=0.5)
    red = world.Scene("square", "red", "large", "plain", **centre)
    img = render([red], jitter=False)[0].astype(int)
    r, g, b = img[16, 16]
    assert r > 180 and g < 60 and b < 60  # the centre is red
    assert abs(int(img[1, 1, 0]) - int(img[1, 1, 1])) < 5  # the corner is grey background
    small = render([world.Scene("circle", "blue", "small", "plain", **centre)], jitter=False)[0]
    large = render([world.Scene("circle", "blue", "large", "plain", **centre)], jitter=False)[0]
    blue_pixels = lambda im: int(((im[..., 2] > 150) & (im[..., 0] < 100)).sum())
    assert blue_pixels(large) > 2 * blue_pixels(small)
    outlined = render([world.Scene("circle", "yellow", "large", "outlined", **centre)], jitter=False)[0]
    assert (outlined.sum(-1) < 120).sum() > 20  # a dark border
    striped = render([world.Scene("square", "green", "large", "striped", **centre)], jitter=False)[0]
    column = striped[8:24, 16, 1].astype(int)
    assert column.max() - column.min() > 40  # light and dark bands alternate down the shape


def test_to_tensor_round_trip():
    imgs = render(world.sample_scenes(4, np.random.default_rng(0)))
    x = to_tensor(imgs)
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x), imgs)


def test_captions_name_attributes_and_include_empty():
    rng = np.random.default_rng(0)
    scenes = world.sample_scenes(2000, rng)
    caps = [world.random_caption(s, rng) for s in scenes]
    assert 0.06 < sum(c == "" for c in caps) / len(caps) < 0.14
    for scene, cap in zip(scenes, caps):
        named = world.parse_caption(cap)
        for key in ("shape", "colour", "size"):
            assert named[key] in (None, getattr(scene, key))
        if named["style"] is not None:
            assert named["style"] == scene.style
    # Some attributes are omitted at random.
    assert any(world.parse_caption(c)["colour"] is None for c in caps if c)
    assert world.caption(shape="circle", colour="red", size="small", style="striped") == "a small red circle, striped"
    assert world.parse_caption("a small red circle, striped") == {
        "shape": "circle", "colour": "red", "size": "small", "style": "striped"}


def test_style_prior_makes_styles_rare_unless_asked():
    scenes = world.sample_scenes(5000, np.random.default_rng(0))
    share_plain = sum(s.style == "plain" for s in scenes) / len(scenes)
    assert 0.65 < share_plain < 0.75


def test_offline_tokenizer_one_token_per_word(tmp_path):
    tok = load_tokenizer(write_tokenizer_files(tmp_path))
    assert tok.model_max_length == MODEL_MAX_LENGTH
    for word in world.WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    # Text outside the vocabulary still tokenizes (byte-level), it does not fail.
    assert len(tok("zebra").input_ids) > 3
    batch = tok(["a red circle", ""], padding="max_length", max_length=MODEL_MAX_LENGTH, return_tensors="pt")
    assert batch.input_ids.shape == (2, MODEL_MAX_LENGTH)


@pytest.mark.slow
def test_tiny_builders_load_with_stock_pipelines(tiny_pipelines):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sd = StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd"])
    assert sd.text_encoder.config.eos_token_id == sd.tokenizer.eos_token_id
    assert StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd-v"]).scheduler.config.prediction_type == "v_prediction"
    xl = StableDiffusionXLPipeline.from_pretrained(tiny_pipelines["sdxl"])
    assert xl.unet.config.addition_embed_type == "text_time"
    for pipe in (sd, xl):
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


@pytest.mark.slow
def test_pretrain_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffalign.toy.pretrain import PretrainConfig, pretrain

    out = pretrain(PretrainConfig(out=str(tmp_path / "toy"), vae_steps=3, pool_size=64, unet_steps=3,
                                  unet_batch_size=8, vae_batch_size=8))
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor != 1.0  # set from the encoded pool's latent std
    assert (out / "README.md").read_text().startswith("---")
    log = (out / "pretrain_log.jsonl").read_text().splitlines()
    assert any('"phase": "unet"' in line for line in log) and any('"phase": "vae"' in line for line in log)


@pytest.mark.slow
def test_render_captions_excludes_heldout_and_loads_as_image_captions(tmp_path):
    from diffalign.data.captions import ImageCaptions
    from diffalign.toy.prompts import heldout_rule
    from diffalign.toy.render_captions import render_captions, scenes_for_captions, write_captions_parquet

    combo = lambda s: heldout_rule(world.COLOUR_NAMES.index(s.colour), world.SHAPES.index(s.shape))
    kept = scenes_for_captions(300, np.random.default_rng(0))
    assert len(kept) == 300 and not any(combo(s) for s in kept)
    assert any(combo(s) for s in scenes_for_captions(300, np.random.default_rng(0), exclude_heldout=False))
    rows = render_captions(40, seed=5)
    assert rows == render_captions(40, seed=5)  # deterministic, images included
    assert {r["caption"] for r in rows} != {""} and any(r["caption"] == "" for r in render_captions(200, seed=5))
    path = write_captions_parquet(tmp_path / "c.parquet", 12, seed=1)
    data = ImageCaptions(str(path), image_column="image")
    assert len(data) == 12 and data.caption(3) == render_captions(12, seed=1)[3]["caption"]
    assert data.image(0).size == (RESOLUTION, RESOLUTION)


@pytest.mark.slow
def test_render_pairs_can_exclude_heldout_combinations():
    from diffalign.toy.prompts import toy_prompts
    from diffalign.toy.render_pairs import render_pairs

    heldout = set(toy_prompts("heldout"))
    assert heldout & {r["caption"] for r in render_pairs(300, kind="fidelity", seed=2)}
    assert not heldout & {r["caption"] for r in render_pairs(300, kind="fidelity", seed=2, exclude_heldout=True)}
