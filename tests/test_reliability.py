"""Issue 9, in process: numerical faults, signals at a step boundary, untrusted files, resources.

The subprocess kill tests are in test_reliability_kill*.py, bad configs and bad data in
test_reliability_inputs.py, the property-based tests in test_reliability_props.py. RELIABILITY.md maps each
fault to its test.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffalign.errors import UserError
from diffalign.toy.render_pairs import write_pairs_parquet
from diffalign.training.guards import StopSignals, TrainingStopped

SRC = Path(__file__).resolve().parents[1] / "src" / "diffalign"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs_parquet(tmp_path_factory.mktemp("pairs") / "style.parquet", 8, kind="style", seed=3)


def _cfg(model, data, out, **kw):
    from diffalign.training.config import TrainConfig

    base = dict(method="mapo", pretrained_model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out),
                resolution=32, train_batch_size=2, max_train_steps=2, learning_rate=1e-3, rank=4, seed=0,
                report_to="none", checkpointing_steps=1000)
    if kw.get("method") == "selfnpo":
        base.update(dataset_name="toy", ddim_grid=5, teacher_steps=2, teacher_ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison(monkeypatch, recipe_cls, calls: set[int], kind: str = "loss", action=None):
    """Make recipe calls number `calls` (0-based; one per step with no accumulation) non-finite, or run `action`."""
    real = recipe_cls.__call__
    seen = {"n": 0}

    def poisoned(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        n = seen["n"]
        seen["n"] += 1
        if n in calls:
            if action is not None:
                action()
            elif kind == "loss":
                result.losses = result.losses * float("inf") if n % 2 else result.losses * float("nan")
            else:
                result.losses = _NanGrad.apply(result.losses)
        return result

    monkeypatch.setattr(recipe_cls, "__call__", poisoned)


def _lora(out: Path) -> dict:
    return load_file(out / "pytorch_lora_weights.safetensors")


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ numerical faults
@pytest.mark.parametrize("kind", ["loss", "gradient"])
@pytest.mark.slow
def test_nonfinite_step_is_skipped_warned_and_counted(tiny_pipelines, pairs, tmp_path, monkeypatch, capsys, kind):
    from diffalign.training import recipes
    from diffalign.training.loop import train

    one_step = _lora(train(_cfg(tiny_pipelines["sd"], pairs, tmp_path / "one", max_train_steps=1)))
    _poison(monkeypatch, recipes.PreferenceRecipe, {1}, kind)
    out = train(_cfg(tiny_pipelines["sd"], pairs, tmp_path / "two", max_train_steps=2))
    # Step 2 was skipped entirely (no AdamW update, no weight decay): the weights are those after step 1.
    _assert_same(_lora(out), one_step)
    assert f"warning: step 2: non-finite {kind}, optimizer update skipped" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["step"] == 2 and lines[1]["skipped_update"] == 1 and lines[1]["nonfinite_steps"] == 1
    assert "skipped_update" not in lines[0]
    if kind == "loss":
        assert lines[1]["loss"] is None  # NaN/inf are logged as null: the file stays valid JSON
    report = json.loads((out / "train_report.json").read_text())
    assert report["status"] == "finished" and report["nonfinite_steps"] == 1 and report["consecutive_nonfinite"] == 1


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_naming_step_and_last_good_checkpoint(tiny_pipelines, tmp_path, monkeypatch):
    from diffalign.training import selfnpo
    from diffalign.training.loop import train

    _poison(monkeypatch, selfnpo.SelfNPORecipe, set(range(2, 100)))
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped) as info:
        train(_cfg(tiny_pipelines["sd"], None, out, method="selfnpo", max_train_steps=8, checkpointing_steps=1,
                   max_consecutive_nonfinite=3))
    message = str(info.value)
    assert "training stopped at step 5" in message and "steps 3-5" in message
    assert "max_consecutive_nonfinite=3" in message and f"{out / 'checkpoint-2'}" in message
    assert info.value.exit_code == 2
    # Skipped steps write no checkpoint: the newest one is from before the bad stretch.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    report = json.loads((out / "train_report.json").read_text())
    assert report["status"].startswith("stopped: non-finite") and report["nonfinite_steps"] == 3
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_fp16_overflow_is_left_to_the_grad_scaler():
    """With a GradScaler (fp16), overflowing gradients are the scaler's normal calibration: it skips the update and
    lowers its scale; that is counted apart from faults. A non-finite loss is still a fault, and nothing moves."""
    from diffalign.training.steps import optimizer_step

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.tensor(1.0))  # the scaler starts its state at the first scaled loss
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    class Scaled:  # what accelerate's AcceleratedOptimizer does when it holds a scaler
        def step(self):
            scaler.step(opt)
            scaler.update()

        def zero_grad(self, set_to_none=True):
            opt.zero_grad(set_to_none=set_to_none)

    class Accelerator:
        num_processes = 1

        def __init__(self):
            self.scaler = scaler

        def clip_grad_norm_(self, params, max_norm):
            scaler.unscale_(opt)
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

    p.grad = torch.tensor([1.0, float("inf"), 1.0])
    assert optimizer_step(Accelerator(), [p], Scaled(), sched, 1.0, {"loss": 0.5}) == ("fp16_overflow", False)
    assert torch.equal(p.detach(), torch.ones(3)) and scaler.get_scale() == 512.0
    p.grad = torch.full((3,), 512.0)
    assert optimizer_step(Accelerator(), [p], Scaled(), sched, 1.0, {"loss": 0.5}) == (None, False)
    assert not torch.equal(p.detach(), torch.ones(3))
    before = p.detach().clone()
    p.grad = torch.full((3,), 512.0)
    assert optimizer_step(Accelerator(), [p], Scaled(), sched, 1.0, {"loss": float("nan")})[0] == "loss"
    assert torch.equal(p.detach(), before)


# -------------------------------------------------------------------------------------------------- signals
@pytest.fixture
def python_sigint():
    """SIGINT as a foreground Python process has it, whatever the shell that started pytest left (a background
    job of a non-interactive shell starts with SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("method,sig", [("mapo", signal.SIGINT), ("selfnpo", signal.SIGTERM)],
                         ids=["mapo-SIGINT", "selfnpo-SIGTERM"])
@pytest.mark.slow
def test_signal_saves_a_checkpoint_at_the_step_boundary_and_resume_is_exact(tiny_pipelines, pairs, tmp_path,
                                                                            monkeypatch, method, sig,
                                                                            python_sigint):
    from diffalign.training import recipes, selfnpo
    from diffalign.training.loop import train

    cfg = lambda out, **kw: _cfg(tiny_pipelines["sd"], pairs, out, method=method, max_train_steps=4, **kw)
    straight = _lora(train(cfg(tmp_path / "straight")))
    recipe_cls = selfnpo.SelfNPORecipe if method == "selfnpo" else recipes.PreferenceRecipe
    handler_before = signal.getsignal(sig)
    with monkeypatch.context() as m:
        _poison(m, recipe_cls, {1}, action=lambda: os.kill(os.getpid(), sig))  # arrives in the middle of step 2
        with pytest.raises(TrainingStopped) as info:
            train(cfg(tmp_path / "run"))
    assert info.value.exit_code == 128 + sig
    assert f"stopped by {signal.Signals(sig).name} at step 2 of 4" in str(info.value)
    assert "--resume_from_checkpoint=latest" in str(info.value)
    assert (tmp_path / "run" / "checkpoint-2" / "state.json").is_file()  # checkpointing_steps is 1000: the signal's
    assert signal.getsignal(sig) == handler_before  # the run's handlers are gone again
    resumed = train(cfg(tmp_path / "run", resume_from_checkpoint="latest"))
    _assert_same(_lora(resumed), straight)


def test_a_second_signal_stops_at_once(python_sigint):
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT  # the first one only sets the flag
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_signal_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # the other one is still handled
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.received is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


# -------------------------------------------------------------------------------------------- untrusted files
class _Payload:
    """Unpickling this runs `open(marker, "w")`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    from diffalign.training.checkpoint import load_checkpoint

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ckpt = tmp_path / "checkpoint-1"  # a format-1 checkpoint (optimizer.pt / scheduler.pt), as older runs wrote
    ckpt.mkdir()
    save_file({"w": torch.ones(3)}, ckpt / "trainable.safetensors")
    torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
    marker = tmp_path / "payload-ran"
    with open(ckpt / "optimizer.pt", "wb") as fh:
        pickle.dump({"state": _Payload(marker)}, fh)
    (ckpt / "state.json").write_text(json.dumps({"global_step": 1}))
    with pytest.raises(UserError, match=r"refusing to load .*optimizer\.pt.*weights_only=True"):
        load_checkpoint(ckpt, params={"w": param}, optimizer=optimizer, lr_scheduler=scheduler)
    assert not marker.exists()
    # The same file renamed .bin in place of the scheduler state: refused too.
    shutil.copy(ckpt / "optimizer.pt", ckpt / "scheduler.pt")
    (ckpt / "optimizer.pt").unlink()
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    with pytest.raises(UserError, match=r"refusing to load .*scheduler\.pt"):
        load_checkpoint(ckpt, params={"w": param}, optimizer=optimizer, lr_scheduler=scheduler)
    assert not marker.exists()


def test_a_malicious_pickle_as_unet_weights_is_refused_and_never_runs(tiny_pipelines, tmp_path):
    from diffalign.models import load_family

    model = tmp_path / "model"
    shutil.copytree(tiny_pipelines["sd"], model)
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "payload-ran"
    with open(model / "unet" / "diffusion_pytorch_model.bin", "wb") as fh:
        pickle.dump({"conv_in.weight": _Payload(marker)}, fh)
    # diffusers reads .bin weights with torch.load(weights_only=True): the pickle is refused, a UserError says so.
    with pytest.raises(UserError, match=r"cannot load the unet .*diffusion_pytorch_model\.bin"):
        load_family(model)
    assert not marker.exists()


@pytest.mark.slow
def test_checkpoints_we_write_hold_no_pickle(tiny_pipelines, pairs, tmp_path):
    from diffalign.training.loop import train

    out = train(_cfg(tiny_pipelines["sd"], pairs, tmp_path / "run", max_train_steps=2, checkpointing_steps=1))
    files = sorted(p.name for p in (out / "checkpoint-1").iterdir())
    assert files == ["optimizer.json", "optimizer.safetensors", "pytorch_lora_weights.safetensors", "scheduler.json",
                     "scheduler.safetensors", "state.json", "trainable.safetensors"]
    state = json.loads((out / "checkpoint-1" / "state.json").read_text())
    assert set(state["files"]) == set(files) - {"state.json"}  # what makes a checkpoint "complete"
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt")]


def _unsafe_calls(tree) -> list[str]:
    """Calls that could run code from a file: trust_remote_code=True anywhere, torch.load without
    weights_only=True, pickle/dill loads."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        if isinstance(kwargs.get("trust_remote_code"), ast.Constant) and kwargs["trust_remote_code"].value is True:
            found.append(f"line {node.lineno}: {name}(trust_remote_code=True)")
        if name == "torch.load" and not (isinstance(kwargs.get("weights_only"), ast.Constant)
                                         and kwargs["weights_only"].value is True):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "cloudpickle.load"):
            found.append(f"line {node.lineno}: {name}")
    return found


