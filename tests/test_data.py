"""diffalign.data: preference pairs from every source, validation, joint augmentation, latent cache."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.data import (
    CachedPairs,
    PairCollator,
    PairTransform,
    SkippedPair,
    TransformedPairs,
    build_cache,
    cache_miss_reason,
    collate_pairs,
    deterministic_rng,
    fingerprint,
    load_pairs,
    open_cache,
)
from diffalign.errors import UserError
from diffalign.toy.render import render
from diffalign.toy.world import Scene

RED, BLUE = "red", "blue"


def toy_image(colour: str, size: tuple[int, int]) -> Image.Image:
    """A toy render (a large shape centred on a light background), resized to `size` = (width, height)."""
    scene = Scene("square", colour, "large", "plain", 0.5, 0.5)
    array = render([scene], rng=np.random.default_rng(0), jitter=False)[0]
    return Image.fromarray(array).resize(size, Image.Resampling.NEAREST)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


RED_PNG = png(toy_image(RED, (40, 48)))  # jpg_0: 40 wide, 48 high
BLUE_PNG = png(toy_image(BLUE, (32, 32)))  # jpg_1: 32x32


def centre_colour(image: Image.Image) -> str:
    r, g, b = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
    assert max(r, b) > 150 and min(r, b) < 100, (r, g, b)
    return RED if r > b else BLUE


def pickapic_rows(specs) -> dict:
    """Columns in the Pick-a-Pic schema; a spec is (caption, jpg_0 bytes, jpg_1 bytes, label_0, label_1)."""
    cols = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for spec in specs:
        for key, value in zip(cols, spec):
            cols[key].append(value)
    return cols


def write_parquet(path, specs, drop=()):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: v for k, v in pickapic_rows(specs).items() if k not in drop}
    pq.write_table(pa.table(cols), path)
    return path


MIXED = [
    ("a red square", RED_PNG, BLUE_PNG, 1.0, 0.0),  # row 0: image 0 (red) wins
    ("a blue square", RED_PNG, BLUE_PNG, 0.0, 1.0),  # row 1: image 1 (blue) wins
    ("a tie", RED_PNG, BLUE_PNG, 0.5, 0.5),  # row 2: tie
    ("", RED_PNG, BLUE_PNG, 1.0, 0.0),  # row 3: empty caption (kept, counted)
    ("bad label", RED_PNG, BLUE_PNG, 0.7, 0.3),  # row 4: label outside {0, 0.5, 1}
    ("broken", RED_PNG, b"not an image", 1.0, 0.0),  # row 5: undecodable jpg_1 (found at fetch time)
    (None, RED_PNG, BLUE_PNG, 1.0, 0.0),  # row 6: caption None
]


@pytest.fixture
def mixed_parquet(tmp_path):
    return write_parquet(tmp_path / "pick.parquet", MIXED)


def load(path, tmp_path, **kw):
    return load_pairs(str(path), cache_dir=tmp_path / "hf", **kw)


# --------------------------------------------------------------------------------------------- parquet
def test_parquet_winner_follows_labels_and_report(mixed_parquet, tmp_path):
    pairs = load(mixed_parquet, tmp_path)
    assert len(pairs) == 4  # rows 0, 1, 3, 5
    first, second = pairs[0], pairs[1]
    assert set(first) == {"index", "row", "caption", "image_w", "image_l"}
    assert (first["index"], first["row"], first["caption"]) == (0, 0, "a red square")
    assert centre_colour(first["image_w"]) == RED and centre_colour(first["image_l"]) == BLUE
    assert centre_colour(second["image_w"]) == BLUE and centre_colour(second["image_l"]) == RED
    assert first["image_w"].mode == "RGB" and first["image_w"].size == (40, 48)  # each keeps its own size
    assert first["image_l"].size == (32, 32)
    report = pairs.report()
    assert report["rows"] == 7 and report["pairs"] == 4
    assert (report["tie"], report["bad_label"], report["missing_caption"], report["empty_caption"]) == (1, 1, 1, 1)
    assert report["undecodable_image"] == 0  # nothing decoded yet: images are checked when fetched
    assert "1 tie" in pairs.summary()


def test_lenient_undecodable_image_is_skipped_counted_and_dropped_by_collate(mixed_parquet, tmp_path):
    pairs = load(mixed_parquet, tmp_path)
    skipped = pairs[3]  # row 5
    assert isinstance(skipped, SkippedPair)
    assert (skipped.row, skipped.column, skipped.reason) == (5, "jpg_1", "undecodable_image")
    assert pairs.report()["undecodable_image"] == 1 and pairs.report()["usable_pairs"] == 3

    transform = PairTransform(16)
    items = [transform(pairs[i], deterministic_rng(0, 0, i)) for i in range(len(pairs))] + [None]
    collator = PairCollator()
    batch = collator(items)
    assert batch["pixel_w"].shape == (3, 3, 16, 16) and batch["index"].tolist() == [0, 1, 2]
    assert batch["caption"] == ["a red square", "a blue square", ""]
    assert batch["num_dropped"] == 2 and collator.num_dropped == 2
    assert [s.row for s in batch["skipped"]] == [5]
    # A fresh copy (e.g. the main process when a worker saw the failure) learns about it from the batch.
    fresh = load(mixed_parquet, tmp_path)
    fresh.record_skipped(batch["skipped"])
    assert fresh.report()["undecodable_image"] == 1
    fresh.save_report(tmp_path / "data_report.json")
    saved = json.loads((tmp_path / "data_report.json").read_text())
    assert saved["counts"]["tie"] == 1 and saved["skipped_at_fetch"][0]["row"] == 5
    empty = collate_pairs([skipped, None])
    assert empty["index"].numel() == 0 and empty["caption"] == [] and empty["num_dropped"] == 2


def test_strict_raises_with_row_column_reason(mixed_parquet, tmp_path):
    with pytest.raises(UserError, match=r"row 4, column 'label_0': bad_label"):
        load(mixed_parquet, tmp_path, strict=True)
    good_then_broken = write_parquet(tmp_path / "broken.parquet", [MIXED[0], MIXED[5]])
    pairs = load(good_then_broken, tmp_path, strict=True)  # no decoding at construction
    assert len(pairs) == 2
    pairs[0]
    with pytest.raises(UserError, match=r"row 1, column 'jpg_1': undecodable_image"):
        pairs[1]
    no_image = write_parquet(tmp_path / "noimage.parquet", [MIXED[0], ("x", None, BLUE_PNG, 0.0, 1.0)])
    assert load(no_image, tmp_path).report()["missing_image"] == 1  # empty cells are found up front
    with pytest.raises(UserError, match=r"row 1, column 'jpg_0': missing_image"):
        load(no_image, tmp_path, strict=True)
    no_caption = write_parquet(tmp_path / "nocap.parquet", [MIXED[0], MIXED[6]])
    with pytest.raises(UserError, match=r"row 1, column 'caption': missing_caption"):
        load(no_caption, tmp_path, strict=True)


def test_ties_swap_max_samples_min_size(mixed_parquet, tmp_path):
    with pytest.raises(UserError, match=r"row 2 is a tie"):
        load(mixed_parquet, tmp_path, ties="error")
    with pytest.raises(UserError, match="tie policy"):
        load(mixed_parquet, tmp_path, ties="first")
    swapped = load(mixed_parquet, tmp_path, swap=True)
    assert centre_colour(swapped[0]["image_w"]) == BLUE and centre_colour(swapped[0]["image_l"]) == RED
    assert "swapped" in swapped.summary()
    head = load(mixed_parquet, tmp_path, max_samples=3)
    assert head.report()["rows"] == 3 and len(head) == 2
    small = load(mixed_parquet, tmp_path, min_size=40)
    assert isinstance(small[0], SkippedPair) and small[0].reason == "image_too_small" and small[0].column == "jpg_1"


def test_missing_column_is_named(tmp_path):
    path = write_parquet(tmp_path / "nolabel.parquet", MIXED[:2], drop=("label_1",))
    with pytest.raises(UserError, match=r"no column 'label_1'.*columns present: caption, jpg_0, jpg_1, label_0"):
        load(path, tmp_path)


def test_parquet_glob_and_missing_paths(tmp_path):
    write_parquet(tmp_path / "train-0.parquet", MIXED[:2])
    write_parquet(tmp_path / "train-1.parquet", MIXED[:1])
    pairs = load(tmp_path / "train-*.parquet", tmp_path)
    assert len(pairs) == 3
    with pytest.raises(UserError, match="no files match"):
        load(tmp_path / "nothing-*.parquet", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "absent.parquet", tmp_path)


def test_hub_dataset_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match=r"cannot load hub dataset 'no-such-org/no-such-data'.*local source"):
        load_pairs("no-such-org/no-such-data", cache_dir=tmp_path / "hf")


# ------------------------------------------------------------------------------------------ save_to_disk
def test_save_to_disk_datasetdict_with_image_feature(tmp_path):
    import datasets

    cols = pickapic_rows(MIXED[:3])
    features = datasets.Features({
        "caption": datasets.Value("string"), "jpg_0": datasets.Image(), "jpg_1": datasets.Image(),
        "label_0": datasets.Value("float64"), "label_1": datasets.Value("float64"),
    })
    cols["jpg_0"] = [{"bytes": b, "path": None} for b in cols["jpg_0"]]
    cols["jpg_1"] = [{"bytes": b, "path": None} for b in cols["jpg_1"]]
    ds = datasets.Dataset.from_dict(cols, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "saved"))

    with pytest.raises(UserError, match=r"no split 'validation'; available splits: train, test"):
        load(tmp_path / "saved", tmp_path, split="validation")
    train = load(tmp_path / "saved", tmp_path)
    assert len(train) == 2 and train.report()["tie"] == 1
    assert centre_colour(train[1]["image_w"]) == BLUE
    test = load(tmp_path / "saved", tmp_path, split="test")
    assert len(test) == 1 and test[0]["caption"] == "a blue square"
    assert "split 'test'" in test.summary()


# ----------------------------------------------------------------------------------------- image folder
def make_folder(root, fmt="jsonl"):
    (root / "w").mkdir(parents=True)
    (root / "l").mkdir()
    entries = [("a.png", "a red square"), ("b.png", "a red one"), ("c.png", "loser missing")]
    for name, _ in entries:
        toy_image(RED, (40, 48)).save(root / "w" / name)
    for name, _ in entries[:2]:
        toy_image(BLUE, (32, 32)).save(root / "l" / name)
    toy_image(RED, (32, 32)).save(root / "w" / "unlisted.png")
    if fmt == "jsonl":
        lines = [json.dumps({"file_name": n, "caption": c}) for n, c in entries]
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    else:
        (root / "captions.csv").write_text("file_name,caption\n" + "".join(f"{n},{c}\n" for n, c in entries))
    return root


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_image_folder_pairs(tmp_path, fmt):
    root = make_folder(tmp_path / "pairs", fmt)
    pairs = load(root, tmp_path)
    assert len(pairs) == 2
    item = pairs[0]
    assert item["caption"] == "a red square"
    assert centre_colour(item["image_w"]) == RED and centre_colour(item["image_l"]) == BLUE
    report = pairs.report()
    assert report["missing_image"] == 1 and report["unlisted_file"] == 1
    assert centre_colour(load(root, tmp_path, swap=True)[0]["image_w"]) == BLUE
    with pytest.raises(UserError, match="unlisted.png"):
        load(root, tmp_path, strict=True)


def test_image_folder_splits_and_bad_lines(tmp_path):
    make_folder(tmp_path / "root" / "train")
    with pytest.raises(UserError, match=r"no split 'test'; available splits: train"):
        load(tmp_path / "root", tmp_path, split="test")
    assert len(load(tmp_path / "root", tmp_path)) == 2
    flat = make_folder(tmp_path / "flat")
    with open(flat / "captions.jsonl", "a") as fh:
        fh.write("{not json\n")
    assert load(flat, tmp_path).report()["bad_caption"] == 1
    (flat / "w" / "unlisted.png").unlink()
    with pytest.raises(UserError, match=r"row 2, column 'l': missing_image \(no file l/c.png\)"):
        load(flat, tmp_path, strict=True)
    toy_image(BLUE, (32, 32)).save(flat / "l" / "c.png")
    with pytest.raises(UserError, match=r"row 3, column 'file_name': bad_caption \(line 4"):
        load(flat, tmp_path, strict=True)


# -------------------------------------------------------------------------------------------- transform
def marked(size, marker_cols):
    """White image (width, height) with a red band over the leftmost `marker_cols` columns."""
    array = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    array[:, :marker_cols] = (255, 0, 0)
    return Image.fromarray(array)


def test_transform_keeps_each_aspect_and_records_sizes():
    item = {"index": 0, "caption": "x", "image_w": toy_image(RED, (40, 48)), "image_l": toy_image(BLUE, (32, 32))}
    out = PairTransform(16, random_flip=False, center_crop=True)(item, random.Random(0))
    assert out["pixel_w"].shape == out["pixel_l"].shape == (3, 16, 16)
    assert out["pixel_w"].dtype == torch.float32
    assert out["pixel_w"].min() >= -1 and out["pixel_w"].max() <= 1 and out["pixel_w"].min() < -0.5
    assert out["original_size_w"] == (48, 40) and out["original_size_l"] == (32, 32)
    # 40x48 -> 16x19 (aspect kept, not stretched to 16x16), centre crop starts at row round(3/2) = 2.
    assert out["crop_top_left_w"] == (2, 0) and out["crop_top_left_l"] == (0, 0)
    # Not stretched: a 64x32 image whose left quarter is black, centre-cropped, shows no black at all.
    wide = marked((64, 32), 16)
    wide.paste((0, 0, 0), (0, 0, 16, 32))
    out = PairTransform(16, random_flip=False, center_crop=True)({"image_w": wide, "image_l": wide}, random.Random(0))
    assert out["original_size_w"] == (32, 64) and out["crop_top_left_w"] == (0, 8)
    assert out["pixel_w"].min() > 0  # (stretching would show 4 black columns; resampling blurs the edge a little)


def test_one_flip_for_both_images():
    item = {"index": 0, "caption": "x", "image_w": marked((40, 48), 5), "image_l": marked((32, 32), 4)}
    transform = PairTransform(32, random_flip=True, center_crop=True)
    seen = set()
    for seed in range(16):
        out = transform(item, deterministic_rng(seed, 0, 0))
        sides = []
        for key in ("pixel_w", "pixel_l"):
            green = out[key][1]  # the red band is where green is low
            left, right = green[:, :3].mean().item(), green[:, -3:].mean().item()
            assert min(left, right) < -0.9 < 0.9 < max(left, right)
            sides.append("right" if right < left else "left")
        assert sides[0] == sides[1]
        assert (sides[0] == "right") == out["flipped"]
        if out["flipped"]:
            assert out["crop_top_left_w"][1] == 32 - 0 - 32  # left edge given in the flipped image
        seen.add(out["flipped"])
    assert seen == {True, False}


def test_transform_joint_crop_and_determinism():
    item = {"index": 3, "caption": "x", "image_w": toy_image(RED, (40, 80)), "image_l": toy_image(BLUE, (30, 60))}
    transform = PairTransform(16)
    a = transform(item, deterministic_rng(7, 2, 3))
    b = transform(item, deterministic_rng(7, 2, 3))
    assert torch.equal(a["pixel_w"], b["pixel_w"]) and torch.equal(a["pixel_l"], b["pixel_l"])
    assert a["crop_top_left_w"] == b["crop_top_left_w"]
    # Same aspect ratio (1:2), both resized to 16x32: one relative crop position gives the same offsets.
    tops = {transform(item, deterministic_rng(7, e, 3))["crop_top_left_w"][0] for e in range(12)}
    assert len(tops) > 1
    for e in range(6):
        out = transform(item, deterministic_rng(7, e, 3))
        assert out["crop_top_left_w"] == out["crop_top_left_l"]
    assert deterministic_rng(1, 0, 5).random() == deterministic_rng(1, 0, 5).random()
    assert deterministic_rng(1, 0, 5).random() != deterministic_rng(1, 1, 5).random()


def test_transformed_pairs_dataset(mixed_parquet, tmp_path):
    pairs = load(mixed_parquet, tmp_path)
    data = TransformedPairs(pairs, PairTransform(16), seed=3)
    data.set_epoch(1)
    first = data[0]
    assert torch.equal(first["pixel_w"], PairTransform(16)(pairs[0], deterministic_rng(3, 1, 0))["pixel_w"])
    assert isinstance(data[3], SkippedPair) and data.report()["undecodable_image"] == 1
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate_pairs)
    batch = next(iter(loader))
    assert batch["pixel_l"].shape == (3, 3, 16, 16) and batch["num_dropped"] == 1


# ------------------------------------------------------------------------------------------------ cache
@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_cache_matches_family_encoding(name, tiny_pipelines, tmp_path):
    from diffalign.models import load_family

    family = load_family(tiny_pipelines[name])
    specs = [MIXED[0], MIXED[1], MIXED[5], ("a third", BLUE_PNG, RED_PNG, 0.0, 1.0)]
    pairs = load(write_parquet(tmp_path / "c.parquet", specs), tmp_path)
    res = family.default_resolution
    cache_dir = tmp_path / "cache"
    assert open_cache(cache_dir, fingerprint(pairs, family, resolution=res)) is None
    out = build_cache(pairs, family, resolution=res, cache_dir=cache_dir, batch_size=2, shard_size=2, progress=False)
    assert out == cache_dir and (cache_dir / "manifest.json").is_file()
    assert pairs.report()["undecodable_image"] == 1  # the build recorded the skipped pair

    key = fingerprint(pairs, family, resolution=res)
    cached = open_cache(cache_dir, key)
    assert isinstance(cached, CachedPairs) and len(cached) == 3
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["fingerprint"] == key and len(manifest["skipped"]) == 1

    view = PairTransform(res, random_flip=False, center_crop=True)
    for j, i in enumerate([0, 1, 3]):
        item = cached[j]
        assert item["index"] == i and item["caption"] == pairs.caption(i)
        ref = view(pairs[i], random.Random(0))
        lat = family.encode_images(torch.stack([ref["pixel_w"], ref["pixel_l"]]))
        torch.testing.assert_close(item["latents_w"], lat[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(item["latents_l"], lat[1], atol=1e-5, rtol=1e-5)
        cond = family.encode_prompts([pairs.caption(i)])
        torch.testing.assert_close(item["prompt_embeds"], cond.prompt_embeds[0], atol=1e-5, rtol=1e-5)
        if name == "sdxl":
            torch.testing.assert_close(item["text_embeds"], cond.text_embeds[0], atol=1e-5, rtol=1e-5)
            ids = family.time_ids([ref["original_size_w"]], [ref["crop_top_left_w"]], (res, res))
            torch.testing.assert_close(item["time_ids_w"], ids[0])
            winner_hw = {0: (48, 40), 1: (32, 32), 3: (48, 40)}[i]  # (h, w) of the winner before resizing
            assert tuple(item["time_ids_w"][:2].tolist()) == winner_hw
            assert item["time_ids_w"][4:].tolist() == [res, res]
            ids_l = family.time_ids([ref["original_size_l"]], [ref["crop_top_left_l"]], (res, res))
            torch.testing.assert_close(item["time_ids_l"], ids_l[0])
        else:
            assert "text_embeds" not in item and "time_ids_w" not in item
    batch = collate_pairs([cached[0], cached[1]])
    assert batch["latents_w"].shape[0] == 2 and batch["index"].tolist() == [0, 1]

    # A second build with the same inputs reuses the cache; other inputs do not match it.
    mtimes = sorted(p.stat().st_mtime_ns for p in cache_dir.glob("shard-*"))
    build_cache(pairs, family, resolution=res, cache_dir=cache_dir, batch_size=2, shard_size=2, progress=False)
    assert sorted(p.stat().st_mtime_ns for p in cache_dir.glob("shard-*")) == mtimes
    assert open_cache(cache_dir, fingerprint(pairs, family, resolution=res // 2)) is None
    assert "other inputs" in cache_miss_reason(cache_dir, fingerprint(pairs, family, resolution=res // 2))
    other = load_family(tiny_pipelines["sdxl" if name == "sd" else "sd"])
    assert open_cache(cache_dir, fingerprint(pairs, other, resolution=res)) is None
    assert open_cache(cache_dir, fingerprint(load(tmp_path / "c.parquet", tmp_path, swap=True), family, resolution=res)) is None
    assert open_cache(cache_dir, fingerprint(pairs, family, resolution=res, extra={"v": 2})) is None


def test_cache_resumes_after_interruption(tiny_pipelines, tmp_path):
    from diffalign.models import load_family

    family = load_family(tiny_pipelines["sd"])
    pairs = load(write_parquet(tmp_path / "c.parquet", [MIXED[0], MIXED[1], MIXED[0]]), tmp_path)
    cache_dir = tmp_path / "cache"
    build_cache(pairs, family, resolution=32, cache_dir=cache_dir, shard_size=1, progress=False)
    first = (cache_dir / "shard-00000.safetensors").stat().st_mtime_ns
    # Simulate a build interrupted after shard 0: no manifest, a build marker, a missing last shard.
    manifest = (cache_dir / "manifest.json").read_text()
    (cache_dir / "manifest.json").unlink()
    (cache_dir / "shard-00002.safetensors").unlink()
    (cache_dir / "building.json").write_text(json.dumps({"fingerprint": json.loads(manifest)["fingerprint"]}))
    key = fingerprint(pairs, family, resolution=32)
    assert "incomplete" in cache_miss_reason(cache_dir, key)
    build_cache(pairs, family, resolution=32, cache_dir=cache_dir, shard_size=1, progress=False)
    assert (cache_dir / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert len(open_cache(cache_dir, key)) == 3 and not (cache_dir / "building.json").exists()
    again = load(tmp_path / "c.parquet", tmp_path)
    build_cache(again, family, resolution=32, cache_dir=cache_dir, shard_size=1, progress=False)  # reused as is
    # Another resolution in the same folder replaces the stale cache (its own files only).
    (cache_dir / "notes.txt").write_text("mine")
    build_cache(pairs, family, resolution=16, cache_dir=cache_dir, shard_size=2, progress=False)
    assert open_cache(cache_dir, key) is None
    small = open_cache(cache_dir, fingerprint(pairs, family, resolution=16))
    assert len(small) == 3 and small[2]["latents_w"].shape[-1] == 8  # 16 px / VAE factor 2
    assert sorted(p.name for p in cache_dir.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert (cache_dir / "notes.txt").read_text() == "mine"
