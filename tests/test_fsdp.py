"""Sharded full fine-tuning (FSDP2, training/sharding.py), launched as users launch it:
`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m diffalign train CONFIG`, here on
2 CPU processes over gloo (the same code as on GPUs: diffalign applies fully_shard itself on both).

For DPO (frozen sharded reference), MaPO (with use_ema, gradient accumulation and clipping, validation),
Self-NPO (sharded EMA teacher) and a DPO LoRA (adapters off as the reference): the final weights of 2 processes
x batch 2 equal 1 process x batch 4 within the tolerance of tests/test_distributed.py, and a 2-process run killed
(SIGKILL inside a checkpoint write, SIGKILL between steps, then SIGTERM) and resumed ends with weights equal, bit for
bit, to the run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lora_checks import assert_every_lora_weight_changed
from safetensors.torch import load_file

from diffalign.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"
TIMEOUT = 300  # seconds per launched job; a healthy 2-process toy run takes ~30 s on 2 busy cores
WEIGHT_RTOL = 1e-4  # as tests/test_distributed.py: max |w_2proc - w_1proc| <= WEIGHT_RTOL * max |w_1proc|, per tensor
STEPS = 4
WEIGHTS = "diffusion_pytorch_model.safetensors"


# ----------------------------------------------------------------------------------------------- fast
@pytest.fixture
def fsdp_env(monkeypatch):
    """The variables `accelerate launch` exports for configs/accelerate/fsdp.yaml."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(FSDP_CONFIG))
    fsdp = config.fsdp_config
    values = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(fsdp["fsdp_version"]),
              "FSDP_AUTO_WRAP_POLICY": fsdp["fsdp_auto_wrap_policy"],
              "FSDP_TRANSFORMER_CLS_TO_WRAP": fsdp["fsdp_transformer_layer_cls_to_wrap"],
              "FSDP_RESHARD_AFTER_FORWARD": str(fsdp["fsdp_reshard_after_forward"]).lower(),
              "FSDP_OFFLOAD_PARAMS": str(fsdp["fsdp_offload_params"]).lower(),
              "FSDP_ACTIVATION_CHECKPOINTING": str(fsdp["fsdp_activation_checkpointing"]).lower()}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


def test_the_fsdp_launch_is_read_by_diffalign_and_hidden_from_accelerate(fsdp_env):
    from diffalign.training.sharding import requested_plan

    plan = requested_plan()
    assert plan is not None and "BasicTransformerBlock" in plan.blocks and "CogVideoXBlock" in plan.blocks
    assert plan.reshard_after_forward is True
    assert os.environ["ACCELERATE_USE_FSDP"] == "false"  # accelerate now builds a plain multi-process Accelerator
    assert requested_plan() is None  # asked once


@pytest.mark.parametrize("key, value, message", [
    ("FSDP_VERSION", "1", "fsdp_version: 2"), ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "true", "gradient_checkpointing: true"),
    ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "TRANSFORMER_BASED_WRAP")])
def test_fsdp_settings_diffalign_does_not_implement_are_refused(fsdp_env, monkeypatch, key, value, message):
    from diffalign.training.sharding import requested_plan

    monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=message):
        requested_plan()


@pytest.mark.parametrize("change, message", [({"use_8bit_adam": True}, "8bit"), ({"mixed_precision": "fp16"}, "bf16"),
                                             ({"torch_compile": True}, "torch_compile: false")])
def test_sharded_runs_refuse_what_they_do_not_do(change, message):
    from types import SimpleNamespace

    from diffalign.training.sharding import check_supported

    cfg = SimpleNamespace(**{"train_mode": "full", "use_8bit_adam": False, "mixed_precision": "no", **change})
    with pytest.raises(UserError, match=message):
        check_supported(cfg, SimpleNamespace(mixed_precision=cfg.mixed_precision))


def test_sharded_clipping_is_torch_clipping_on_one_process():
    from diffalign.training.sharding import clip_grad_norm

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(b, 0.5)
    assert clip_grad_norm(a, 0.5) == pytest.approx(float(expected), rel=1e-6) and float(expected) > 0.5
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)
    a[1].grad[0, 0] = float("nan")  # the NaN guard reads the norm
    assert clip_grad_norm(a, 0.5) != clip_grad_norm(a, 0.5)


