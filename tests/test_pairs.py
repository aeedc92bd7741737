"""`diffalign pairs`: self-generated preference datasets (recipes prefix, ranked, target) on the shipped toy model.

Every expectation is recomputed independently: pixels from a direct pipeline call or the ground-truth render,
scores from the toy judge on the kept candidates, label positions from the documented draw. Runs use 2
sampling steps (the images are rough, the mechanics are exact).
"""

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.config_loader import load_config
from diffalign.errors import UserError
from diffalign.generation import GenerationSettings, PairsConfig, make_pairs, read_manifest, read_pairs, run_pairs
from diffalign.generation.pairs import run as pairs_module
from diffalign.generation.pairs.store import schema
from diffalign.generation.pairs.units import pick_pairs

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ("a red square", "a blue circle", "a green diamond")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The toy model and judge gain nothing from intra-op threads; on a busy 2-core box they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(_one_thread):
    from diffalign.models import load_pipeline
    from diffalign.toy.paths import toy_model_path

    return load_pipeline(str(toy_model_path()))


@pytest.fixture(scope="module")
def judge():
    from diffalign.evaluation import get_reward

    return get_reward("toy")


class Interrupted(Exception):
    pass


class StopAfter:
    """The pipeline, raising on call k+1: a run killed mid-sampling (and, with k=0, proof nothing is sampled)."""

    def __init__(self, pipe, calls: int):
        self._pipe, self._left = pipe, calls

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        if self._left == 0:
            raise Interrupted("sampling interrupted")
        self._left -= 1
        return self._pipe(*args, **kwargs)


def _cfg(out, **kw) -> PairsConfig:
    base = dict(recipe="prefix", pretrained_model_name_or_path="toy", prompt_list=PROMPTS, chosen_template="{prompt}, striped",
                rejected_template="{prompt}", num_inference_steps=2, batch_size=4, output_dir=str(out))
    return PairsConfig(**{**base, **kw})


def _rows(out):
    return read_pairs(out).to_pylist()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _sides(row):
    """(chosen, rejected) as dicts of jpg, prompt, seed, score."""
    w, l = ("0", "1") if row["label_0"] == 1.0 else ("1", "0")
    assert {row["label_0"], row["label_1"]} == {0.0, 1.0}
    return tuple({k: row[f"{k}_{i}"] for k in ("jpg", "prompt", "seed", "score")} for i in (w, l))


def _is_sample_of(data: bytes, pipe, prompt: str, seed: int) -> bool:
    """The image is what a direct pipeline call makes from this prompt and seed. Up to 1/255 per channel: in
    another batch size the float sums run in another order (another seed or prompt differs by far more)."""
    image = pipe(prompt=[prompt], num_inference_steps=2, guidance_scale=7.5,
                 generator=[torch.Generator().manual_seed(seed)]).images[0]
    return int(np.abs(_pixels(data).astype(int) - np.asarray(image.convert("RGB")).astype(int)).max()) <= 1


def _shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((Path(out) / "data").iterdir())}


# ------------------------------------------------------------------------------------------------ units
def test_pick_pairs_golden():
    nan = float("nan")
    kept, skipped = pick_pairs([0.2, 0.9, nan, 0.1, 0.9])  # first highest against first lowest; NaN takes no part
    assert kept == [(0, 1, 3)] and not skipped
    assert pick_pairs([0.2, 0.9, nan, 0.1, 0.9], margin=0.8) == ([], {"gap_below_margin": 1})  # 0.8 is not > 0.8
    assert pick_pairs([0.3, nan]) == ([], {"unscored": 1})
    # all: slot c is the c-th pair of combinations(range(n), 2): (0,1) (0,2) (1,2); equal scores never win.
    assert pick_pairs([0.5, 0.7, 0.5], "all") == ([(0, 1, 0), (2, 1, 2)], {"gap_below_margin": 1})
    assert pick_pairs([0.5, nan, 0.1], "all", margin=0.3) == ([(1, 0, 2)], {"unscored": 2})
    with pytest.raises(UserError, match="best-worst"):
        pick_pairs([0.1, 0.2], "best-of")


