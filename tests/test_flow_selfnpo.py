"""Self-NPO on flow-matching models (issue 20, docs/methods.md#self-npo-on-flow-models): the straight-path
re-noising gives the marginal of the later sigma, the teacher takes K Euler steps of its guided velocity in K+1
calls, its target is x_t - sigma v, and it moves only by its EMA. Tiny random-init SD3 / FLUX pipelines."""

import math

import pytest
import torch

from diffalign.models import FlowSchedule, load_family
from diffalign.models.flow import training_sigmas
from diffalign.training.selfnpo import EmaTeacher, SelfNPOBatch, SelfNPORecipe, ddim_grid

F64 = torch.float64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from flow_builders import save_tiny_flow_pipelines

    return save_tiny_flow_pipelines(tmp_path_factory.mktemp("flow"))


def test_renoise_gives_the_marginal_of_the_later_sigma():
    sched = FlowSchedule(training_sigmas({"num_train_timesteps": 1000, "shift": 3.0}))
    gen = torch.Generator().manual_seed(1234)
    t = torch.tensor([0, 100, 400, 900])
    s = torch.tensor([1, 500, 999, 950])
    shape = (4, 1, 250, 200)  # 50k elements per sample
    x0 = torch.linspace(-1.5, 1.5, 250 * 200, dtype=F64).reshape(1, 1, 250, 200).expand(shape)
    sig = sched.sigmas
    view = (-1, 1, 1, 1)
    x_t = (1 - sig[t]).view(view) * x0 + sig[t].view(view) * torch.randn(shape, generator=gen, dtype=F64)
    x_s = sched.renoise(x_t, t, s, torch.randn(shape, generator=gen, dtype=F64))
    resid = (x_s - (1 - sig[s]).view(view) * x0).flatten(1)
    n = resid.shape[1]
    for i in range(4):
        # mean (1 - sigma_s) x0: the residual has mean ~0 and is uncorrelated with x0 (5 standard errors) ...
        assert abs(resid[i].mean().item()) < 5 * sig[s[i]].item() / math.sqrt(n)
        assert abs((resid[i] * x0[i].flatten()).mean().item()) < 5 * 1.5 * sig[s[i]].item() / math.sqrt(n)
        # ... and std sigma_s (relative standard error of a sample std ~ 1/sqrt(2n) = 0.3%)
        assert resid[i].std().item() == pytest.approx(sig[s[i]].item(), rel=0.015)
    # s = T-1 (sigma 1) is pure noise: x_t drops out entirely.
    z = torch.randn(1, 3, 4, 4, dtype=F64)
    out = sched.renoise(torch.randn(1, 3, 4, 4, dtype=F64), torch.tensor([10]), torch.tensor([999]), z)
    torch.testing.assert_close(out, z, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="s > t"):
        sched.renoise(x_t[:2], t[:2], torch.tensor([0, 100]), x_t[:2])


def _batch(family, n=3, prompts=("a red circle", "a blue square", "")):
    cond = family.encode_prompts(list(prompts[:n]))
    uncond = family.unconditional(1).repeat(n)
    lat = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    return SelfNPOBatch(cond, uncond, lat)