def test_a_checkpoint_resumes_only_the_way_it_was_written(tmp_path):
    from diffalign.training.checkpoint import load_checkpoint, load_sharded_checkpoint

    for name, sharded in (("sharded", True), ("whole", False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(json.dumps({"global_step": 2, "sharded": sharded, "files": {}}))
    with pytest.raises(UserError, match="sharded state of an FSDP run.*fsdp.yaml"):
        load_checkpoint(tmp_path / "sharded", params={}, optimizer=None, lr_scheduler=None)
    with pytest.raises(UserError, match="holds whole weights.*ddp.yaml"):
        load_sharded_checkpoint(tmp_path / "whole", load_shards=None, lr_scheduler=None)


# ------------------------------------------------------------------------------------ 2 processes
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from diffalign.toy.render_pairs import write_pairs_parquet

    root = tmp_path_factory.mktemp("fsdp_data")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow diamond\n")
    return {"pairs": write_pairs_parquet(root / "pairs.parquet", 24, kind="style", seed=3), "prompts": prompts}


def _config(method: str, model: Path, data: dict, out: Path, **more) -> Path:
    import yaml

    method, _, mode = method.partition("-")
    kw = dict(method=method, pretrained_model_name_or_path=str(model), train_mode=mode or "full", rank=4, resolution=32,
              max_train_steps=STEPS, learning_rate=1e-3, adam_epsilon=1e-3, seed=0, report_to="none",
              checkpointing_steps=2, train_batch_size=2, output_dir=str(out), validation_prompts=[])
    if method == "selfnpo":
        kw.update(dataset_name=str(data["prompts"]), ddim_grid=5, teacher_steps=2, teacher_ema_decay=0.5)
    else:
        kw.update(dataset_name=str(data["pairs"]))
    if method == "dpo":
        kw.update(beta=100.0)  # see tests/test_distributed.py: beta 5000 would amplify float rounding 50x more
    if method == "mapo":  # the EMA sharded too; accumulation and clipping on sharded gradients; validation
        kw.update(use_ema=True, ema_decay=0.5, gradient_accumulation_steps=2, max_grad_norm=0.5,
                  validation_prompts=["a red circle"], validation_steps=2, validation_num_inference_steps=2)
    kw.update(more)
    path = Path(f"{out}.yaml")
    path.write_text(yaml.safe_dump(kw))
    return path


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", **extra}
    env.pop("ACCELERATE_USE_FSDP", None)
    return env


def _launch(config: Path, log: Path, script: Path | None = None, args: tuple = (), **env) -> subprocess.Popen:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2", "--main_process_port",
           "0", *([str(script)] if script else ["-m", "diffalign"]), "train", str(config), *args]
    # Own session for the launcher (torchrun starts each worker in a session of its own): see _kill_all.
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True, env=_env(**env),
                            start_new_session=True)


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and both workers at once, as a node failure would, and wait until they are gone. The
    workers must be killed themselves: torchrun starts each in a session of its own, so they outlive their launcher
    (and would finish the run on their own)."""
    workers = _workers(proc)
    assert len(workers) == 2, f"expected 2 training processes under the launcher, found {workers}"
    for pid in workers:
        os.killpg(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers), "a training process survived SIGKILL"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _wait(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        for pid in _workers(proc):
            os.killpg(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"2-process job did not finish in {TIMEOUT} s (deadlock?):\n{log.read_text()[-3000:]}")


def _run(config: Path, log: Path) -> str:
    code = _wait(_launch(config, log), log)
    text = log.read_text()
    assert code == 0, text[-5000:]
    return text


def _until(cond, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.time() + TIMEOUT
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            _kill_all(proc)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _workers(proc: subprocess.Popen) -> list[int]:
    """The training processes the launcher started (its children running diffalign)."""
    found = []
    for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        try:
            if b"diffalign" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
        except OSError:
            pass
    return found


def _train_in_process(config: Path, args: tuple = ()) -> Path:
    from diffalign.config_loader import load_config
    from diffalign.training.config import TrainConfig
    from diffalign.training.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(TrainConfig, str(config), list(args)))
    finally:
        torch.set_num_threads(threads)


def _weights(method: str) -> list[str]:
    """The weight files a run writes: the UNet (and with use_ema the trained one), or the LoRA."""
    if method.endswith("-lora"):
        return ["pytorch_lora_weights.safetensors"]
    return [f"unet/{WEIGHTS}", f"unet_raw/{WEIGHTS}"] if method == "mapo" else [f"unet/{WEIGHTS}"]


def _kill(method: str, config: Path, out: Path, tmp_path: Path) -> str:
    """Interrupt a resumable 2-process run once, the way `method`'s test chose; returns what to look for."""
    from diffalign.training.checkpoint import PAUSE_ENV, incomplete_checkpoints, list_checkpoints

    log = tmp_path / "killed.log"
    if method == "dpo":  # SIGKILL while checkpoint-2's shards are written and the main process has not committed it
        proc = _launch(config, log, **{PAUSE_ENV: f"2:{TIMEOUT}"})
        _until((out / ".checkpoint-2.tmp" / "sharded" / ".metadata").is_file, proc, log, "the write of checkpoint-2")
        time.sleep(0.2)
        _kill_all(proc)
        assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
        assert [p.name for p in incomplete_checkpoints(out)] == [".checkpoint-2.tmp"]
        return "resumed from"
    proc = _launch(config, log)
    _until(lambda: len(list_checkpoints(out)) >= (2 if method != "selfnpo" else 1), proc, log, "a checkpoint")
    if method in ("mapo", "dpo-lora"):  # SIGKILL of every process at a random moment of the next step
        time.sleep(random.Random(3).uniform(0, 0.8))
        _kill_all(proc)
        assert (out / "train_report.json").is_file() and "finished" not in (out / "train_report.json").read_text()
        return "resumed from"
    # Self-NPO: SIGKILL of every process as soon as checkpoint-1 is complete (mid step 2), then SIGTERM to both
    # workers of the resumed run (a scheduler's preemption) once it has logged a step: a checkpoint, then exit.
    _kill_all(proc)
    resumed_at = int(list_checkpoints(out)[-1].name.split("-")[1])
    assert resumed_at < STEPS - 1, "the run got too far before the kill for the SIGTERM part to mean anything"
    log = tmp_path / "terminated.log"
    proc = _launch(config, log)
    # The progress bar of the resumed run shows its first step done (its signal handlers are in place by then).
    _until(lambda: f"{resumed_at + 1}/{STEPS}" in log.read_text(), proc, log, "a step of the resumed run")
    for pid in _workers(proc):
        os.kill(pid, signal.SIGTERM)
    assert _wait(proc, log) != 0
    text = log.read_text()
    assert "stopped by SIGTERM at step" in text and "--resume_from_checkpoint=latest" in text, text[-3000:]
    stopped = int(text.split("stopped by SIGTERM at step ")[1].split()[0])
    assert list_checkpoints(out)[-1].name == f"checkpoint-{stopped}"
    return f"resumed from {out / f'checkpoint-{stopped}'}"


