"""Negative-branch guidance (issue 5): composition, one-call fast path, two-call path, extract-lora, CLI."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffalign.guidance import (
    NegativeGuidedUNet,
    attach_negative_guidance,
    compose_dense_unet,
    detach_negative_guidance,
    extract_lora_factors,
    mixed_adapter_batch,
)
from diffalign.models import load_family, load_pipeline

ALPHA, BETA = 0.7, 1.3


def _make_lora(path, out, seed):
    family = load_family(path)
    family.add_lora(4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in family.unet.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    family.save_lora(out)
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(tiny_pipelines, tmp_path_factory):
    root = tmp_path_factory.mktemp("guidance_loras")
    return {
        k: (_make_lora(tiny_pipelines[k], root / f"{k}_pos", 1), _make_lora(tiny_pipelines[k], root / f"{k}_neg", 2))
        for k in ("sd", "sdxl")
    }


def _pipe(path):
    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kw):
    args = dict(prompt=["a red circle"], num_inference_steps=2, guidance_scale=5.0, output_type="np")
    args.update(kw)
    return pipe(generator=[torch.Generator().manual_seed(i) for i in range(len(args["prompt"]) * args.get(
        "num_images_per_prompt", 1))], **args).images


class _Counter:
    def __init__(self, *modules):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args):
        self.calls += 1

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.slow
def test_zero_weights_give_plain_cfg_exactly(tiny_pipelines, loras):
    pipe = _pipe(tiny_pipelines["sd"])
    plain = _run(pipe, negative_prompt=["a blue square"])
    info = attach_negative_guidance(pipe, negative=loras["sd"][1], alpha=0.0, beta=0.0)
    assert info.fast and info.calls_per_step == 1
    guided = _run(pipe, negative_prompt=["a blue square"])
    np.testing.assert_array_equal(guided, plain)
    detach_negative_guidance(pipe)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    np.testing.assert_array_equal(_run(pipe, negative_prompt=["a blue square"]), plain)


def _merged_unet(path, files_and_weights):
    """A UNet with LoRAs fused by diffusers itself (independent of diffalign.guidance)."""
    pipe = load_pipeline(path)
    names = []
    for i, (file, _) in enumerate(files_and_weights):
        pipe.load_lora_weights(str(file), adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, adapter_weights=[w for _, w in files_and_weights])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    return pipe.unet.eval()


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.slow
def test_fast_path_equals_two_call_loop_with_merged_weights(tiny_pipelines, loras, kind):
    pos, neg = loras[kind]
    steps, kw = 3, dict(num_images_per_prompt=2, negative_prompt=["a green star"], guidance_rescale=0.3)
    # Reference: two separately merged UNets, two calls per step.
    ref_pipe = _pipe(tiny_pipelines[kind])
    positive = _merged_unet(tiny_pipelines[kind], [(pos, 1.0)])
    negative = _merged_unet(tiny_pipelines[kind], [(pos, ALPHA), (neg, BETA)])
    object.__setattr__(ref_pipe, "unet", NegativeGuidedUNet(positive, negative))
    counter = _Counter(positive, negative)
    ref = _run(ref_pipe, num_inference_steps=steps, **kw)
    counter.close()
    assert counter.calls == 2 * steps

    pipe = _pipe(tiny_pipelines[kind])
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    info = attach_negative_guidance(pipe, negative=neg, positive=pos, alpha=ALPHA, beta=BETA)
    assert info.fast and info.rank == 8 and info.positive_folded  # (ALPHA-1)*eta + BETA*delta: rank 4 + 4
    assert "npo_pos" not in pipe.unet.positive.peft_config  # folded: the positive half runs no adapter
    counter = _Counter(pipe.unet.positive)
    fast = _run(pipe, num_inference_steps=steps, **kw)
    counter.close()
    assert counter.calls == steps  # one batched network call per step
    np.testing.assert_allclose(fast, ref, atol=1e-4)

    # The built-in two-call path agrees too and costs two calls per step.
    detach_negative_guidance(pipe)
    after = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())  # unfolded exactly
    info = attach_negative_guidance(pipe, negative=neg, positive=pos, alpha=ALPHA, beta=BETA, force_two_calls=True)
    assert not info.fast
    counter = _Counter(pipe.unet.positive, pipe.unet.negative)
    slow = _run(pipe, num_inference_steps=steps, **kw)
    counter.close()
    assert counter.calls == 2 * steps
    np.testing.assert_allclose(slow, ref, atol=1e-4)
    # Guidance off (g = 1): no CFG batch, the positive model alone.
    detach_negative_guidance(pipe)
    attach_negative_guidance(pipe, negative=neg, positive=pos, alpha=ALPHA, beta=BETA)
    off = _run(pipe, guidance_scale=1.0)
    object.__setattr__(ref_pipe, "unet", positive)
    np.testing.assert_allclose(off, _run(ref_pipe, guidance_scale=1.0), atol=1e-4)


def _hand_merged(base_unet, terms):
    out = {k: v.clone().float() for k, v in base_unet.state_dict().items()}
    for coef, file in terms:
        sd = load_file(str(file))
        for key, a in sd.items():
            # diffusers writes `lora.down`/`lora.up` (older) or `lora_A`/`lora_B` (peft) key names
            down, up = (".lora.down.", ".lora.up.") if ".lora.down." in key else (".lora_A.", ".lora_B.")
            if down not in key:
                continue
            b = sd[key.replace(down, up)]
            module = key[len("unet."):].split(down)[0]
            out[f"{module}.weight"] += coef * (b.float() @ a.float())  # scaling 1: saved with alpha = rank
    return out


@pytest.mark.slow
def test_positive_and_negative_lora_compose_as_the_formula(tiny_pipelines, loras):
    pos, neg = loras["sd"]
    pipe = _pipe(tiny_pipelines["sd"])
    expected = _hand_merged(pipe.unet, [(ALPHA, pos), (BETA, neg)])
    composed = compose_dense_unet(pipe.unet, type(pipe), positive=pos, negative=neg, alpha=ALPHA, beta=BETA)
    got = composed.state_dict()
    assert set(got) == set(expected)
    changed = 0
    for k, v in expected.items():
        torch.testing.assert_close(got[k].float(), v, atol=1e-6, rtol=1e-5)
        changed += int(not torch.equal(v, pipe.unet.state_dict()[k].float()))
    assert changed == 2 * 4 * 2 * 2  # to_q/k/v/out.0 of attn1+attn2, in the tiny UNet's 2 transformer blocks
    # The batched fast path's negative half equals a UNet with exactly these weights.
    attach_negative_guidance(pipe, negative=neg, positive=pos, alpha=ALPHA, beta=BETA)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    states = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    states = states[:, : pipe.tokenizer.model_max_length]
    with torch.no_grad():
        batched = pipe.unet(x, 10, states, return_dict=False)[0]
        # peft's own mixed-batch forward; the positive LoRA is folded into the weights, so its half runs the base
        with mixed_adapter_batch(pipe.unet.positive, ["npo_neg", "__base__"]):
            peft_mixed = pipe.unet.positive(x, 10, states, return_dict=False)[0]
        torch.testing.assert_close(batched, peft_mixed, atol=1e-6, rtol=1e-5)
        composed.load_state_dict(expected)
        alone = composed.eval()(x[:1], 10, states[:1], return_dict=False)[0]
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("two_calls", [False, True])
@pytest.mark.slow
def test_negative_prompt_reaches_the_negative_branch(tiny_pipelines, loras, two_calls):
    pipe = _pipe(tiny_pipelines["sd"])
    neg_emb, _ = pipe.encode_prompt("a green star", "cpu", 1, False)
    pos_emb, _ = pipe.encode_prompt("a red circle", "cpu", 1, False)
    attach_negative_guidance(pipe, negative=loras["sd"][1], force_two_calls=two_calls)
    seen = []
    targets = [pipe.unet.negative, pipe.unet.positive] if two_calls else [pipe.unet.positive]

    def grab(module, args, kwargs):
        seen.append(kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None))

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in targets]
    _run(pipe, num_inference_steps=1, negative_prompt=["a green star"])
    for h in handles:
        h.remove()
    states = torch.cat(seen) if two_calls else seen[0]
    torch.testing.assert_close(states[:1], neg_emb)  # first half: negative model, negative prompt
    torch.testing.assert_close(states[1:], pos_emb)


@pytest.mark.slow
def test_extract_lora_recovers_low_rank_difference_and_loads(tiny_pipelines, tmp_path):
    from diffalign.cli import main

    base = load_family(tiny_pipelines["sd"]).unet
    tuned = load_family(tiny_pipelines["sd"]).unet
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if name.endswith(("to_q", "to_v")):
                o, i = module.weight.shape
                module.weight.add_(torch.randn(o, 2, generator=gen) @ torch.randn(2, i, generator=gen) * 0.05)
    tuned.save_pretrained(tmp_path / "tuned")
    factors = extract_lora_factors(base, tuned, rank=1)
    assert all(a.shape[0] == 1 for a, _, _ in factors.values())  # truncated: an approximation at rank 1
    assert main(["extract-lora", "--base", str(tiny_pipelines["sd"]), "--tuned", str(tmp_path / "tuned"),
                 "--rank", "2", "--out", str(tmp_path / "lora")]) == 0
    pipe = load_pipeline(tiny_pipelines["sd"])
    pipe.load_lora_weights(str(tmp_path / "lora"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    want = tuned.state_dict()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, want[k], atol=1e-5, rtol=1e-4)  # exact at rank >= 2


@pytest.mark.slow
def test_full_unet_negative_uses_two_calls_and_matches_its_lora(tiny_pipelines, loras, tmp_path):
    pipe = _pipe(tiny_pipelines["sd"])
    merged = _merged_unet(tiny_pipelines["sd"], [(loras["sd"][1], 1.0)])
    merged.save_pretrained(tmp_path / "npo_unet")
    attach_negative_guidance(pipe, negative=tmp_path / "npo_unet")
    assert isinstance(pipe.unet, NegativeGuidedUNet) and not pipe.unet.fast
    slow = _run(pipe)
    detach_negative_guidance(pipe)
    attach_negative_guidance(pipe, negative=loras["sd"][1])
    np.testing.assert_allclose(slow, _run(pipe), atol=1e-4)


@pytest.mark.slow
def test_cli_generate_with_negative_model_and_export(tiny_pipelines, loras, tmp_path):
    from diffusers import UNet2DConditionModel

    from diffalign.cli import main

    pos, neg = loras["sd"]
    out = tmp_path / "imgs"
    code = main(["generate", "--model", str(tiny_pipelines["sd"]), "--prompt", "a red circle", "--out", str(out),
                 "--steps", "2", "--lora", str(pos), "--negative-model", str(neg), "--npo-alpha", "0.5",
                 "--negative-prompt", "blurry", "--num-images-per-prompt", "2"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and (out / rows[0]["file"]).is_file()
    settings = rows[0]["settings"]
    assert settings["negative_model"] == str(neg) and settings["npo_alpha"] == 0.5 and settings["npo_beta"] == 1.0
    assert settings["negative_prompt"] == "blurry"
    assert main(["export-negative", "--model", str(tiny_pipelines["sd"]), "--lora", str(pos),
                 "--negative-model", str(neg), "--npo-alpha", "0.5", "--out", str(tmp_path / "neg_unet")]) == 0
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "neg_unet").state_dict()
    expected = _hand_merged(load_pipeline(tiny_pipelines["sd"]).unet, [(0.5, pos), (1.0, neg)])
    assert set(exported) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(exported[k], v, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_fast_path_with_alpha_one_runs_only_delta_on_the_negative_half(tiny_pipelines, loras):
    """alpha = 1: the folded positive LoRA already is theta_base + eta, so the negative adapter is beta*delta alone
    (rank of delta), and the one-call path still equals the two-call path."""
    pos, neg = loras["sd"]
    kw = dict(num_inference_steps=3, negative_prompt=["a green star"])
    pipe = _pipe(tiny_pipelines["sd"])
    attach_negative_guidance(pipe, negative=neg, positive=pos, alpha=1.0, beta=BETA, force_two_calls=True)
    slow = _run(pipe, **kw)
    detach_negative_guidance(pipe)
    info = attach_negative_guidance(pipe, negative=neg, positive=pos, alpha=1.0, beta=BETA)
    assert info.fast and info.positive_folded and info.rank == 4
    np.testing.assert_allclose(_run(pipe, **kw), slow, atol=1e-4)
    detach_negative_guidance(pipe)
    # Positive only, alpha = 1: the negative branch is the positive model, i.e. plain CFG with the fused LoRA.
    info = attach_negative_guidance(pipe, positive=pos, alpha=1.0)
    assert info.fast and info.rank == 0
    guided = _run(pipe, **kw)
    detach_negative_guidance(pipe)
    plain = _pipe(tiny_pipelines["sd"])
    plain.load_lora_weights(str(pos))
    np.testing.assert_allclose(guided, _run(plain, **kw), atol=1e-4)
