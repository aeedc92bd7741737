"""Issue 9: a preference-training run (`diffalign train`, DPO) killed at any moment - SIGKILL in the middle of
a checkpoint write, SIGKILL at random moments, SIGTERM - resumes with `--resume_from_checkpoint=latest` and ends
with weights equal, bit for bit, to a run that was never interrupted."""

from __future__ import annotations

import json
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

from diffalign.toy.render_pairs import write_pairs_parquet
from diffalign.training.checkpoint import incomplete_checkpoints, list_checkpoints, resolve_resume

STEPS = 14


def _args(model, data, out) -> list[str]:
    return [str(REPO / "configs" / "toy_dpo.yaml"), f"--pretrained_model_name_or_path={model}",
            f"--dataset_name={data}", f"--output_dir={out}", f"--max_train_steps={STEPS}", "--checkpointing_steps=1",
            "--checkpoints_total_limit=2", "--train_batch_size=2", "--rank=4", "--learning_rate=1e-3",
            "--validation_prompts=[]", "--resume_from_checkpoint=latest"]


@pytest.mark.slow
def test_dpo_killed_anywhere_resumes_to_the_uninterrupted_weights(tiny_pipelines, tmp_path):
    from diffalign.config_loader import load_config
    from diffalign.training.config import TrainConfig
    from diffalign.training.loop import train

    model, data = tiny_pipelines["sd"], write_pairs_parquet(tmp_path / "pairs.parquet", 12, kind="style", seed=3)
    straight_args = _args(model, data, tmp_path / "straight")
    straight = train(load_config(TrainConfig, straight_args[0], straight_args[1:]))

    out = tmp_path / "killed"
    args = _args(model, data, out)
    rng = random.Random(9)

    # 1. SIGKILL inside the write of checkpoint-3: the half-written folder is never taken as latest.
    assert kill_inside_checkpoint_write(args, out, tmp_path / "a.log", step=3) == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert resolve_resume(out, "latest").name == "checkpoint-2"
    assert [p.name for p in incomplete_checkpoints(out)] == [".checkpoint-3.tmp"]

    # 2. SIGKILL at a random moment (mid-step, mid-checkpoint, mid-deletion of an old checkpoint, mid-log line).
    code = kill_after_progress(args, out, tmp_path / "b.log", rng)
    assert code == -signal.SIGKILL, (tmp_path / "b.log").read_text()[-2000:]

    # 3. SIGTERM: checkpoint at the next step boundary, exit 143, and say how to resume.
    before = max(metric_steps(out))
    code = kill_after_progress(args, out, tmp_path / "c.log", rng, sig=signal.SIGTERM, max_delay=0)
    text = (tmp_path / "c.log").read_text()
    assert code == 143, text[-2000:]
    assert "stopped by SIGTERM at step" in text and "--resume_from_checkpoint=latest" in text
    stopped_at = int(text.split("stopped by SIGTERM at step ")[1].split()[0])
    assert before < stopped_at < STEPS and list_checkpoints(out)[-1].name == f"checkpoint-{stopped_at}"
    assert json.loads((out / "train_report.json").read_text())["status"] == "interrupted: SIGTERM"

    # 4. Resume to the end.
    proc = start(args, tmp_path / "d.log")
    assert finish(proc) == 0, (tmp_path / "d.log").read_text()[-2000:]
    assert_same_tensors(straight / "pytorch_lora_weights.safetensors", out / "pytorch_lora_weights.safetensors")
    assert metric_steps(out) == list(range(1, STEPS + 1))  # every step logged once: redone steps replace their lines
    assert incomplete_checkpoints(out) == []
    assert json.loads((out / "train_report.json").read_text())["status"] == "finished"
