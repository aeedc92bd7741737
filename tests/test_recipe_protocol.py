"""One loop, one method table, networks passed and not swapped: a new method is a table row and a recipe; a
reference or teacher forward never puts another network into the family, not even when it raises."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from lora_checks import assert_every_lora_weight_changed

from diffalign.errors import UserError
from diffalign.models import NoiseSchedule, load_family
from diffalign.toy.render_pairs import write_pairs_parquet
from diffalign.training import methods
from diffalign.training.batches import PairBatch
from diffalign.training.config import register_method
from diffalign.training.protocol import StepResult
from diffalign.training.recipes import PreferenceRecipe
from diffalign.training.reference import AdaptersOff, FrozenCopy
from diffalign.training.sections import NoKeys
from diffalign.training.selfnpo import EmaTeacher, SelfNPOBatch, SelfNPORecipe

SRC = Path(__file__).resolve().parents[1] / "src" / "diffalign"


@pytest.fixture(scope="module")
def style_pairs(tmp_path_factory):
    return write_pairs_parquet(tmp_path_factory.mktemp("pairs") / "style.parquet", 12, kind="style", seed=3)


@pytest.fixture
def table():
    """The method table as it was before the test (a test may register a throwaway method)."""
    saved = dict(methods._TABLE)
    yield methods
    methods._TABLE.clear()
    methods._TABLE.update(saved)


def _cfg(model, data, out, **kw):
    from diffalign.training.config import TrainConfig

    base = dict(pretrained_model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out), resolution=32,
                train_batch_size=2, max_train_steps=2, learning_rate=1e-3, rank=4, seed=0, report_to="none",
                checkpointing_steps=1000)
    return TrainConfig(**{**base, **kw})


def _pairs(family, b=2):
    g = torch.Generator().manual_seed(0)
    cond = family.encode_prompts(["a red circle"] * b)
    return PairBatch(torch.randn(b, 4, 16, 16, generator=g), torch.randn(b, 4, 16, 16, generator=g), cond, cond)


# ------------------------------------------------------------------------------------------- a new method
@pytest.mark.slow
def test_a_new_method_is_a_table_row_and_a_few_lines_of_recipe(tiny_pipelines, style_pairs, tmp_path, table):
    """A throwaway method, with its own objective (the L1 distance) and its own step, trains end to end: the
    config accepts it, the loop drives it, the model card says what it made. loop.py is not touched."""

    class WinnerL1(PreferenceRecipe):  # the pair data flow; a step of its own
        def __call__(self, batch, noise, t):
            x_t = self.schedule.add_noise(batch.latents_w, noise, t)
            pred = self.family.predict(x_t, t, batch.cond_w, net=self.net)
            losses = self.objective(pred, self.schedule.target(batch.latents_w, noise, t))
            return StepResult(losses, {"l1": losses.detach().mean()})

    def l1(keys):
        return lambda pred, target: (pred.float() - target.float()).abs().flatten(1).mean(dim=1)

    register_method(table.Method("l1", summary="L1 fine-tuning on the preferred images",
                                       role="a model fine-tuned with an L1 loss (a test)", recipe=WinnerL1.for_run,
                                       section=NoKeys, objective=l1, image_columns=(1, 2)))
    assert "l1 = L1 fine-tuning" in table.help_text()
    with pytest.raises(UserError, match="beta=5.0 only applies to"):  # other methods' keys still refused
        _cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "x", method="l1", beta=5.0).validate()

    from diffalign.training.loop import train

    out = train(_cfg(tiny_pipelines["sd"], style_pairs, tmp_path / "run", method="l1", checkpointing_steps=1))
    assert_every_lora_weight_changed(out, tiny_pipelines["sd"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] == pytest.approx(m["l1"]) for m in metrics)
    assert "a model fine-tuned with an L1 loss (a test)" in (out / "README.md").read_text()
    assert json.loads((out / "checkpoint-1" / "state.json").read_text())["method"] == "l1"


def test_the_table_refuses_a_row_that_does_not_fit_the_config(table):
    from dataclasses import dataclass

    @dataclass
    class NewKey:
        temperature: float = 1.0

    row = table.Method("x", summary="", role="", recipe=PreferenceRecipe.for_run, section=NewKey, objective=None)
    with pytest.raises(ValueError, match="'temperature' is not a TrainConfig key"):
        register_method(row)
    with pytest.raises(ValueError, match="already in the table"):
        register_method(table.get_method("dpo"))


# ------------------------------------------------------------------------------- networks passed, not swapped
def test_no_network_is_swapped_into_a_family():
    """`family.unet = other` around a call is gone: the network to call is an argument of `predict`."""
    swap = re.compile(r"\b(?:family|self\.family)\.unet\s*=[^=]|saved,\s*\S*\.unet\s*=")
    found = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if swap.search(line)]
    assert not found, found


def _raising_hook(family, trained, seen):
    def hook(module, args):
        seen.append(family.unet is trained)  # the family holds the trained network during the call too
        raise RuntimeError("boom inside the forward")

    return hook


@pytest.mark.slow
def test_an_exception_in_a_reference_forward_leaves_the_family_network(tiny_pipelines):
    family = load_family(tiny_pipelines["sd"])
    trained = family.unet
    # Full fine-tune: the reference is a frozen copy, passed to predict.
    reference = FrozenCopy.of(family.unet)
    family.enable_full_finetune()
    seen = []
    handle = reference.module.register_forward_pre_hook(_raising_hook(family, trained, seen))
    recipe = PreferenceRecipe(family, "dpo", beta=5000.0, reference=reference)
    noise, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    with pytest.raises(RuntimeError, match="boom"):
        recipe(_pairs(family), noise, t)
    handle.remove()
    assert seen == [True] and family.unet is trained
    assert all(p.requires_grad for p in family.unet.parameters())
    assert all(not p.requires_grad for p in reference.module.parameters())

    # LoRA: the reference is the same network with its adapters off; they are on again after the exception.
    lora = load_family(tiny_pipelines["sd"])
    lora.add_lora(4)
    trained = lora.unet
    calls = []

    def second_call_raises(module, args):
        calls.append(any(getattr(m, "_disable_adapters", False) for m in module.modules()))
        if len(calls) == 2:
            raise RuntimeError("boom inside the reference forward")

    handle = lora.unet.register_forward_pre_hook(second_call_raises)
    recipe = PreferenceRecipe(lora, "dpo", beta=5000.0, reference=AdaptersOff(lora.unet))
    with pytest.raises(RuntimeError, match="boom"):
        recipe(_pairs(lora), noise, t)
    handle.remove()
    assert calls == [False, True]  # the policy pass with adapters, the reference pass without
    assert lora.unet is trained and not any(getattr(m, "_disable_adapters", False) for m in lora.unet.modules())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_an_exception_in_a_teacher_forward_leaves_the_family_network(tiny_pipelines, mode):
    family = load_family(tiny_pipelines["sd"])
    if mode == "full":
        family.enable_full_finetune()
    else:
        family.add_lora(4)
        with torch.no_grad():
            for p in family.unet.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
    trained, was_training = family.unet, family.unet.training
    named = {n: p for n, p in family.unet.named_parameters() if p.requires_grad}
    student = {n: p.detach().clone() for n, p in named.items()}
    teacher = EmaTeacher(family.unet, named, 0.5, separate_copy=mode == "full")
    with torch.no_grad():  # a teacher unlike the student, so loading it into a shared UNet would show
        for w in teacher.state_dict().values():
            w.add_(1.0)
    seen = []
    handle = teacher.module.register_forward_pre_hook(_raising_hook(family, trained, seen))
    recipe = SelfNPORecipe(family, teacher, start="noise", grid_steps=4, teacher_steps=2, latent_shape=(4, 16, 16))
    cond = family.encode_prompts(["a red circle", ""])
    with pytest.raises(RuntimeError, match="boom"):
        recipe(SelfNPOBatch(cond, cond), torch.Generator().manual_seed(0))
    handle.remove()
    assert seen == [True] and family.unet is trained
    assert all(torch.equal(p.detach(), student[n]) for n, p in named.items())  # LoRA: the student's values are back
    assert family.unet.training == was_training


# ------------------------------------------------------------------------------------------ model layer
def test_predict_calls_the_network_it_is_given_in_its_dtype(tiny_pipelines):
    family = load_family(tiny_pipelines["sd"])
    other = FrozenCopy.of(family.unet).module.to(torch.bfloat16)
    seen = []
    other.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].dtype),
                                    with_kwargs=True)
    cond = family.encode_prompts(["a red circle"])
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    own = family.predict(x, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = family.predict(x.bfloat16(), t, cond, net=other)
    assert seen == [torch.bfloat16] and family.unet is not other and own.dtype == torch.float32
    assert theirs.shape == own.shape


def test_the_noise_schedule_is_the_familys_maths():
    abar = torch.linspace(0.999, 0.01, 1000)
    schedule = NoiseSchedule(abar, "epsilon")
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    x_t = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, a * x0 + s * noise)
    torch.testing.assert_close(schedule.pred_x0(x_t, t, noise), x0, rtol=0, atol=1e-4)
    # One DDIM step (eta 0) with the exact x0 lands on the same trajectory: a_next x0 + s_next eps.
    t_next = torch.tensor([0, 250, 500])
    a2, s2 = abar[t_next].sqrt().view(-1, 1, 1, 1), (1 - abar[t_next]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(schedule.ddim_step(x_t, x0, t, t_next), a2 * x0 + s2 * noise, rtol=0, atol=1e-5)
    v = NoiseSchedule(abar, "v_prediction").target(x0, noise, t)
    torch.testing.assert_close(v, a * noise - s * x0)
    with pytest.raises(UserError, match="unsupported prediction_type"):
        NoiseSchedule(abar, "flow").target(x0, noise, t)
