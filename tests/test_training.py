import json
import math

import numpy as np
import pytest
import torch
from lora_checks import assert_every_lora_weight_changed
from safetensors.torch import load_file

from diffalign.models import load_family
from diffalign.toy.render_pairs import write_pairs_parquet
from diffalign.training.recipes import PairBatch, PreferenceRecipe, count_unet_calls


@pytest.fixture(scope="module")
def style_pairs(tmp_path_factory):
    return write_pairs_parquet(tmp_path_factory.mktemp("pairs") / "style.parquet", 24, kind="style", seed=3)


def _cfg(model, data, out, **kw):
    from diffalign.training.config import TrainConfig

    base = dict(method="mapo", pretrained_model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out),
                resolution=32, train_batch_size=4, max_train_steps=3, learning_rate=1e-3, lr_scheduler="constant",
                lr_warmup_steps=0, rank=4, seed=0, report_to="none", checkpointing_steps=1000, beta=None)
    base.update(kw)
    if base["method"] in ("dpo", "npo") and base["beta"] is None:
        base["beta"] = 5000.0
    return TrainConfig(**base)


def _batch(family, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = lambda: torch.randn(b, 4, 16, 16, generator=g)
    cond = family.encode_prompts(["a red circle"] * b)
    return PairBatch(lat(), lat(), cond, cond)


def test_first_dpo_loss_with_zero_lora_is_ln2_and_calls_are_counted(tiny_pipelines):
    family = load_family(tiny_pipelines["sd"])
    family.add_lora(4)
    batch = _batch(family)
    noise = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 900])
    dpo = PreferenceRecipe(family, "dpo", beta=5000.0)
    with count_unet_calls(family.unet) as calls:
        result = dpo(batch, noise, t)
    assert calls["calls"] == 2  # policy + reference (adapters off), each one batch of 2B
    torch.testing.assert_close(result.losses, torch.full((3,), math.log(2.0)))
    with count_unet_calls(family.unet) as calls:
        PreferenceRecipe(family, "mapo")(batch, noise, t)
    assert calls["calls"] == 1  # MaPO: one network pass per step, no reference


def test_recipe_uses_one_noise_and_timestep_per_pair(tiny_pipelines):
    family = load_family(tiny_pipelines["sd"])
    family.add_lora(4)
    batch = _batch(family)
    batch = PairBatch(batch.latents_w, batch.latents_w.clone(), batch.cond_w, batch.cond_l)  # identical images
    noise = torch.randn(3, 4, 16, 16)
    result = PreferenceRecipe(family, "mapo")(batch, noise, torch.tensor([5, 50, 500]))
    # Same image, same noise, same t: winner and loser errors agree exactly (they share the 2B forward pass).
    assert float(result.metrics["err_w"]) == pytest.approx(float(result.metrics["err_l"]), rel=1e-5)


@pytest.mark.parametrize("method", ["dpo", "mapo", "npo", "sft"])
@pytest.mark.slow
def test_every_trainable_parameter_changes_and_lora_loads(tiny_pipelines, style_pairs, tmp_path, method):
    from diffusers import StableDiffusionPipeline

    from diffalign.training.loop import train

    out = train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / method, method=method,
                     validation_prompts=["a red circle"], validation_steps=2, validation_num_inference_steps=2))
    assert_every_lora_weight_changed(out, tiny_pipelines["sd"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd"])
    pipe.load_lora_weights(out)
    assert pipe.get_list_adapters()["unet"]
    assert (out / "config.yaml").is_file() and (out / "README.md").is_file()
    assert "pipe.load_lora_weights" in (out / "README.md").read_text()
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == ["step-000002.png", "step-000003.png"]
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 3


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_pipelines, style_pairs, tmp_path):
    from diffalign.training.loop import train

    kw = dict(method="dpo", max_train_steps=4, checkpointing_steps=2, gradient_accumulation_steps=2, train_batch_size=2)
    straight = train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "straight", **kw))
    # Stop after step 2 (the run ends there, writing checkpoint-2 first), then resume to step 4.
    interrupted = tmp_path / "resumed"
    train(_cfg(tiny_pipelines["sd"], style_pairs, interrupted, **{**kw, "max_train_steps": 3, "checkpointing_steps": 2}))
    assert (interrupted / "checkpoint-2").is_dir()
    resumed = train(_cfg(tiny_pipelines["sd"], style_pairs, interrupted,
                         resume_from_checkpoint=str(interrupted / "checkpoint-2"), **kw))
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_full_finetune_dpo_with_frozen_reference_and_ema(tiny_pipelines, style_pairs, tmp_path):
    from diffusers import UNet2DConditionModel

    from diffalign.training.loop import train

    out = train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "full", method="dpo", train_mode="full",
                     learning_rate=1e-4, max_train_steps=2, use_ema=True, ema_decay=0.5))
    base = UNet2DConditionModel.from_pretrained(tiny_pipelines["sd"], subfolder="unet").state_dict()
    trained = UNet2DConditionModel.from_pretrained(out / "unet_raw").state_dict()
    unchanged = [k for k in base if torch.equal(base[k], trained[k])]
    assert not unchanged, unchanged[:5]
    ema = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    key = next(iter(base))
    assert not torch.equal(ema[key], trained[key])


