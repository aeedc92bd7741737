"""Checkpoints a user can pick (issue 19): every checkpoint-N holds loadable weights, every command that takes a run
folder takes its checkpoints, a final checkpoint is written at the last step, resuming a finished run does nothing."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.errors import UserError
from diffalign.toy.render_pairs import write_pairs_parquet


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs_parquet(tmp_path_factory.mktemp("pairs") / "style.parquet", 16, kind="style", seed=3)


def _cfg(model, data, out, **kw):
    from diffalign.training.config import TrainConfig

    base = dict(method="sft", pretrained_model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out),
                resolution=32, train_batch_size=4, max_train_steps=3, learning_rate=1e-2, lr_scheduler="constant",
                lr_warmup_steps=0, rank=4, seed=0, report_to="none", checkpointing_steps=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def lora_runs(tiny_pipelines, pairs, tmp_path_factory):
    """A 3-step LoRA run checkpointing every 2 steps, and a 2-step run of the same recipe (the weights at step 2)."""
    from diffalign.training.loop import train

    root = tmp_path_factory.mktemp("ckpt_runs")
    run = train(_cfg(tiny_pipelines["sd"], pairs, root / "run"))
    two = train(_cfg(tiny_pipelines["sd"], pairs, root / "two", max_train_steps=2, checkpointing_steps=1000))
    return run, two


def _same_tensors(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _images(folder):
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return rows, np.stack([np.asarray(Image.open(folder / r["file"])) for r in rows])


@pytest.mark.slow
def test_every_checkpoint_holds_the_loadable_lora_and_the_last_step_gets_one(lora_runs):
    run, two = lora_runs
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    # checkpoint-2 holds the weights the run had at step 2 (what a 2-step run of the same recipe ends with) ...
    _same_tensors(run / "checkpoint-2" / "pytorch_lora_weights.safetensors", two / "pytorch_lora_weights.safetensors")
    # ... and the checkpoint at the last step the run's final weights.
    _same_tensors(run / "checkpoint-3" / "pytorch_lora_weights.safetensors", run / "pytorch_lora_weights.safetensors")
    state = json.loads((run / "checkpoint-2" / "state.json").read_text())
    assert "pytorch_lora_weights.safetensors" in state["files"]  # part of what makes the checkpoint complete


@pytest.mark.slow
def test_generate_takes_a_checkpoint_folder_and_records_its_step(lora_runs, tiny_pipelines, tmp_path):
    run, two = lora_runs
    common = ["--model", str(tiny_pipelines["sd"]), "--prompt", "a red circle", "--steps", "2", "--seed", "5"]
    assert main(["generate", *common, "--lora", str(run / "checkpoint-2"), "--out", str(tmp_path / "ck2")]) == 0
    assert main(["generate", *common, "--lora", str(two), "--out", str(tmp_path / "two")]) == 0
    assert main(["generate", *common, "--out", str(tmp_path / "base")]) == 0
    rows, ck2 = _images(tmp_path / "ck2")
    _, at_two = _images(tmp_path / "two")
    _, base = _images(tmp_path / "base")
    assert np.array_equal(ck2, at_two) and not np.array_equal(ck2, base)
    assert rows[0]["settings"]["lora_step"] == 2  # the manifest says which step made the images
    # The guidance commands and export take it too.
    assert main(["generate", *common, "--negative-model", str(run / "checkpoint-2"),
                 "--out", str(tmp_path / "npo")]) == 0
    rows, _ = _images(tmp_path / "npo")
    assert rows[0]["settings"]["negative_model_step"] == 2
    assert main(["export", "--lora", str(run / "checkpoint-2"), "--out", str(tmp_path / "k.safetensors")]) == 0
    kohya = load_file(str(tmp_path / "k.safetensors"))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)


@pytest.mark.slow
def test_stock_diffusers_loads_a_checkpoint_folder(lora_runs, tiny_pipelines):
    from diffusers import StableDiffusionPipeline

    run, _ = lora_runs

    def sample(lora=None):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipelines["sd"]), safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
            assert pipe.get_list_adapters()["unet"]  # something loaded (diffusers only warns when nothing does)
        return pipe("a red circle", height=32, width=32, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    last, final, base = sample(run / "checkpoint-3"), sample(run), sample()
    assert np.array_equal(last, final) and not np.array_equal(last, base)


def test_resume_latest_of_a_finished_run_does_nothing(lora_runs, tiny_pipelines, pairs, tmp_path, capsys):
    import shutil

    from diffalign.training.loop import train

    run = tmp_path / "run"
    shutil.copytree(lora_runs[0], run)
    metrics = (run / "metrics.jsonl").read_text()
    weights = (run / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    train(_cfg(tiny_pipelines["sd"], pairs, run, resume_from_checkpoint="latest"))
    out = capsys.readouterr().out
    assert "nothing to do: the run finished at step 3" in out
    assert (run / "metrics.jsonl").read_text() == metrics  # no step was taken
    assert (run / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == weights
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


@pytest.mark.slow
def test_full_finetune_checkpoints_hold_a_loadable_unet_and_the_ema_named(tiny_pipelines, pairs, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from diffalign.guidance.offsets import resolve_offset
    from diffalign.training.loop import train

    run = train(_cfg(tiny_pipelines["sd"], pairs, tmp_path / "full", train_mode="full", use_ema=True, ema_decay=0.5,
                     max_train_steps=2, checkpointing_steps=1, learning_rate=1e-4))
    for step in (1, 2):
        ckpt = run / f"checkpoint-{step}"
        unet = UNet2DConditionModel.from_pretrained(str(ckpt), subfolder="unet")
        raw = UNet2DConditionModel.from_pretrained(str(ckpt), subfolder="unet_raw")
        trainable = load_file(str(ckpt / "trainable.safetensors"))
        assert all(torch.equal(raw.state_dict()[k], v) for k, v in trainable.items())  # unet_raw: the trained weights
        assert any(not torch.equal(unet.state_dict()[k], v) for k, v in trainable.items())  # unet: the EMA
        state = json.loads((ckpt / "state.json").read_text())
        assert "EMA" in state["weights"]["unet"] and "unet/config.json" in state["files"]
        assert resolve_offset(ckpt).kind == "unet"  # --negative-model / --lora of the guidance commands
    for sub in ("unet", "unet_raw"):
        _same_tensors(run / "checkpoint-2" / sub / "diffusion_pytorch_model.safetensors",
                      run / sub / "diffusion_pytorch_model.safetensors")
    capsys.readouterr()
    assert main(["extract-lora", "--base", str(tiny_pipelines["sd"]), "--tuned", str(run / "checkpoint-1"),
                 "--rank", "2", "--out", str(tmp_path / "extracted")]) == 0
    assert "LoRA keeps" in capsys.readouterr().out
    assert (tmp_path / "extracted" / "pytorch_lora_weights.safetensors").is_file()
    assert main(["generate", "--model", str(tiny_pipelines["sd"]), "--prompt", "x", "--lora",
                 str(run / "checkpoint-1"), "--out", str(tmp_path / "g")]) == 2
    assert "is a checkpoint of a full fine-tune: its weights are the UNet in" in capsys.readouterr().err


def test_a_checkpoint_with_only_the_resume_state_says_so(tmp_path):
    from safetensors.torch import save_file

    from diffalign.models import resolve_lora_file

    old = tmp_path / "run" / "checkpoint-5"
    old.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(old / "trainable.safetensors"))
    save_file({"0": torch.zeros(1)}, str(old / "optimizer.safetensors"))
    (old / "state.json").write_text(json.dumps({"global_step": 5}))
    with pytest.raises(UserError, match="holds only the resume state"):
        resolve_lora_file(old)