@pytest.mark.parametrize("method", ["dpo", "mapo", "selfnpo", "dpo-lora"])
@pytest.mark.slow
def test_fsdp_two_processes_train_like_one_and_resume_exactly_after_a_kill(tiny_pipelines, data, tmp_path, method):
    from diffusers import UNet2DConditionModel

    model = tiny_pipelines["sd"]
    two = tmp_path / "two"
    proc = _launch(_config(method, model, data, two), tmp_path / "two.log")
    one = _train_in_process(_config(method, model, data, tmp_path / "one", train_batch_size=4, validation_prompts=[]))
    assert _wait(proc, tmp_path / "two.log") == 0, (tmp_path / "two.log").read_text()[-5000:]
    stdout = (tmp_path / "two.log").read_text()

    assert "FSDP2: parameters, gradients and optimizer states sharded" in stdout
    assert "2 process(es) x batch 2" in stdout and stdout.count("saved to ") == 1
    assert [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # Checkpoints hold the sharded state (one file per process) and the gathered, loadable weights.
    state = json.loads((two / "checkpoint-2" / "state.json").read_text())
    assert state["sharded"] is True and not (two / "checkpoint-2" / "trainable.safetensors").exists()
    assert sorted(p.name for p in (two / "checkpoint-2" / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    if method == "mapo":
        assert sorted(p.name for p in (two / "validation").glob("*.png")) == ["step-000002.png", "step-000004.png"]

    base = load_file(model / "unet" / WEIGHTS)
    for name in _weights(method):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys() and a
        if method.endswith("-lora"):
            assert_every_lora_weight_changed(two, model)
        else:
            assert b.keys() == base.keys() and all(b[k].shape == base[k].shape for k in b)  # whole: none a shard
            assert all(not torch.equal(b[k], base[k]) for k in b if b[k].is_floating_point())  # every weight trained
        worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)
        assert worst <= WEIGHT_RTOL, f"{name}: 1-process and 2-process weights differ by {worst:.2e} of a tensor's scale"
    if not method.endswith("-lora"):
        loaded = UNet2DConditionModel.from_pretrained(two / "unet")
        torch.testing.assert_close(dict(loaded.state_dict()), load_file(two / "unet" / WEIGHTS), rtol=0, atol=0)

    # Killed and resumed (checkpoint every step, `latest`): bit for bit the uninterrupted 2-process run.
    killed = tmp_path / "killed"
    config = _config(method, model, data, killed, checkpointing_steps=1, checkpoints_total_limit=2,
                     resume_from_checkpoint="latest", validation_prompts=[])
    expect = _kill(method, config, killed, tmp_path)
    stdout = _run(config, tmp_path / "resumed.log")
    assert expect in stdout and "nothing to do" not in stdout and stdout.count("saved to ") == 1
    for name in _weights(method):
        a, b = load_file(two / name), load_file(killed / name)
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {len(different)} tensors differ after the resume, e.g. {different[:3]}"
    assert [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert json.loads((killed / "train_report.json").read_text())["status"] == "finished"


# A NaN in the gradients of one process only, at step 2 (a hook on that process's loss): the sharded NaN guard
# must skip the update on both processes (they agree on the norm over every shard) and the run goes on.
_NAN_ON_RANK_1 = """
import os, sys
import torch
from diffalign.training import recipes

original, calls = recipes.PreferenceRecipe.step, [0]

def step(self, batch, generator):
    result = original(self, batch, generator)
    calls[0] += 1
    if calls[0] == 2 and os.environ["RANK"] == "1":
        result.losses.register_hook(lambda grad: grad * float("nan"))
    return result

recipes.PreferenceRecipe.step = step
from diffalign.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_fsdp_a_nan_gradient_on_one_process_skips_the_update_on_both(tiny_pipelines, data, tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(_NAN_ON_RANK_1)
    out = tmp_path / "run"
    config = _config("mapo", tiny_pipelines["sd"], data, out, max_train_steps=3, checkpointing_steps=1,
                     use_ema=False, gradient_accumulation_steps=1, validation_prompts=[])
    proc = _launch(config, tmp_path / "run.log", script=script)
    assert _wait(proc, tmp_path / "run.log") == 0, (tmp_path / "run.log").read_text()[-5000:]
    text = (tmp_path / "run.log").read_text()
    assert "step 2: non-finite gradient, optimizer update skipped" in text, text[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("skipped_update", 0) for m in lines] == [0, 1, 0]
    report = json.loads((out / "train_report.json").read_text())
    assert report["status"] == "finished" and report["nonfinite_steps"] == 1
    # No checkpoint after the skipped update; the final weights are finite and trained.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    final = load_file(out / "unet" / WEIGHTS)
    assert all(torch.isfinite(v).all() for v in final.values())


def test_a_sharded_full_checkpoint_is_not_taken_for_a_lora(tmp_path):
    """Its only top-level .safetensors file is the scheduler state: `--lora checkpoint-N` must say it is a UNet."""
    from diffalign.models import resolve_lora_file

    folder = tmp_path / "checkpoint-2"
    (folder / "sharded").mkdir(parents=True)
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "scheduler.safetensors").write_bytes(b"")
    (folder / "state.json").write_text(json.dumps({"global_step": 2, "sharded": True}))
    with pytest.raises(UserError, match="checkpoint of a full fine-tune"):
        resolve_lora_file(folder)


@pytest.mark.slow
def test_fsdp_cogvideox_selfnpo_full_trains_like_one_process(tmp_path):
    """The shipped CogVideoX-5b Self-NPO recipe, full fine-tune, on the tiny 5b-like transformer (CogVideoXBlock
    units): 2 sharded processes reach the 1-process weights, written whole and loadable by diffusers."""
    from diffusers import CogVideoXTransformer3DModel
    from video_builders import save_tiny_cogvideox

    model = save_tiny_cogvideox(tmp_path / "cogvideox")["5b"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na large diamond\n")
    config = REPO / "configs" / "cogvideox_5b_selfnpo.yaml"
    common = (f"--pretrained_model_name_or_path={model}", f"--dataset_name={prompts}", "--train_mode=full",
              "--max_train_steps=2", "--learning_rate=1e-3", "--adam_epsilon=1e-3", "--ddim_grid=5", "--teacher_steps=2",
              "--teacher_ema_decay=0.9", "--mixed_precision=no", "--use_8bit_adam=false", "--gradient_checkpointing=false",
              "--gradient_accumulation_steps=1", "--report_to=none", "--checkpointing_steps=1000", "--validation_prompts=[]")
    two, log = tmp_path / "two", tmp_path / "two.log"
    proc = _launch(config, log, args=(*common, f"--output_dir={two}", "--train_batch_size=2"))
    one = _train_in_process(config, (*common, f"--output_dir={tmp_path / 'one'}", "--train_batch_size=4"))
    assert _wait(proc, log) == 0, log.read_text()[-5000:]
    assert "FSDP2: parameters, gradients and optimizer states sharded" in log.read_text()
    a, b = load_file(one / "transformer" / WEIGHTS), load_file(two / "transformer" / WEIGHTS)
    base = load_file(model / "transformer" / WEIGHTS)
    assert a.keys() == b.keys() == base.keys()
    assert all(not torch.equal(b[k], base[k]) for k in b)  # every weight trained
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)
    assert worst <= WEIGHT_RTOL, f"1-process and 2-process weights differ by {worst:.2e} of a tensor's scale"
    loaded = CogVideoXTransformer3DModel.from_pretrained(two, subfolder="transformer")
    torch.testing.assert_close(dict(loaded.state_dict()), b, rtol=0, atol=0)