@pytest.mark.slow
def test_sdxl_mapo_trains(tiny_pipelines, style_pairs, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from diffalign.training.loop import train

    out = train(_cfg(tiny_pipelines["sdxl"], style_pairs, tmp_path / "xl", method="mapo", max_train_steps=2))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipelines["sdxl"])
    pipe.load_lora_weights(out)
    assert pipe.get_list_adapters()["unet"]


@pytest.mark.slow
def test_kohya_export_round_trips_through_diffusers(tiny_pipelines, style_pairs, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffalign.cli import main
    from diffalign.training.loop import train

    out = train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "k", method="mapo", max_train_steps=2,
                     learning_rate=1e-2, lora_alpha=8))
    assert main(["export", "--lora", str(out), "--format", "kohya", "--out", str(tmp_path / "kohya.safetensors")]) == 0
    keys = load_file(tmp_path / "kohya.safetensors").keys()
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys) and any(k.endswith(".lora_up.weight") for k in keys)

    def images(lora):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd"])
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(lora)
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    np.testing.assert_allclose(images(str(out)), images(str(tmp_path / "kohya.safetensors")), atol=1e-5)


@pytest.mark.slow
def test_train_cli_overrides_and_bad_keys(tiny_pipelines, style_pairs, tmp_path, capsys):
    from diffalign.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"method: sft\npretrained_model_name_or_path: {tiny_pipelines['sd']}\nresolution: 32\n"
                      f"dataset_name: {style_pairs}\ntrain_batch_size: 2\nmax_train_steps: 5\nreport_to: none\n")
    assert main(["train", str(config), f"--output_dir={tmp_path / 'o'}", "--max_train_steps=1"]) == 0
    assert json.loads((tmp_path / "o" / "train_report.json").read_text())["steps"] == 1
    assert main(["train", str(config), f"--output_dir={tmp_path / 'o2'}", "--learnng_rate=1e-4"]) == 2
    assert "learning_rate" in capsys.readouterr().err


@pytest.mark.slow
def test_training_uses_a_matching_cache_and_says_so(tiny_pipelines, style_pairs, tmp_path, capsys):
    from diffalign.training.loop import train

    cache = tmp_path / "cache"
    kw = dict(method="mapo", max_train_steps=2, use_cache=True, cache_dir=str(cache), random_flip=False)
    train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "a", **kw))
    first = capsys.readouterr().out
    assert "building it" in first and (cache / "manifest.json").is_file()
    built = (cache / "manifest.json").stat().st_mtime_ns
    train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "b", **kw))
    second = capsys.readouterr().out
    assert "using the latent cache" in second and "building it" not in second
    assert (cache / "manifest.json").stat().st_mtime_ns == built  # reused, not rebuilt


@pytest.mark.slow
def test_the_cache_command_builds_the_cache_the_run_uses(tiny_pipelines, style_pairs, tmp_path, capsys):
    """Every data key reaches `diffalign cache` as it reaches `diffalign train` (min_image_size did not, so a
    prebuilt cache never matched and the run built its own)."""
    from diffalign.cli import main

    cache = tmp_path / "cache"
    config = tmp_path / "c.yaml"
    config.write_text(f"method: mapo\npretrained_model_name_or_path: {tiny_pipelines['sd']}\nresolution: 32\n"
                      f"dataset_name: {style_pairs}\ntrain_batch_size: 2\nmax_train_steps: 1\nreport_to: none\n"
                      f"use_cache: true\ncache_dir: {cache}\nrandom_flip: false\nmin_image_size: 16\n")
    assert main(["cache", str(config), f"--output_dir={tmp_path / 'o'}"]) == 0
    built = (cache / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["train", str(config), f"--output_dir={tmp_path / 'o'}"]) == 0
    out = capsys.readouterr().out
    assert "using the latent cache" in out and "building it" not in out
    assert (cache / "manifest.json").stat().st_mtime_ns == built


