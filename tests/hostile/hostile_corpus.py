"""The hostile-input corpus (issue 22): every case builds its inputs in a fresh folder and names the command
that must meet them, and the outcome class the command must reach.

Outcome classes (what `test_hostile.py` asserts, and what RELIABILITY.md's table shows):

- ``error``: exit code 2 (or the case's own code), one line on stderr starting ``diffalign CMD: error:``, no
  traceback, containing the case's expected text;
- ``refused``: the same, and every input file the case lists is byte-identical afterwards;
- ``skip``: exit code 0 and the case's check finds the bad input counted (never dropped silently);
- ``ok``: exit code 0 and the case's check finds the result right (an odd but valid input, such as a large seed).

Every case's inputs are also checked byte-identical afterwards (never a changed input). A case builds its files
with `build(ctx)` and returns the command line; `ctx` holds the folder, the tiny model and pytest's monkeypatch.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image


@dataclass
class Ctx:
    tmp: Path
    model: str  # a tiny SD pipeline folder
    monkeypatch: object
    inputs: list = field(default_factory=list)  # files that must be unchanged afterwards

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
        self.inputs.append(path)
        return path


@dataclass
class Case:
    id: str
    defect: int
    input: str  # what is hostile, for the table
    outcome: str  # error | refused | skip
    expect: str  # text the one-line error contains (error/refused), or what is counted (skip)
    build: Callable[[Ctx], list[str]]
    check: Callable[[Ctx, str], None] | None = None  # extra assertion after the command (stderr given)
    exit_code: int = 2


def png(side: int = 32, colour=(200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (side, side), colour).save(buf, format="PNG")
    return buf.getvalue()


def parquet(ctx: Ctx, name: str, rows: list[tuple], columns=("caption", "jpg_0", "jpg_1", "label_0", "label_1")):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = ctx.tmp / name
    pq.write_table(pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)}), path)
    ctx.inputs.append(path)
    return path


def train_args(ctx: Ctx, data, *extra: str, out: str = "run") -> list[str]:
    return ["train", "--method=mapo", f"--pretrained_model_name_or_path={ctx.model}", f"--dataset_name={data}",
            f"--output_dir={ctx.tmp / out}", "--report_to=none", "--resolution=32", "--train_batch_size=2",
            "--max_train_steps=2", "--rank=4", "--learning_rate=1e-3", "--checkpointing_steps=1000", *extra]


#: The pixel path (images decoded at every step), where images that fail are found as they are fetched.
PIXELS = ("--use_cache=false",)


def report(ctx: Ctx, out: str = "run") -> dict:
    return json.loads((ctx.tmp / out / "train_report.json").read_text())


# ------------------------------------------------------------------------------------------------ cases
CASES: list[Case] = []


def case(**kw):
    def register(build):
        CASES.append(Case(build=build, **kw))
        return build
    return register


def _half_images(ctx, path=PIXELS):
    good = png()
    data = parquet(ctx, "half.parquet", [("x", good[: len(good) // 2], png(colour=(1, 2, 3)), 1.0, 0.0)] * 16)
    return train_args(ctx, data, "--max_train_steps=3", *path)


def _check_not_finished(ctx, err):
    r = report(ctx)
    assert r["status"] == "stopped: no usable data" and r["fetch_failures"] == r["fetched_rows"] == 6, r


case(id="truncated_images_every_row", defect=1, input="parquet whose jpg_0 bytes are cut in half in every row "
     "(a run shorter than an epoch)", outcome="error", expect="had images that could not be used",
     check=_check_not_finished)(_half_images)


def _half_images_epoch(ctx):
    good = png()
    data = parquet(ctx, "half.parquet", [("x", good[: len(good) // 2], png(colour=(1, 2, 3)), 1.0, 0.0)] * 4)
    return train_args(ctx, data, "--max_train_steps=6", *PIXELS)


case(id="truncated_images_whole_epoch", defect=1, input="parquet whose every image fails for a whole epoch",
     outcome="error", expect="in epoch 1 had images that could not be used")(_half_images_epoch)


def _some_bad_over_limit(ctx, path=PIXELS):
    good, bad = png(), png()[:40]
    rows = [("x", bad, good, 1.0, 0.0)] * 3 + [("x", good, png(colour=(1, 2, 3)), 1.0, 0.0)] * 5
    return train_args(ctx, parquet(ctx, "some.parquet", rows), "--max_train_steps=8", "--max_skipped_share=0.25",
                      "--seed=1", *path)


case(id="skipped_share_over_user_limit", defect=1, input="3 of 8 rows undecodable, max_skipped_share=0.25",
     outcome="error", expect="max_skipped_share=0.25")(_some_bad_over_limit)


def _some_bad_counted(ctx, path=PIXELS):
    good, bad = png(), png()[:40]
    rows = [("x", bad, good, 1.0, 0.0)] + [("x", good, png(colour=(1, 2, 3)), 1.0, 0.0)] * 3
    return train_args(ctx, parquet(ctx, "some.parquet", rows), "--max_train_steps=2", *path)


def _check_counted(ctx, err):
    r = report(ctx)
    assert r["status"] == "finished" and r["fetch_failures"] == 1 and r["data"]["undecodable_image"] == 1, r


case(id="one_undecodable_row", defect=1, input="1 of 4 rows undecodable (default limit)", outcome="skip",
     expect="fetch_failures=1, undecodable_image=1 in train_report.json", check=_check_counted,
     exit_code=0)(_some_bad_counted)


# The same bad images on the default path (use_cache: auto): the latent cache is built before training, so its
# skipped pairs are counted there, against the same limit, and the run stops before its first step.
case(id="truncated_images_every_row_cached", defect=1, input="every jpg_0 cut in half, default use_cache: auto",
     outcome="error", expect="16 of the 16 pairs had images that could not be used when the latent cache was built "
     "(16 undecodable_image")(lambda ctx: _half_images(ctx, path=()))


case(id="skipped_share_over_user_limit_cached", defect=1, input="3 of 8 rows undecodable, max_skipped_share=0.25, "
     "default use_cache: auto", outcome="error", expect="3 of the 8 pairs had images that could not be used when the "
     "latent cache was built")(lambda ctx: _some_bad_over_limit(ctx, path=()))


def _check_counted_cached(ctx, err):
    r = report(ctx)
    assert r["status"] == "finished" and r["data"]["undecodable_image"] == 1 and r["data"]["usable_pairs"] == 3, r
    manifest = json.loads((ctx.tmp / "run" / "cache" / "manifest.json").read_text())
    assert len(manifest["skipped"]) == 1 and manifest["num_pairs"] == 3, manifest


case(id="one_undecodable_row_cached", defect=1, input="1 of 4 rows undecodable, default use_cache: auto",
     outcome="skip", expect="undecodable_image=1 in train_report.json, in the cache manifest's skipped list",
     check=_check_counted_cached, exit_code=0)(lambda ctx: _some_bad_counted(ctx, path=()))


# ------------------------------------------------------------------------------------------------ 2: LoRA files
def make_lora(ctx: Ctx, edit=None, name: str = "lora.safetensors") -> Path:
    """A complete LoRA of the tiny model with non-zero weights, optionally edited ({key: tensor} -> same)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from diffalign.models import load_pipeline
    from diffalign.models.lora import add_lora, save_lora

    pipe = load_pipeline(ctx.model)
    add_lora(pipe.unet, 4)
    gen = torch.Generator().manual_seed(0)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=gen) * 0.01
    src = save_lora(pipe.unet, type(pipe), ctx.tmp / "lora_src")
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(src))
    path = ctx.tmp / name
    save_file(edit(state) if edit else state, str(path), metadata=metadata)
    ctx.inputs.append(path)
    return path


