import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffalign.cli import main


def _gen(model, out, *extra):
    return main(["generate", "--model", str(model), "--out", str(out), "--steps", "2", *extra])


def _pixels(folder):
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return rows, [np.asarray(Image.open(folder / r["file"])) for r in rows]


@pytest.mark.slow
def test_generate_writes_pngs_and_manifest_deterministically(tiny_pipelines, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square, striped\na shape\n")
    assert _gen(tiny_pipelines["sd"], tmp_path / "a", "--prompts", str(prompts), "--seed", "7", "--batch-size", "3") == 0
    assert _gen(tiny_pipelines["sd"], tmp_path / "b", "--prompts", str(prompts), "--seed", "7", "--batch-size", "1") == 0
    rows_a, imgs_a = _pixels(tmp_path / "a")
    rows_b, imgs_b = _pixels(tmp_path / "b")
    assert [r["prompt"] for r in rows_a] == ["a red circle", "a blue square, striped", "a shape"]
    assert [r["seed"] for r in rows_a] == [7, 8, 9]
    assert rows_a[0]["settings"]["num_inference_steps"] == 2 and rows_a[0]["settings"]["guidance_scale"] == 7.5
    assert imgs_a[0].shape == (32, 32, 3)
    # Same seed and settings give the same images, whatever the batch size.
    for x, y in zip(imgs_a, imgs_b):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    # Different seeds give different images.
    assert _gen(tiny_pipelines["sd"], tmp_path / "c", "--prompts", str(prompts), "--seed", "8") == 0
    _, imgs_c = _pixels(tmp_path / "c")
    assert np.abs(imgs_c[0].astype(int) - imgs_a[0].astype(int)).max() > 5


@pytest.mark.slow
def test_generate_jsonl_prompts_sdxl_and_images_per_prompt(tiny_pipelines, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle", "id": 1}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    assert _gen(tiny_pipelines["sdxl"], tmp_path / "xl", "--prompts", str(prompts), "--num-images-per-prompt", "2",
                "--negative-prompt", "a blue square") == 0
    rows, imgs = _pixels(tmp_path / "xl")
    assert [r["prompt"] for r in rows] == ["a red circle", "a red circle", "", ""]
    assert len({r["seed"] for r in rows}) == 4
    assert rows[0]["settings"]["negative_prompt"] == "a blue square"


def test_generate_with_lora_changes_images(tiny_pipelines, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd"])
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    assert _gen(tiny_pipelines["sd"], tmp_path / "base", "--prompt", "a red circle") == 0
    assert _gen(tiny_pipelines["sd"], tmp_path / "lora_out", "--prompt", "a red circle", "--lora", str(tmp_path / "lora")) == 0
    _, base = _pixels(tmp_path / "base")
    rows, tuned = _pixels(tmp_path / "lora_out")
    assert rows[0]["settings"]["lora"] == str(tmp_path / "lora")
    assert np.abs(base[0].astype(int) - tuned[0].astype(int)).max() > 5


@pytest.mark.parametrize(
    "args, expected",
    [
        (["generate", "--model", "/nonexistent/model", "--prompt", "x", "--out", "{tmp}/o"], "/nonexistent/model"),
        (["generate", "--model", "{tmp}", "--prompt", "x", "--out", "{tmp}/o"], "model_index.json"),
        (["generate", "--model", "{sd}", "--prompts", "{tmp}/missing.txt", "--out", "{tmp}/o"], "missing.txt"),
        (["generate", "--model", "{sd}", "--prompt", "x", "--out", "{sd}/model_index.json/sub"], "not writable"),
        (["generate", "--model", "{sd}", "--prompt", "x", "--out", "{tmp}/o", "--lora", "{tmp}/bad_lora.safetensors"],
         "bad_lora"),
        (["generate", "--model", "{sd}", "--prompt", "x", "--out", "{tmp}/o", "--height", "32"], "--width"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_pipelines, tmp_path, capsys, args, expected):
    import torch
    from safetensors.torch import save_file

    save_file({"text_model.foo.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "bad_lora.safetensors")
    fill = lambda s: s.replace("{tmp}", str(tmp_path)).replace("{sd}", str(tiny_pipelines["sd"]))
    code = main([fill(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    # Loading progress bars may precede it; the error itself is one line, with no traceback.
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("diffalign generate: error: "), err
    assert expected in errors[0], err
    assert "Traceback" not in err


@pytest.mark.slow
def test_console_script_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "diffalign", "generate", "--model", "no/such-model-here",
                           "--prompt", "x", "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "no/such-model-here" in proc.stderr and "Traceback" not in proc.stderr


def test_toy_path_points_at_a_loadable_pipeline(capsys):
    from diffusers import StableDiffusionPipeline

    assert main(["toy", "path"]) == 0
    path = capsys.readouterr().out.strip()
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32


def test_generate_toy_shorthand(tmp_path):
    assert main(["generate", "--model", "toy", "--prompt", "a red circle", "--out", str(tmp_path / "t"),
                 "--steps", "3", "--num-images-per-prompt", "2"]) == 0
    rows, imgs = _pixels(tmp_path / "t")
    assert len(rows) == 2 and imgs[0].shape == (32, 32, 3)


def _manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_generate_dtype_scheduler_and_device_are_used_and_recorded(tiny_pipelines, tmp_path):
    base = ["generate", "--model", str(tiny_pipelines["sd"]), "--prompt", "a red circle", "--steps", "3",
            "--num-images-per-prompt", "2"]
    assert main([*base, "--out", str(tmp_path / "ddim")]) == 0
    assert main([*base, "--out", str(tmp_path / "euler"), "--scheduler", "euler", "--device", "cpu"]) == 0
    assert main([*base, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    ddim, euler, bf16 = (_manifest(tmp_path / name) for name in ("ddim", "euler", "bf16"))
    assert euler[0]["settings"]["scheduler"] == "EulerDiscreteScheduler" != ddim[0]["settings"]["scheduler"]
    assert (bf16[0]["settings"]["dtype"], ddim[0]["settings"]["dtype"]) == ("bfloat16", "float32")
    pixels = {name: np.asarray(Image.open(tmp_path / name / "00000.png"), dtype=np.int16) for name in ("ddim", "euler", "bf16")}
    assert np.abs(pixels["euler"] - pixels["ddim"]).max() > 0  # another sampler, other images
    assert np.abs(pixels["bf16"] - pixels["ddim"]).max() > 0  # bfloat16 arithmetic: close, not identical
    assert np.abs(pixels["bf16"] - pixels["ddim"]).mean() < 40


@pytest.mark.parametrize("extra,expected", [(["--scheduler", "warp9"], "unknown scheduler 'warp9'"),
                                            (["--variant", "fp16"], "cannot load pipeline")])
def test_generate_bad_scheduler_or_missing_variant_is_one_line(tiny_pipelines, tmp_path, capsys, extra, expected):
    argv = ["generate", "--model", str(tiny_pipelines["sd"]), "--prompt", "x", "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