@pytest.mark.slow
def test_training_with_loading_threads_gives_the_same_weights(tiny_pipelines, style_pairs, tmp_path):
    from diffalign.training.loop import train

    kw = dict(method="mapo", max_train_steps=3, train_batch_size=2)
    a = load_file(train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "a", **kw)) / "pytorch_lora_weights.safetensors")
    b = load_file(train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "b", dataloader_num_workers=2, **kw))
                  / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_latest_and_checkpoint_limit(tiny_pipelines, style_pairs, tmp_path, capsys):
    from diffalign.training.checkpoint import list_checkpoints
    from diffalign.training.loop import train

    out = tmp_path / "run"
    kw = dict(method="sft", checkpointing_steps=1, checkpoints_total_limit=2)
    train(_cfg(tiny_pipelines["sd"], style_pairs, out, max_train_steps=4, **kw))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]  # the last step gets one too
    capsys.readouterr()
    train(_cfg(tiny_pipelines["sd"], style_pairs, out, max_train_steps=5, resume_from_checkpoint="latest", **kw))
    assert "resumed from" in capsys.readouterr().out and "checkpoint-5" in str(list_checkpoints(out))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [4, 5]


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error(tiny_pipelines, style_pairs, tmp_path, monkeypatch):
    from diffalign.errors import UserError
    from diffalign.training import recipes
    from diffalign.training.loop import train

    real = recipes.PreferenceRecipe.__call__

    def poisoned(self, batch, noise, t):
        result = real(self, batch, noise, t)
        result.losses = result.losses * float("nan")
        return result

    monkeypatch.setattr(recipes.PreferenceRecipe, "__call__", poisoned)
    # Issue 9: a non-finite step is skipped; max_consecutive_nonfinite of them in a row stop the run.
    with pytest.raises(UserError, match=r"loss or its gradients were not finite .* stopped at step 1"):
        train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "nan", max_train_steps=2, max_consecutive_nonfinite=1))


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed_precision in it; a test that
    changes it starts and ends with a fresh one (accelerate's own tests do the same)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.parametrize("method,mode,model", [("mapo", "lora", "sd"), ("dpo", "full", "sd"), ("selfnpo", "lora", "sd"),
                                              ("selfnpo", "full", "sd"), ("dpo", "lora", "sdxl")])
@pytest.mark.slow
def test_mixed_precision_keeps_frozen_weights_in_bf16_and_trains_in_float32(tiny_pipelines, style_pairs, tmp_path,
                                                                            seen_run, fresh_accelerator_state,
                                                                            method, mode, model):
    """bf16 (CPU autocast here; fp16 on GPUs works the same way): the frozen weights are stored in bf16 - half
    the bytes - while every trained weight, the DPO reference aside, stays float32, and the run still trains."""
    from diffalign.training.loop import train

    kw = dict(method=method, train_mode=mode, max_train_steps=2, train_batch_size=2, mixed_precision="bf16")
    if method == "selfnpo":
        kw.update(dataset_name="toy", ddim_grid=5, teacher_steps=2, teacher_ema_decay=0.5)
    out = train(_cfg(tiny_pipelines[model], style_pairs, tmp_path / "run", **kw))

    family = seen_run["family"]
    for module in family.text_encoders:
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    vae_dtype = torch.float32 if family.vae.config.force_upcast else torch.bfloat16  # SDXL's asks for float32
    assert {p.dtype for p in family.vae.parameters()} == {vae_dtype}
    unet = family.bare_unet
    trained = {p.dtype for p in unet.parameters() if p.requires_grad}
    frozen = {p.dtype for p in unet.parameters() if not p.requires_grad}
    assert trained == {torch.float32}
    assert frozen == ({torch.bfloat16} if mode == "lora" else set())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    if mode == "lora":
        assert_every_lora_weight_changed(out, tiny_pipelines[model])
    else:
        from diffusers import UNet2DConditionModel

        tuned = UNet2DConditionModel.from_pretrained(out / "unet")
        base = UNet2DConditionModel.from_pretrained(tiny_pipelines["sd"], subfolder="unet")
        assert {p.dtype for p in tuned.parameters()} == {torch.float32}
        changed = [not torch.equal(a, b) for a, b in zip(tuned.parameters(), base.parameters())]
        assert sum(changed) > 0.9 * len(changed)