def generate_args(ctx: Ctx, *extra: str, out: str = "gen") -> list[str]:
    return ["generate", "--model", ctx.model, "--prompt", "a red square", "--out", str(ctx.tmp / out), "--steps", "1",
            "--height", "32", "--width", "32", *extra]


def _drop_fifth_of_ups(state):
    ups = sorted(k for k in state if "lora.up" in k)
    return {k: v for k, v in state.items() if k not in ups[: len(ups) // 5]}


def _rename_most(state):
    return {(k.replace("unet.", "unet.renamed_", 1) if i % 4 else k): v for i, (k, v) in enumerate(sorted(state.items()))}


def _extra_module(state):
    any_down = next(k for k in state if "lora.down" in k)
    any_up = any_down.replace("lora.down", "lora.up")
    return {**state, "unet.no_such_block.to_q.lora.down.weight": state[any_down].clone(),
            "unet.no_such_block.to_q.lora.up.weight": state[any_up].clone()}


case(id="lora_fifth_of_up_weights_removed", defect=2, input="LoRA file with a fifth of its lora.up weights removed",
     outcome="refused", expect="have no value in the file")(
    lambda ctx: generate_args(ctx, "--lora", str(make_lora(ctx, _drop_fifth_of_ups))))
case(id="lora_keys_renamed", defect=2, input="LoRA file with most keys renamed", outcome="refused",
     expect="have no value in the file")(lambda ctx: generate_args(ctx, "--lora", str(make_lora(ctx, _rename_most))))
case(id="lora_key_for_no_module", defect=2, input="LoRA file with weights for a module the model does not have",
     outcome="refused", expect="match no module of the model (unet.no_such_block.to_q)")(
    lambda ctx: generate_args(ctx, "--lora", str(make_lora(ctx, _extra_module))))


# ------------------------------------------------------------------------------------------------ 3: seeds
def _good_parquet(ctx, n=4, name="good.parquet"):
    return parquet(ctx, name, [("a red square", png(), png(colour=(1, 2, 3)), 1.0, 0.0)] * n)


def _check_learned(ctx, err):
    from safetensors.torch import load_file

    r = report(ctx)
    assert r["status"] == "finished", r
    weights = load_file(str(ctx.tmp / "run" / "pytorch_lora_weights.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora.up" in k)


case(id="seed_1234567890", defect=3, input="train --seed=1234567890 (above the old 1.8e8 overflow)", outcome="ok",
     expect="finished, LoRA up-weights not all zero", check=_check_learned, exit_code=0)(
    lambda ctx: train_args(ctx, _good_parquet(ctx), "--seed=1234567890"))
case(id="seed_2_32_minus_1", defect=3, input="train --seed=4294967295", outcome="ok",
     expect="finished, LoRA up-weights not all zero", check=_check_learned, exit_code=0)(
    lambda ctx: train_args(ctx, _good_parquet(ctx), "--seed=4294967295"))
case(id="seed_negative", defect=3, input="train --seed=-1", outcome="error",
     expect="seed must be in 0 .. 4294967295")(lambda ctx: train_args(ctx, _good_parquet(ctx), "--seed=-1"))
case(id="seed_2_40", defect=3, input="train --seed=1099511627776", outcome="error",
     expect="seed must be in 0 .. 4294967295")(lambda ctx: train_args(ctx, _good_parquet(ctx), "--seed=1099511627776"))


# ------------------------------------------------------------------------------------------------ 4: resume
def _first_run(ctx, protect: bool = True) -> Path:
    """A finished 2-step run with checkpoint-1; `protect`: its files are inputs that must stay unchanged."""
    from diffalign.cli import main

    data = _good_parquet(ctx)
    assert main(train_args(ctx, data, "--checkpointing_steps=1", "--max_train_steps=2")) == 0
    if protect:
        run = ctx.tmp / "run"
        ctx.inputs += [run / "config.yaml", run / "metrics.jsonl", run / "train_report.json",
                       run / "pytorch_lora_weights.safetensors", run / "checkpoint-1" / "trainable.safetensors"]
    return data


def _resume(change: str, protect: bool = True):
    def build(ctx):
        data = _first_run(ctx, protect)
        args = train_args(ctx, data, "--checkpointing_steps=1", "--max_train_steps=3",
                          "--resume_from_checkpoint=latest")
        key, value = change.split("=", 1)
        if key == "--dataset_name":
            value = str(parquet(ctx, "other.parquet", [("x", png(), png(colour=(9, 9, 9)), 0.0, 1.0)] * 4))
        return [a for a in args if not a.startswith(key + "=")] + [f"{key}={value}"]
    return build


for _key, _value, _shown in (("rank", "8", "rank: 4 in the run, 8 now"),
                             ("dataset_name", "x", "with a changed dataset_name"),
                             ("method", "sft", "with a changed method"),
                             ("train_mode", "full", "with a changed train_mode")):
    case(id=f"resume_changed_{_key}", defect=4, input=f"resume with a different {_key}", outcome="refused",
         expect=_shown)(_resume(f"--{_key}={_value}"))


def _check_history(ctx, err):
    lines = (ctx.tmp / "run" / "config_history.jsonl").read_text().splitlines()
    # the first run (2 steps) ends with a checkpoint at its last step, so `latest` resumes from step 2
    assert json.loads(lines[-1]) == {"from_step": 2, "changed": {"learning_rate": [0.001, 0.002],
                                                                "max_train_steps": [2, 3]}}, lines
    assert report(ctx)["status"] == "finished"


case(id="resume_changed_learning_rate", defect=4, input="resume with a different learning_rate", outcome="ok",
     expect="allowed, logged, recorded from its step in config_history.jsonl", check=_check_history, exit_code=0)(
    _resume("--learning_rate=2e-3", protect=False))


# ------------------------------------------------------------------------------------------------ 5: overwrite
def _drop_checkpoints(ctx):
    """A run ends with a checkpoint at its last step; a finished run without checkpoints is one whose checkpoints
    were deleted (or copied without them)."""
    import shutil

    for folder in (ctx.tmp / "run").glob("checkpoint-*"):
        shutil.rmtree(folder)


def _finished_run(ctx):
    from diffalign.cli import main

    data = _good_parquet(ctx)
    assert main(train_args(ctx, data)) == 0
    _drop_checkpoints(ctx)
    for name in ("pytorch_lora_weights.safetensors", "metrics.jsonl", "train_report.json"):
        ctx.inputs.append(ctx.tmp / "run" / name)
    return train_args(ctx, data, "--learning_rate=5e-3")


case(id="second_run_into_finished_folder", defect=5, input="a fresh run into the output_dir of a finished run "
     "without checkpoints", outcome="refused", expect="holds a finished run")(_finished_run)
case(id="second_run_into_finished_folder_latest", defect=5, input="the same with --resume_from_checkpoint=latest "
     "(no checkpoint to resume)", outcome="refused", expect="holds a finished run")(
    lambda ctx: _finished_run(ctx) + ["--resume_from_checkpoint=latest"])


# ------------------------------------------------------------------------------------------------ 6: text, names
def image_folder(ctx: Ctx, name: str, index: str, content: bytes, extra=None) -> Path:
    root = ctx.tmp / name
    for sub in ("w", "l"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            ctx.file(f"{name}/{sub}/ok{i}.png", png(colour=(10 * i, 20, 30 if sub == "w" else 200)))
    ctx.file(f"{name}/{index}", content)
    if extra:
        extra(root)
    return root


_OK_ROWS = b'{"file_name": "ok0.png", "caption": "a"}\n{"file_name": "ok1.png", "caption": "b"}\n'
case(id="captions_jsonl_latin1", defect=6, input="a latin-1 byte in captions.jsonl", outcome="error",
     expect="captions.jsonl', line 3, column 41: byte 0xe9 is not UTF-8")(
    lambda ctx: train_args(ctx, image_folder(ctx, "ds", "captions.jsonl",
                                             _OK_ROWS + b'{"file_name": "ok0.png", "caption": "caf\xe9"}\n')))
case(id="captions_csv_latin1", defect=6, input="a latin-1 byte in captions.csv", outcome="error",
     expect="captions.csv', line 2, column 12: byte 0xe9 is not UTF-8")(
    lambda ctx: train_args(ctx, image_folder(ctx, "ds", "captions.csv", b"file_name,caption\nok0.png,caf\xe9\n"
                                                                          b"ok1.png,b\n")))
case(id="prompts_txt_latin1", defect=6, input="a latin-1 byte in a generate --prompts file", outcome="error",
     expect="prompts.txt', line 2, column 4: byte 0xe9 is not UTF-8")(
    lambda ctx: generate_args(ctx, "--prompt", "x")[:3] + ["--prompts", str(ctx.file("prompts.txt", b"a\ncaf\xe9\n"))]
    + generate_args(ctx)[5:])
case(id="selfnpo_prompts_latin1", defect=6, input="a latin-1 byte in a Self-NPO prompt file", outcome="error",
     expect="prompts.jsonl', line 1, column 16: byte 0xe9 is not UTF-8")(
    lambda ctx: [a for a in train_args(ctx, ctx.file("prompts.jsonl", b'{"prompt": "caf\xe9"}\n'))
                 if a != "--method=mapo"] + ["--method=selfnpo"])
case(id="captions_name_with_nul", defect=6, input="a NUL byte in a file name of captions.jsonl", outcome="error",
     expect="names 'ok\\x00.png', which cannot be opened (the name holds a NUL byte)")(
    lambda ctx: train_args(ctx, image_folder(ctx, "ds", "captions.jsonl",
                                             _OK_ROWS + b'{"file_name": "ok\\u0000.png", "caption": "a"}\n')))
case(id="captions_name_symlink_loop", defect=6, input="captions.jsonl names a symlink loop", outcome="error",
     expect="names 'loop.png', which cannot be opened (a symlink loop)")(
    lambda ctx: train_args(ctx, image_folder(ctx, "ds", "captions.jsonl",
                                             _OK_ROWS + b'{"file_name": "loop.png", "caption": "a"}\n',
                                             extra=lambda root: (root / "w" / "loop.png").symlink_to("loop.png"))))


# ------------------------------------------------------------------------------------------------ 8, 10: evaluate
def gen_folder(ctx: Ctx, name: str, files: list[str], write=True) -> Path:
    folder = ctx.tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, f in enumerate(files):
        if write and "/" not in f and not f.startswith("."):
            ctx.file(f"{name}/{f}", png(colour=(20 * i, 100, 50)))
        rows.append(json.dumps({"file": f, "prompt": f"a red circle {i}", "seed": i, "index": i}))
    ctx.file(f"{name}/manifest.jsonl", "\n".join(rows) + "\n")
    return folder


def evaluate_args(ctx: Ctx, *folders: Path, lenient=False) -> list[str]:
    return ["evaluate", "--images", *map(str, folders), "--rewards", "toy", "--out", str(ctx.tmp / "eval"),
            "--bootstrap", "50", *(["--lenient"] if lenient else [])]


def _outside_secret(ctx) -> Path:
    return ctx.file("outside/secret.png", png(colour=(1, 1, 1)))


for _kind, _name in (("dotdot", "../outside/secret.png"), ("absolute", "ABS")):
    def _build(ctx, _name=_name):
        secret = _outside_secret(ctx)
        name = str(secret) if _name == "ABS" else _name
        return evaluate_args(ctx, gen_folder(ctx, "images", ["0.png", "1.png", name]), lenient=True)

    _shown = _name if _name != 'ABS' else 'an absolute path'
    case(id=f"manifest_{_kind}_path", defect=8, input=f"evaluate: a manifest row naming {_shown} (--lenient)",
         outcome="refused", expect="outside the folder; a manifest may only name images inside its own folder")(_build)


def _manifest_symlink(ctx):
    secret = _outside_secret(ctx)
    folder = gen_folder(ctx, "images", ["0.png", "1.png", "link.png"])
    (folder / "link.png").unlink()
    ctx.inputs.remove(folder / "link.png")
    (folder / "link.png").symlink_to(secret)
    return evaluate_args(ctx, folder)


case(id="manifest_symlink_outside", defect=8, input="evaluate: a manifest row naming a symlink to a file outside",
     outcome="refused", expect="'file' is 'link.png', a symlink to")(_manifest_symlink)


def _bomb(ctx):
    from PIL import Image

    ctx.monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # a 32x32 image is then more than twice the limit
    return evaluate_args(ctx, gen_folder(ctx, "images", ["0.png", "1.png"]), lenient=True)


def _check_bomb_counted(ctx, err):
    metrics = json.loads((ctx.tmp / "eval" / "metrics.json").read_text())
    assert "DecompressionBombError" in json.dumps(metrics), metrics


case(id="evaluate_decompression_bomb", defect=10, input="evaluate: images above PIL's decompression-bomb limit "
     "(--lenient)", outcome="skip", expect="counted as unreadable (DecompressionBombError) in the report",
     check=_check_bomb_counted, exit_code=0)(_bomb)


def _bomb_strict(ctx):
    from PIL import Image

    ctx.monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    return evaluate_args(ctx, gen_folder(ctx, "images", ["0.png", "1.png"]))


case(id="evaluate_decompression_bomb_strict", defect=10, input="evaluate: the same without --lenient",
     outcome="error", expect="cannot be read")(_bomb_strict)


def _too_many_pixels(ctx):
    from diffalign.safety import images

    ctx.monkeypatch.setattr(images, "MAX_DECODED_PIXELS", 32 * 32)  # the 40x40 winners are above the cap
    rows = [("x", png(40), png(32, (1, 2, 3)), 1.0, 0.0)] + [("x", png(32), png(32, (1, 2, 3)), 1.0, 0.0)] * 3
    return train_args(ctx, parquet(ctx, "big.parquet", rows), *PIXELS)


def _check_too_large(ctx, err):
    r = report(ctx)
    assert r["status"] == "finished" and r["data"]["image_too_large"] == 1 and r["fetch_failures"] == 1, r


case(id="train_image_above_decode_cap", defect=10, input="train: an image above the decoded-size cap",
     outcome="skip", expect="image_too_large=1 in train_report.json (not decoded)", check=_check_too_large,
     exit_code=0)(_too_many_pixels)


# ------------------------------------------------------------------------------------------------ 12: 16-bit PNG
def png16(value: int, side: int = 32) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), value, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _sixteen_bit(ctx):
    rows = [("x", png16(32768), png16(8000), 1.0, 0.0)] * 4
    return train_args(ctx, parquet(ctx, "gray16.parquet", rows))


def _check_sixteen_bit(ctx, err):
    from diffalign.data import decode_image

    assert report(ctx)["status"] == "finished"
    assert decode_image(png16(32768)).getpixel((0, 0)) == (128, 128, 128)  # was (255, 255, 255)
    assert decode_image(png16(8000)).getpixel((0, 0)) == (31, 31, 31)


case(id="sixteen_bit_grayscale_png", defect=12, input="train on 16-bit grayscale PNGs", outcome="ok",
     expect="decoded scaled to 8 bits (32768 -> 128), not saturated to white", check=_check_sixteen_bit,
     exit_code=0)(_sixteen_bit)


# ------------------------------------------------------------------------------------------------ 9, 13: export
def export_args(ctx, lora, out=None):
    return ["export", "--lora", str(lora), *(["--out", str(out)] if out is not None else [])]


case(id="export_onto_its_input", defect=9, input="export --out the input file itself", outcome="refused",
     expect="is the input LoRA file itself")(lambda ctx: export_args(ctx, p := make_lora(ctx), p))


def _export_via_other_name(ctx):
    lora = make_lora(ctx)
    (ctx.tmp / "alias.safetensors").symlink_to(lora)
    return export_args(ctx, lora, ctx.tmp / "alias.safetensors")


case(id="export_onto_its_input_via_symlink", defect=9, input="export --out a symlink to the input file",
     outcome="refused", expect="is the input LoRA file itself")(_export_via_other_name)


def _check_exported(ctx, err):
    from safetensors.torch import load_file

    out = load_file(str(ctx.tmp / "out.safetensors"))
    assert any(k.startswith("lora_unet_") for k in out) and not list(ctx.tmp.glob(".*.tmp"))


case(id="export_to_a_new_file", defect=9, input="export --out a new file (written through a temporary name)",
     outcome="ok", expect="kohya keys written; no temporary file left", check=_check_exported, exit_code=0)(
    lambda ctx: export_args(ctx, make_lora(ctx), ctx.tmp / "out.safetensors"))
case(id="export_garbage_file", defect=13, input="export a file of random bytes", outcome="error",
     expect="is not a readable safetensors file")(
    lambda ctx: export_args(ctx, ctx.file("garbage.safetensors", bytes(range(256)) * 4), ctx.tmp / "o.safetensors"))
case(id="export_a_bin_pickle", defect=13, input="export a .bin (pickle) file", outcome="error",
     expect="(.bin pickles are never loaded)")(
    lambda ctx: export_args(ctx, ctx.file("lora.bin", b"\x80\x04\x95garbage pickle"), ctx.tmp / "o.safetensors"))


def _read_only_folder(ctx):
    folder = ctx.tmp / "ro"
    folder.mkdir()
    (folder / "below").write_text("a file, so nothing can be created under it (even as root)")
    return export_args(ctx, make_lora(ctx), folder / "below" / "out.safetensors")


case(id="export_to_unwritable_folder", defect=13, input="export --out below a regular file (not writable, even "
     "for root)", outcome="error", expect="cannot write")(_read_only_folder)


# ------------------------------------------------------------------------------------------------ 7: disk full
def _enospc(path):
    import errno
    import os

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _disk_full_in_checkpoint(ctx):
    from diffalign.training import checkpoint

    real = checkpoint.save_file

    def save_file(tensors, path, *a, **kw):
        if "checkpoint-2" in str(path):
            raise _enospc(path)
        return real(tensors, path, *a, **kw)

    ctx.monkeypatch.setattr(checkpoint, "save_file", save_file)
    return train_args(ctx, _good_parquet(ctx), "--checkpointing_steps=1", "--max_train_steps=4")


def _check_disk_full_train(ctx, err):
    from diffalign.training.checkpoint import list_checkpoints

    r = report(ctx)
    assert r["status"] == "failed: disk full" and r["steps"] == 2, r
    assert [p.name for p in list_checkpoints(ctx.tmp / "run")] == ["checkpoint-1"]
    assert not list((ctx.tmp / "run").glob(".checkpoint-*"))  # the half-written one is removed


case(id="disk_full_during_a_training_checkpoint", defect=7, input="train: ENOSPC while checkpoint-2 is written",
     outcome="error", expect="the disk is full: a write in", check=_check_disk_full_train, exit_code=28)(
    _disk_full_in_checkpoint)


def _disk_full_in_metrics(ctx):
    import builtins

    real_open = builtins.open

    def fake_open(file, mode="r", *a, **kw):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise _enospc(file)
        return real_open(file, mode, *a, **kw)

    from pathlib import Path as P

    real_path_open = P.open

    def path_open(self, mode="r", *a, **kw):
        if self.name == "metrics.jsonl" and "a" in mode:
            raise _enospc(self)
        return real_path_open(self, mode, *a, **kw)

    ctx.monkeypatch.setattr(P, "open", path_open)
    return train_args(ctx, _good_parquet(ctx))


def _check_disk_full_report(ctx, err):
    r = report(ctx)
    assert r["status"] == "failed: disk full", r
    assert "no checkpoint was written yet" in err


case(id="disk_full_while_logging_metrics", defect=7, input="train: ENOSPC while metrics.jsonl is appended",
     outcome="error", expect="no checkpoint was written yet", check=_check_disk_full_report, exit_code=28)(
    _disk_full_in_metrics)


def _disk_full_in_generate(ctx):
    from PIL import Image as PILImage

    def save(self, fp, *a, **kw):
        raise _enospc(fp)

    ctx.monkeypatch.setattr(PILImage.Image, "save", save)
    return generate_args(ctx)


case(id="disk_full_in_generate", defect=7, input="generate: ENOSPC while an image is written", outcome="error",
     expect="the disk is full: a write failed", exit_code=28)(_disk_full_in_generate)


def _disk_full_in_pairs(ctx):
    import pyarrow.parquet as pq

    def fail(self, *a, **kw):
        raise _enospc("data/.shard.tmp")

    ctx.monkeypatch.setattr(pq.ParquetWriter, "write_table", fail)
    return ["pairs", *PAIRS_ARGS(ctx)]


def PAIRS_ARGS(ctx):
    repo = Path(__file__).resolve().parents[2]
    return [str(repo / "configs/pairs/toy_pick_style.yaml"), "--num_pairs=2", "--num_inference_steps=1",
            f"--pretrained_model_name_or_path={ctx.model}", f"--output_dir={ctx.tmp / 'pairs'}", "--height=32",
            "--width=32"]


case(id="disk_full_in_pairs", defect=7, input="pairs: ENOSPC while a shard is written", outcome="error",
     expect="the disk is full: a write failed", exit_code=28)(_disk_full_in_pairs)


# ------------------------------------------------------------------------------------------------ 11: YAML
_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)) + "method: mapo\n"


def _config_file(ctx, text: str) -> list[str]:
    return ["train", str(ctx.file("config.yaml", text)), f"--output_dir={ctx.tmp / 'run'}"]


case(id="yaml_alias_bomb", defect=11, input=f"a {len(_BOMB)}-byte YAML billion-laughs config (nested aliases)",
     outcome="error", expect="an alias (*a, line 2) is not allowed in a config file")(
    lambda ctx: _config_file(ctx, _BOMB))
case(id="yaml_single_alias", defect=11, input="a config reusing one value through an alias", outcome="error",
     expect="an alias (*lr, line 2) is not allowed")(
    lambda ctx: _config_file(ctx, "learning_rate: &lr 1.0e-4\nadam_epsilon: *lr\nmethod: mapo\n"))


def _check_short(ctx, err):
    assert len(err.strip().splitlines()[-1]) < 600, len(err)


case(id="yaml_huge_wrong_value", defect=11, input="a 1 MB value of the wrong type", outcome="error",
     expect="expected int, got 'xxxxxxxx", check=_check_short)(
    lambda ctx: _config_file(ctx, "method: mapo\ntrain_batch_size: " + "x" * 1_000_000 + "\n"))


# ------------------------------------------------------------------------------------------------ 13: odd arguments
case(id="generate_height_30", defect=13, input="generate --height 30 --width 30", outcome="error",
     expect="--height must be a positive multiple of 8")(
    lambda ctx: [a for a in generate_args(ctx)[:-4]] + ["--height", "30", "--width", "30"])
case(id="generate_negative_seed", defect=13, input="generate --seed -5", outcome="error",
     expect="--seed must be in 0 .. 4294967295")(lambda ctx: generate_args(ctx, "--seed", "-5"))
case(id="render_pairs_out_is_a_folder", defect=13, input="toy render-pairs --out an existing folder",
     outcome="error", expect="is a folder; give the output file name")(
    lambda ctx: ["toy", "render-pairs", "--out", str(ctx.tmp), "-n", "4"])
case(id="render_pairs_negative_count", defect=13, input="toy render-pairs -n -5", outcome="error",
     expect="-n/--num-pairs must be at least 1, got -5")(
    lambda ctx: ["toy", "render-pairs", "--out", str(ctx.tmp / "p.parquet"), "-n", "-5"])
case(id="render_captions_zero_rows", defect=13, input="toy render-captions -n 0", outcome="error",
     expect="-n/--num-rows must be at least 1, got 0")(
    lambda ctx: ["toy", "render-captions", "--out", str(ctx.tmp / "c.parquet"), "-n", "0"])


def _custom_pipeline(ctx):
    import shutil

    folder = ctx.tmp / "custom"
    shutil.copytree(ctx.model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "EvilPipeline"
    ctx.file("custom/model_index.json", json.dumps(index))
    return ["generate", "--model", str(folder), *generate_args(ctx)[3:]]


case(id="custom_pipeline_class", defect=13, input="generate with a model_index.json naming a custom pipeline class",
     outcome="refused", expect="names the pipeline class 'EvilPipeline', which is not one of diffusers' own")(
    _custom_pipeline)


def _edited_state(edit, resume="latest"):
    def build(ctx):
        data = _first_run(ctx)
        name = "checkpoint-2" if resume == "latest" else resume  # the first run's last step has the newest one
        state_file = ctx.tmp / "run" / name / "state.json"
        state = json.loads(state_file.read_text())
        edit(state)
        state_file.write_text(json.dumps(state))
        return train_args(ctx, data, "--checkpointing_steps=1", "--max_train_steps=3",
                          f"--resume_from_checkpoint={resume}")
    return build


case(id="state_json_step_is_text", defect=13, input="a hand-edited state.json: global_step \"five\"",
     outcome="error", expect="has no whole-number global_step")(
    _edited_state(lambda s: s.update(global_step="five")))
case(id="state_json_count_is_text", defect=13, input="a hand-edited state.json: nonfinite_steps \"many\"",
     outcome="error", expect="nonfinite_steps is 'many', not a count")(
    _edited_state(lambda s: s.update(nonfinite_steps="many")))
case(id="state_json_files_is_a_list", defect=13, input="a hand-edited state.json: files is a list, resumed by "
     "name", outcome="error", expect="is not a complete checkpoint folder")(
    _edited_state(lambda s: s.update(files=list(s["files"])), resume="checkpoint-1"))


# ------------------------------------------------------------------------------------------------ 14: image paths
def _path_parquet(ctx, path_of):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ctx.file("outside/secret.png", png(colour=(5, 5, 5)))
    ctx.file("images/inside.png", png(colour=(200, 5, 5)))
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = 4
    table = pa.table({"caption": ["x"] * rows,
                      "jpg_0": pa.array([{"bytes": None, "path": path_of(ctx)}] * rows, type=cell),
                      "jpg_1": pa.array([{"bytes": png(colour=(1, 2, 3)), "path": None}] * rows, type=cell),
                      "label_0": [1.0] * rows, "label_1": [0.0] * rows})
    path = ctx.tmp / "paths.parquet"
    pq.write_table(table, path)
    ctx.inputs.append(path)
    return path


case(id="parquet_path_without_image_root", defect=14, input="parquet image cells holding a file path, no image_root",
     outcome="refused", expect="set image_root to the folder that holds such images")(
    lambda ctx: train_args(ctx, _path_parquet(ctx, lambda c: str(c.tmp / "outside" / "secret.png"))))
case(id="parquet_absolute_path_outside_image_root", defect=14, input="parquet image path (absolute) outside "
     "image_root", outcome="refused", expect="is outside image_root")(
    lambda ctx: train_args(ctx, _path_parquet(ctx, lambda c: str(c.tmp / "outside" / "secret.png")),
                           f"--image_root={ctx.tmp / 'images'}"))
case(id="parquet_dotdot_path_outside_image_root", defect=14, input="parquet image path ../outside/secret.png "
     "with image_root", outcome="refused", expect="'../outside/secret.png' is outside image_root")(
    lambda ctx: train_args(ctx, _path_parquet(ctx, lambda c: "../outside/secret.png"),
                           f"--image_root={ctx.tmp / 'images'}"))
case(id="parquet_path_inside_image_root", defect=14, input="parquet image path inside image_root (relative)",
     outcome="ok", expect="finished, LoRA up-weights not all zero", check=_check_learned, exit_code=0)(
    lambda ctx: train_args(ctx, _path_parquet(ctx, lambda c: "inside.png"), f"--image_root={ctx.tmp / 'images'}"))


def _prompts_loop(ctx):
    (ctx.tmp / "loop.txt").symlink_to("loop.txt")
    return generate_args(ctx)[:3] + ["--prompts", str(ctx.tmp / "loop.txt")] + generate_args(ctx)[5:]


case(id="prompts_file_symlink_loop", defect=6, input="generate --prompts a symlink loop", outcome="error",
     expect="is a symlink that leads nowhere (a symlink loop")(_prompts_loop)


def _overwrite_finished(ctx):
    from diffalign.cli import main

    data = _good_parquet(ctx)
    assert main(train_args(ctx, data)) == 0
    _drop_checkpoints(ctx)
    return train_args(ctx, data, "--learning_rate=5e-3", "--overwrite_output_dir=true")


def _check_replaced(ctx, err):
    from diffalign.config_loader import load_config
    from diffalign.training.config import TrainConfig

    assert report(ctx)["status"] == "finished"
    assert load_config(TrainConfig, str(ctx.tmp / "run" / "config.yaml"), []).learning_rate == 5e-3


case(id="second_run_with_overwrite_output_dir", defect=5, input="the same with --overwrite_output_dir=true",
     outcome="ok", expect="the finished run is replaced, as asked", check=_check_replaced, exit_code=0)(
    _overwrite_finished)


case(id="evaluate_negative_seed", defect=3, input="evaluate --seed -1 (the bootstrap's numpy generator)",
     outcome="error", expect="--seed must be in 0 .. 4294967295")(
    lambda ctx: evaluate_args(ctx, gen_folder(ctx, "images", ["0.png", "1.png"])) + ["--seed", "-1"])
