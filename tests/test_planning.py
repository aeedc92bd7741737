"""The shipped real architectures (planning/architectures/*.json) and the memory planner's arithmetic."""

import json

import pytest

from diffalign.planning.architectures import ARCHITECTURES, HERE, architecture_for, build, parameter_count

# The releases' public parameter counts (millions): SD1.5 UNet ~860 M, SDXL UNet ~2.57 B, CLIP-L text ~123 M,
# OpenCLIP bigG text ~695 M, SD VAE ~84 M, CogVideoX-2b transformer ~1.69 B, -5b ~5.6 B, T5-XXL encoder ~4.76 B.
PUBLIC_MILLIONS = {"sd15_unet.json": 860, "sdxl_unet.json": 2567, "clip_l_text.json": 123, "clip_bigg_text.json": 695,
                   "sd_vae.json": 84, "sdxl_vae.json": 84, "cogvideox_2b_transformer.json": 1690,
                   "cogvideox_5b_transformer.json": 5570, "t5_xxl_encoder.json": 4762}


@pytest.mark.parametrize("file", sorted(PUBLIC_MILLIONS))
def test_shipped_configs_build_with_the_public_parameter_counts(file):
    count = parameter_count(file)  # on the meta device: no memory
    assert abs(count / 1e6 - PUBLIC_MILLIONS[file]) / PUBLIC_MILLIONS[file] < 0.005, (file, count)


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
