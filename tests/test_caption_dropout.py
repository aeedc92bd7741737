"""Caption dropout (`proportion_empty_prompts`) for the pair methods: the rule (which samples, how many, the same
for any process count), the real batch path (pixels and the latent cache), resume, p = 0 and the config."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.errors import UserError
from diffalign.toy.render_pairs import write_pairs_parquet
from diffalign.training.batches import drop_captions, empty_prompt_mask


@pytest.fixture(scope="module")
def style_pairs(tmp_path_factory):
    return write_pairs_parquet(tmp_path_factory.mktemp("pairs") / "style.parquet", 24, kind="style", seed=3)


def _cfg(model, data, out, **kw):
    from diffalign.training.config import TrainConfig

    base = dict(method="mapo", pretrained_model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out),
                resolution=32, train_batch_size=4, max_train_steps=3, learning_rate=1e-3, rank=4, seed=0,
                report_to="none", checkpointing_steps=1000, center_crop=True,
                use_cache=False)  # the pixel path, whose text encoder sees the dropped captions; the cache: below
    base.update(kw)
    if base["method"] in ("dpo", "npo") and "beta" not in kw:
        base["beta"] = 5000.0
    return TrainConfig(**base)


def _spy_batches(monkeypatch):
    """The rows every micro-batch hands to `to_pair_batch` (after caption dropout), in order."""
    import diffalign.training.recipes as recipes

    seen, real = [], recipes.to_pair_batch

    def spy(items, *args, **kwargs):
        seen.append(list(items))
        return real(items, *args, **kwargs)

    monkeypatch.setattr(recipes, "to_pair_batch", spy)
    return seen


def _spy_prompts(monkeypatch):
    """Every caption list the SD family's text encoder is asked to encode."""
    from diffalign.models.sd import SDFamily

    seen, real = [], SDFamily.encode_prompts

    def spy(self, prompts):
        seen.append(list(prompts))
        return real(self, prompts)

    monkeypatch.setattr(SDFamily, "encode_prompts", spy)
    return seen


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _rule(p, seed, steps, ga, batch, shard=(0, 1)) -> list[list[bool]]:
    """The drop masks the loop's rule gives, micro-batch by micro-batch (the loop's own generator and function)."""
    from diffalign.training.loop import _step_generator

    return [empty_prompt_mask(p, batch, _step_generator(seed, s, m, 0), shard=shard)
            for s in range(steps) for m in range(ga)]


# ------------------------------------------------------------------------------------------------ the rule
def test_the_rule_is_per_global_sample_and_p0_draws_nothing():
    gen = lambda: torch.Generator().manual_seed(123)
    # p = 0: nothing dropped and the generator untouched, so noise and t are what they were without the option.
    g = gen()
    assert empty_prompt_mask(0.0, 8, g) == [False] * 8
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=gen()))
    assert empty_prompt_mask(1.0, 8, gen()) == [True] * 8
    # 2 processes x 4 rows drop exactly the rows 1 process x 8 rows drops: rank r holds global rows r::2.
    one = empty_prompt_mask(0.5, 8, gen())
    r0, r1 = empty_prompt_mask(0.5, 4, gen(), shard=(0, 2)), empty_prompt_mask(0.5, 4, gen(), shard=(1, 2))
    assert [x for pair in zip(r0, r1) for x in pair] == one and 0 < sum(one) < 8
    # The share over many micro-batches is p, within sampling error.
    for p in (0.2, 0.05):
        masks = _rule(p, seed=0, steps=2500, ga=1, batch=8)
        n = 8 * len(masks)
        share = sum(map(sum, masks)) / n
        assert abs(share - p) < 4.5 * (p * (1 - p) / n) ** 0.5, (p, share)


def test_drop_captions_pixel_and_cached_items():
    empty = {"prompt_embeds": torch.zeros(3, 2)}
    pixel = [{"caption": "a", "pixel_w": 1}, None, {"caption": "b", "pixel_w": 2}]
    out, n = drop_captions(pixel, [True, True, False])
    assert n == 1 and out[0] == {"caption": "", "pixel_w": 1} and out[1] is None and out[2] is pixel[2]
    assert pixel[0]["caption"] == "a"  # copied, not changed in place
    cached = [{"caption": "a", "prompt_embeds": torch.ones(3, 2), "latents_w": 1}]
    out, n = drop_captions(cached, [True], empty)
    assert n == 1 and out[0]["caption"] == "" and out[0]["prompt_embeds"] is empty["prompt_embeds"]
    with pytest.raises(ValueError, match="empty prompt"):
        drop_captions(cached, [True])


@pytest.mark.parametrize("kw,match", [
    (dict(proportion_empty_prompts=-0.1), r"proportion_empty_prompts must be in \[0, 1\]"),
    (dict(proportion_empty_prompts=1.5), r"proportion_empty_prompts must be in \[0, 1\]"),
    (dict(proportion_empty_prompts=float("nan")), "proportion_empty_prompts must be a finite number"),
    (dict(method="selfnpo", beta=None, image_columns=("image",), proportion_empty_prompts=0.2),
     "proportion_empty_prompts=0.2 applies to the pair methods"),
])
def test_config_range(kw, match):
    from diffalign.training.config import TrainConfig

    base = dict(method="dpo", beta=1000.0, pretrained_model_name_or_path="toy", dataset_name="d.parquet",
                output_dir="out")
    assert TrainConfig(**base).proportion_empty_prompts == 0.0
    for method, beta in (("dpo", 1000.0), ("npo", 1000.0), ("mapo", None), ("sft", None)):
        for p in (0.0, 0.2, 1.0):
            TrainConfig(**{**base, "method": method, "beta": beta, "proportion_empty_prompts": p}).validate()
    with pytest.raises(UserError, match=match):
        TrainConfig(**{**base, **kw}).validate()