@pytest.mark.slow
def test_bf16_full_finetune_samples_validation_grids_with_its_half_precision_reference(tiny_pipelines, style_pairs,
                                                                                      tmp_path, fresh_accelerator_state):
    """The base row of a full fine-tune samples the frozen reference copy, stored in bf16: its latents reached the
    float32 VAE (the tiny VAE asks for force_upcast) and the validation crashed with a dtype mismatch in conv2d."""
    from PIL import Image

    from diffalign.training.loop import train

    out = train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "run", method="dpo", train_mode="full",
                     mixed_precision="bf16", max_train_steps=2, train_batch_size=2, learning_rate=1e-4,
                     validation_prompts=["a red circle"], validation_steps=1, validation_num_inference_steps=2))
    grids = sorted((out / "validation").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000001.png", "step-000002.png"]
    assert Image.open(grids[-1]).info["rows"].split("\n") == ["base", "trained, step 2"]


def test_frozen_weight_dtype_follows_mixed_precision():
    from diffalign.training.setup import frozen_weight_dtype

    assert frozen_weight_dtype("fp16") == torch.float16 and frozen_weight_dtype("bf16") == torch.bfloat16
    assert frozen_weight_dtype("no") == frozen_weight_dtype(None) == torch.float32


@pytest.mark.slow
def test_use_cache_auto_gives_the_pixel_paths_batches_with_flips(tiny_pipelines, style_pairs, tmp_path):
    """use_cache=auto on local data trains from a cache holding both views of every pair, and picks
    per pair and epoch the view the pixel path flips to: the same batches as use_cache=false, up to VAE rounding."""
    from diffalign.training.batches import CachedItems, PixelPairs, to_pair_batch
    from diffalign.training.pair_data import load_pair_items

    family = load_family(tiny_pipelines["sd"])
    logs = []
    kw = dict(random_flip=True, center_crop=True, cache_dir=str(tmp_path / "cache"))
    _, cached = load_pair_items(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "a", use_cache="auto", **kw),
                                family, 32, logs.append)
    _, pixels = load_pair_items(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "b", use_cache=False, **kw),
                                family, 32, logs.append)
    assert isinstance(cached, CachedItems) and isinstance(pixels, PixelPairs) and len(cached) == len(pixels) == 24
    assert any("latent cache built in" in m for m in logs)
    flips = []
    for epoch in (0, 1):
        for i in range(len(pixels)):
            p, c = pixels.item(i, epoch), cached.item(i, epoch)
            assert p["flipped"] == c["flipped"] and p["index"] == c["index"]
            flips.append(p["flipped"])
        rows = range(0, 24, 6)
        bp = to_pair_batch([pixels.item(i, epoch) for i in rows], family, 32, "cpu")
        bc = to_pair_batch([cached.item(i, epoch) for i in rows], family, 32, "cpu")
        torch.testing.assert_close(bc.latents_w, bp.latents_w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bc.latents_l, bp.latents_l, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bc.cond_w.prompt_embeds, bp.cond_w.prompt_embeds, atol=1e-5, rtol=1e-5)
    assert 0 < sum(flips) < len(flips)  # both views are used
    # The flipped views really are other latents (the test could not pass with one view only).
    item = next(cached.cached[i] for i in range(24))
    assert not torch.allclose(item["latents_w"], item["latents_w_flip"])


@pytest.mark.slow
def test_use_cache_auto_keeps_pixels_for_random_crops_and_says_why(tiny_pipelines, tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from diffalign.toy.render_pairs import render_pairs
    from diffalign.training.batches import PixelPairs
    from diffalign.training.pair_data import load_pair_items

    def widen(data):  # 48x32: a random crop to 32 px has 16 columns of room
        out = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize((48, 32)).save(out, format="PNG")
        return out.getvalue()

    rows = [{**r, "jpg_0": widen(r["jpg_0"]), "jpg_1": widen(r["jpg_1"])} for r in render_pairs(4, "style", "striped", 3, False)]
    wide = tmp_path / "wide.parquet"
    pq.write_table(pa.Table.from_pylist(rows), wide)
    family = load_family(tiny_pipelines["sd"])
    logs = []
    cfg = _cfg(tiny_pipelines["sd"], wide, tmp_path / "o", random_flip=True, center_crop=False, use_cache="auto")
    _, items = load_pair_items(cfg, family, 32, logs.append)
    assert isinstance(items, PixelPairs)
    assert sum("training on pixels" in m and "random crop" in m for m in logs) == 1


@pytest.mark.slow
def test_adapters_off_reference_equals_peft_disable_and_restores_the_flags(tiny_pipelines):
    from diffalign.models.lora import lora_disabled
    from diffalign.training.reference import AdaptersOff

    family = load_family(tiny_pipelines["sd"])
    family.add_lora(4)
    with torch.no_grad():
        for name, p in family.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)  # adapters that change the output
    batch = _batch(family, b=2)
    x, t = batch.latents_w, torch.tensor([10, 700])
    with torch.no_grad():
        on = family.predict(x, t, batch.cond_w)
        with lora_disabled(family.unet):
            peft_off = family.predict(x, t, batch.cond_w)
        off = AdaptersOff(family.unet)
        with off.active(family.unet) as net:
            ours = family.predict(x, t, batch.cond_w, net=net)
        again = family.predict(x, t, batch.cond_w)
    assert not torch.equal(on, peft_off)
    assert torch.equal(ours, peft_off) and torch.equal(again, on)
