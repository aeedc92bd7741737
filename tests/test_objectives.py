"""Tests of diffalign.objectives: golden values computed by hand, gradients, numerics, re-noising."""

import math
from decimal import Decimal, getcontext

import pytest
import torch

from diffalign.objectives import (
    dpo_loss,
    dpo_objective,
    mapo_link,
    mapo_loss,
    mapo_objective,
    pseudo_huber,
    renoise,
    sft_loss,
    sft_objective,
)
from diffalign.objectives.dpo import dpo_inner, dpo_metrics, npo_loss
from diffalign.objectives.mapo import mapo_metrics, resolve_mapo_params

F64 = torch.float64


@pytest.fixture(autouse=True)
def _few_threads():
    # A training job shares the machine: these tensors are tiny, one thread is plenty.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def t64(*values):
    return torch.tensor(values, dtype=F64)


def log1pexp(x):
    """softplus(x) = log(1 + e^x) = -logsigmoid(-x), computed stably in float64."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def g_ref(u: float) -> float:
    """g(u) = u / (e^u - 1) in 60-digit decimal arithmetic."""
    getcontext().prec = 60
    if u == 0:
        return 1.0
    d = Decimal(repr(u))
    return float(d / (d.exp() - 1))


# ----------------------------------------------------------------------------------------------- DPO
# Two pairs, beta = 20:
#   pair 0: err_w=0.10 err_l=0.12 ref 0.11/0.11 -> inner = -0.5*20*((0.10-0.12) - 0) = +0.2
#   pair 1: err_w=0.30 err_l=0.20 ref 0.25/0.25 -> inner = -0.5*20*((0.30-0.20) - 0) = -1.0
DPO_ARGS = (t64(0.10, 0.30), t64(0.12, 0.20), t64(0.11, 0.25), t64(0.11, 0.25))
DPO_BETA = 20.0


def test_dpo_inner_golden():
    inner = dpo_inner(*DPO_ARGS, beta=DPO_BETA)
    torch.testing.assert_close(inner, t64(0.2, -1.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "loss_type, label_smoothing, expected",
    [
        # sigmoid: -log sigmoid(x) = log(1 + e^-x): log1p(e^-0.2) = 0.598139, log1p(e^1) = 1.313262
        ("sigmoid", 0.0, [math.log1p(math.exp(-0.2)), math.log1p(math.exp(1.0))]),
        # cDPO eps=0.1: 0.9*log1p(e^-x) + 0.1*log1p(e^x) = 0.618139, 1.213262
        ("sigmoid", 0.1, [0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2)),
                          0.9 * math.log1p(math.exp(1.0)) + 0.1 * math.log1p(math.exp(-1.0))]),
        # hinge: relu(1 - x) = 0.8, 2.0
        ("hinge", 0.0, [0.8, 2.0]),
        # ipo: h = x/beta = 0.01, -0.05; 1/(2 beta) = 0.025 -> (0.01-0.025)^2 = 2.25e-4, (-0.075)^2 = 5.625e-3
        ("ipo", 0.0, [(0.01 - 0.025) ** 2, (-0.05 - 0.025) ** 2]),
    ],
)
def test_dpo_golden(loss_type, label_smoothing, expected):
    loss = dpo_loss(*DPO_ARGS, beta=DPO_BETA, loss_type=loss_type, label_smoothing=label_smoothing)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-15)


def test_dpo_literal_values():
    # The same numbers as literals, so a change in the convention (e.g. dropping the 0.5) is caught.
    loss = dpo_loss(*DPO_ARGS, beta=DPO_BETA)
    torch.testing.assert_close(loss, t64(0.5981388693815918, 1.3132616875182228), rtol=1e-12, atol=0)


def test_dpo_model_equals_reference_gives_ln2():
    err_w, err_l = torch.rand(8, dtype=F64), torch.rand(8, dtype=F64)
    loss = dpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), beta=5000.0)
    torch.testing.assert_close(loss, torch.full((8,), math.log(2.0), dtype=F64))
    assert dpo_metrics(err_w, err_l, err_w, err_l, beta=5000.0)["implicit_acc"] == 0.5


def test_swap_flips_inner_and_npo_is_swap():
    g = torch.Generator().manual_seed(0)
    args = [torch.rand(6, generator=g, dtype=F64) for _ in range(4)]
    torch.testing.assert_close(dpo_inner(*args, beta=50.0, swap=True), -dpo_inner(*args, beta=50.0))
    for loss_type in ("sigmoid", "hinge", "ipo"):
        torch.testing.assert_close(
            npo_loss(*args, beta=50.0, loss_type=loss_type),
            dpo_loss(*args, beta=50.0, loss_type=loss_type, swap=True),
        )
    # Swapped sigmoid loss equals the loss on the negated logit: -logsigmoid(-inner).
    inner = dpo_inner(*args, beta=50.0)
    torch.testing.assert_close(npo_loss(*args, beta=50.0), -torch.nn.functional.logsigmoid(-inner))


def test_dpo_metrics():
    m = dpo_metrics(*DPO_ARGS, beta=DPO_BETA)
    assert m["implicit_acc"].item() == pytest.approx(0.5)  # one of two pairs has inner > 0
    assert m["margin"].item() == pytest.approx((0.2 - 1.0) / 2)
    assert (m["reward_w"] - m["reward_l"]).item() == pytest.approx(m["margin"].item())
    assert m["model_diff"].item() == pytest.approx(((0.10 - 0.12) + (0.30 - 0.20)) / 2)
    assert all(v.ndim == 0 and not v.requires_grad for v in m.values())
    assert dpo_metrics(*DPO_ARGS, beta=DPO_BETA, swap=True)["margin"].item() == pytest.approx(0.4)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_gradcheck(loss_type):
    # Inner terms 0.15 and -1.2 with beta 30, away from the hinge's kink at inner = 1.
    inputs = tuple(x.clone().requires_grad_() for x in (t64(0.10, 0.30), t64(0.12, 0.22), t64(0.11, 0.26), t64(0.12, 0.26)))
    kw = {"label_smoothing": 0.1} if loss_type == "sigmoid" else {}
    assert torch.autograd.gradcheck(lambda *a: dpo_loss(*a, beta=30.0, loss_type=loss_type, **kw), inputs)


def test_dpo_gradient_direction():
    # Lowering the winner's error must lower the loss: d loss / d err_w > 0.
    err_w = t64(0.10, 0.30).requires_grad_()
    dpo_loss(err_w, *DPO_ARGS[1:], beta=DPO_BETA).sum().backward()
    assert (err_w.grad > 0).all()


def test_dpo_rejects_bad_settings():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*DPO_ARGS, beta=1.0, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*DPO_ARGS, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*DPO_ARGS, beta=1.0, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(torch.rand(2, 4, 8, 8), *DPO_ARGS[1:], beta=1.0)


# ---------------------------------------------------------------------------------------------- MaPO
def test_mapo_link_golden_and_extremes():
    u = t64(0.0, 1e-8, 1e-4, 0.0099, 0.01, 0.0101, 0.5, 2.0, 50.0, 800.0, -1e-4, -5.0, -800.0)
    g = mapo_link(u)
    assert torch.isfinite(g).all()
    for ui, gi in zip(u.tolist(), g.tolist()):
        # 800 e^-800 ~ 3e-345 underflows float64 to 0 in the reference as well.
        assert math.isclose(gi, g_ref(ui), rel_tol=1e-14, abs_tol=1e-300), (ui, gi, g_ref(ui))
    assert g[0].item() == 1.0
    assert g[8].item() == pytest.approx(50.0 * math.exp(-50.0), rel=1e-12)  # ~ u e^-u for large u
    assert g[-1].item() == pytest.approx(800.0)  # -> |u| for very negative u
    assert (g[:10].diff() < 0).all()  # decreasing


def test_mapo_link_float32_and_gradients_finite():
    u = torch.tensor([0.0, 1e-8, 1e-4, 50.0, 100.0, 800.0, 1e5, -800.0, -1e5], requires_grad=True)
    g = mapo_link(u)
    g.sum().backward()
    assert torch.isfinite(g).all() and torch.isfinite(u.grad).all()
    assert g[0].item() == 1.0 and u.grad[0].item() == pytest.approx(-0.5)  # g'(0) = -1/2
    half = mapo_link(torch.tensor([0.0, 3.0, 20.0], dtype=torch.float16))
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_mapo_link_gradcheck():
    # Points on both sides of the series cutoff (1e-2) and in both exponential branches.
    u = t64(0.005, 0.02, -0.02, 0.5, 3.0, 40.0, -2.0).requires_grad_()
    assert torch.autograd.gradcheck(mapo_link, (u,))
    u0 = t64(0.0).requires_grad_()
    mapo_link(u0).sum().backward()
    assert u0.grad.item() == -0.5


def g(u):
    return u / math.expm1(u)


def test_mapo_official_golden():
    # Official: scale 0.5, k 1000, weight 0.1.
    # pair 0: err 0.100 / 0.102 -> g(0.05) = 0.9752083, g(0.051) = 0.9747167, margin = 4.9158e-4
    #         L = 0.1 + 0.1 * log(1 + e^{-0.49158}) = 0.1477263
    # pair 1: err 0.300 / 0.200 -> g(0.15) = 0.9268743, g(0.10) = 0.9508332, margin = -0.0239589
    #         L = 0.3 + 0.1 * log(1 + e^{23.9589}) = 2.6958897
    loss = mapo_loss(t64(0.100, 0.300), t64(0.102, 0.200))
    expected = [
        0.100 + 0.1 * log1pexp(-1000.0 * (g(0.05) - g(0.051))),
        0.300 + 0.1 * log1pexp(-1000.0 * (g(0.15) - g(0.10))),
    ]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, t64(0.14772626761622382, 2.6958897226082055), rtol=1e-9, atol=0)


def test_mapo_paper_golden():
    # Paper v2, beta 8: scale 1, k 8, weight 1/8.
    # pair 0: g(0.1) = 0.9508332, g(0.3) = 0.8574888, margin = 0.0933444
    #         L = 0.1 + log(1 + e^{-0.746755}) / 8 = 0.1484891
    # pair 1: g(0.4) = 0.8132979, g(0.35) = 0.8351876, margin = -0.0218896
    #         L = 0.4 + log(1 + e^{0.175117}) / 8 = 0.4980668
    loss = mapo_loss(t64(0.1, 0.4), t64(0.3, 0.35), preset="paper", beta=8.0)
    expected = [0.1 + log1pexp(-8.0 * (g(0.1) - g(0.3))) / 8.0, 0.4 + log1pexp(-8.0 * (g(0.4) - g(0.35))) / 8.0]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, t64(0.1484891377572642, 0.4980667625001417), rtol=1e-9, atol=0)


def test_mapo_presets_and_overrides():
    assert resolve_mapo_params("official") == resolve_mapo_params(None, scale=0.5, k=1000, weight=0.1)
    p = resolve_mapo_params("paper", beta=64)
    assert (p.scale, p.k, p.weight) == (1.0, 64.0, 1 / 64)
    assert resolve_mapo_params("official", weight=0.5).weight == 0.5  # raw knob beats the preset
    assert resolve_mapo_params("paper", beta=8, k=100).k == 100.0
    err_w, err_l = t64(0.2, 0.3), t64(0.25, 0.1)
    torch.testing.assert_close(
        mapo_loss(err_w, err_l, preset="official", k=10.0),
        mapo_loss(err_w, err_l, preset=None, scale=0.5, k=10.0, weight=0.1),
    )
    with pytest.raises(ValueError, match="needs beta"):
        mapo_loss(err_w, err_l, preset="paper")
    with pytest.raises(ValueError, match="preset='paper'"):
        mapo_loss(err_w, err_l, preset="official", beta=8.0)
    with pytest.raises(ValueError, match="unknown MaPO preset"):
        mapo_loss(err_w, err_l, preset="offical")
    with pytest.raises(ValueError, match="needs scale"):
        mapo_loss(err_w, err_l, preset=None, k=1.0, weight=1.0)


@pytest.mark.parametrize("kwargs", [{}, {"preset": "paper", "beta": 8.0}])
def test_mapo_gradcheck(kwargs):
    err_w = t64(0.10, 0.30, 0.21).requires_grad_()
    err_l = t64(0.102, 0.20, 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mapo_loss(a, b, **kwargs), (err_w, err_l))


@pytest.mark.parametrize("kwargs", [{}, {"preset": "paper", "beta": 8.0}, {"preset": "paper", "beta": 1024.0}])
def test_mapo_direction(kwargs):
    # With err_w fixed, a larger loser error is a wider margin: the loss must fall.
    # Over a wide range it never rises (it saturates at err_w once the margin is won)...
    err_l = torch.linspace(0.0, 2.0, 50, dtype=F64)
    loss = mapo_loss(torch.full_like(err_l, 0.2), err_l, **kwargs)
    assert (loss.diff() <= 0).all() and loss[0] > loss[-1]
    # ...and near err_w, where the margin term is live, it falls strictly.
    err_l = torch.linspace(0.15, 0.25, 21, dtype=F64)
    assert (mapo_loss(torch.full_like(err_l, 0.2), err_l, **kwargs).diff() < 0).all()
    # And the gradient pushes err_w down and err_l up.
    a, b = t64(0.2).requires_grad_(), t64(0.21).requires_grad_()
    mapo_loss(a, b, **kwargs).sum().backward()
    assert a.grad.item() > 0 > b.grad.item()


def test_mapo_metrics_and_extreme_errors():
    m = mapo_metrics(t64(0.1, 0.4), t64(0.3, 0.35), preset="paper", beta=8.0)
    assert m["margin"].item() == pytest.approx(((g(0.1) - g(0.3)) + (g(0.4) - g(0.35))) / 2)
    assert m["margin_acc"].item() == pytest.approx(0.5)
    # Huge and zero errors (fp32) stay finite, gradients too.
    err_w = torch.tensor([0.0, 1e-9, 500.0, 3.0], requires_grad=True)
    err_l = torch.tensor([0.0, 1e4, 0.0, 3.0], requires_grad=True)
    loss = mapo_loss(err_w, err_l)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(err_w.grad).all() and torch.isfinite(err_l.grad).all()


# ----------------------------------------------------------------------------------------------- SFT
def test_sft_is_winner_error():
    e = t64(0.1, 0.2, 0.3)
    assert sft_loss(e) is e
    with pytest.raises(ValueError, match="shape"):
        sft_loss(torch.rand(2, 3))


# ------------------------------------------------------------------------------------- pseudo-Huber
def test_pseudo_huber_golden():
    c = 1e-3
    pred = torch.zeros(2, 1, 2, 2, dtype=F64)
    target = torch.zeros_like(pred)
    target[0] = c  # |d| = c everywhere: sqrt(2c^2) - c = (sqrt(2) - 1) c = 4.142136e-4
    target[1, 0, 0, 0] = 2.0  # one element |d| = 2: sqrt(4 + 1e-6) - 1e-3 = 1.99900025; mean over 4
    out = pseudo_huber(pred, target, c=c)
    expected = [(math.sqrt(2.0) - 1.0) * c, (math.sqrt(4.0 + c * c) - c) / 4.0]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)


def test_pseudo_huber_asymptotes():
    c = 1e-3
    small = torch.full((1, 4), 1e-6, dtype=F64)
    assert pseudo_huber(small, torch.zeros_like(small), c).item() == pytest.approx(0.5 * 1e-12 / c, rel=1e-6)
    big = torch.full((1, 4), -10.0, dtype=F64)
    assert pseudo_huber(big, torch.zeros_like(big), c).item() == pytest.approx(10.0, abs=1.1 * c)
    # float32 keeps the tiny-d regime accurate (no cancellation).
    small32 = torch.full((1, 3), 1e-5)
    assert pseudo_huber(small32, torch.zeros_like(small32), c).item() == pytest.approx(0.5e-10 / c, rel=1e-4)


def test_pseudo_huber_shapes_and_gradcheck():
    x = torch.randn(3, 2, 4, 4, 4, dtype=F64)  # 5-D video latents
    assert pseudo_huber(x, torch.zeros_like(x)).shape == (3,)
    pred = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    target = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, q: pseudo_huber(p, q, c=0.1), (pred, target))
    zero = torch.zeros(1, 3, dtype=F64, requires_grad=True)
    pseudo_huber(zero, torch.zeros(1, 3, dtype=F64)).sum().backward()
    assert torch.isfinite(zero.grad).all()
    with pytest.raises(ValueError, match="c must be"):
        pseudo_huber(pred, target, c=0.0)
    with pytest.raises(ValueError, match="shape"):
        pseudo_huber(pred, target[:, :2])


# ------------------------------------------------------------------------------------------ renoise
def sd_alphas_cumprod():
    # The SD "scaled_linear" schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def test_renoise_matches_marginal_statistics():
    abar = sd_alphas_cumprod()
    gen = torch.Generator().manual_seed(1234)
    t = torch.tensor([0, 100, 400, 900])
    s = torch.tensor([1, 500, 999, 950])
    shape = (4, 1, 250, 200)  # 50k elements per sample, 200k in all
    x0 = torch.linspace(-1.5, 1.5, 250 * 200, dtype=F64).reshape(1, 1, 250, 200).expand(shape)
    a = abar.sqrt()
    sig = (1 - abar).sqrt()
    view = (-1, 1, 1, 1)
    eps = torch.randn(shape, generator=gen, dtype=F64)
    x_t = a[t].view(view) * x0 + sig[t].view(view) * eps
    x_s = renoise(x_t, t, s, abar, torch.randn(shape, generator=gen, dtype=F64))
    resid = (x_s - a[s].view(view) * x0).flatten(1)
    n = resid.shape[1]
    for i in range(4):
        std = resid[i].std().item()
        # mean a_s x0: residual mean ~ 0 (5 standard errors), and uncorrelated with x0
        assert abs(resid[i].mean().item()) < 5 * sig[s[i]].item() / math.sqrt(n)
        assert abs((resid[i] * x0[i].flatten()).mean().item()) < 5 * 1.5 * sig[s[i]].item() / math.sqrt(n)
        # std s_s: the sample std's relative standard error is ~1/sqrt(2n) = 0.3%
        assert std == pytest.approx(sig[s[i]].item(), rel=0.015)


def test_renoise_formula_and_video_shape():
    abar = sd_alphas_cumprod().float()
    t, s = torch.tensor([10, 300]), torch.tensor([20, 301])
    x_t = torch.randn(2, 3, 2, 4, 4)  # [B, C, F, H, W]
    noise = torch.randn_like(x_t)
    x_s = renoise(x_t, t, s, abar, noise)
    assert x_s.shape == x_t.shape and x_s.dtype == torch.float32
    a_t, a_s = abar[t].double().sqrt(), abar[s].double().sqrt()
    s_t, s_s = (1 - abar[t].double()).sqrt(), (1 - abar[s].double()).sqrt()
    coef = (a_s * ((s_s / a_s) ** 2 - (s_t / a_t) ** 2).sqrt()).view(-1, 1, 1, 1, 1)
    expected = a_s.view(-1, 1, 1, 1, 1) * (x_t.double() / a_t.view(-1, 1, 1, 1, 1)) + coef * noise.double()
    torch.testing.assert_close(x_s.double(), expected, rtol=1e-5, atol=1e-6)


def test_renoise_rejects_bad_timesteps():
    abar = sd_alphas_cumprod()
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    with pytest.raises(ValueError, match="s > t"):
        renoise(x, torch.tensor([10, 20]), torch.tensor([11, 20]), abar, torch.randn_like(x))
    with pytest.raises(ValueError, match="s > t"):
        renoise(x, torch.tensor([10, 20]), torch.tensor([5, 30]), abar, torch.randn_like(x))
    with pytest.raises(ValueError, match="integer"):
        renoise(x, torch.tensor([10.0, 20.0]), torch.tensor([11.0, 30.0]), abar, torch.randn_like(x))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        renoise(x, torch.tensor([10, 20]), torch.tensor([11, 1000]), abar, torch.randn_like(x))


# ------------------------------------------------------------------------------- bound pair objectives
def test_pair_objectives_bind_the_losses_and_say_what_they_read():
    """objectives/pair.py: the losses and metrics of objectives/*.py with their settings bound; NPO's swap is the
    objective's (npo_loss for DPO, winner and loser exchanged for MaPO)."""
    g = torch.Generator().manual_seed(0)
    w, l, rw, rl = (torch.rand(4, generator=g, dtype=F64) for _ in range(4))
    dpo = dpo_objective(beta=5000.0, loss_type="hinge")
    assert dpo.reads == "pair+reference" and dpo.needs_reference
    assert torch.equal(dpo.loss(w, l, rw, rl), dpo_loss(w, l, rw, rl, beta=5000.0, loss_type="hinge"))
    assert dpo.metrics(w, l, rw, rl).keys() == dpo_metrics(w, l, rw, rl, beta=5000.0).keys()
    npo = dpo_objective(beta=1000.0, swap=True)
    assert torch.equal(npo.loss(w, l, rw, rl), npo_loss(w, l, rw, rl, beta=1000.0))
    mapo = mapo_objective(preset="paper", beta=8.0)
    assert mapo.reads == "pair" and not mapo.needs_reference
    assert torch.equal(mapo.loss(w, l), mapo_loss(w, l, preset="paper", beta=8.0))
    swapped = mapo_objective(swap=True)
    assert torch.equal(swapped.loss(w, l), mapo_loss(l, w))
    assert torch.equal(swapped.metrics(w, l)["err_w"], mapo_metrics(l, w)["err_w"])
    sft = sft_objective()
    assert sft.reads == "winner" and sft.metrics is None and torch.equal(sft.loss(w), sft_loss(w))
    with pytest.raises(ValueError, match="reads must be one of"):
        type(sft)("x", "triple", sft_loss)
