"""extract-lora that says what it kept (issue 19): every Linear and Conv layer, conv kernels in the conv LoRA form,
the share of the difference kept per layer group and in total, a warning below a threshold."""

import numpy as np
import pytest
import torch

from diffalign.cli import main
from diffalign.guidance import attach_negative_guidance, detach_negative_guidance
from diffalign.guidance.extract import NOT_LORA, decompose_difference, layer_group
from diffalign.models import load_family, load_pipeline


def _low_rank_delta(shape, rank, gen, scale=0.05):
    """A random delta of exactly `rank` for a Linear (out, in) or Conv (out, in, kh, kw) weight."""
    out, rest = shape[0], int(np.prod(shape[1:]))
    return (torch.randn(out, rank, generator=gen) @ torch.randn(rank, rest, generator=gen) * scale).reshape(shape)


def _tuned(path, select, rank=2, seed=3, bias=False):
    """The tiny UNet with a rank-`rank` delta on the weight of every Linear/Conv2d layer `select(name, module)` picks
    (and on their biases when `bias`)."""
    unet = load_family(path).unet
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and select(name, module):
                module.weight.add_(_low_rank_delta(module.weight.shape, rank, gen))
                if bias and module.bias is not None:
                    module.bias.add_(torch.randn(module.bias.shape, generator=gen) * 0.05)
    return unet


def _every(name, module):
    return True


@pytest.mark.slow
def test_a_full_unet_difference_of_known_rank_is_recovered_exactly(tiny_pipelines, tmp_path, capsys):
    path = tiny_pipelines["sd"]
    base = load_family(path).unet
    tuned = _tuned(path, _every, rank=2)
    kinds = {type(m).__name__ for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert kinds == {"Linear", "Conv2d"}
    factors, report = decompose_difference(base, tuned, rank=3)
    conv = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert set(conv) <= set(factors) and factors[conv[0]][0].ndim == 4  # conv LoRA form: A a kernel, B 1x1
    assert report.kept_percent == pytest.approx(100.0, abs=1e-6) and report.held.get(NOT_LORA, 0.0) == 0.0
    tuned.save_pretrained(tmp_path / "tuned")
    capsys.readouterr()
    assert main(["extract-lora", "--base", str(path), "--tuned", str(tmp_path / "tuned"), "--rank", "3",
                 "--out", str(tmp_path / "lora")]) == 0
    captured = capsys.readouterr()
    assert "total" in captured.out and "100.0%" in captured.out and "warning" not in captured.err
    # Stock diffusers loads it (conv layers included) and, fused, gives the tuned UNet.
    pipe = load_pipeline(path)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    want = tuned.state_dict()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, want[k], atol=1e-5, rtol=1e-4)
    # The guidance fast path takes it: one batched call, the same images as the tuned UNet as a second model.
    images = {}
    for name, negative in (("lora", tmp_path / "lora"), ("unet", tmp_path / "tuned")):
        pipe = load_pipeline(path)
        pipe.set_progress_bar_config(disable=True)
        attach_negative_guidance(pipe, negative=negative)
        assert pipe.unet.fast == (name == "lora")
        images[name] = pipe("a red circle", height=32, width=32, num_inference_steps=2, output_type="np",
                            generator=torch.Generator().manual_seed(0)).images
        detach_negative_guidance(pipe)
    np.testing.assert_allclose(images["lora"], images["unet"], atol=1e-4)


def test_shares_per_layer_group_are_right(tiny_pipelines):
    path = tiny_pipelines["sd"]
    base = load_family(path).unet
    # A difference on the resnet convs only: the report says all of it is there, and kept at full rank.
    tuned = _tuned(path, lambda n, m: isinstance(m, torch.nn.Conv2d) and ".resnets." in n, rank=2)
    _, report = decompose_difference(base, tuned, rank=2)
    assert report.share("conv: resnets") == pytest.approx((100.0, 100.0))
    assert all(report.held[g] == 0 for g in report.held if g != "conv: resnets")
    # Spread over attention projections, resnet convs and biases: each group's share is its squared difference
    # over the whole; the biases are held but not kept.
    tuned = _tuned(path, lambda n, m: "attn" in n or ".resnets." in n, rank=2, bias=True)
    _, report = decompose_difference(base, tuned, rank=2)
    held: dict[str, float] = {}
    modules = dict(base.named_modules())
    tuned_params = dict(tuned.named_parameters())
    for key, p in base.named_parameters():
        d = float((tuned_params[key].detach().double() - p.detach().double()).pow(2).sum())
        owner, leaf = key.rsplit(".", 1)
        module = modules[owner]
        layer = leaf == "weight" and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        group = layer_group(owner, module) if layer else NOT_LORA
        held[group] = held.get(group, 0.0) + d
    total = sum(held.values())
    assert held["conv: resnets"] > 0 and held["linear: attention to_q/k/v/out"] > 0 and held[NOT_LORA] > 0
    for group, value in held.items():
        assert report.share(group)[0] == pytest.approx(100 * value / total, abs=1e-6)
    assert report.share(NOT_LORA)[1] == 0.0
    assert report.kept_percent == pytest.approx(100 - 100 * held[NOT_LORA] / total, abs=1e-6)
    # Restricted to the attention projections, the rest (resnet convs, proj_in/out, feed-forward) is reported as
    # not targeted, not silently lost.
    _, report = decompose_difference(base, tuned, rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    attention = "linear: attention to_q/k/v/out"
    rest = sum(v for g, v in held.items() if g not in (NOT_LORA, attention))
    assert report.share("Linear/Conv layers outside --target-modules")[0] == pytest.approx(100 * rest / total)
    assert report.share(attention) == pytest.approx((100 * held[attention] / total,) * 2)


@pytest.mark.slow
def test_the_warning_fires_below_the_threshold(tiny_pipelines, tmp_path, capsys):
    path = tiny_pipelines["sd"]
    tuned = _tuned(path, lambda n, m: ".resnets." in n, rank=8)
    tuned.save_pretrained(tmp_path / "tuned")
    args = ["extract-lora", "--base", str(path), "--tuned", str(tmp_path / "tuned"), "--rank", "1"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "conv: resnets" in captured.out
    assert "warning: the rank-1 LoRA keeps" in captured.err and "below 90%" in captured.err
    assert main([*args, "--out", str(tmp_path / "b"), "--warn-below", "1"]) == 0
    assert "warning" not in capsys.readouterr().err