def test_shipped_configs_load_and_describe_the_toy_scenarios():
    from diffalign.toy.prompts import toy_prompts
    from diffalign.toy.world import COLOUR_NAMES, SHAPES, caption

    configs = {p.stem: load_config(PairsConfig, p).validate() for p in sorted((REPO / "configs/pairs").glob("*.yaml"))}
    assert set(configs) == {"toy_pick_style", "toy_pick_safety", "toy_ranked", "toy_target", "sdxl_pick_style",
                            "toy_pick_style_filtered", "toy_ranked_fidelity"}
    train = [caption(shape=s, colour=c) for c in COLOUR_NAMES for s in SHAPES]
    train = [p for p in train if p not in toy_prompts("heldout")]
    style, safety = configs["toy_pick_style"], configs["toy_pick_safety"]
    assert len(train) == 16 and list(style.prompt_list) == train == list(safety.prompt_list)
    assert style.pairs_per_prompt == 8 and style.num_pairs is None  # 128 pairs
    assert (style.chosen_template, style.rejected_template) == ("{prompt}, striped", "{prompt}")
    assert (safety.chosen_template, safety.rejected_template) == ("{prompt}", "{prompt}, outlined")
    assert configs["toy_ranked"].reward == "toy" and configs["toy_target"].recipe == "target"
    fidelity = configs["toy_ranked_fidelity"]  # decisive pairs: one image right, one wrong
    assert fidelity.reward == "toy:term=shape_colour_correct" and fidelity.margin == 0.5
    assert list(fidelity.prompt_list) == train and fidelity.num_samples_per_prompt == 4


# ---------------------------------------------------------------------------------------------- recipes
@pytest.mark.slow
def test_prefix_pairs_share_seeds_and_carry_provenance(tmp_path, pipe):
    out = tmp_path / "style"
    result = run_pairs(_cfg(out, pairs_per_prompt=2, seed=3, shard_size=4), pipe=pipe)
    assert (result.units, result.pairs, result.shards, result.dataset_name) == (6, 6, 2, str(out))
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000.parquet", "train-00001.parquet"]
    assert pq.read_schema(out / "data/train-00001.parquet").names == schema().names
    rows = _rows(out)
    assert [r["pair_index"] for r in rows] == list(range(6))
    for i, row in enumerate(rows):
        chosen, rejected = _sides(row)
        assert row["caption"] == PROMPTS[i % 3]  # prompts take turns: pair i uses prompt i mod 3
        assert (chosen["prompt"], rejected["prompt"]) == (row["caption"] + ", striped", row["caption"])
        assert chosen["seed"] == rejected["seed"] == 3 + i
        assert chosen["jpg"] == (out / "images/chosen" / f"{i:05d}.png").read_bytes()  # the sampled PNG itself
        assert row["label_0"] == float(np.random.default_rng([3, i]).integers(2))  # the documented per-pair draw
        assert (row["recipe"], row["model"], row["lora"], row["score_0"], row["score_1"]) == ("prefix", "toy", None, None, None)
        settings = json.loads(row["settings"])
        assert (settings["num_inference_steps"], settings["guidance_scale"], settings["height"], settings["scheduler"]) == \
            (2, 7.5, 32, "DDIMScheduler")
    assert {r["label_0"] for r in rows} == {0.0, 1.0}  # position carries no signal
    # Same seed, different prompt: each image is exactly what the pipeline makes from its own prompt and seed.
    for i in (0, 4):
        chosen, rejected = _sides(rows[i])
        assert _is_sample_of(chosen["jpg"], pipe, chosen["prompt"], 3 + i)
        assert _is_sample_of(rejected["jpg"], pipe, rejected["prompt"], 3 + i)
        assert not _is_sample_of(chosen["jpg"], pipe, chosen["prompt"], 4 + i)  # the check tells seeds apart
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["units"], summary["pairs"], summary["skipped"], summary["candidate_images"]) == (6, 6, {}, 12)
    assert load_config(PairsConfig, out / "pairs_config.yaml") == _cfg(out, pairs_per_prompt=2, seed=3, shard_size=4)

    # Relabelling another run's images: nothing is sampled (the pipeline may not be called), chosen kept first.
    again = run_pairs(_cfg(tmp_path / "first", pairs_per_prompt=2, seed=3, shard_size=4, chosen_first=True,
                           images_dir=str(out / "images")), pipe=StopAfter(pipe, 0))
    assert again.pairs == 6
    for row, old in zip(_rows(tmp_path / "first"), rows):
        assert row["label_0"] == 1.0 and row["jpg_0"] == _sides(old)[0]["jpg"] and row["jpg_1"] == _sides(old)[1]["jpg"]

    # same_seed: false gives the rejected image of pair i its own seed, seed + 1000000 + i.
    run_pairs(_cfg(tmp_path / "own", num_pairs=2, seed=3, same_seed=False), pipe=pipe)
    assert [tuple(s["seed"] for s in _sides(r)) for r in _rows(tmp_path / "own")] == [(3, 1000003), (4, 1000004)]