# ------------------------------------------------------------------------------------------- the batch path
@pytest.mark.slow
def test_an_epoch_drops_what_the_rule_gives_through_the_real_batch_path(tiny_pipelines, style_pairs, tmp_path,
                                                                         monkeypatch):
    """Two epochs of 24 pairs (12 steps x 2 micro-batches x 2 pairs): the captions the text encoder receives are ""
    exactly where the rule says, the metric counts them, and the model card says so."""
    from diffalign.training.loop import train

    batches, prompts = _spy_batches(monkeypatch), _spy_prompts(monkeypatch)
    p, steps, ga, b = 0.3, 12, 2, 2
    out = train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "run", method="npo", proportion_empty_prompts=p,
                     max_train_steps=steps, gradient_accumulation_steps=ga, train_batch_size=b))
    rule = _rule(p, seed=0, steps=steps, ga=ga, batch=b)
    assert len(prompts) == len(batches) == len(rule) == steps * ga  # one encode per micro-batch, no validation
    for got, want, rows in zip(prompts, rule, batches):
        assert [c == "" for c in got] == want  # the data has no empty caption: every "" is a dropped one
        assert [r["caption"] for r in rows] == got
    dropped = sum(map(sum, rule))
    assert 0 < dropped < steps * ga * b
    logged = [m["empty_prompts"] for m in _metrics(out)]
    assert logged == [sum(map(sum, rule[s * ga:(s + 1) * ga])) for s in range(steps)]
    assert sum(logged) == dropped
    assert "caption dropout | a share 0.3" in (out / "README.md").read_text()


@pytest.mark.slow
def test_p0_trains_on_the_captions_as_given(tiny_pipelines, style_pairs, tmp_path, monkeypatch):
    from diffalign.training.loop import train

    prompts = _spy_prompts(monkeypatch)
    out = train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "run", proportion_empty_prompts=0.0))
    assert len(prompts) == 3 and all(c for got in prompts for c in got)
    assert all("empty_prompts" not in m for m in _metrics(out))
    assert "caption dropout" not in (out / "README.md").read_text()


@pytest.mark.slow
def test_the_cache_drops_the_same_captions_as_pixels(tiny_pipelines, style_pairs, tmp_path, monkeypatch):
    """use_cache: the same rows lose their caption, and take the cached form of the encoded "" in place of
    their own embeddings (what the pixel path's text encoder makes of "")."""
    from diffalign.models import load_family
    from diffalign.training.loop import train

    kw = dict(method="dpo", proportion_empty_prompts=0.5, max_train_steps=4, train_batch_size=3)
    batches = _spy_batches(monkeypatch)
    pixel = train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "pixel", **kw))
    pixel_rows = list(batches)
    batches.clear()
    cached = train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "cached", use_cache=True,
                        cache_dir=str(tmp_path / "cache"), **kw))
    assert len(batches) == len(pixel_rows) == 4
    family = load_family(tiny_pipelines["sd"])
    with torch.no_grad():
        empty = family.encode_prompts([""]).prompt_embeds[0]
    dropped = 0
    for pix, cac in zip(pixel_rows, batches):
        assert [r["caption"] for r in pix] == [r["caption"] for r in cac]
        for r in cac:
            if r["caption"] == "":
                dropped += 1
                torch.testing.assert_close(r["prompt_embeds"], empty)
            else:
                with torch.no_grad():
                    own = family.encode_prompts([r["caption"]]).prompt_embeds[0]
                torch.testing.assert_close(r["prompt_embeds"], own)
                assert not torch.allclose(r["prompt_embeds"], empty)
    assert 0 < dropped < 12
    assert [m["empty_prompts"] for m in _metrics(pixel)] == [m["empty_prompts"] for m in _metrics(cached)]


@pytest.mark.slow
def test_resume_with_caption_dropout_gives_the_same_weights(tiny_pipelines, style_pairs, tmp_path):
    from diffalign.training.loop import train

    kw = dict(method="dpo", proportion_empty_prompts=0.2, max_train_steps=4, checkpointing_steps=2,
              gradient_accumulation_steps=2, train_batch_size=2)
    straight = train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "straight", **kw))
    interrupted = tmp_path / "resumed"
    train(_cfg(tiny_pipelines["sd"], style_pairs, interrupted, **{**kw, "max_train_steps": 3}))
    assert (interrupted / "checkpoint-2").is_dir()
    resumed = train(_cfg(tiny_pipelines["sd"], style_pairs, interrupted,
                         resume_from_checkpoint=str(interrupted / "checkpoint-2"), **kw))
    logged = [m["empty_prompts"] for m in _metrics(straight)]
    assert logged[2:] == [m["empty_prompts"] for m in _metrics(resumed)][2:] and sum(logged[2:]) > 0
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_npo_recipes_drop_a_fifth_of_the_captions():
    from pathlib import Path

    from diffalign.config_loader import load_config
    from diffalign.training.config import TrainConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    for name, p in (("sd15_npo", 0.2), ("sdxl_npo", 0.2), ("toy_npo", 0.2), ("sd15_dpo", 0.0), ("sd15_selfnpo", 0.0),
                    ("sdxl_mapo_official", 0.0)):
        cfg = load_config(TrainConfig, configs / f"{name}.yaml", ["--dataset_name=d", "--output_dir=o"]).validate()
        assert cfg.proportion_empty_prompts == p, name