@pytest.mark.slow
def test_no_remote_code_and_no_unsafe_loading_in_the_package():
    bad = [f"{path.relative_to(SRC)} {hit}" for path in SRC.rglob("*.py")
           for hit in _unsafe_calls(ast.parse(path.read_text(encoding="utf-8")))]
    assert not bad, bad
    assert not re.findall(r"trust_remote_code\s*=\s*True", "".join(p.read_text() for p in SRC.rglob("*.py")))
    # The checker itself finds what it must.
    sample = "torch.load(f)\ntorch.load(f, weights_only=False)\nAutoModel.from_pretrained(x, trust_remote_code=True)\n"
    assert len(_unsafe_calls(ast.parse(sample + "torch.load(f, weights_only=True)\n"))) == 3


def test_a_truncated_checkpoint_is_not_latest_and_a_named_one_is_refused(tmp_path):
    from diffalign.training.checkpoint import list_checkpoints, remove_incomplete, resolve_resume, save_checkpoint

    param = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([param])
    optimizer.zero_grad()
    param.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, weights={"w": param}, optimizer=optimizer, lr_scheduler=scheduler)
    weights = tmp_path / "checkpoint-2" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # a disk that lost the end of a file
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-1"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, "checkpoint-2")
    (tmp_path / ".checkpoint-3.tmp").mkdir()  # what a kill during a write leaves
    removed, ignored = remove_incomplete(tmp_path)
    assert [p.name for p in removed] == [".checkpoint-3.tmp"] and not (tmp_path / ".checkpoint-3.tmp").exists()
    assert ignored == [tmp_path / "checkpoint-2"] and weights.is_file()  # not ours to delete: left for the user