@pytest.mark.slow
def test_ranked_pairs_are_best_against_worst_by_the_judge(tmp_path, pipe, judge):
    out = tmp_path / "ranked"
    cfg = _cfg(out, recipe="ranked", chosen_template=None, rejected_template=None, prompt_list=PROMPTS[:2],
               num_samples_per_prompt=3, reward="toy", seed=7)
    run_pairs(cfg, pipe=pipe, reward=judge)
    manifest = read_manifest(out / "images/candidates")
    assert [m["seed"] for m in manifest] == list(range(7, 13))
    assert [m["prompt"] for m in manifest] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    pil = [Image.open(out / "images/candidates" / m["file"]).convert("RGB") for m in manifest]
    scores = judge.details(pil, [m["prompt"] for m in manifest])["score"].tolist()
    rows = _rows(out)
    assert [r["caption"] for r in rows] == list(PROMPTS[:2]) and [r["pair_index"] for r in rows] == [0, 1]
    for g, row in enumerate(rows):
        group = scores[3 * g : 3 * g + 3]
        chosen, rejected = _sides(row)
        assert (chosen["seed"], rejected["seed"]) == (7 + 3 * g + int(np.argmax(group)), 7 + 3 * g + int(np.argmin(group)))
        assert chosen["score"] == pytest.approx(max(group), abs=1e-6) and rejected["score"] == pytest.approx(min(group), abs=1e-6)
        assert chosen["jpg"] == (out / "images/candidates" / f"{chosen['seed'] - 7:05d}.png").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    gaps = [max(scores[3 * g : 3 * g + 3]) - min(scores[3 * g : 3 * g + 3]) for g in range(2)]
    assert summary["scores"]["gap_mean"] == pytest.approx(float(np.mean(gaps)), abs=1e-6)

    # strategy all, relabelled from the same candidates: every two whose gap exceeds the margin, slot by slot.
    margin = 0.1
    everything = tmp_path / "all"
    result = run_pairs(PairsConfig(**{**vars(cfg), "strategy": "all", "margin": margin, "output_dir": str(everything),
                                      "images_dir": str(out / "images")}), pipe=StopAfter(pipe, 0), reward=judge)
    expected = {}
    for g in range(2):
        for c, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)]):
            si, sj = scores[3 * g + i], scores[3 * g + j]
            if abs(si - sj) > margin:
                w, l = (i, j) if si >= sj else (j, i)
                expected[3 * g + c] = (7 + 3 * g + w, 7 + 3 * g + l)
    got = {r["pair_index"]: tuple(s["seed"] for s in _sides(r)) for r in _rows(everything)}
    assert got == expected and 0 < len(expected) < 6
    assert result.skipped == {"gap_below_margin": 6 - len(expected)}