def _lora_family(path):
    torch.manual_seed(0)
    family = load_family(path)
    family.add_lora(4)
    with torch.no_grad():
        for _, p in family.unet.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return family, {n: p for n, p in family.unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_teacher_takes_k_euler_steps_of_its_guided_velocity_in_k_plus_1_calls(tiny, name):
    family, named = _lora_family(tiny[name])
    teacher = EmaTeacher(family.unet, named, 0.999, separate_copy=False)
    B, K, N, w = 3, 2, 6, -3.0
    recipe = SelfNPORecipe(family, teacher, start="images", guidance=w, grid_steps=N, teacher_steps=K,
                           start_range="interior")
    batch = _batch(family, B)
    rows = []
    hook = family.unet.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]),
                                                 with_kwargs=True)
    try:
        result = recipe(batch, torch.Generator().manual_seed(7))
    finally:
        hook.remove()
    assert int(result.metrics["teacher_calls"]) == K + 1
    assert rows == [2 * B] * (K + 1) + [B]  # cond|uncond batched per teacher call, then the student
    # Redo the teacher's walk by hand: start x = (1 - sigma) x0 + sigma eps at g[i], K Euler steps of
    # v = v_c + w (v_c - v_u) along the grid, then the target x0_hat = x - sigma v at the end.
    r = recipe.teacher_target(batch, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    path = ddim_grid(1000, N).tolist() + [0]
    i = torch.randint(0, N - K, (B,), generator=gen)
    eps = torch.randn(B, 4, 16, 16, generator=gen)
    sig = family.schedule.sigmas
    assert r.t_start.tolist() == [path[j] for j in i.tolist()]
    with torch.no_grad(), teacher.active() as net:
        for b in range(B):
            ks = [path[j] for j in range(int(i[b]), int(i[b]) + K + 1)]
            x = ((1 - sig[ks[0]]) * batch.latents[b : b + 1].double() + sig[ks[0]] * eps[b : b + 1].double()).float()

            def velocity(x, k):
                t = torch.tensor([k])
                v_c = family.predict(x, t, batch.cond[b], net=net).float()
                v_u = family.predict(x, t, batch.uncond[b], net=net).float()
                return v_c + w * (v_c - v_u)

            for k, k_next in zip(ks[:-1], ks[1:]):
                x = x + float(sig[k_next] - sig[k]) * velocity(x, k)
            target = x - float(sig[ks[-1]]) * velocity(x, ks[-1])
            assert int(r.t[b]) == ks[-1]
            torch.testing.assert_close(r.x_t[b : b + 1], x, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(r.target[b : b + 1], target, rtol=1e-4, atol=1e-5)


def test_noise_start_walks_from_pure_noise(tiny):
    family, named = _lora_family(tiny["sd3"])
    teacher = EmaTeacher(family.unet, named, 0.999, separate_copy=False)
    recipe = SelfNPORecipe(family, teacher, start="noise", guidance=-1.0, grid_steps=5, teacher_steps=2,
                           latent_shape=(4, 16, 16))
    assert float(family.schedule.sigmas[int(recipe.grid[0])]) == 1.0  # the top of the grid is pure noise
    result = recipe(_batch(family), torch.Generator().manual_seed(0))
    assert torch.isfinite(result.losses).all() and result.losses.shape == (3,)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_teacher_takes_no_gradient_and_moves_only_by_ema(tiny, mode):
    if mode == "full":
        family = load_family(tiny["flux"])
        family.enable_full_finetune()
        named = {n: p for n, p in family.unet.named_parameters() if p.requires_grad}
    else:
        family, named = _lora_family(tiny["flux"])
    decay = 0.75
    teacher = EmaTeacher(family.unet, named, decay, separate_copy=mode == "full")
    recipe = SelfNPORecipe(family, teacher, start="images", guidance=-5.0, grid_steps=5, teacher_steps=2)
    optimizer = torch.optim.SGD(list(named.values()), lr=1e-2)
    before = {n: w.clone() for n, w in teacher.state_dict().items()}
    student_before = {n: p.detach().clone() for n, p in named.items()}
    target = recipe.teacher_target(_batch(family), torch.Generator().manual_seed(0)).target
    assert not target.requires_grad
    recipe(_batch(family), torch.Generator().manual_seed(0)).losses.mean().backward()
    for n, w in teacher.state_dict().items():
        assert w.grad is None and not w.requires_grad, n
    assert all(torch.equal(p.detach(), student_before[n]) for n, p in named.items())
    optimizer.step()
    for n, w in teacher.state_dict().items():
        assert torch.equal(w, before[n]), f"{n} moved by the optimizer step"
    teacher.update(named)
    changed = 0
    for n, w in teacher.state_dict().items():
        assert torch.equal(w, decay * before[n] + (1 - decay) * named[n].detach()), n
        changed += not torch.equal(w, before[n])
    assert changed > 0.9 * len(named)
