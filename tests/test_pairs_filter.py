"""`diffalign pairs`: the image filter (filter_reward, filter_chosen, filter_rejected) and further tries (max_tries).

The filter's reward here is a stub whose values are a hash of each image's pixels (and a flag read from its
prompt), so which pairs must be kept is recomputed independently from the candidate images and the documented
seeds. The toy model samples with 2 steps (rough images, exact mechanics). The toy judge's new `all_correct`
term is checked against its per-attribute probabilities.
"""

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.errors import UserError
from diffalign.evaluation import Reward
from diffalign.generation import PairsConfig, read_manifest, read_pairs, run_pairs
from diffalign.generation.pairs import tries as pairs_tries
from diffalign.generation.pairs.filter import judge_try, parse_condition

PROMPTS = ("a red square", "a blue circle", "a green diamond")
STRIDE = 10_000_000  # documented: try t adds t x 10,000,000 to a unit's seeds
CHOSEN = ("h >= 0.45", "striped >= 1")  # the stub's terms: h (pixel hash) and striped (read from the prompt)
REJECTED = ("h < 0.55", "striped < 1")


from test_pairs import _one_thread, pipe  # noqa: E402,F401  (module fixtures: one thread, the toy pipeline)


def _hash(image) -> float:
    """A value in [0, 1) fixed by the pixels alone."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return int(hashlib.sha256(pixels.tobytes()).hexdigest()[:8], 16) / 2**32


class HashReward(Reward):
    """Stub filter reward. Terms: h (pixel hash), striped (1 if the prompt says 'striped'), score (= h).
    Records the prompts it was asked about, to check what each side is scored against."""

    name = "hash"

    def __init__(self):
        self.seen: list[tuple[float, str]] = []

    def details(self, images, prompts):
        h = [_hash(im) for im in images]
        self.seen += list(zip(h, prompts))
        return {"score": torch.tensor(h, dtype=torch.float64), "h": torch.tensor(h, dtype=torch.float64),
                "striped": torch.tensor([float("striped" in p) for p in prompts], dtype=torch.float64)}

    def score(self, images, prompts):
        return self.details(images, prompts)["score"]


class Interrupted(Exception):
    pass


class StopAfter:
    """The pipeline, raising on call k+1 (k=0: proof that nothing is sampled)."""

    def __init__(self, pipe, calls: int):
        self._pipe, self._left, self.calls = pipe, calls, 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        if self._left == 0:
            raise Interrupted("sampling interrupted")
        self._left -= 1
        self.calls += 1
        return self._pipe(*args, **kwargs)


def _cfg(out, **kw) -> PairsConfig:
    base = dict(recipe="prefix", pretrained_model_name_or_path="toy", prompt_list=PROMPTS, chosen_template="{prompt}, striped",
                rejected_template="{prompt}", num_inference_steps=2, batch_size=4, output_dir=str(out),
                filter_reward="hash", filter_chosen=CHOSEN, filter_rejected=REJECTED)
    return PairsConfig(**{**base, **kw})


def _rows(out) -> dict[int, dict]:
    return {r["pair_index"]: r for r in read_pairs(out).to_pylist()}


def _chosen_seed(row) -> int:
    return row["seed_0"] if row["label_0"] == 1.0 else row["seed_1"]


def _image(folder: Path, i: int):
    return Image.open(folder / f"{i:05d}.png").convert("RGB")


def _shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((Path(out) / "data").iterdir())}


def _expected(out, units: int, tries: int, chosen_min=0.45, rejected_max=0.55):
    """Per unit, from the candidate images alone: (try kept or None, reasons of each failed try)."""
    result = {}
    for i in range(units):
        failed = []
        for t in range(tries):
            suffix = "" if t == 0 else f"_try{t}"
            c = _hash(_image(out / f"images/chosen{suffix}", i)) >= chosen_min
            r = _hash(_image(out / f"images/rejected{suffix}", i)) < rejected_max
            if c and r:
                result[i] = (t, failed)
                break
            failed.append([why for why, ok in (("chosen_failed", c), ("rejected_failed", r)) if not ok])
        else:
            result[i] = (None, failed)
    return result


def _failed_tries(expected) -> dict[str, int]:
    """Failed tries by reason (a try failing both sides counts for both)."""
    counts: dict[str, int] = {}
    for _, whys in expected.values():
        for why in whys:
            for w in why:
                counts[w] = counts.get(w, 0) + 1
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------------------------ rules
def test_conditions_parse_and_nan_meets_none():
    c = parse_condition(" all_correct>=1 ", "filter_chosen")
    assert (c.term, c.op, c.value, str(c)) == ("all_correct", ">=", 1.0, "all_correct >= 1")
    assert c.holds(1.0) and not c.holds(0.999) and not c.holds(math.nan)
    below = parse_condition("style_striped < 0.5", "filter_rejected")
    assert below.holds(0.49) and not below.holds(0.5) and not below.holds(math.nan)
    assert parse_condition("score > -2e-1", "k").holds(-0.1) and not parse_condition("score > -2e-1", "k").holds(-0.2)
    assert parse_condition("x <= 3", "k").holds(3) and not parse_condition("x <= 3", "k").holds(3.5)
    for bad in ("all_correct = 1", "all_correct >= one", ">= 1", "all_correct >= nan", "all_correct >= 1 2", "a >= inf"):
        with pytest.raises(UserError, match="filter_chosen: .* is not a condition TERM OP NUMBER"):
            parse_condition(bad, "filter_chosen")


def test_judge_try_order_of_checks():
    assert judge_try(True, True, None, 0.0) == ([(0, 0, 1)], [])
    assert judge_try(False, True, None, 0.0) == ([], ["chosen_failed"])
    assert judge_try(False, False, [0.9, 0.1], 0.0) == ([], ["chosen_failed", "rejected_failed"])
    assert judge_try(True, False, [0.9, 0.1], 0.0) == ([], ["rejected_failed"])
    # The filter passed: the reward check decides, as without a filter.
    assert judge_try(True, True, [0.9, 0.1], 0.5) == ([(0, 0, 1)], [])
    assert judge_try(True, True, [0.5, 0.4], 0.5) == ([], ["gap_below_margin"])
    assert judge_try(True, True, [0.1, 0.9], 0.5) == ([], ["reversed"])


def test_toy_all_correct_is_every_named_attribute_judged_right():
    from diffalign.evaluation import ToyReward, get_reward
    from diffalign.toy.render import render
    from diffalign.toy.world import caption, sample_scenes

    reward = ToyReward()
    rng = np.random.default_rng(5)
    scenes = sample_scenes(24, rng, style_prior=(1, 1, 1))
    images = render(scenes, rng)
    other = {"red": "blue", "blue": "red"}
    prompts = []
    for k, s in enumerate(scenes):
        kind = k % 4
        if kind == 0:
            prompts.append(caption(shape=s.shape, colour=s.colour) + f", {s.style}")  # shape, colour, style
        elif kind == 1:
            prompts.append(f"a {other.get(s.colour, 'red')} {s.shape}")  # a colour the image (mostly) does not have
        elif kind == 2:
            prompts.append(f"a {s.size} {s.shape}")  # shape and size
        else:
            prompts.append("")  # names nothing
    d = reward.details(images, prompts)
    probs = reward.probabilities(images)
    from diffalign.toy.world import parse_caption

    for k, prompt in enumerate(prompts):
        named = {a: v for a, v in parse_caption(prompt).items() if v is not None}
        if not named:
            assert math.isnan(d["all_correct"][k].item())
            continue
        right = all(reward.judge.vocabs[a][int(probs[a][k].argmax())] == v for a, v in named.items())
        assert d["all_correct"][k].item() == float(right), prompt
    values = d["all_correct"][~torch.isnan(d["all_correct"])]
    assert {0.0, 1.0} <= set(values.tolist())  # both outcomes occur: the check above could fail either way
    assert torch.equal(get_reward("toy:term=all_correct").score(images, prompts).nan_to_num(-1), d["all_correct"].nan_to_num(-1))


# -------------------------------------------------------------------------------------------- the filter
@pytest.mark.slow
def test_filter_keeps_exactly_the_pairs_passing_the_rule(tmp_path, pipe):
    out = tmp_path / "f"
    stub = HashReward()
    result = run_pairs(_cfg(out, num_pairs=12, seed=2, shard_size=5), pipe=pipe, filter_reward=stub)
    expected = _expected(out, 12, 1)
    kept = {i for i, (t, _) in expected.items() if t == 0}
    assert 0 < len(kept) < 12  # the stub passes some pairs and fails others
    rows = _rows(out)
    assert set(rows) == kept
    for i, row in rows.items():
        assert row["caption"] == PROMPTS[i % 3] and _chosen_seed(row) == 2 + i
        assert (row["score_0"], row["score_1"]) == (None, None)  # no reward check: no scores
        settings = json.loads(row["settings"])
        assert (settings["filter_reward"], settings["filter_chosen"], settings["filter_rejected"]) == \
            ("hash", list(CHOSEN), list(REJECTED))
    # Each side scored against its filter prompt: the chosen against its own prompt, the rejected against the
    # context prompt (the stub's `striped` term would fail the rejected side otherwise).
    for i in range(12):
        assert (_hash(_image(out / "images/chosen", i)), PROMPTS[i % 3] + ", striped") in stub.seen
        assert (_hash(_image(out / "images/rejected", i)), PROMPTS[i % 3]) in stub.seen
    first = {i: why[0][0] for i, (t, why) in expected.items() if t is None}  # chosen first when both fail
    counted = {why: list(first.values()).count(why) for why in set(first.values())}
    assert result.skipped == counted and sum(counted.values()) == 12 - len(kept)
    assert result.kept_share == pytest.approx(len(kept) / 12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept_share"] == pytest.approx(len(kept) / 12) and summary["skipped"] == counted
    assert summary["tries"] == {"max_tries": 1, "sampled": 12, "kept_on_try": {"1": len(kept)},
                                "failed": _failed_tries(expected)}
    assert summary["candidate_images"] == 24

    # With a reward check too: the filter first, then the margin on the pairs it passed (scored against the
    # chosen prompt, as always). A margin no gap exceeds leaves no pair, each counted by the margin's reason.
    run = run_pairs(_cfg(tmp_path / "m", num_pairs=12, seed=2, reward="hash", margin=1.0, images_dir=str(out / "images")),
                    pipe=StopAfter(pipe, 0), reward=HashReward())
    assert run.pairs == 0 and run.skipped == {**counted, "gap_below_margin": len(kept)}


@pytest.mark.slow
def test_tries_sample_further_seeds_until_a_pair_passes(tmp_path, pipe):
    out = tmp_path / "t"
    result = run_pairs(_cfg(out, num_pairs=9, seed=5, max_tries=4, shard_size=4), pipe=pipe, filter_reward=HashReward())
    expected = _expected(out, 9, 4)
    # Try t of a unit exists exactly when tries 0 .. t-1 failed: only the units that needed it are sampled.
    for t in range(1, 4):
        needed = {i for i, (k, _) in expected.items() if k is None or k >= t}
        for side in ("chosen", "rejected"):
            manifest = read_manifest(out / f"images/{side}_try{t}")
            assert {m["index"] for m in manifest} == needed
            assert all(m["seed"] == 5 + t * STRIDE + m["index"] for m in manifest)  # same seed both sides
    rows = _rows(out)
    kept = {i: t for i, (t, _) in expected.items() if t is not None}
    assert set(rows) == set(kept) and any(t > 0 for t in kept.values())
    for i, row in rows.items():
        assert row["seed_0"] == row["seed_1"] == 5 + kept[i] * STRIDE + i
        assert {row["prompt_0"], row["prompt_1"]} == {PROMPTS[i % 3], PROMPTS[i % 3] + ", striped"}
    # A retried image is what the pipeline makes from its prompt and its try's seed.
    i, t = next((i, t) for i, t in kept.items() if t > 0)
    direct = pipe(prompt=[PROMPTS[i % 3] + ", striped"], num_inference_steps=2, guidance_scale=7.5,
                  generator=[torch.Generator().manual_seed(5 + t * STRIDE + i)]).images[0]
    chosen = rows[i]["jpg_0"] if rows[i]["label_0"] == 1.0 else rows[i]["jpg_1"]
    diff = np.abs(np.asarray(Image.open(io.BytesIO(chosen)).convert("RGB"), dtype=int) - np.asarray(direct, dtype=int))
    assert diff.max() <= 1
    # The counts: tries used, kept pairs by try, failed tries by reason, units never kept by their last reason.
    sampled = sum((t + 1) if t is not None else 4 for t, _ in expected.values())
    failed = _failed_tries(expected)
    never = [whys[-1][0] for t, whys in expected.values() if t is None]
    kept_on = {}
    for t in kept.values():
        kept_on[str(t + 1)] = kept_on.get(str(t + 1), 0) + 1
    assert result.tries == {"max_tries": 4, "sampled": sampled, "kept_on_try": dict(sorted(kept_on.items())),
                            "failed": failed}
    assert result.skipped == {w: never.count(w) for w in set(never)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tries"] == result.tries and summary["candidate_images"] == 2 * sampled
    later = sum(1 for t in kept.values() if t > 0)
    assert f"{len(kept)} pairs from 9 units" in result.summary()
    assert f"tries: {sampled} used (at most 4 a unit), pairs kept on try 1: {len(kept) - later}, on later tries: {later}" \
        in result.summary()


@pytest.mark.slow
def test_target_tries_resample_only_the_model_image(tmp_path, pipe):
    """target: the real image is the same in every try, so a unit whose real image fails is not tried again."""
    from diffalign.toy.render import render
    from diffalign.toy.world import caption, sample_scenes

    rng = np.random.default_rng(1)
    scenes = sample_scenes(8, rng)
    (tmp_path / "set").mkdir()
    lines = []
    for i, (scene, image) in enumerate(zip(scenes, render(scenes, rng))):
        Image.fromarray(image).save(tmp_path / "set" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "caption": caption(scene.shape, scene.colour)}))
    (tmp_path / "set/captions.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "target"
    cfg = _cfg(out, recipe="target", prompt_list=(), chosen_template=None, rejected_template=None, seed=4,
               image_caption_source=str(tmp_path / "set"), filter_chosen=("h >= 0.3",), filter_rejected=("h < 0.5",),
               max_tries=3)
    result = run_pairs(cfg, pipe=pipe, filter_reward=HashReward())
    real_ok = {i: _hash(Image.open(tmp_path / "set" / f"{i}.png")) >= 0.3 for i in range(8)}
    assert 0 < sum(real_ok.values()) < 8
    expected = {}
    for i in range(8):
        tries = [t for t in range(3) if (out / f"images/rejected{'_try%d' % t if t else ''}/{i:05d}.png").is_file()]
        if not real_ok[i]:
            assert tries == [0]  # failed on its real image: no further try
            expected[i] = None
            continue
        passing = [t for t in tries if _hash(_image(out / f"images/rejected{'_try%d' % t if t else ''}", i)) < 0.5]
        expected[i] = passing[0] if passing else None
        assert tries == (list(range(passing[0] + 1)) if passing else [0, 1, 2])  # tried until one passed
    rows = _rows(out)
    assert {i: _chosen_seed(r) for i, r in rows.items()} == {i: None for i, t in expected.items() if t is not None}
    for i, row in rows.items():
        rejected_seed = row["seed_1"] if row["label_0"] == 1.0 else row["seed_0"]
        assert rejected_seed == 4 + expected[i] * STRIDE + i
    assert result.skipped.get("chosen_failed", 0) == 8 - sum(real_ok.values())


@pytest.mark.slow
def test_tries_resume_byte_identically(tmp_path, pipe, monkeypatch):
    kw = dict(num_pairs=10, seed=1, max_tries=3, shard_size=4, batch_size=3)
    whole = tmp_path / "whole"
    run_pairs(_cfg(whole, **kw), pipe=pipe, filter_reward=HashReward())
    assert len(read_manifest(whole / "images/chosen_try2")) > 0  # the run did use a third try

    # Killed while sampling a shard's further tries, after shard 0 was written; then finished.
    cut = tmp_path / "cut"
    calls = {"n": 0}
    real = pairs_tries.sample_units

    def die_after_shard_0(pipe_, folder, units, *a, **k):
        if min(units) >= 4:
            calls["n"] += 1
            if calls["n"] == 2:  # the rejected images of a try: its chosen images are there, these are not
                calls["shard"] = min(units) // 4
                raise Interrupted("killed while sampling a try")
        return real(pipe_, folder, units, *a, **k)

    from diffalign.generation.pairs import run as pairs_module

    monkeypatch.setattr(pairs_module, "sample_units", die_after_shard_0)
    with pytest.raises(Interrupted):
        run_pairs(_cfg(cut, **kw), pipe=pipe, filter_reward=HashReward())
    assert calls["shard"] >= 1
    assert sorted(p.name for p in (cut / "data").glob("*.parquet")) == [f"train-{s:05d}.parquet" for s in range(calls["shard"])]
    monkeypatch.setattr(pairs_module, "sample_units", real)
    result = run_pairs(_cfg(cut, **kw), pipe=pipe, filter_reward=HashReward())
    assert result.reused_shards == 1
    assert _shard_bytes(cut) == _shard_bytes(whole)
    assert json.loads((cut / "summary.json").read_text()) == {**json.loads((whole / "summary.json").read_text()),
                                                               "dataset_name": str(cut)}
    # Finished: nothing sampled, nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in (whole / "data").iterdir()}
    assert run_pairs(_cfg(whole, **kw), pipe=StopAfter(pipe, 0), filter_reward=HashReward()).reused_shards == 3
    assert {p: p.stat().st_mtime_ns for p in (whole / "data").iterdir()} == before

    # Another batch size samples the same units and seeds: the same data (pixel sums may differ by 1/255 on
    # some CPUs, so this compares what is decided, not bytes).
    other = tmp_path / "other"
    run_pairs(_cfg(other, **{**kw, "batch_size": 5}), pipe=pipe, filter_reward=HashReward())
    pick = lambda out: sorted((r["pair_index"], r["seed_0"]) for r in _rows(out).values())  # noqa: E731
    assert pick(other) == pick(whole)


@pytest.mark.slow
def test_changed_filter_or_tries_is_a_changed_config(tmp_path, pipe):
    out = tmp_path / "o"
    run_pairs(_cfg(out, num_pairs=6, max_tries=3), pipe=pipe, filter_reward=HashReward())
    assert (out / "images/chosen_try1").is_dir()  # some unit needed a second try
    with pytest.raises(UserError, match=r"changed: filter_chosen .* -> .*overwrite: true"):
        run_pairs(_cfg(out, num_pairs=6, max_tries=3, filter_chosen=("h >= 0.1",)), pipe=pipe, filter_reward=HashReward())
    with pytest.raises(UserError, match=r"changed: max_tries 3 -> 2"):
        run_pairs(_cfg(out, num_pairs=6, max_tries=2), pipe=pipe, filter_reward=HashReward())
    with pytest.raises(UserError, match=r"changed: filter_reward 'hash' -> 'other'"):
        run_pairs(_cfg(out, num_pairs=6, max_tries=3, filter_reward="other"), pipe=pipe, filter_reward=HashReward())
    # overwrite: the data is made again from the same candidates (further tries too): nothing is sampled.
    result = run_pairs(_cfg(out, num_pairs=6, max_tries=2, overwrite=True), pipe=StopAfter(pipe, 0),
                       filter_reward=HashReward())
    expected = _expected(out, 6, 2)
    assert result.tries["sampled"] == sum((t + 1) if t is not None else 2 for t, _ in expected.values())
    assert set(_rows(out)) == {i for i, (t, _) in expected.items() if t is not None}

    # Another run labelling these images again; a try folder whose image has another seed is refused.
    run_pairs(_cfg(tmp_path / "again", num_pairs=6, max_tries=3, images_dir=str(out / "images")), pipe=StopAfter(pipe, 0),
              filter_reward=HashReward())
    manifest = read_manifest(out / "images/chosen_try1")
    manifest[0]["seed"] += 1
    (out / "images/chosen_try1/manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    with pytest.raises(UserError, match=r"chosen_try1' already holds images of other settings \(prompt .* with seed"):
        run_pairs(_cfg(tmp_path / "y", num_pairs=6, max_tries=3, images_dir=str(out / "images")), pipe=pipe,
                  filter_reward=HashReward())

    # Changed sampling settings with overwrite: the try folders are sampled again too.
    run_pairs(_cfg(out, num_pairs=6, max_tries=3, num_inference_steps=3, overwrite=True), pipe=pipe,
              filter_reward=HashReward())
    assert {m["settings"]["num_inference_steps"] for m in read_manifest(out / "images/chosen_try1")} == {3}


def test_configs_without_the_new_keys_keep_their_fingerprint():
    """Shards made before the filter keys existed stay complete: the fingerprint leaves them out at their defaults."""
    cfg = PairsConfig(recipe="prefix", pretrained_model_name_or_path="toy", prompt_list=("a red square",),
                      chosen_template="{prompt}, striped", rejected_template="{prompt}", output_dir="x")
    assert cfg.fingerprint() == "cb08be95462f0641"  # the value before the keys were added
    assert PairsConfig(**{**vars(cfg), "max_tries": 2, "reward": "toy"}).fingerprint() != \
        PairsConfig(**{**vars(cfg), "reward": "toy"}).fingerprint()


def test_shipped_filtered_config_states_the_toy_rule():
    from diffalign.config_loader import load_config

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(PairsConfig, repo / "configs/pairs/toy_pick_style_filtered.yaml").validate()
    plain = load_config(PairsConfig, repo / "configs/pairs/toy_pick_style.yaml")
    assert cfg.prompt_list == plain.prompt_list and (cfg.chosen_template, cfg.rejected_template) == \
        (plain.chosen_template, plain.rejected_template)
    assert cfg.filter_reward == "toy" and cfg.filter_chosen == ("all_correct >= 1",)
    assert cfg.filter_rejected == ("all_correct >= 1", "style_striped < 0.5") and cfg.max_tries > 1


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--filter_reward=none"], "need filter_reward"),
        (["--filter_chosen=[]", "--filter_rejected=[]"], "nothing to check"),
        (["--filter_chosen=[all_correct = 1]"], "filter_chosen: 'all_correct = 1' is not a condition TERM OP NUMBER"),
        (["--filter_rejected=[style_striped < low]"], "filter_rejected: 'style_striped < low' is not a condition"),
        (["--filter_chosen=[stripes >= 1]"], "filter_chosen: 'stripes' is not a term of reward 'toy'"),
        (["--max_tries=0"], "max_tries must be at least 1"),
        (["--filter_reward=none", "--filter_chosen=[]", "--filter_rejected=[]", "--max_tries=3"], "there is no check"),
        (["--recipe=ranked", "--chosen_template=none", "--rejected_template=none", "--reward=toy"],
         "filter_reward applies to recipes prefix and target"),
        (["--recipe=ranked", "--chosen_template=none", "--rejected_template=none", "--reward=toy", "--filter_reward=none",
          "--filter_chosen=[]", "--filter_rejected=[]", "--max_tries=2"], "max_tries applies to recipes prefix and target"),
        (["--filter_reward=nosuch"], "unknown reward 'nosuch'"),
    ],
)
def test_bad_filter_configs_fail_before_the_model_loads(tmp_path, capsys, overrides, expected):
    config = tmp_path / "c.yaml"
    config.write_text("recipe: prefix\npretrained_model_name_or_path: /no/such/model\nprompt_list: [a red square]\n"
                      "chosen_template: '{prompt}, striped'\nrejected_template: '{prompt}'\nfilter_reward: toy\n"
                      "filter_chosen: ['all_correct >= 1']\nfilter_rejected: ['all_correct >= 1', 'style_striped < 0.5']\n"
                      "max_tries: 2\n")
    assert main(["pairs", str(config), f"--output_dir={tmp_path / 'o'}", *overrides]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("diffalign pairs: error: "), err
    assert expected in errors[0] and "/no/such/model" not in errors[0], err


def test_help_config_lists_the_filter_keys(capsys):
    assert main(["pairs", "--help-config"]) == 0
    text = capsys.readouterr().out
    for key in ("filter_reward", "filter_chosen", "filter_rejected", "max_tries"):
        assert f"--{key} " in text
