"""The shipped real architectures (planning/architectures/*.json) and the memory planner's arithmetic."""

import json

import pytest

from diffalign.planning.architectures import ARCHITECTURES, HERE, architecture_for, build, parameter_count

# The releases' public parameter counts (Architecture.public_counts), each (file, figure) once.
PUBLIC_COUNTS = sorted({(f, c) for a in ARCHITECTURES.values() for f, c in a.public_counts.items()})


@pytest.mark.parametrize("file,public", PUBLIC_COUNTS)
def test_shipped_configs_build_with_the_public_parameter_counts(file, public):
    count = parameter_count(file)  # on the meta device: no memory
    assert abs(count - public) / public < 0.005, (file, count)


def test_every_shipped_file_is_used_and_is_plain_json():
    used = {f for a in ARCHITECTURES.values() for f in a.files.values()}
    shipped = {p.name for p in HERE.glob("*.json")}
    assert used == shipped
    for name in shipped:
        assert isinstance(json.loads((HERE / name).read_text()), dict)


def test_t5_embedding_is_shared_as_in_the_checkpoints():
    t5 = build("t5_xxl_encoder.json")
    assert t5.shared.weight is t5.encoder.embed_tokens.weight


def test_architecture_is_found_from_the_hub_id_or_a_pipeline_folder(tmp_path):
    assert architecture_for("stabilityai/stable-diffusion-xl-base-1.0").name == "sdxl"
    assert architecture_for("THUDM/CogVideoX-5b").name == "cogvideox-5b"
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["d", "U"]}))
    (tmp_path / "unet" / "config.json").write_text((HERE / "sd15_unet.json").read_text())
    assert architecture_for(str(tmp_path)).name == "sd15"
    # not the first shipped architecture: a matcher returning ARCHITECTURES' first entry would fail here
    xl = tmp_path / "xl"
    (xl / "unet").mkdir(parents=True)
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": ["d", "U"]}))
    (xl / "unet" / "config.json").write_text((HERE / "sdxl_unet.json").read_text())
    assert architecture_for(str(xl)).name == "sdxl"


# --------------------------------------------------------------------------------------------- the planner
from diffalign.cli import main  # noqa: E402
from diffalign.errors import UserError  # noqa: E402
from diffalign.planning.architectures import architecture  # noqa: E402
from diffalign.planning.memory import GiB, Setting, lora_parameters, optimizer_bytes, parse_size, plan  # noqa: E402

SD15_UNET = 859_520_964
SD15_LORA8 = 1_594_368  # what peft adds to the real SD1.5 UNet (rank 8, to_q/k/v/out.0; benchmarks/real_shapes.py)


def test_lora_count_is_peft_s():
    assert lora_parameters("sd15_unet.json", 8, ("to_q", "to_k", "to_v", "to_out.0")) == SD15_LORA8
    assert lora_parameters("sd15_unet.json", 16, ("to_q", "to_k", "to_v", "to_out.0")) == 2 * SD15_LORA8
    with pytest.raises(UserError, match="matches no layer"):
        lora_parameters("sd15_unet.json", 8, ("nothing",))


def test_optimizer_state_golden_values():
    shapes = [(1000, 2000), (5000,), (10,)]
    n = 2_000_000 + 5000 + 10
    assert optimizer_bytes("adamw", shapes) == 8 * n  # two float32 moments per parameter
    assert optimizer_bytes("adamw8bit", shapes) == pytest.approx(8 * 10 + 2 * (2_005_000) * (1 + 4 / 2048))
    assert optimizer_bytes("adafactor", shapes) == 4 * (1000 + 2000 + 5000 + 10)  # row + column vectors per matrix
    with pytest.raises(UserError, match="optimizer must be"):
        optimizer_bytes("sgd", shapes)


