"""Self-NPO: the teacher (DDIM maths, call count, no gradient, EMA rule), the training loop, resume, outputs.

The renoise marginal and the pseudo-Huber values are tested in test_objectives.py.
"""

import io
import json

import numpy as np
import pytest
import torch
from lora_checks import assert_every_lora_weight_changed
from safetensors.torch import load_file

from diffalign.errors import UserError
from diffalign.models import Conditioning, load_family
from diffalign.training.selfnpo import EmaTeacher, SelfNPOBatch, SelfNPORecipe, ddim_grid

LATENT = (4, 16, 16)


@pytest.fixture(scope="module")
def image_captions(tmp_path_factory):
    """A parquet of toy renders with an `image` and a `caption` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from diffalign.toy.render import render
    from diffalign.toy.world import caption, sample_scenes

    rng = np.random.default_rng(0)
    scenes = sample_scenes(8, rng)
    rows = []
    for scene, img in zip(scenes, render(scenes, rng)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        rows.append({"image": buf.getvalue(), "caption": caption(shape=scene.shape, colour=scene.colour)})
    path = tmp_path_factory.mktemp("ic") / "images.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\na blue square\n\na green triangle\na yellow diamond\n")
    return path


def _cfg(model, data, out, **kw):
    from diffalign.training.config import TrainConfig

    base = dict(method="selfnpo", pretrained_model_name_or_path=str(model), dataset_name=str(data),
                output_dir=str(out), resolution=32, train_batch_size=2, max_train_steps=3, learning_rate=1e-3,
                rank=4, seed=0, report_to="none", checkpointing_steps=1000, ddim_grid=5, teacher_steps=2,
                teacher_guidance=-5.0, teacher_ema_decay=0.9, image_columns=("image",))
    base.update(kw)
    return TrainConfig(**base)


def _batch(family, n=3, latents=True, prompts=("a red circle", "a blue square", "")):
    cond = family.encode_prompts(list(prompts[:n]))
    uncond = family.unconditional(1).repeat(n).replace(time_ids=cond.time_ids)
    lat = torch.randn(n, *LATENT, generator=torch.Generator().manual_seed(5)) if latents else None
    return SelfNPOBatch(cond, uncond, lat)


def _lora_family(path):
    torch.manual_seed(0)
    family = load_family(path)
    family.add_lora(4)
    # Non-zero adapters, so the student differs from the base and every LoRA weight gets a gradient.
    with torch.no_grad():
        for name, p in family.unet.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return family, {n: p for n, p in family.unet.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ teacher
def test_ddim_grid_trailing():
    assert ddim_grid(1000, 25).tolist() == list(range(999, 0, -40))
    assert ddim_grid(1000, 4).tolist() == [999, 749, 499, 249]
    with pytest.raises(ValueError):
        ddim_grid(1000, 0)


@pytest.mark.parametrize("kind,w", [("sd", -1.0), ("sd-v", -5.0)])
@pytest.mark.slow
def test_teacher_walk_equals_diffusers_ddim(tiny_pipelines, kind, w):
    """From pure noise with K = N-1 the teacher's walk is a whole trailing-DDIM sampling run (eta 0): with the
    interior range it ends at the lowest grid point; with the official range a sample starting below the top
    takes one more step, into t = 0 with alphas_cumprod[0] (diffusers' set_alpha_to_one=False), and its target
    is the teacher's x0 estimate there."""
    from diffusers import DDIMScheduler

    family = load_family(tiny_pipelines[kind])
    named = {n: p for n, p in family.unet.named_parameters()}
    teacher = EmaTeacher(family.unet, named, 0.999, separate_copy=True)
    B = 4
    batch = _batch(family, n=B, latents=False, prompts=("a red circle", "a blue square", "", "a green triangle"))
    pair = type(batch.cond).cat([batch.cond, batch.uncond])

    def guided(x, t):
        c, u = family.predict(torch.cat([x, x]), t, pair).chunk(2)
        return c + w * (c - u)

    sched = DDIMScheduler.from_config(family.noise_scheduler.config, timestep_spacing="trailing",
                                      set_alpha_to_one=False)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]
    for start_range, seed in (("interior", 3), ("official", 1)):
        recipe = SelfNPORecipe(family, teacher, start="noise", guidance=w, grid_steps=4, teacher_steps=3,
                               latent_shape=LATENT, start_range=start_range)
        result = recipe.teacher_target(batch, torch.Generator().manual_seed(seed))
        gen = torch.Generator().manual_seed(seed)
        i = torch.randint(0, 1 if start_range == "interior" else 4, (B,), generator=gen)  # the start indices
        x = torch.randn(B, *LATENT, generator=gen)
        states, targets = [], []
        with torch.no_grad():
            for t in sched.timesteps:
                step = sched.step(guided(x, t), t, x, eta=0.0)
                states.append(x)
                targets.append(step.pred_original_sample)
                x = step.prev_sample
            states.append(x)  # at t = 0: the final sample with alphas_cumprod[0]
            targets.append(family.pred_x0(x, 0, guided(x, torch.tensor(0))))
        end = torch.clamp(i + 3, max=4)
        for b in range(B):
            torch.testing.assert_close(result.x_t[b], states[end[b]][b], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(result.target[b], targets[end[b]][b], rtol=1e-4, atol=1e-4)
        path = [999, 749, 499, 249, 0]
        assert result.t.tolist() == [path[e] for e in end] and result.t_start.tolist() == [path[j] for j in i]
        assert result.calls == int(end.max()) + 1
        if start_range == "interior":
            assert result.t.tolist() == [249] * B and result.calls == 4
        else:  # the seed gives both kinds of sample: one ends at 249 after 3 steps, the others at 0
            assert set(result.t.tolist()) == {249, 0} and result.calls == 5


def _cheap_family(path):
    """A real family's noise maths with a network that predicts 0 and records each call's timesteps: many
    teacher walks at no cost."""
    family = load_family(path)
    family.calls = []

    def predict(x, t, cond, **kw):
        family.calls.append(torch.as_tensor(t).expand(x.shape[0]).clone())
        return torch.zeros_like(x)

    family.predict = predict
    return family


@pytest.mark.parametrize("start", ["images", "noise"])
@pytest.mark.slow
def test_start_range_distribution(tiny_pipelines, start):
    """(t_start, t_end) over many draws: official = start index uniform over all N grid points, end clipped at
    t = 0 (exactly when i >= N-K, a share K/N); interior = the old rule, i uniform over 0..N-1-K, never t = 0.
    With t_end = 0 the student's s is uniform on 1..T-1."""
    family = _cheap_family(tiny_pipelines["sd"])
    teacher = EmaTeacher(family.unet, {}, 0.9, separate_copy=False)
    N, K, B, T = 25, 5, 20000, 1000
    grid = ddim_grid(T, N).tolist()
    shape = (1, 2, 2)
    cond = Conditioning(torch.zeros(B, 1, 1))
    batch = SelfNPOBatch(cond, cond, torch.zeros(B, *shape) if start == "images" else None)
    results = {}
    for start_range in ("official", "interior"):
        recipe = SelfNPORecipe(family, teacher, start=start, grid_steps=N, teacher_steps=K, latent_shape=shape,
                               start_range=start_range)
        family.calls.clear()
        results[start_range] = recipe(batch, torch.Generator().manual_seed(7))
        s = family.calls[-1]  # the student's call comes last
        teacher_result = recipe.teacher_target(batch, torch.Generator().manual_seed(7))  # the same draws again
        t_start, t_end = teacher_result.t_start, teacher_result.t
        i = torch.tensor([grid.index(v) for v in t_start.tolist()])
        counts = torch.bincount(i, minlength=N).double()
        if start_range == "official":
            # Support: every start index 0..N-1; the end is the grid point K further, or t = 0 past the bottom.
            assert counts.gt(0).all()
            expected_end = torch.tensor([grid[j + K] if j + K < N else 0 for j in i.tolist()])
            assert torch.equal(t_end, expected_end)
            assert torch.equal(t_end == 0, i >= N - K)
            share = (t_end == 0).double().mean().item()
            assert abs(share - K / N) < 4.5 * (K / N * (1 - K / N) / B) ** 0.5
            zero = t_end == 0
            assert (s[zero] >= 1).all() and (s[zero] <= T - 1).all()
            assert s[zero].min() < grid[-1]  # below the lowest grid point: impossible with the interior range
            assert abs(s[zero].double().mean().item() - T / 2) < 4.5 * (T / 12 ** 0.5) / zero.sum().item() ** 0.5
        else:
            # The old rule, draw for draw: the same generator gives the same start indices as before.
            old_i = torch.randint(0, N - K, (B,), generator=torch.Generator().manual_seed(7))
            assert torch.equal(i, old_i)
            assert counts[: N - K].gt(0).all() and counts[N - K :].eq(0).all()
            assert torch.equal(t_end, torch.tensor([grid[j + K] for j in i.tolist()]))
            assert t_end.min().item() == grid[-1] and t_start.min().item() == grid[N - 1 - K]  # 39 and 239
        assert (s > t_end).all() and (s <= T - 1).all()
        # Each start index equally likely: every count within 4.5 sigma of its binomial expectation.
        support = N if start_range == "official" else N - K
        p = 1 / support
        sigma = (B * p * (1 - p)) ** 0.5
        assert (counts[:support] - B * p).abs().max().item() < 4.5 * sigma
    assert results["official"].metrics["teacher_calls"] == (K + 1 if start == "images" else N + 1)
    assert results["interior"].metrics["teacher_calls"] == (K + 1 if start == "images" else N)  # max i = N-1-K


@pytest.mark.slow
def test_teacher_calls_per_step_and_batching(tiny_pipelines):
    family, named = _lora_family(tiny_pipelines["sd"])
    teacher = EmaTeacher(family.unet, named, 0.999, separate_copy=False)
    B, K, N = 3, 2, 6
    seen = []
    hook = family.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    path = ddim_grid(1000, N).tolist() + [0]
    try:
        for start_range in ("interior", "official"):
            for w, per_call in ((-5.0, 2 * B), (-1.0, B)):
                for start in ("images", "noise"):
                    for seed in (11, 12):
                        seen.clear()
                        recipe = SelfNPORecipe(family, teacher, start=start, guidance=w, grid_steps=N,
                                               teacher_steps=K, latent_shape=LATENT, start_range=start_range)
                        result = recipe(_batch(family), torch.Generator().manual_seed(seed))
                        calls, rows = int(result.metrics["teacher_calls"]), list(seen)
                        r = recipe.teacher_target(_batch(family), torch.Generator().manual_seed(seed))
                        i = [path.index(v) for v in r.t_start.tolist()]
                        end = [path.index(v) for v in r.t.tolist()]
                        # A sample makes (end - i) + 1 calls; the batch walks in lock-step.
                        assert end == [min(j + K, N) if start_range == "official" else j + K for j in i]
                        if start == "images":
                            assert calls == max(e - j for e, j in zip(end, i)) + 1
                            if start_range == "interior":
                                assert calls == K + 1
                                # K+1 teacher calls (cond|uncond batched), then 1 student call
                                assert rows == [per_call] * (K + 1) + [B]
                        else:
                            assert calls == max(end) + 1
                        assert len(rows) == calls + 1
                        assert rows[0] == per_call and rows[-1] == B  # samples leave the batch as they finish
    finally:
        hook.remove()


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.slow
def test_teacher_takes_no_gradient_and_moves_only_by_ema(tiny_pipelines, mode):
    if mode == "full":
        family = load_family(tiny_pipelines["sd"])
        family.enable_full_finetune()
        named = {n: p for n, p in family.unet.named_parameters() if p.requires_grad}
    else:
        family, named = _lora_family(tiny_pipelines["sd"])
    decay = 0.75
    teacher = EmaTeacher(family.unet, named, decay, separate_copy=mode == "full")
    recipe = SelfNPORecipe(family, teacher, start="images", guidance=-5.0, grid_steps=5, teacher_steps=2)
    optimizer = torch.optim.SGD(list(named.values()), lr=1e-2)
    before = {n: w.clone() for n, w in teacher.state_dict().items()}
    student_before = {n: p.detach().clone() for n, p in named.items()}

    target = recipe.teacher_target(_batch(family), torch.Generator().manual_seed(0)).target
    assert not target.requires_grad
    result = recipe(_batch(family), torch.Generator().manual_seed(0))
    result.losses.mean().backward()
    for name, w in teacher.state_dict().items():
        assert w.grad is None and not w.requires_grad, name
    if mode == "full":
        assert all(p.grad is None and not p.requires_grad for p in teacher.module.parameters())
    # Running the teacher did not disturb the student (LoRA: the EMA weights were swapped in and back out).
    assert all(torch.equal(p.detach(), student_before[n]) for n, p in named.items())
    optimizer.step()
    for name, w in teacher.state_dict().items():
        assert torch.equal(w, before[name]), f"{name} moved by the optimizer step"
    teacher.update(named)
    changed = 0
    for name, w in teacher.state_dict().items():
        expected = decay * before[name] + (1 - decay) * named[name].detach()
        assert torch.equal(w, expected), name
        changed += not torch.equal(w, before[name])
    assert changed > 0.9 * len(named)


# -------------------------------------------------------------------------------------------- the loop
@pytest.mark.slow
def test_lora_noise_start_trains_every_parameter_and_loads(tiny_pipelines, prompt_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffalign.training.loop import train

    out = train(_cfg(tiny_pipelines["sd"], prompt_file, tmp_path / "lora", selfnpo_start="noise",
                     validation_prompts=["a red circle"], validation_steps=3, validation_num_inference_steps=2))
    assert_every_lora_weight_changed(out, tiny_pipelines["sd"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd"])
    pipe.load_lora_weights(out)
    assert pipe.get_list_adapters()["unet"]
    card = (out / "README.md").read_text()
    assert "NEGATIVE model" in card and "negative branch" in card and "load_lora_weights" in card
    assert "| start range | official: any grid point, the teacher's steps clipped at t = 0 |" in card
    assert (out / "config.yaml").is_file() and (out / "validation" / "step-000003.png").is_file()
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 3 and report["data"]["prompts"] == 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"loss", "t", "s", "t_start", "teacher_calls", "lr", "grad_norm"} <= set(metrics[0])


@pytest.mark.slow
def test_full_finetune_images_start_v_prediction(tiny_pipelines, image_captions, tmp_path):
    from diffusers import UNet2DConditionModel

    from diffalign.training.loop import train

    out = train(_cfg(tiny_pipelines["sd-v"], image_captions, tmp_path / "full", selfnpo_start="images",
                     train_mode="full", learning_rate=1e-4, max_train_steps=2, selfnpo_loss="l2"))
    base = UNet2DConditionModel.from_pretrained(tiny_pipelines["sd-v"], subfolder="unet").state_dict()
    trained = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    unchanged = [k for k in base if torch.equal(base[k], trained[k])]
    assert not unchanged, unchanged[:5]
    card = (out / "README.md").read_text()
    assert "NEGATIVE model" in card and "neg.unet = UNet2DConditionModel.from_pretrained" in card


@pytest.mark.slow
def test_sdxl_one_step(tiny_pipelines, image_captions, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from diffalign.training.loop import train

    out = train(_cfg(tiny_pipelines["sdxl"], image_captions, tmp_path / "xl", selfnpo_start="images",
                     max_train_steps=1, random_flip=True))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipelines["sdxl"])
    pipe.load_lora_weights(out)
    assert pipe.get_list_adapters()["unet"]


@pytest.mark.slow
def test_resume_gives_the_same_student_and_teacher(tiny_pipelines, prompt_file, tmp_path):
    from diffalign.training.loop import train

    kw = dict(selfnpo_start="noise", max_train_steps=5, checkpointing_steps=2, gradient_accumulation_steps=2)
    straight = train(_cfg(tiny_pipelines["sd"], prompt_file, tmp_path / "straight", **kw))
    interrupted = tmp_path / "resumed"
    train(_cfg(tiny_pipelines["sd"], prompt_file, interrupted, **{**kw, "max_train_steps": 3}))
    assert (interrupted / "checkpoint-2" / "ema.safetensors").is_file()
    resumed = train(_cfg(tiny_pipelines["sd"], prompt_file, interrupted, resume_from_checkpoint="latest", **kw))
    for name in ("pytorch_lora_weights.safetensors", "checkpoint-4/ema.safetensors",
                 "checkpoint-4/trainable.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # The teacher is an EMA of the student, not the student, and not the base.
    ema = load_file(straight / "checkpoint-4" / "ema.safetensors")
    student = load_file(straight / "checkpoint-4" / "trainable.safetensors")
    assert any(not torch.equal(ema[k], student[k]) for k in ema)


# ----------------------------------------------------------------------------------------- data and config
def test_prompt_sources(tmp_path, image_captions):
    from diffalign.data.captions import ImageCaptions
    from diffalign.data.prompts import read_prompts
    from diffalign.toy.prompts import toy_prompts

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"caption": "a red circle"}\n{"prompt": ""}\n')
    assert read_prompts(jsonl) == ["a red circle", ""]
    rows = ImageCaptions(image_captions, image_column="image", max_samples=3)
    assert len(rows) == 3 and rows.image(0).size == (32, 32)
    assert read_prompts(image_captions, "caption", max_samples=3) == [rows.caption(i) for i in range(3)]
    with pytest.raises(UserError, match="no column 'text'"):
        read_prompts(image_captions, "text")
    with pytest.raises(UserError, match="no image column"):
        ImageCaptions(image_captions, image_column="jpg_0")
    train, heldout = toy_prompts("train"), toy_prompts("heldout")
    assert len(heldout) == 8 and "" in train and read_prompts("toy") == train
    named_pairs = {(w[1], w[2]) for p in train if len(w := p.split()) == 3}
    assert not {tuple(h.split()[1:]) for h in heldout} & named_pairs


@pytest.mark.parametrize("kw,key", [
    (dict(beta=1000.0), "beta"),
    (dict(use_ema=True, train_mode="full"), "use_ema"),
    (dict(use_cache=True), "use_cache"),
    (dict(loss_type="hinge"), "loss_type"),
    (dict(ties="error"), "ties"),
    (dict(teacher_steps=0), "teacher_steps"),
    (dict(ddim_grid=3, teacher_steps=3), "ddim_grid"),
    (dict(teacher_ema_decay=1.0), "teacher_ema_decay"),
    (dict(huber_c=0.0), "huber_c"),
    (dict(selfnpo_start="images", image_columns=("jpg_0", "jpg_1")), "image_columns"),
    (dict(selfnpo_start="images", image_columns=("image",), dataset_name="toy"), "dataset_name=toy"),
    (dict(method="mapo", teacher_steps=3), "teacher_steps"),
    (dict(method="mapo", selfnpo_start="images"), "selfnpo_start"),
    (dict(method="mapo", selfnpo_start_range="interior"), "selfnpo_start_range=interior only applies"),
])
def test_config_rules(kw, key):
    from diffalign.training.config import TrainConfig

    base = dict(method="selfnpo", pretrained_model_name_or_path="toy", dataset_name="d.parquet", output_dir="out")
    TrainConfig(**base).validate()
    TrainConfig(**{**base, "selfnpo_start": "images", "image_columns": ("image",)}).validate()
    assert TrainConfig(**base).selfnpo_start_range == "official"
    TrainConfig(**{**base, "selfnpo_start_range": "interior"}).validate()
    with pytest.raises(UserError, match=key):
        TrainConfig(**{**base, **kw}).validate()


def test_shipped_selfnpo_recipes():
    from pathlib import Path

    from diffalign.config_loader import load_config
    from diffalign.training.config import TrainConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    sd15 = load_config(TrainConfig, configs / "sd15_selfnpo.yaml", ["--dataset_name=d"]).validate()
    assert (sd15.learning_rate, sd15.teacher_guidance, sd15.train_batch_size, sd15.max_train_steps, sd15.train_mode,
            sd15.use_8bit_adam, sd15.adam_weight_decay, sd15.max_grad_norm, sd15.teacher_steps, sd15.ddim_grid,
            sd15.teacher_ema_decay, sd15.huber_c) == (1e-6, -1.0, 20, 1000, "full", True, 1e-3, 1.0, 5, 25, 0.999, 1e-3)
    sdxl = load_config(TrainConfig, configs / "sdxl_selfnpo.yaml", ["--dataset_name=d"]).validate()
    assert (sdxl.learning_rate, sdxl.teacher_guidance, sdxl.train_batch_size, sdxl.adam_weight_decay) == (
        1e-7, -5.0, 10, 0.0)
    toy = load_config(TrainConfig, configs / "toy_selfnpo.yaml", []).validate()
    assert toy.method == "selfnpo" and toy.dataset_name == "toy" and toy.selfnpo_start == "noise"
    assert sd15.selfnpo_start_range == sdxl.selfnpo_start_range == toy.selfnpo_start_range == "official"