def _toy_caption_folder(folder: Path, n: int = 4) -> list:
    """A tiny image-caption set: toy ground-truth renders plus three broken entries."""
    from diffalign.toy.render import render
    from diffalign.toy.world import caption, sample_scenes

    rng = np.random.default_rng(0)
    scenes = sample_scenes(n, rng)
    images = render(scenes, rng)
    folder.mkdir()
    lines = []
    for i, (scene, image) in enumerate(zip(scenes, images)):
        Image.fromarray(image).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "caption": caption(scene.shape, scene.colour)}))
    (folder / "broken.png").write_bytes(b"not a png")
    lines.insert(2, json.dumps({"file_name": "broken.png", "caption": "a red square"}))
    lines.insert(3, json.dumps({"file_name": "gone.png", "caption": "a blue circle"}))
    lines.append("{not json")
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return [(caption(s.shape, s.colour), image) for s, image in zip(scenes, images)]


@pytest.mark.slow
def test_target_pairs_real_images_against_samples(tmp_path, pipe, capsys):
    truth = _toy_caption_folder(tmp_path / "set")
    out = tmp_path / "target"
    cfg = _cfg(out, recipe="target", prompt_list=(), chosen_template=None, rejected_template=None, seed=11,
               image_caption_source=str(tmp_path / "set"))
    result = run_pairs(cfg, pipe=pipe)
    assert result.pairs == 4 and result.skipped == {"bad_caption": 1, "missing_image": 1, "undecodable_image": 1}
    for i, row in enumerate(_rows(out)):
        chosen, rejected = _sides(row)
        assert row["caption"] == truth[i][0] and row["recipe"] == "target"
        assert (chosen["prompt"], chosen["seed"]) == (None, None)  # a real image: no prompt, no seed
        assert np.array_equal(_pixels(chosen["jpg"]), truth[i][1])
        assert (rejected["prompt"], rejected["seed"]) == (truth[i][0], 11 + i)
        if i == 0:
            assert _is_sample_of(rejected["jpg"], pipe, truth[0][0], 11)

    # A table source with its own column names.
    import pyarrow as pa

    table = pa.table({"text": [c for c, _ in truth], "img": [(tmp_path / "set" / f"{i}.png").read_bytes() for i in range(4)]})
    pq.write_table(table, tmp_path / "set.parquet")
    run_pairs(PairsConfig(**{**vars(cfg), "image_caption_source": str(tmp_path / "set.parquet"), "image_column": "img",
                             "caption_column": "text", "num_pairs": 2, "output_dir": str(tmp_path / "t2"),
                             "image_format": "jpeg", "keep_images": False}), pipe=pipe)
    rows = _rows(tmp_path / "t2")
    assert [r["caption"] for r in rows] == [truth[0][0], truth[1][0]]
    for i, row in enumerate(rows):
        chosen, rejected = _sides(row)
        assert chosen["jpg"][:2] == rejected["jpg"][:2] == b"\xff\xd8"  # JPEG, both sides
        assert np.abs(_pixels(chosen["jpg"]).astype(int) - truth[i][1]).mean() < 8  # lossy, but the same render
    assert not (tmp_path / "t2/images").exists() and (tmp_path / "t2/summary.json").is_file()  # keep_images: false

    # strict_data stops at the bad row, naming it and the reason, before any model is loaded.
    argv = ["pairs", "--recipe=target", "--pretrained_model_name_or_path=/no/such/model", f"--output_dir={tmp_path / 's'}",
            f"--image_caption_source={tmp_path / 'set'}", "--strict_data=true"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "row 2 (captions.jsonl line 3, file 'broken.png'): undecodable_image" in err and "/no/such/model" not in err


# ------------------------------------------------------------------------------------ resume, determinism
@pytest.mark.slow
def test_resume_after_interrupts_equals_one_uninterrupted_run(tmp_path, pipe, monkeypatch):
    """Killed while sampling, then while writing shards, then finished: the bytes of one uninterrupted run of
    the same config and seed (so also: the same config twice gives the same data)."""
    kw = dict(pairs_per_prompt=3, num_pairs=8, seed=1, shard_size=3, batch_size=2)
    whole = tmp_path / "whole"
    run_pairs(_cfg(whole, **kw), pipe=pipe)

    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):  # killed after 3 batches of 2: 6 of the 8 chosen images exist
        run_pairs(_cfg(cut, **kw), pipe=StopAfter(pipe, 3))
    assert not list((cut / "data").iterdir()) and len(list((cut / "images/chosen").glob("*.png"))) == 6

    written = []
    real_write = pairs_module.write_shard

    def write_one_then_die(cfg, s, rows, info):
        if written:
            raise Interrupted("writing interrupted")
        written.append(s)
        return real_write(cfg, s, rows, info)

    monkeypatch.setattr(pairs_module, "write_shard", write_one_then_die)
    # Exactly the missing images are sampled: 1 batch of chosen, 4 of rejected; a 6th call would raise.
    with pytest.raises(Interrupted, match="writing"):
        run_pairs(_cfg(cut, **kw), pipe=StopAfter(pipe, 5))
    first = cut / "data/train-00000.parquet"
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)
    (cut / "data/.train-00001.parquet.tmp").write_bytes(b"half a shard")  # what a killed writer leaves

    monkeypatch.setattr(pairs_module, "write_shard",
                        lambda cfg, s, rows, info: written.append(s) or real_write(cfg, s, rows, info))
    result = run_pairs(_cfg(cut, **kw), pipe=StopAfter(pipe, 0))  # nothing left to sample
    assert written == [0, 1, 2] and (first.stat().st_ino, first.stat().st_mtime_ns) == stamp  # shard 0 kept as it was
    assert result.reused_shards == 1 and result.pairs == 8
    assert _shard_bytes(cut) == _shard_bytes(whole)  # byte-identical data, no stray temp file
    assert json.loads((cut / "summary.json").read_text()) == {**json.loads((whole / "summary.json").read_text()),
                                                               "dataset_name": str(cut)}

    # A finished run re-run: nothing sampled, nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in (whole / "data").iterdir()}
    assert run_pairs(_cfg(whole, **kw), pipe=StopAfter(pipe, 0)).reused_shards == 3
    assert {p: p.stat().st_mtime_ns for p in (whole / "data").iterdir()} == before


