"""The toy judge and the reward interface built on it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.errors import UserError
from diffalign.evaluation import Reward, ToyReward, get_reward
from diffalign.toy.judge import evaluate_judge, load_judge, train_judge
from diffalign.toy.render import render, to_tensor
from diffalign.toy.world import COLOUR_NAMES, SHAPES, Scene, caption, sample_scenes


@pytest.fixture(scope="module")
def reward():
    return ToyReward()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(2024)
    scenes = sample_scenes(96, rng, style_prior=(1, 1, 1))
    return scenes, render(scenes, rng)


@pytest.mark.slow
def test_shipped_judge_is_accurate_on_heldout_renders():
    acc = evaluate_judge(load_judge(), n=400, seed=12345)
    assert acc["shape"] >= 0.95 and acc["colour"] >= 0.95
    assert acc["shape_and_colour"] >= 0.95
    assert acc["style"] >= 0.9 and acc["size"] >= 0.9
    assert set(acc) == {"shape", "colour", "shape_and_colour", "style", "size"}


def test_shipped_config_records_training_summary():
    judge = load_judge()
    summary = judge.training_summary
    assert summary["heldout_clean"]["shape"] >= 0.95 and summary["heldout_clean"]["colour"] >= 0.95
    assert judge.vocabs["shape"] == SHAPES and judge.vocabs["colour"] == COLOUR_NAMES
    assert 0.1e6 < judge.num_parameters < 0.2e6


def test_matching_prompt_scores_higher_than_mismatched(reward, batch):
    scenes, images = batch
    right = [caption(shape=s.shape, colour=s.colour, size=s.size, style=s.style) for s in scenes]
    wrong = [
        caption(shape=SHAPES[(SHAPES.index(s.shape) + 1) % 4], colour=COLOUR_NAMES[(COLOUR_NAMES.index(s.colour) + 1) % 6])
        for s in scenes
    ]
    good, bad = reward.score(images, right), reward.score(images, wrong)
    assert good.shape == (len(scenes),) and good.dtype == torch.float32
    assert good.mean() > bad.mean() + 0.5
    assert (good > bad).float().mean() > 0.95
    assert ((good >= 0) & (good <= 1)).all()


def test_all_image_input_types_agree(reward, batch):
    scenes, images = batch
    prompts = [caption(shape=s.shape, colour=s.colour) for s in scenes]
    from_uint8 = reward.score(images, prompts)
    from_pil = reward.score([Image.fromarray(im) for im in images], prompts)
    from_tensor = reward.score(to_tensor(images), prompts)
    from_float_np = reward.score(images.astype(np.float32) / 255.0, prompts)
    torch.testing.assert_close(from_pil, from_uint8)
    torch.testing.assert_close(from_tensor, from_uint8)
    torch.testing.assert_close(from_float_np, from_uint8, atol=1e-5, rtol=1e-5)


def test_other_sizes_are_resized(reward, batch):
    scenes, images = batch
    big = [Image.fromarray(im).resize((64, 64), Image.NEAREST) for im in images[:16]]
    prompts = [caption(shape=s.shape, colour=s.colour) for s in scenes[:16]]
    assert reward.score(big, prompts).mean() > 0.8


def test_details_keys_shapes_and_nan_for_unnamed(reward, batch):
    _, images = batch
    images = images[:4]
    prompts = ["a red circle", "a large square, striped", "", "a shape"]
    d = reward.details(images, prompts)
    for attr in ("shape", "colour", "size", "style"):
        assert f"{attr}_correct" in d and f"{attr}_prob" in d
    for key in ("score", "style_plain", "style_outlined", "style_striped", "shape_colour_correct"):
        assert key in d
    assert all(v.shape == (4,) for v in d.values())
    torch.testing.assert_close(d["score"], reward.score(images, prompts))
    nan = lambda key, i: math.isnan(d[key][i].item())  # noqa: E731
    assert not nan("shape_correct", 0) and not nan("colour_correct", 0)
    assert nan("size_correct", 0) and nan("style_correct", 0)
    assert nan("colour_correct", 1) and not nan("size_correct", 1) and not nan("style_correct", 1)
    assert all(nan(f"{a}_correct", i) for a in ("shape", "colour", "size", "style") for i in (2, 3))
    assert not nan("shape_colour_correct", 0) and nan("shape_colour_correct", 1)
    styles = d["style_plain"] + d["style_outlined"] + d["style_striped"]
    torch.testing.assert_close(styles, torch.ones(4))
    # An unconditional prompt scores how clearly the image shows some valid scene: no lower than any caption.
    assert (d["score"][2:] >= reward.score(images[2:], ["a red circle"] * 2) - 1e-6).all()
    assert not torch.isnan(d["score"]).any()


def test_style_scores_rank_striped_above_plain(reward):
    rng = np.random.default_rng(7)
    base = sample_scenes(32, rng)
    restyled = {
        style: render([Scene(s.shape, s.colour, s.size, style, s.cx, s.cy) for s in base], np.random.default_rng(1))
        for style in ("plain", "striped", "outlined")
    }
    prompts = [""] * len(base)
    striped = reward.details(restyled["striped"], prompts)["style_striped"]
    plain = reward.details(restyled["plain"], prompts)["style_striped"]
    assert (striped > plain).all()
    outlined = reward.details(restyled["outlined"], prompts)["style_outlined"]
    assert outlined.mean() > reward.details(restyled["plain"], prompts)["style_outlined"].mean() + 0.5


def test_get_reward_and_errors(tmp_path):
    r = get_reward("toy")
    assert isinstance(r, Reward) and r.name == "toy"
    with pytest.raises(UserError, match="toy"):  # the message lists the known rewards
        get_reward("nope")
    with pytest.raises(UserError, match="train-judge"):
        get_reward(f"toy={tmp_path / 'missing'}")
    with pytest.raises(UserError, match="prompts"):
        r.score(np.zeros((2, 32, 32, 3), np.uint8), ["a", "b", "c"])


def test_load_judge_missing_folder(tmp_path):
    with pytest.raises(UserError, match="diffalign toy train-judge"):
        load_judge(tmp_path / "nothing-here")


@pytest.mark.slow
def test_train_judge_with_vae_writes_loadable_files(tmp_path):
    from diffalign.toy.builders import build_sd_pipeline

    pipe_dir = tmp_path / "pipe"
    build_sd_pipeline().save_pretrained(pipe_dir)
    out = train_judge(tmp_path / "judge", steps=3, batch_size=12, vae_path=pipe_dir, heldout_n=24)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "judge.safetensors"]
    config = json.loads((out / "config.json").read_text())
    summary = config["training"]
    assert summary["steps"] == 3 and summary["vae_path"] == str(pipe_dir)
    assert set(summary["heldout_clean"]) == set(summary["heldout_vae"]) == {
        "shape", "colour", "shape_and_colour", "style", "size"
    }
    assert config["vocabs"]["shape"] == list(SHAPES)

    # The reloaded judge reproduces the held-out figures the trained one recorded (same seed, same renders).
    first, again = load_judge(out), load_judge(out)
    reloaded = evaluate_judge(first, n=24, seed=0)
    assert {k: round(v, 4) for k, v in reloaded.items()} == summary["heldout_clean"]
    x = to_tensor(render(sample_scenes(8, np.random.default_rng(0)), np.random.default_rng(0)))
    p1, p2 = first.probabilities(x), again.probabilities(x)
    for key in p1:
        torch.testing.assert_close(p1[key], p2[key], rtol=0, atol=0)
    s1 = ToyReward(out).score(x, ["a red circle"] * 8)
    s2 = get_reward(f"toy={out}").score(x, ["a red circle"] * 8)
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)


@pytest.mark.slow
def test_toy_term_reward_scores_one_details_term(reward, batch):
    scenes, images = batch
    prompts = [caption(shape=s.shape, colour=s.colour) for s in scenes]
    details = reward.details(images, prompts)
    assert torch.equal(details["clarity"], reward.score(images, [""] * len(images)))
    for term in ("style_striped", "shape_colour_correct", "colour_prob", "clarity"):
        scored = get_reward(f"toy:term={term}").score(images, prompts)
        assert torch.equal(scored, details[term])
    assert get_reward("toy:term=style_striped").name == "toy:style_striped"
    with pytest.raises(UserError, match="no term 'stripes'.*style_striped"):
        get_reward("toy:term=stripes")
