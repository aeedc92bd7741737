"""Validation grids (issue 19): labelled rows (base / trained, step N) and columns (the prompts); the base row is
sampled once per run, not at every validation."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.toy.render_pairs import write_pairs_parquet
from diffalign.training import validation
from diffalign.training.validation import grid_layout, save_grid


def test_grid_layout_places_images_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    base, trained = (rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8) for _ in range(2))
    prompts = ["a red circle", "a small green diamond, striped, on a light background", "x"]
    grid = grid_layout([("base", base), ("trained, step 1500", trained)], prompts, scale=4)
    pixels = np.asarray(grid)
    width, height = grid.size
    left, header = width - 3 * 32, height - 2 * 32
    assert left > 0 and header > 0
    # Every image sits in its cell, enlarged 4x (nearest neighbour), rows in the given order.
    for i, images in enumerate((base, trained)):
        for j in range(3):
            cell = pixels[header + i * 32: header + (i + 1) * 32, left + j * 32: left + (j + 1) * 32]
            assert np.array_equal(cell, images[j].repeat(4, axis=0).repeat(4, axis=1))
    # Labels are drawn: dark text in the left margin beside each row and above each column.
    for i in range(2):
        assert (pixels[header + i * 32: header + (i + 1) * 32, :left] < 128).any()
    for j in range(3):
        assert (pixels[:header, left + j * 32: left + (j + 1) * 32] < 128).any()
    assert (pixels[:header, :left] == 255).all()  # the corner stays blank
    # ... and kept as PNG text, so a script can read what each row and column is.
    save_grid(grid, tmp_path / "g.png")
    info = Image.open(tmp_path / "g.png").info
    assert info["rows"].split("\n") == ["base", "trained, step 1500"]
    assert info["columns"].split("\n") == prompts
    with pytest.raises(ValueError, match="one per column"):
        grid_layout([("base", base)], prompts[:2])


@pytest.mark.slow
def test_training_samples_the_base_row_once_per_run(tiny_pipelines, tmp_path, monkeypatch):
    from diffalign.training.config import TrainConfig
    from diffalign.training.loop import train

    calls = []
    real = validation._sample

    def counted(family, cfg, resolution, net=None):
        calls.append(net)
        return real(family, cfg, resolution, net=net)

    monkeypatch.setattr(validation, "_sample", counted)
    pairs = write_pairs_parquet(tmp_path / "pairs.parquet", 8, kind="style", seed=3)
    out = train(TrainConfig(method="sft", pretrained_model_name_or_path=str(tiny_pipelines["sd"]),
                            dataset_name=str(pairs), output_dir=str(tmp_path / "run"), resolution=32,
                            train_batch_size=4, max_train_steps=3, learning_rate=1e-2, rank=4, seed=0,
                            report_to="none", validation_prompts=("a red circle", "a blue square"),
                            validation_steps=1, validation_num_inference_steps=2))
    # 3 grids (steps 1, 2, 3; the end of the run reuses the grid of step 3): 3 trained rows + 1 base row.
    assert len(calls) == 4
    grids = sorted((out / "validation").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000001.png", "step-000002.png", "step-000003.png"]
    images = [Image.open(g) for g in grids]
    assert [im.info["rows"] for im in images] == [f"base\ntrained, step {s}" for s in (1, 2, 3)]
    assert images[0].info["columns"] == "a red circle\na blue square"
    # The base row is the same pixels in every grid; the trained row moves with training.
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    cell = 256  # 32-pixel images enlarged 8x
    header = arrays[0].shape[0] - 2 * cell
    assert all(np.array_equal(a[header: header + cell], arrays[0][header: header + cell]) for a in arrays)
    assert not np.array_equal(arrays[0][header + cell:], arrays[2][header + cell:])


def test_validation_decodes_in_the_vae_dtype_and_leaves_float32_latents_alone(tiny_pipelines):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_pipelines["sd"], subfolder="vae")
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vae.decode(z).sample
        with validation.decode_in_vae_dtype(vae):
            same = vae.decode(z).sample  # float32 latents: exactly what the VAE gives without the wrapper
            half = vae.decode(z.bfloat16()).sample  # bf16 latents (a half-precision reference): decoded in float32
        with pytest.raises(RuntimeError):
            vae.decode(z.bfloat16())  # the wrapper is gone again
    assert torch.equal(same, plain) and "decode" not in vae.__dict__
    torch.testing.assert_close(half, vae.decode(z.bfloat16().float()).sample)
