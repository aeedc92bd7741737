"""Flow-matching families (issue 20): SD3 and FLUX against their stock pipelines, the flow training maths with
golden values, every method training, LoRA round trips through the pipelines' own loaders, exact resume.
All on tiny random-init pipelines built offline (tests/flow_builders.py)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from diffalign.errors import UserError
from diffalign.models import FlowSchedule, detect_family, load_family, load_lora_into_pipeline
from diffalign.models.flow import training_sigmas
from diffalign.models.flux import image_ids, pack_latents, unpack_latents
from diffalign.training.recipes import PairBatch, PreferenceRecipe
from diffalign.training.reference import FrozenCopy
from diffalign.training.timesteps import FlowTimesteps

FLOW = ("sd3", "flux")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from flow_builders import save_tiny_flow_pipelines

    return save_tiny_flow_pipelines(tmp_path_factory.mktemp("flow"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from diffalign.toy.render_pairs import write_pairs_parquet

    return write_pairs_parquet(tmp_path_factory.mktemp("pairs") / "pairs.parquet", 8, kind="style", seed=3)


def _pipe(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------ the families
@pytest.mark.parametrize("name", ["sd3", "flux", "flux-schnell"])
def test_detect_encode_and_predict_as_the_stock_pipeline(tiny, name):
    family = load_family(tiny[name])
    assert detect_family(tiny[name]) == family.name == ("sd3" if name == "sd3" else "flux")
    assert family.prediction_type == "flow" and family.denoiser_name == "transformer"
    pipe = _pipe(tiny[name])
    prompts = ["a red circle", ""]
    cond = family.encode_prompts(prompts)
    with torch.no_grad():
        if name == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
        else:
            emb, pooled, _ = pipe.encode_prompt(prompts, prompts)
    torch.testing.assert_close(cond.prompt_embeds, emb, rtol=0, atol=0)
    torch.testing.assert_close(cond.text_embeds, pooled, rtol=0, atol=0)
    # The transformer call of the pipeline at the first sampling step, against family.predict at that sigma.
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([999, 499])
    sigma = family.schedule.sigma(k, x)
    with torch.no_grad():
        out = family.predict(x, k, cond)
        if name == "sd3":
            ref = pipe.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=emb,
                                   pooled_projections=pooled, return_dict=False)[0]
        else:
            guidance = torch.ones(2) if pipe.transformer.config.guidance_embeds else None
            ids = pipe._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)
            packed = pipe._pack_latents(x, 2, 4, 16, 16)
            torch.testing.assert_close(packed, pack_latents(x), rtol=0, atol=0)
            torch.testing.assert_close(ids, image_ids(16, 16, "cpu", torch.float32), rtol=0, atol=0)
            ref = pipe.transformer(hidden_states=packed, timestep=sigma, guidance=guidance,
                                   pooled_projections=pooled, encoder_hidden_states=emb,
                                   txt_ids=torch.zeros(emb.shape[1], 3), img_ids=ids, return_dict=False)[0]
            ref = pipe._unpack_latents(ref, 32, 32, pipe.vae_scale_factor)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert family.latent_shape(32) == (4, 16, 16)


def test_images_encode_with_the_vae_shift_and_scale(tiny):
    for name, (scale, shift) in (("sd3", (1.5305, 0.0609)), ("flux", (0.3611, 0.1159))):
        family = load_family(tiny[name])
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.no_grad():
            mean = family.vae.encode(images).latent_dist.mean
        torch.testing.assert_close(family.encode_images(images), (mean - shift) * scale)
        torch.testing.assert_close(family.decode_latents(family.encode_images(images)),
                                   family.vae.decode(mean, return_dict=False)[0].clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_flux_packing_round_trips_and_refuses_odd_latents():
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert packed.shape == (2, 15, 64)
    torch.testing.assert_close(unpack_latents(packed, 6, 10), x, rtol=0, atol=0)
    with pytest.raises(UserError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 4))


# -------------------------------------------------------------------------------------------- the maths
def test_sigmas_follow_the_scheduler_shift(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler

    for name, shifted in (("sd3", True), ("flux", False)):
        family = load_family(tiny[name])
        sched = FlowMatchEulerDiscreteScheduler.from_config(family.scheduler.config)
        sig = family.schedule.sigmas
        # The scheduler's training sigmas run from noise down; ours are the same values upwards.
        torch.testing.assert_close(sig.float(), sched.sigmas.flip(0).float(), rtol=0, atol=1e-6)
        assert sig[-1] == 1.0 and bool((sig.diff() > 0).all())
        u = 500 / 1000  # k = 499 -> unshifted sigma 0.5; SD3.5's shift 3 gives 3u / (1 + 2u) = 0.75
        assert float(sig[499]) == pytest.approx(0.75 if shifted else 0.5, abs=1e-12)
        del u


def test_add_noise_target_x0_and_the_euler_step():
    sched = FlowSchedule(training_sigmas({"num_train_timesteps": 1000, "shift": 3.0}))
    x0, eps = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 499, 998])
    sig = sched.sigmas[t].view(-1, 1, 1, 1)
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - sig) * x0 + sig * eps, rtol=0, atol=1e-6)
    v = sched.target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0, rtol=0, atol=0)
    torch.testing.assert_close(sched.pred_x0(x_t, t, v), x0, rtol=0, atol=1e-6)  # the true v gives x0 back
    # The teacher's step from an x0 estimate is the Euler step of its velocity, and lands on the same path.
    t_next = torch.tensor([0, 200, 500])
    step = sched.ddim_step(x_t, x0, t, t_next)
    v_hat = (x_t - x0) / sig
    torch.testing.assert_close(step, x_t + (sched.sigmas[t_next].view(-1, 1, 1, 1) - sig) * v_hat, rtol=0, atol=1e-6)
    torch.testing.assert_close(step, sched.add_noise(x0, eps, t_next), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode"])
def test_weighted_timesteps(scheme):
    sampler = FlowTimesteps(1000, scheme, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    gen = torch.Generator().manual_seed(0)
    k = sampler.sample(20000, gen)
    assert k.dtype == torch.long and int(k.min()) >= 0 and int(k.max()) <= 999
    u = 1 - (k.double() + 0.5) / 1000  # back to the density's u (index floor(uT) into sigmas from noise down)
    if scheme == "none":
        assert float(u.mean()) == pytest.approx(0.5, abs=0.01) and float(u.std()) == pytest.approx(12 ** -0.5, abs=0.01)
    elif scheme == "logit_normal":  # sigmoid(N(0, 1)): mean 0.5, sd ~0.208, and logit(u) ~ N(0, 1)
        z = torch.logit(u)
        assert float(z.mean()) == pytest.approx(0.0, abs=0.03) and float(z.std()) == pytest.approx(1.0, abs=0.03)
    else:  # the mode density with scale 1.29 puts more mass in the middle than uniform
        middle = float(((u > 0.25) & (u < 0.75)).double().mean())
        assert middle > 0.6
    # The same generator gives the same draws; a global batch of 4 split over 2 processes gives its rows.
    both = sampler.sample(4, torch.Generator().manual_seed(3))
    halves = [sampler.sample(2, torch.Generator().manual_seed(3), shard=(r, 2)) for r in range(2)]
    assert torch.equal(both[0::2], halves[0]) and torch.equal(both[1::2], halves[1])


def test_weighting_scheme_is_refused_for_diffusion_models(tiny_pipelines):
    from diffalign.training.config import TrainConfig
    from diffalign.training.timesteps import timestep_sampler

    cfg = TrainConfig(method="mapo", pretrained_model_name_or_path="x", dataset_name="y", output_dir="z",
                      weighting_scheme="logit_normal")
    with pytest.raises(UserError, match="weighting_scheme=logit_normal applies to flow-matching"):
        timestep_sampler(cfg, load_family(tiny_pipelines["sd"]))


class _Scaled(torch.nn.Module):
    """A stand-in transformer predicting `c * hidden_states`, so the errors can be worked out by hand."""

    def __init__(self, c: float):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(float(c)))

    def forward(self, hidden_states, **kwargs):
        return (self.c * hidden_states,)


@pytest.mark.parametrize("name", FLOW)
def test_dpo_and_mapo_losses_on_the_flow_target_golden(tiny, name):
    # sigma = 0.75 (SD3.5 shift 3 at k = 499; FLUX unshifted at k = 749). x0_w = 0.1, x0_l = -0.1, eps = 0.05.
    # Policy v = x_t: x_t,w = 0.25*0.1 + 0.75*0.05 = 0.0625, target 0.05 - 0.1 = -0.05: err_w = 0.1125^2 = 0.01265625
    #                 x_t,l = -0.025 + 0.0375 = 0.0125, target 0.15:                   err_l = 0.1375^2 = 0.01890625
    # Reference v = 0: ref_w = 0.05^2 = 0.0025, ref_l = 0.15^2 = 0.0225.
    # DPO (beta 100): -log sigmoid(-0.5 * 100 * ((err_w - err_l) - (ref_w - ref_l))) = log(1 + e^{0.6875})
    # MaPO official: err_w + 0.1 * log(1 + e^{-1000 (g(err_w/2) - g(err_l/2))}), g(u) = u / (e^u - 1)
    family = load_family(tiny[name])
    k = torch.tensor([499 if name == "sd3" else 749] * 2)
    assert float(family.schedule.sigmas[k[0]]) == pytest.approx(0.75, abs=1e-12)
    cond = family.encode_prompts(["a red circle"] * 2)
    batch = PairBatch(torch.full((2, 4, 4, 4), 0.1), torch.full((2, 4, 4, 4), -0.1), cond, cond)
    noise = torch.full((2, 4, 4, 4), 0.05)
    dpo = PreferenceRecipe(family, "dpo", beta=100.0, reference=FrozenCopy(_Scaled(0.0)))
    dpo.attach(_Scaled(1.0))
    result = dpo(batch, noise, k)
    torch.testing.assert_close(result.metrics["err_w"], torch.tensor(0.01265625), rtol=1e-5, atol=0)
    torch.testing.assert_close(result.metrics["err_l"], torch.tensor(0.01890625), rtol=1e-5, atol=0)
    torch.testing.assert_close(result.losses, torch.full((2,), 1.0948510472537265), rtol=1e-4, atol=0)
    mapo = PreferenceRecipe(family, "mapo")
    mapo.attach(_Scaled(1.0))
    torch.testing.assert_close(mapo(batch, noise, k).losses, torch.full((2,), 0.031757501235142795), rtol=1e-4, atol=0)
    g = lambda u: u / math.expm1(u)  # noqa: E731  (the golden number above, from the formula)
    assert 0.01265625 + 0.1 * math.log1p(math.exp(-1000 * (g(0.01265625 / 2) - g(0.01890625 / 2)))) == \
        pytest.approx(0.031757501235142795, rel=1e-12)


def test_flux_dev_gets_the_training_guidance(tiny):
    family = load_family(tiny["flux"])
    seen = []
    hook = family.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance"]), with_kwargs=True)
    cond = family.encode_prompts(["a"])
    x = torch.zeros(1, 4, 4, 4)
    try:
        family.predict(x, torch.tensor([10]), cond)
        family.training_guidance = 3.5
        family.predict(x, torch.tensor([10]), cond)
    finally:
        hook.remove()
    assert [float(g) for g in seen] == [1.0, 3.5]
    schnell = load_family(tiny["flux-schnell"])
    assert not schnell.guidance_embeds
    from diffalign.training.config import TrainConfig
    from diffalign.training.setup import apply_flow_settings

    cfg = TrainConfig(method="mapo", guidance_scale=3.5)
    apply_flow_settings(cfg, load_family(tiny["flux"]))
    with pytest.raises(UserError, match="guidance embeddings"):
        apply_flow_settings(cfg, schnell)


# -------------------------------------------------------------------------------------------- training
def _train(model, data, out, **kw):
    from diffalign.training.config import TrainConfig
    from diffalign.training.loop import train

    base = dict(pretrained_model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out), resolution=32,
                train_batch_size=2, max_train_steps=2, learning_rate=1e-3, rank=4, seed=0, report_to="none",
                checkpointing_steps=1000, weighting_scheme="logit_normal")
    base.update(kw)
    return train(TrainConfig(**base))


def _assert_every_lora_weight_changed(out, model, rank=4, seed=0):
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    torch.manual_seed(seed)
    fresh = load_family(model)
    fresh.add_lora(rank)
    init = {k: v for k, v in fresh.unet.named_parameters() if v.requires_grad}
    assert len(init) == len(weights) > 0
    for name, value in init.items():
        module, which = name.split(".lora_")
        key = f"transformer.{module}.lora_{which[0]}.weight"
        assert not torch.equal(weights[key], value.detach()), f"{name} did not change"


@pytest.mark.parametrize("name", FLOW)
@pytest.mark.parametrize("method", ["dpo", "mapo", "npo", "sft", "selfnpo"])
def test_every_method_trains_every_lora_weight_and_loads_in_the_pipeline(tiny, pairs, tmp_path, name, method):
    kw = dict(method=method)
    data = pairs
    if method in ("dpo", "npo"):
        kw["beta"] = 1000.0
    if method == "selfnpo":
        data = tmp_path / "prompts.txt"
        data.write_text("a red circle\na blue square\n")
        kw.update(ddim_grid=5, teacher_steps=2, teacher_ema_decay=0.9, image_columns=(), weighting_scheme="none")
    if method == "mapo":
        kw.update(validation_prompts=["a red circle"], validation_steps=2, validation_num_inference_steps=2,
                  validation_guidance_scale=2.0)
    if name == "flux":
        kw["guidance_scale"] = 3.5
    out = _train(tiny[name], data, tmp_path / method, **kw)
    _assert_every_lora_weight_changed(out, tiny[name])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert load_lora_into_pipeline(_pipe(tiny[name]), out)
    if method == "mapo":
        assert [p.name for p in (out / "validation").glob("*.png")] == ["step-000002.png"]


@pytest.mark.parametrize("name", FLOW)
def test_full_finetune_changes_every_trained_weight(tiny, pairs, tmp_path, name):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if name == "sd3" else FluxTransformer2DModel
    out = _train(tiny[name], pairs, tmp_path / "full", method="sft", train_mode="full", learning_rate=1e-3,
                 max_train_steps=1)
    # Parameters, not buffers (SD3's fixed sin-cos position table is a buffer, never trained).
    base = {k: v.detach() for k, v in cls.from_pretrained(tiny[name], subfolder="transformer").named_parameters()}
    trained = {k: v.detach() for k, v in cls.from_pretrained(out, subfolder="transformer").named_parameters()}
    assert base.keys() == trained.keys()
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    # FLUX-dev: the guidance embedder is trained too (it gets the training guidance on every call).
    assert len(changed) == len(base), sorted(set(base) - set(changed))[:5]


def test_a_full_finetune_writes_transformer_where_diffusers_and_diffalign_load_it(tiny, pairs, tmp_path, seen_run,
                                                                                  capsys):
    """A transformer family's full fine-tune keeps the network where a pipeline folder does, in `transformer/` (with
    use_ema: the EMA there, the trained weights in `transformer_raw/`), not in `unet/`, in the run folder and in
    its checkpoints: diffusers' from_pretrained(run, subfolder="transformer") finds it, and so does every diffalign
    command that takes the run folder. Runs written before, with the transformer in `unet/`, still load."""
    import shutil

    from diffusers import SD3Transformer2DModel

    from diffalign.cli import main
    from diffalign.guidance.offsets import load_unet, resolve_offset
    from diffalign.models import load_pipeline, resolve_lora_file
    out = _train(tiny["sd3"], pairs, tmp_path / "full", method="sft", train_mode="full", use_ema=True, ema_decay=0.5,
                 checkpointing_steps=2)
    trained = {k: v.detach() for k, v in seen_run["family"].unet.named_parameters()}  # the trained (not EMA) weights
    ckpt = out / "checkpoint-2"
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert ema.keys() == trained.keys() and any(not torch.equal(ema[k], v) for k, v in trained.items())
    for folder in (out, ckpt):
        assert not (folder / "unet").exists() and not (folder / "unet_raw").exists()
        raw = dict(SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer_raw").named_parameters())
        averaged = dict(SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").named_parameters())
        assert all(torch.equal(raw[k], v) for k, v in trained.items())
        assert all(torch.equal(averaged[k], v) for k, v in ema.items())
    assert json.loads((ckpt / "state.json").read_text())["weights"] == {
        "transformer": "EMA of the trained weights (use_ema)", "transformer_raw": "the trained weights"}
    card = (out / "README.md").read_text()
    assert 'pipe.transformer = SD3Transformer2DModel.from_pretrained(".", subfolder="transformer")' in card

    # diffalign's own loader (guidance offsets, extract-lora) takes the run folder's transformer/.
    for folder in (out, ckpt):
        loaded = load_unet(str(folder))
        assert isinstance(loaded, SD3Transformer2DModel) and resolve_offset(folder).kind == "unet"  # a whole model
        assert all(torch.equal(dict(loaded.named_parameters())[k], v) for k, v in ema.items())
    capsys.readouterr()
    assert main(["extract-lora", "--base", str(tiny["sd3"]), "--tuned", str(out), "--rank", "64",
                 "--out", str(tmp_path / "lora")]) == 0
    pipe = load_pipeline(tiny["sd3"])
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    load_lora_into_pipeline(pipe, tmp_path / "lora")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    linear = {f"{n}.weight" for n, m in pipe.transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for k, v in pipe.transformer.state_dict().items():  # the LoRA at full rank: the fine-tune's Linear/Conv weights
        torch.testing.assert_close(v, ema[k] if k in linear else base[k], atol=1e-5, rtol=1e-4)
    # The run folder and a checkpoint are no LoRA, and a transformer is no negative model for guidance.
    for folder in (out, ckpt):
        with pytest.raises(UserError, match="full fine-tune: its weights are the transformer in .*transformer "):
            resolve_lora_file(folder)
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny["sd3"]), "--prompt", "x", "--negative-model", str(out), "--out",
                 str(tmp_path / "g")]) == 2
    assert "is a full model folder; guidance on a transformer composes LoRA offsets only" in capsys.readouterr().err

    # A run written before the folder followed the family: the transformer in unet/.
    old = tmp_path / "old"
    old.mkdir()
    shutil.copytree(out / "transformer", old / "unet")
    shutil.copy(out / "train_report.json", old / "train_report.json")
    loaded = load_unet(str(old))
    assert isinstance(loaded, SD3Transformer2DModel)
    assert all(torch.equal(dict(loaded.named_parameters())[k], v) for k, v in ema.items())
    with pytest.raises(UserError, match=r"its weights are the transformer in .*unet \(give it to extract-lora"):
        resolve_lora_file(old)


@pytest.mark.parametrize("name", FLOW)
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny, pairs, tmp_path, name):
    kw = dict(method="dpo", beta=1000.0, max_train_steps=4, checkpointing_steps=2, gradient_accumulation_steps=2,
              train_batch_size=1)
    straight = _train(tiny[name], pairs, tmp_path / "straight", **kw)
    interrupted = tmp_path / "resumed"
    _train(tiny[name], pairs, interrupted, **{**kw, "max_train_steps": 3})
    resumed = _train(tiny[name], pairs, interrupted, resume_from_checkpoint=str(interrupted / "checkpoint-2"), **kw)
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------- LoRA files
def _random_lora(path, out, seed):
    family = load_family(path)
    family.add_lora(4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in family.unet.named_parameters():
            if "lora_B" in pname:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return family, family.save_lora(out)


def _sample(pipe, name, **kw):
    args = dict(prompt=["a red circle"], height=32, width=32, num_inference_steps=2, output_type="latent",
                guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    if name == "flux":
        args.update(true_cfg_scale=2.0, negative_prompt=["a blue square"])
    args.update(kw)
    return pipe(**args).images


@pytest.mark.parametrize("name", FLOW)
def test_lora_round_trip_through_the_stock_pipeline_gives_identical_images(tiny, tmp_path, name):
    family, file = _random_lora(tiny[name], tmp_path / "lora", 1)
    keys = list(load_file(str(file)))
    assert keys and all(k.startswith("transformer.") for k in keys)
    with torch.no_grad():
        own = _sample(family.make_pipeline(), name)  # the family's in-memory LoRA
    pipe = _pipe(tiny[name])
    base = _sample(pipe, name)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded = _sample(pipe, name)
    assert not torch.equal(base, loaded)
    torch.testing.assert_close(loaded, own, rtol=0, atol=0)
    fresh = load_family(tiny[name])
    fresh.load_lora(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(_sample(fresh.make_pipeline(), name), own, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ the recipes
RECIPES = ("sd35_mapo", "sd35_dpo", "sd35_selfnpo", "flux_mapo", "flux_dpo")


@pytest.fixture
def fresh_accelerator_state():
    """The recipes start accelerate in bf16; accelerate keeps one state per process (see test_training.py)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipes_validate_and_fail_offline_only_for_the_weights(recipe, tmp_path, capsys,
                                                                        fresh_accelerator_state):
    from diffalign.cli import main
    from diffalign.config_loader import load_config
    from diffalign.shipped_configs import resolve_config
    from diffalign.training.config import TrainConfig

    cfg = load_config(TrainConfig, resolve_config(recipe))
    cfg.dataset_name = str(tmp_path / "missing.parquet")
    cfg.output_dir = str(tmp_path / "out")
    cfg.validate()
    assert cfg.train_mode == "lora" and cfg.mixed_precision == "bf16"
    code = main(["train", recipe, f"--dataset_name={tmp_path / 'missing.parquet'}", f"--output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "is not a local folder and is not in the Hugging Face cache" in err[0]
    assert cfg.pretrained_model_name_or_path in err[0]


def test_a_shipped_flux_recipe_trains_the_tiny_model(tiny, pairs, tmp_path, fresh_accelerator_state):
    from diffalign.cli import main

    code = main(["train", "flux_dpo", f"--pretrained_model_name_or_path={tiny['flux']}", f"--dataset_name={pairs}",
                 f"--output_dir={tmp_path / 'run'}", "--resolution=32", "--train_batch_size=2",
                 "--gradient_accumulation_steps=1", "--max_train_steps=2", "--lr_warmup_steps=1", "--learning_rate=1e-3",
                 "--rank=4", "--use_8bit_adam=false", "--mixed_precision=no", "--report_to=none",
                 "--gradient_checkpointing=false", "--validation_steps=1000", "--validation_num_inference_steps=2"])
    assert code == 0
    _assert_every_lora_weight_changed(tmp_path / "run", tiny["flux"])


def test_every_family_denoiser_is_a_class_load_denoiser_accepts():
    """models/folders.py lists the denoiser classes it loads by hand (the families import it): they are exactly the
    families' own `denoiser_class`es, so a new family cannot be forgotten there."""
    from diffalign.models import FAMILIES
    from diffalign.models.folders import DENOISER_CLASSES

    assert set(DENOISER_CLASSES) == {cls.denoiser_class for cls in FAMILIES.values() if cls is not None}
