"""Several processes (gloo on CPU) give the same results as one process: training weights and logs,
checkpoint/resume, and `diffalign generate`. Training is launched with the shipped configs/accelerate/ddp.yaml
(`accelerate launch --config_file ... --num_processes 2`), generation with torchrun.

Every multi-process run is a subprocess with a timeout, so a deadlock fails the test instead of hanging it.
The single-process reference runs in this process at the same GLOBAL batch (per-device batch doubled).

Tolerance: the two runs push batches of different sizes through the UNet and add gradients in another order,
so they agree to float rounding, not bit for bit. Two settings keep that rounding from being amplified by
something other than the distribution under test: AdamW's epsilon is 1e-3 (with 1e-8 its update is
lr * g/|g|, so a gradient element near zero flips sign on rounding noise), and DPO's beta is 100 (the logit
is beta/2 times a difference of two nearly equal errors, so beta 5000 multiplies their rounding by 2500).
A wrong data or noise split across processes changes the weights by O(100%), far outside 1e-4.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_checks import assert_every_lora_weight_changed
from PIL import Image
from safetensors.torch import load_file

TIMEOUT = 240  # seconds per launched job; a healthy 2-process toy run takes ~20 s on 2 busy cores
WEIGHT_RTOL = 1e-4  # per tensor: max |w_2proc - w_1proc| <= WEIGHT_RTOL * max |w_1proc|
STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from diffalign.toy.render_pairs import write_pairs_parquet

    root = tmp_path_factory.mktemp("dist_data")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow diamond\na small red square\n"
                       "a large blue circle, striped\na green diamond\na red triangle, outlined\n")
    return {"pairs": write_pairs_parquet(root / "pairs.parquet", 24, kind="style", seed=3), "prompts": prompts}


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


REPO = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str]) -> subprocess.Popen:
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "diffalign", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())


def _accelerate_launch(args: list[str]) -> subprocess.Popen:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/ddp.yaml"), "--num_processes",
           "2", "--main_process_port", "0", "-m", "diffalign", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"2-process job did not finish in {TIMEOUT} s (deadlock?):\n{out[-3000:]}")
    assert proc.returncode == 0, out[-5000:]
    return out


def _train_kw(method: str, model: Path, data: dict) -> dict:
    if method == "npo-dropout":  # caption dropout: 2 processes must drop the same global samples as 1
        return {**_train_kw("npo", model, data), "proportion_empty_prompts": 0.5}
    kw = dict(method=method, pretrained_model_name_or_path=str(model), resolution=32, max_train_steps=STEPS,
              learning_rate=1e-3, adam_epsilon=1e-3, rank=4, seed=0, report_to="none", checkpointing_steps=2,
              validation_prompts=["a red circle"], validation_steps=2, validation_num_inference_steps=2)
    if method == "selfnpo":
        kw.update(dataset_name=str(data["prompts"]), ddim_grid=5, teacher_steps=2, teacher_ema_decay=0.5)
    else:
        kw.update(dataset_name=str(data["pairs"]), **({"beta": 100.0} if method in ("dpo", "npo") else {}))
    return kw


def _as_args(kw: dict) -> list[str]:
    """`diffalign train CONFIG.yaml`, the config written beside the run's output folder."""
    import yaml

    config = Path(f"{kw['output_dir']}.yaml")
    config.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in kw.items()}))
    return ["train", str(config)]


def _train_in_process(kw: dict) -> Path:
    from diffalign.config_loader import load_config
    from diffalign.training.config import TrainConfig
    from diffalign.training.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each torchrun process, and leaves the other core to it
    try:
        return train(load_config(TrainConfig, _as_args(kw)[1], []))
    finally:
        torch.set_num_threads(threads)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(one: Path, two: Path) -> None:
    a = load_file(one / "pytorch_lora_weights.safetensors")
    b = load_file(two / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and a
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)
    assert worst <= WEIGHT_RTOL, f"1-process and 2-process weights differ by {worst:.2e} of a tensor's scale"


def _assert_logged_once(out: Path, stdout: str) -> None:
    assert [m["step"] for m in _metrics(out)] == list(range(1, STEPS + 1))  # one line per step, none twice
    assert json.loads((out / "train_report.json").read_text())["steps"] == STEPS
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: diffusers")
    assert stdout.count("saved to ") == 1  # only the main process finishes the run (outputs, card, report)
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == ["step-000002.png", "step-000003.png"]