@pytest.mark.slow
def test_changed_config_is_refused_unless_overwrite(tmp_path, pipe):
    out = tmp_path / "o"
    run_pairs(_cfg(out, num_pairs=2), pipe=pipe)
    with pytest.raises(UserError, match=r"another config \(changed: num_inference_steps 2 -> 3\).*overwrite: true"):
        run_pairs(_cfg(out, num_pairs=2, num_inference_steps=3), pipe=pipe)
    # Run-only keys (batch_size) are not a change: the finished run is reused.
    assert run_pairs(_cfg(out, num_pairs=2, batch_size=1), pipe=StopAfter(pipe, 0)).reused_shards == 1
    run_pairs(_cfg(out, num_pairs=2, num_inference_steps=3, overwrite=True), pipe=pipe)
    assert {json.loads(r["settings"])["num_inference_steps"] for r in _rows(out)} == {3}
    assert read_manifest(out / "images/chosen")[0]["settings"]["num_inference_steps"] == 3  # images replaced too
    # A run that died before making anything (no image, no shard) does not block another config.
    with pytest.raises(Interrupted):
        run_pairs(_cfg(tmp_path / "died", num_pairs=2), pipe=StopAfter(pipe, 0))
    assert run_pairs(_cfg(tmp_path / "died", num_pairs=1, num_inference_steps=3), pipe=pipe).pairs == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a diffalign pairs folder"):
        run_pairs(_cfg(tmp_path / "other", num_pairs=2, overwrite=True), pipe=pipe)


