"""Negative-branch guidance on SD3 (its CFG batch) and FLUX (true CFG with a negative prompt), issue 20:
theta_neg = theta_base + alpha*eta + beta*delta; the LoRA fast path equals the two-call path (a merged second
transformer), zero offsets give the plain pipeline, and the negative weights reach only the negative branch."""

import pytest
import torch

from diffalign.guidance import attach_negative_guidance, detach_negative_guidance
from diffalign.models import load_family


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from flow_builders import save_tiny_flow_pipelines

    return save_tiny_flow_pipelines(tmp_path_factory.mktemp("flow"))


def _lora(path, out, seed, scale=0.3):
    family = load_family(path)
    family.add_lora(4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in family.unet.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return family.save_lora(out)


def _pipe(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, name, **kw):
    args = dict(prompt=["a red circle", "a blue square"], height=32, width=32, num_inference_steps=3,
                guidance_scale=4.0, output_type="latent",
                generator=[torch.Generator().manual_seed(i) for i in range(2)])
    args["negative_prompt"] = ["a green triangle", ""]
    if name == "flux":
        args.update(true_cfg_scale=3.0, guidance_scale=3.5)
    args.update(kw)
    return pipe(**args).images


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_fast_path_equals_the_two_call_path_and_reaches_only_the_negative_branch(tiny, tmp_path, name):
    neg = _lora(tiny[name], tmp_path / "neg", 1)
    pos = _lora(tiny[name], tmp_path / "pos", 2, scale=0.2)
    pipe = _pipe(tiny[name])
    plain = _sample(pipe, name)
    calls = []
    for two in (False, True):
        info = attach_negative_guidance(pipe, negative=neg, positive=pos, alpha=0.5, beta=1.5, force_two_calls=two)
        assert info.fast is not two
        assert info.calls_per_step == (2 if two or name == "flux" else 1)
        hook = (pipe.transformer.positive if not two else pipe.transformer).register_forward_pre_hook(
            lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
        try:
            calls.clear()
            out = _sample(pipe, name)
        finally:
            hook.remove()
            detach_negative_guidance(pipe)
        if not two:
            fast = out
            # SD3: one call of the whole CFG batch per step; FLUX: its two true-CFG calls of the one transformer.
            assert calls == ([4] * 3 if name == "sd3" else [2] * 6)
    torch.testing.assert_close(fast, out, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fast, plain, atol=1e-3)
    # Detached: the pipeline is its plain self again, no adapter left behind.
    torch.testing.assert_close(_sample(pipe, name), plain, rtol=0, atol=0)
    assert not getattr(pipe.transformer, "peft_config", None)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_zero_weights_give_the_plain_pipeline_and_no_cfg_runs_the_positive_only(tiny, tmp_path, name):
    neg = _lora(tiny[name], tmp_path / "neg", 3)
    pipe = _pipe(tiny[name])
    plain = _sample(pipe, name)
    attach_negative_guidance(pipe, negative=neg, beta=0.0)
    torch.testing.assert_close(_sample(pipe, name), plain, rtol=1e-5, atol=1e-5)
    detach_negative_guidance(pipe)
    # Without CFG (SD3 guidance 1; FLUX true_cfg_scale 1) the negative model is never used.
    no_cfg = dict(guidance_scale=1.0) if name == "sd3" else dict(true_cfg_scale=1.0)
    base = _sample(pipe, name, **no_cfg)
    attach_negative_guidance(pipe, negative=neg, beta=2.0)
    torch.testing.assert_close(_sample(pipe, name, **no_cfg), base, rtol=1e-5, atol=1e-5)
    detach_negative_guidance(pipe)


@pytest.mark.slow
def test_generate_on_flux_runs_the_negative_branch_only_under_true_cfg(tiny, tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from diffalign.cli import main

    neg = _lora(tiny["flux"], tmp_path / "neg", seed=5)
    base = ["generate", "--model", str(tiny["flux"]), "--prompt", "a red circle", "--steps", "2"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "no_cfg"), "--negative-model", str(neg)]) == 2
    assert "pass --true-cfg-scale above 1" in capsys.readouterr().err
    for name, extra in (("cfg", []), ("cfg_neg", ["--negative-model", str(neg)])):
        assert main([*base, "--out", str(tmp_path / name), "--true-cfg-scale", "3", *extra]) == 0
    pixels = {n: np.asarray(Image.open(tmp_path / n / "00000.png"), dtype=np.int16) for n in ("plain", "cfg", "cfg_neg")}
    assert np.abs(pixels["cfg"] - pixels["plain"]).max() > 0  # true CFG ran a negative branch
    assert np.abs(pixels["cfg_neg"] - pixels["cfg"]).max() > 0  # and the negative model acted in it
    row = json.loads((tmp_path / "cfg_neg" / "manifest.jsonl").read_text().splitlines()[0])
    assert row["settings"]["true_cfg_scale"] == 3.0 and row["settings"]["negative_model"] == str(neg)
    assert main([*base[:2], str(tiny["sd3"]), *base[3:], "--out", str(tmp_path / "sd3"), "--true-cfg-scale", "3"]) == 2
    assert "--true-cfg-scale applies to FLUX pipelines" in capsys.readouterr().err
