"""`trace_teacher`: the Self-NPO teacher's calls replayed from torch.jit traces give what the eager calls give."""

import pytest
import torch
from safetensors.torch import load_file
from test_selfnpo import _cfg, _lora_family

from diffalign.errors import UserError
from diffalign.training.traced import TracedDenoiser


def _inputs(family, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 16, 16, generator=g)
    t = torch.randint(1, 999, (n,), generator=g)
    return x, t, family.unconditional(n)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_replayed_calls_equal_eager_calls_across_batch_sizes_and_weight_changes(tiny_pipelines, kind):
    family, trainable = _lora_family(tiny_pipelines[kind])
    net = family.unet.eval()
    traced = TracedDenoiser(net)
    with torch.no_grad():
        for n, seed in ((4, 0), (2, 1), (4, 2), (1, 3)):
            x, t, cond = _inputs(family, n, seed)
            assert torch.equal(family.predict(x, t, cond, net=traced), family.predict(x, t, cond, net=net))
        assert traced.recorded == 1  # one trace for the per-row shape, checked once per new batch size
        assert traced.replayed == 4 and traced.eager == 0
        for p in trainable.values():  # as the EMA teacher's weights are swapped in, in place
            p.add_(0.05)
        x, t, cond = _inputs(family, 4, 4)
        assert torch.equal(family.predict(x, t, cond, net=traced), family.predict(x, t, cond, net=net))
        assert traced.recorded == 1
    x, t, cond = _inputs(family, 2, 5)
    out = family.predict(x, t, cond, net=traced)  # with gradients: the eager call, differentiable
    assert out.requires_grad and traced.eager == 1


def test_trace_teacher_trains_the_same_negative_bit_for_bit(tiny_pipelines, tmp_path, monkeypatch):
    from diffalign.training.loop import train

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle\na blue square\n\na green triangle\n")

    replays = []
    original = TracedDenoiser._trace_for
    monkeypatch.setattr(TracedDenoiser, "_trace_for", lambda self, inputs: replays.append(1) or original(self, inputs))
    kw = dict(selfnpo_start="noise", max_train_steps=3, ddim_grid=6, teacher_steps=2, teacher_guidance=-1.0)
    eager = train(_cfg(tiny_pipelines["sd"], prompt_file, tmp_path / "eager", **kw))
    assert not replays
    traced = train(_cfg(tiny_pipelines["sd"], prompt_file, tmp_path / "traced", trace_teacher=True, **kw))
    assert len(replays) >= 3 * 3  # every teacher call of the 3 steps (at least K + 1 = 3 each)
    a, b = load_file(eager / "pytorch_lora_weights.safetensors"), load_file(traced / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k or "lora.up" in k)  # it did train


def test_trace_teacher_is_refused_for_a_transformer(tmp_path):
    from flow_builders import build_sd3_pipeline

    from diffalign.training.loop import train

    path = tmp_path / "sd3"
    build_sd3_pipeline().save_pretrained(path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(UserError, match="trace_teacher applies to UNet families"):
        train(_cfg(path, prompts, tmp_path / "out", selfnpo_start="noise", trace_teacher=True, teacher_guidance=-1.0))
