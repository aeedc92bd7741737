"""Issue 9: a Self-NPO run (`diffalign train`, method selfnpo, data-free) killed at random moments and in the
middle of a checkpoint write, then interrupted with SIGINT, resumes with `--resume_from_checkpoint=latest` to a
student and teacher equal, bit for bit, to a run that was never interrupted."""

from __future__ import annotations

import random
import signal

import pytest
from reliability_helpers import (
    REPO,
    assert_same_tensors,
    finish,
    kill_after_progress,
    kill_inside_checkpoint_write,
    metric_steps,
    start,
)

from diffalign.training.checkpoint import incomplete_checkpoints, list_checkpoints

STEPS = 12


def _args(model, out) -> list[str]:
    return [str(REPO / "configs" / "toy_selfnpo.yaml"), f"--pretrained_model_name_or_path={model}",
            "--dataset_name=toy", f"--output_dir={out}", f"--max_train_steps={STEPS}", "--checkpointing_steps=1",
            "--train_batch_size=2", "--rank=4", "--learning_rate=1e-3", "--teacher_steps=2", "--ddim_grid=10",
            "--validation_prompts=[]", "--resume_from_checkpoint=latest"]


@pytest.mark.slow
def test_selfnpo_killed_anywhere_resumes_to_the_uninterrupted_student_and_teacher(tiny_pipelines, tmp_path):
    from diffalign.config_loader import load_config
    from diffalign.training.config import TrainConfig
    from diffalign.training.loop import train

    straight_args = _args(tiny_pipelines["sd"], tmp_path / "straight")
    straight = train(load_config(TrainConfig, straight_args[0], straight_args[1:]))

    out = tmp_path / "killed"
    args = _args(tiny_pipelines["sd"], out)
    rng = random.Random(5)

    # SIGKILL at a random moment after the first step.
    assert kill_after_progress(args, out, tmp_path / "a.log", rng) == -signal.SIGKILL
    # SIGKILL while the writer of the next checkpoint has written only its first file.
    nxt = max(metric_steps(out) + [int(p.name.split("-")[1]) for p in list_checkpoints(out)]) + 1
    assert kill_inside_checkpoint_write(args, out, tmp_path / "b.log", step=nxt) == -signal.SIGKILL
    assert list_checkpoints(out)[-1].name == f"checkpoint-{nxt - 1}"
    assert f".checkpoint-{nxt}.tmp" in [p.name for p in incomplete_checkpoints(out)]
    # SIGINT (Ctrl-C): a checkpoint at the step boundary, exit 130, a message saying how to resume.
    code = kill_after_progress(args, out, tmp_path / "c.log", rng, sig=signal.SIGINT, max_delay=0)
    text = (tmp_path / "c.log").read_text()
    assert code == 130 and "stopped by SIGINT" in text and "--resume_from_checkpoint=latest" in text, text[-2000:]
    # Resume to the end.
    assert finish(start(args, tmp_path / "d.log")) == 0, (tmp_path / "d.log").read_text()[-2000:]
    assert_same_tensors(straight / "pytorch_lora_weights.safetensors", out / "pytorch_lora_weights.safetensors")
    # The teacher (an EMA of the student) resumed exactly too: compare the last checkpoint both runs wrote.
    last = f"checkpoint-{STEPS - 1}"
    assert_same_tensors(straight / last / "ema.safetensors", out / last / "ema.safetensors")
    assert metric_steps(out) == list(range(1, STEPS + 1))