@pytest.mark.parametrize("method", ["dpo", "mapo", "selfnpo", "npo-dropout"])
@pytest.mark.slow
def test_two_processes_train_like_one_process_at_the_same_global_batch(tiny_pipelines, data, tmp_path, method):
    """Weights and logged losses of 2 processes x batch 2 equal 1 process x batch 4; logs are written once;
    validation on the main process (every 2 steps and at the end) does not hang the other process."""
    kw = _train_kw(method, tiny_pipelines["sd"], data)
    two = tmp_path / "two"
    proc = _accelerate_launch(_as_args({**kw, "train_batch_size": 2, "output_dir": two}))
    one = _train_in_process({**kw, "train_batch_size": 4, "output_dir": tmp_path / "one",
                             "validation_prompts": []})
    stdout = _finish(proc)

    assert "2 process(es) x batch 2" in stdout
    _assert_logged_once(two, stdout)
    assert_every_lora_weight_changed(two, tiny_pipelines["sd"])
    _assert_same_weights(one, two)
    # The logged loss is the global batch's (averaged over processes), so it matches the 1-process log.
    np.testing.assert_allclose([m["loss"] for m in _metrics(two)], [m["loss"] for m in _metrics(one)], rtol=1e-4)
    if kw.get("proportion_empty_prompts"):  # the logged count is the global batch's, the same samples dropped
        dropped = [m["empty_prompts"] for m in _metrics(one)]
        assert [m["empty_prompts"] for m in _metrics(two)] == dropped and 0 < sum(dropped) < STEPS * 4

    if method != "dpo":  # resume runs the same code for every method; one 2-process resume keeps the file short
        return
    # Resume the 2-process run from its step-2 checkpoint (by name: `latest` is the final checkpoint-3 now, and a
    # finished run has nothing to do): it must reach the same weights and log step 3 once.
    assert (two / "checkpoint-2").is_dir() and (two / "checkpoint-3").is_dir()
    finished = tmp_path / "finished.safetensors"
    shutil.copy(two / "pytorch_lora_weights.safetensors", finished)
    stdout = _finish(_accelerate_launch(_as_args({**kw, "train_batch_size": 2, "output_dir": two,
                                                   "resume_from_checkpoint": str(two / "checkpoint-2")})))
    assert "resumed from" in stdout and "checkpoint-2" in stdout
    _assert_logged_once(two, stdout)
    a, b = load_file(finished), load_file(two / "pytorch_lora_weights.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["mapo", "selfnpo-images"])
@pytest.mark.slow
def test_a_process_without_usable_rows_in_a_micro_batch_does_not_hang_the_others(tiny_pipelines, tmp_path, method):
    """An undecodable image that leaves one process's micro-batch empty: every process skips that micro-batch
    (a process that skipped alone would leave the other in the gradient all-reduce: a crash or a hang), it is
    counted (`skipped_micro_batches`), and the run finishes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.toy.render_captions import render_captions
    from diffalign.toy.render_pairs import render_pairs

    if method == "mapo":
        rows, column = render_pairs(8, kind="style", seed=5), "jpg_0"
        # The pixel path: there the bad image is met when it is fetched (the cache would drop it before training).
        kw = {**_train_kw("mapo", tiny_pipelines["sd"], {"pairs": tmp_path / "data.parquet"}), "use_cache": False}
    else:
        rows, column = render_captions(8, seed=5), "image"
        kw = {**_train_kw("selfnpo", tiny_pipelines["sd"], {"prompts": None}), "selfnpo_start": "images",
              "dataset_name": str(tmp_path / "data.parquet"), "image_columns": ["image"]}
    # Step 1's global batch is rows order[0:2] of epoch 0's permutation (seed 0); process 1 gets order[1] alone.
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    rows[order[1]][column] = b"these bytes are not an image"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    out = tmp_path / "two"
    stdout = _finish(_accelerate_launch(_as_args({**kw, "train_batch_size": 1, "output_dir": out,
                                                  "validation_prompts": []})))
    assert "step 1, micro-batch 0: a process has no usable row" in stdout
    report = json.loads((out / "train_report.json").read_text())
    assert report["status"] == "finished" and report["steps"] == STEPS
    # The image itself is counted only by the process that met it (process 1): train_report.json is the main one's.
    assert report["skipped_micro_batches"] == 1


# ------------------------------------------------------------------------------------------- generation
def _generate_args(model, prompts: Path, out: Path, *extra) -> list[str]:
    return ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--steps", "2",
            "--seed", "3", *extra]


def _rows_and_pixels(folder: Path):
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return rows, [np.asarray(Image.open(folder / r["file"])).astype(int) for r in rows]


@pytest.mark.slow
def test_generate_two_processes_write_one_manifest_of_the_same_images(tiny_pipelines, tmp_path):
    from diffalign.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow diamond\na red square\n")
    proc = _torchrun(_generate_args(tiny_pipelines["sd"], prompts, tmp_path / "two", "--batch-size", "2"))
    assert main(_generate_args(tiny_pipelines["sd"], prompts, tmp_path / "one", "--batch-size", "3")) == 0
    stdout = _finish(proc)
    assert stdout.count("wrote 5 images") == 1  # the main process reports once

    rows1, pix1 = _rows_and_pixels(tmp_path / "one")
    rows2, pix2 = _rows_and_pixels(tmp_path / "two")
    assert [r["index"] for r in rows2] == [0, 1, 2, 3, 4]  # one manifest, each image once, ordered by index
    assert rows2 == rows1  # same files, prompts, seeds and settings
    for x, y in zip(pix1, pix2):  # each image has its own seed: the split over processes does not matter
        assert np.abs(x - y).max() <= 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [f"0000{i}.png" for i in range(5)] + ["manifest.jsonl"]


def test_generate_resumes_without_duplicates(tiny_pipelines, tmp_path):
    from diffalign.cli import main

    out = tmp_path / "o"
    first, more = tmp_path / "first.txt", tmp_path / "more.txt"
    first.write_text("a red circle\na blue square\n")
    more.write_text("a red circle\na blue square\na green triangle\na yellow diamond\n")
    assert main(_generate_args(tiny_pipelines["sd"], first, out)) == 0
    old = {p.name: 1_000_000_000 for p in out.glob("*.png")}
    for name, stamp in old.items():
        os.utime(out / name, ns=(stamp, stamp))

    # The same job with more prompts makes only the missing images; the manifest lists each image once.
    assert main(_generate_args(tiny_pipelines["sd"], more, out)) == 0
    rows, _ = _rows_and_pixels(out)
    assert [(r["index"], r["prompt"], r["seed"]) for r in rows] == [
        (0, "a red circle", 3), (1, "a blue square", 4), (2, "a green triangle", 5), (3, "a yellow diamond", 6)]
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in old.items())  # not redone

    # A killed run leaves part files and no new manifest: their rows count as done, torn lines are ignored.
    _, reference = _rows_and_pixels(out)
    (out / "00003.png").unlink()
    (out / ".manifest-part-1.jsonl").write_text(json.dumps(rows[2]) + "\n" + '{"file": "000')
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    stamp2 = (out / "00002.png").stat().st_mtime_ns
    assert main(_generate_args(tiny_pipelines["sd"], more, out)) == 0
    rows_after, pixels = _rows_and_pixels(out)
    assert rows_after == rows and not list(out.glob(".manifest-part-*"))
    assert (out / "00002.png").stat().st_mtime_ns == stamp2  # listed in the part file: kept
    assert np.abs(pixels[3] - reference[3]).max() <= 1  # the deleted image was made again, the same


@pytest.mark.slow
def test_generate_into_a_folder_of_other_settings_needs_overwrite(tiny_pipelines, tmp_path, capsys):
    from diffalign.cli import main

    out = tmp_path / "o"
    three, two = tmp_path / "three.txt", tmp_path / "two.txt"
    three.write_text("a red circle\na blue square\na green triangle\n")
    two.write_text("a red circle\na blue square\n")
    assert main(_generate_args(tiny_pipelines["sd"], three, out)) == 0
    capsys.readouterr()
    for extra, what in [(["--guidance-scale", "3"], "guidance_scale=7.5"), (["--seed", "9"], "seed 3"),
                        (["--num-images-per-prompt", "2"], "num_images_per_prompt=1")]:
        assert main(_generate_args(tiny_pipelines["sd"], three, out, *extra)) == 2  # a later --seed wins
        err = capsys.readouterr().err
        assert "already holds images of other settings" in err and what in err and "--overwrite" in err, err
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("a blue square\na red circle\na green triangle\n")
    assert main(_generate_args(tiny_pipelines["sd"], swapped, out)) == 2
    assert "prompt 'a red circle' for image 0" in capsys.readouterr().err

    # --overwrite replaces the earlier job: its images beyond the new job's are gone too.
    assert main(_generate_args(tiny_pipelines["sd"], two, out, "--guidance-scale", "3", "--overwrite")) == 0
    rows, _ = _rows_and_pixels(out)
    assert [r["settings"]["guidance_scale"] for r in rows] == [3.0, 3.0]
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png"]


# -------------------------------------------------------------------------------------- accelerate configs
@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_shipped_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / f"configs/accelerate/{name}.yaml"))  # unknown keys raise
    assert config.distributed_type == kind and config.num_machines == 1
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
    # FSDP2 is the sharded engine (tests/test_fsdp.py); DeepSpeed, which cannot run here, is not shipped.
    assert sorted(p.name for p in (REPO / "configs/accelerate").glob("*.yaml")) == ["ddp.yaml", "fsdp.yaml"]


@pytest.mark.parametrize("kind", ["DistributedType.FSDP", "DEEPSPEED"])
def test_deepspeed_and_accelerates_own_fsdp_stop_with_a_pointer_to_fsdp_yaml(kind):
    from diffalign.errors import UserError
    from diffalign.training.setup import check_distributed_type

    with pytest.raises(UserError, match="not supported by diffalign train.*configs/accelerate/fsdp.yaml"):
        check_distributed_type(kind)
    for fine in ("DistributedType.MULTI_GPU", "MULTI_CPU", "NO"):
        check_distributed_type(fine)