# ------------------------------------------------------------------------------- the CLI, datasets, train
@pytest.mark.slow
def test_cli_output_loads_with_datasets_and_trains(tmp_path, capsys):
    import datasets

    from diffalign.data import load_pairs

    out = tmp_path / "style"
    assert main(["pairs", str(REPO / "configs/pairs/toy_pick_style.yaml"), "--num_pairs=4", "--num_inference_steps=2",
                 f"--output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 pairs from 4 units in 1 shard(s)" in printed
    name = re.search(r"--dataset_name=(\S+)", printed).group(1)
    assert name == str(out)
    ds = datasets.load_dataset("parquet", data_files=f"{name}/data/*.parquet", split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 4 and ds.column_names == schema().names
    pairs = load_pairs(name, cache_dir=tmp_path / "hf")
    rows = _rows(out)
    assert len(pairs) == 4 and np.array_equal(np.asarray(pairs[0]["image_w"]), _pixels(_sides(rows[0])[0]["jpg"]))
    assert main(["train", str(REPO / "configs/toy_mapo.yaml"), f"--dataset_name={name}", "--max_train_steps=2",
                 "--checkpointing_steps=1000", "--validation_prompts=[]", "--train_batch_size=2",
                 f"--output_dir={tmp_path / 'train'}"]) == 0
    assert (tmp_path / "train/pytorch_lora_weights.safetensors").is_file()


def test_make_pairs_keeps_the_single_file_call(tmp_path, pipe):
    settings = GenerationSettings(guidance_scale=7.5, num_inference_steps=2, seed=0, num_images_per_prompt=2, batch_size=4)
    out = tmp_path / "pairs" / "pairs.parquet"
    report = make_pairs(pipe, list(PROMPTS[:2]), out, settings, templates=("{prompt}, striped", "{prompt}"),
                        images_dir=tmp_path / "pairs" / "images")
    assert report.pairs == 4 and report.summary().startswith("4 pairs from 4 units")
    assert pq.read_table(out).equals(read_pairs(tmp_path / "pairs" / "pairs"))
    assert len(list((tmp_path / "pairs/images/chosen").glob("*.png"))) == 4


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--chosen_template=none"], "recipe prefix needs chosen_template"),
        (["--chosen_tempalte=x"], "did you mean 'chosen_template'"),
        (["--chosen_template=striped"], "has no {prompt}"),
        (["--chosen_template={prompt}"], "are the same"),
        (["--chosen_template={prompt}, {x}"], "has a brace other than {prompt}"),
        (["--prompts=toy:test", "--prompt_list=[]"], "not a toy prompt set"),
        (["--prompts=/no/such/prompts.txt", "--prompt_list=[]"], "prompts file '/no/such/prompts.txt' does not exist"),
        (["--prompts=toy:train"], "exactly one of them"),
        (["--recipe=ranked", "--chosen_template=none", "--rejected_template=none"], "needs a reward"),
        (["--recipe=ranked", "--chosen_template=none", "--rejected_template=none", "--reward=toy",
          "--num_samples_per_prompt=1"], "num_samples_per_prompt must be at least 2"),
        (["--recipe=ranked", "--chosen_template=none", "--rejected_template=none", "--reward=nosuch"], "unknown reward 'nosuch'"),
        (["--reward=toy", "--score_key=nope"], "score_key 'nope' is not a term"),
        (["--recipe=target", "--chosen_template=none", "--rejected_template=none", "--prompt_list=[]",
          "--image_caption_source=/no/such/set"], "does not exist"),
        (["--recipe=target", "--chosen_template=none", "--rejected_template=none"], "remove prompts"),
        (["--height=64"], "both height and width"),
        (["--margin=-1"], "margin must be at least 0"),
        (["--keep_images=false", "--images_dir=/tmp/x"], "keep_images"),
        (["--num_inference_steps=0"], "num_inference_steps must be at least 1"),
    ],
)
def test_bad_configs_fail_before_the_model_loads(tmp_path, capsys, overrides, expected):
    config = tmp_path / "c.yaml"
    config.write_text("recipe: prefix\npretrained_model_name_or_path: /no/such/model\nprompt_list: [a red square]\n"
                      "chosen_template: '{prompt}, striped'\nrejected_template: '{prompt}'\n")
    assert main(["pairs", str(config), f"--output_dir={tmp_path / 'o'}", *overrides]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("diffalign pairs: error: "), err
    assert expected in errors[0] and "/no/such/model" not in errors[0], err


def test_help_config_lists_every_key(capsys):
    assert main(["pairs", "--help-config"]) == 0
    text = capsys.readouterr().out
    for key in ("recipe", "chosen_template", "num_samples_per_prompt", "image_caption_source", "shard_size", "overwrite"):
        assert f"--{key} " in text