def test_full_fine_tune_lines_are_parameters_times_bytes():
    s = Setting(architecture("sd15"), method="dpo", train_mode="full", mixed_precision="bf16", needs_reference=True)
    p = plan(s)
    assert p.line("weights: denoiser (trained)") == SD15_UNET * 4
    assert p.line("gradients") == SD15_UNET * 4
    assert p.line("optimizer state") == SD15_UNET * 8
    assert p.line("autocast copies") == SD15_UNET * 2
    assert p.line("DPO reference") == SD15_UNET * 2  # frozen copy in bf16
    assert p.line("weights: text encoder") == 123_060_480 * 2
    assert p.line("weights: VAE") == 83_653_863 * 2


def test_lora_lines_reference_teacher_and_vae_upcast():
    sdxl = architecture("sdxl")
    p = plan(Setting(sdxl, method="dpo", train_mode="lora", mixed_precision="fp16", needs_reference=True))
    assert p.line("DPO reference") == 0  # the network with its adapters off
    assert p.line("weights: VAE") == 83_653_863 * 4  # force_upcast: float32
    assert plan(Setting(sdxl, mixed_precision="fp16", separate_vae=True)).line("weights: VAE") == 83_653_863 * 2
    s = Setting(architecture("sd15"), method="selfnpo", train_mode="lora")
    assert plan(s).line("Self-NPO teacher") == SD15_LORA8 * 4
    full = plan(Setting(architecture("sd15"), method="selfnpo", train_mode="full", use_ema=False))
    assert full.line("Self-NPO teacher") == SD15_UNET * 4


def test_fsdp2_shards_parameters_gradients_and_state_not_activations():
    base = Setting(architecture("sd15"), method="mapo", train_mode="full", use_ema=True)
    one, four = plan(base), plan(Setting(**{**vars(base), "num_processes": 4}))
    for name in ("weights: denoiser", "gradients", "optimizer state", "EMA copy"):
        assert four.line(name) == one.line(name) / 4
    assert four.line("activations") == one.line("activations")
    assert four.line("weights: text encoder") == one.line("weights: text encoder")
    assert four.line("FSDP2 gathered units") > 0 and one.line("FSDP2 gathered units") == 0
    ddp = plan(Setting(**{**vars(base), "num_processes": 4, "strategy": "ddp"}))
    assert ddp.line("gradients") == one.line("gradients") and ddp.line("DDP gradient buckets") == SD15_UNET * 4


def test_activations_scale_with_rows_and_size_and_the_largest_batch():
    sd15 = architecture("sd15")
    mapo = plan(Setting(sd15, method="mapo", resolution=512))
    assert plan(Setting(sd15, method="sft", resolution=512)).line("activations") == mapo.line("activations") / 2
    assert plan(Setting(sd15, method="mapo", resolution=256)).line("activations") == mapo.line("activations") / 4
    assert plan(Setting(sd15, method="mapo", resolution=512, batch=3)).line("activations") == 3 * mapo.line("activations")
    budget = mapo.fixed + 3.5 * mapo.activation_per_sample
    assert mapo.largest_batch(budget) == 3 and mapo.largest_batch(mapo.fixed) == 0


def test_parse_size():
    assert parse_size("24GB") == 24 * GiB and parse_size("80 GiB") == 80 * GiB and parse_size("512MB") == 512 * 2 ** 20
    with pytest.raises(UserError, match="gpu-memory"):
        parse_size("lots")


def test_plan_command_prints_the_breakdown_and_a_verdict(capsys):
    assert main(["plan", "sdxl_mapo_official", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    for words in ("weights: denoiser (trained)", "gradients", "optimizer state (adamw8bit)", "activations",
                  "on a 24 GB device: does NOT fit", "--train_mode=lora: largest per-device batch"):
        assert words in out
    assert main(["plan", "sd15_dpo", "--train_mode=lora", "--gpu-memory", "24GB"]) == 0
    assert "FITS at batch" in capsys.readouterr().out


def test_plan_command_refuses_an_unknown_model(capsys):
    assert main(["plan", "toy_mapo"]) == 2
    assert "--architecture" in capsys.readouterr().err