def test_optimizer_and_scheduler_state_round_trip_without_pickle(tmp_path):
    from diffalign.training.checkpoint import load_checkpoint, save_checkpoint

    def make():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5))
        opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.8, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return p, opt, sched

    p, opt, sched = make()
    for _ in range(3):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
        sched.step()
    save_checkpoint(tmp_path, 3, weights={"w": p}, optimizer=opt, lr_scheduler=sched)
    q, opt2, sched2 = make()
    load_checkpoint(tmp_path / "checkpoint-3", params={"w": q}, optimizer=opt2, lr_scheduler=sched2)
    assert torch.equal(p, q) and opt2.param_groups[0]["betas"] == (0.8, 0.95)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"] and sched.state_dict() == sched2.state_dict()
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(a["state"][0][key], b["state"][0][key])


# ------------------------------------------------------------------------------------------------- resources
@pytest.mark.slow
def test_too_little_disk_for_a_checkpoint_is_reported_before_training(tiny_pipelines, pairs, tmp_path, monkeypatch):
    from diffalign.training.loop import train

    real = shutil.disk_usage
    out = tmp_path / "run"
    # Only the run folder's disk is "full" (the datasets library checks its own cache folder's space).
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=200_000) if Path(p) == out else real(p))
    with pytest.raises(UserError, match=r"not enough disk space in .* for one training checkpoint: about .* needed, "
                                        r"195\.3 KB free"):
        train(_cfg(tiny_pipelines["sd"], pairs, out, max_train_steps=2, checkpointing_steps=1))
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))  # no step was taken


@pytest.mark.slow
def test_checkpoint_size_estimate_covers_what_is_written(tiny_pipelines, pairs, tmp_path):
    from diffalign.models import load_family
    from diffalign.training.checkpoint import estimate_checkpoint_bytes
    from diffalign.training.loop import train

    out = train(_cfg(tiny_pipelines["sd"], pairs, tmp_path / "run", max_train_steps=2, checkpointing_steps=1))
    written = sum(f.stat().st_size for f in (out / "checkpoint-1").iterdir())
    family = load_family(tiny_pipelines["sd"])
    family.add_lora(4)
    estimate = estimate_checkpoint_bytes([p for p in family.unet.parameters() if p.requires_grad])
    assert written <= estimate < written * 1.2 + (1 << 20)


def test_an_output_folder_that_cannot_be_written_is_reported_before_any_model_loads(tmp_path, monkeypatch, pairs):
    from diffalign.training import setup
    from diffalign.training.loop import train

    monkeypatch.setattr(setup, "load_family", lambda *a, **k: pytest.fail("a model was loaded"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # even root cannot make a folder below a regular file
    with pytest.raises(UserError, match=r"output folder '.*a-file/run' is not writable .*--output_dir"):
        train(_cfg("toy", pairs, blocker / "run"))
