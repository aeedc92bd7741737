"""Issue 9, property-based (hypothesis): the config loader and the preference-pair parser on random input."""

from __future__ import annotations

import dataclasses
import io
import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffalign.config_loader import _is_optional, _sequence_item, dump_config, load_config, parse_overrides
from diffalign.errors import UserError
from diffalign.training.config import TrainConfig

FIELDS = {f.name: typing.get_type_hints(TrainConfig)[f.name] for f in dataclasses.fields(TrainConfig) if f.init}
NONE_WORDS = ("none", "null", "~")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------------------------- config loader
def _scalar(tp, optional: bool):
    if typing.get_origin(tp) is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-(2 ** 63), 2 ** 63)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if tp is str:
        text = st.text(max_size=20)
        # Documented limit: a string field that may be none reads the words none/null/~ as none (the command
        # line needs that), so those strings cannot round-trip there.
        return text.filter(lambda s: s.strip().lower() not in NONE_WORDS) if optional else text
    raise AssertionError(f"no strategy for {tp!r}")


def _value(tp):
    optional, inner = _is_optional(tp)
    item = _sequence_item(inner)
    if item is not None:
        seq = st.lists(_scalar(item, False), max_size=4)
        strategy = seq.map(tuple) if typing.get_origin(inner) is tuple else seq
    else:
        strategy = _scalar(inner, optional)
    return st.one_of(st.none(), strategy) if optional else strategy


CONFIGS = st.fixed_dictionaries({name: _value(tp) for name, tp in FIELDS.items()}).map(lambda kw: TrainConfig(**kw))


@SETTINGS
@given(cfg=CONFIGS)
@pytest.mark.slow
def test_dump_then_load_gives_the_same_config(tmp_path, cfg):
    assert load_config(TrainConfig, dump_config(cfg, tmp_path / "config.yaml")) == cfg


def _normalised_unknown(key: str) -> bool:
    return key.strip().replace("-", "_") not in FIELDS


UNKNOWN_KEYS = st.text(min_size=1, max_size=30).filter(
    lambda k: "=" not in k and not k.startswith("-") and k.strip() and _normalised_unknown(k))


@SETTINGS
@given(key=UNKNOWN_KEYS, value=st.one_of(st.integers(), st.text(max_size=5), st.booleans()))
@pytest.mark.slow
def test_an_unknown_key_is_always_refused_naming_it(tmp_path, key, value):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": "mapo", key: value}))
    with pytest.raises(UserError) as info:
        load_config(TrainConfig, path)
    assert f"unknown config key {_shown(key.replace('-', '_'))} in '{path}'" in str(info.value)
    with pytest.raises(UserError) as info:
        load_config(TrainConfig, None, [f"--{key}=1"])
    assert f"unknown config key {_shown(key.strip().replace('-', '_'))} on the command line" in str(info.value)


def _shown(key: str) -> str:
    """How the message shows a key: its repr, cut at 120 characters with the length said (escapes make a
    30-character key's repr longer than that)."""
    text = repr(key)
    return text if len(text) <= 120 else f"{text[:120]}... ({len(text)} characters)"


KEYS = st.from_regex(r"[a-z][a-z0-9_-]{0,15}", fullmatch=True)
VALUES = st.text(max_size=12).filter(lambda v: not v.startswith("--"))


@SETTINGS
@given(items=st.lists(st.tuples(KEYS, VALUES, st.sampled_from(["--k=v", "k=v", "--k v"])), max_size=6),
       flag=st.one_of(st.none(), st.sampled_from(["use_ema", "random-flip"])))
@pytest.mark.slow
def test_override_forms_parse_to_the_same_pairs(items, flag):
    args, expected = [], []
    for key, value, form in items:
        if form == "--k v":
            args += [f"--{key}", value]
        else:
            args.append(f"--{key}={value}" if form == "--k=v" else f"{key}={value}")
        expected.append((key.replace("-", "_"), value))
    if flag:  # a bare boolean flag at the end means true
        args.append(f"--{flag}")
        expected.append((flag.replace("-", "_"), "true"))
    assert parse_overrides(args, bool_keys={"use_ema", "random_flip"}) == expected


@SETTINGS
@given(value=st.floats(allow_nan=False, allow_infinity=False), as_text=st.booleans())
def test_float_overrides_read_back_exactly(value, as_text):
    cfg = load_config(TrainConfig, None, [f"--learning_rate={value!r}" if as_text else f"--learning_rate={value}"])
    assert cfg.learning_rate == value


# ------------------------------------------------------------------------------------------------ pair parser
GREEN, BLUE = (10, 200, 30), (10, 30, 200)


def _png(side: int, colour=GREEN) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, format="PNG")
    return buf.getvalue()


GOOD, GOOD_BLUE, SMALL, JUNK = _png(16), _png(16, BLUE), _png(4), b"\xff\xd8 not a jpeg"
COLOUR = {GOOD: GREEN, GOOD_BLUE: BLUE}
LABELS = st.sampled_from([0.0, 0.5, 1.0, 0.0, 1.0, None, 2.0, -1.0, 0.3, math.nan, math.inf])
IMAGES = st.sampled_from([GOOD, GOOD_BLUE, GOOD, GOOD_BLUE, SMALL, JUNK, None])
CAPTIONS = st.one_of(st.none(), st.text(max_size=8))
ROWS = st.lists(st.tuples(CAPTIONS, IMAGES, IMAGES, LABELS, LABELS), min_size=1, max_size=12)


def _oracle(row) -> tuple[str | None, int | None]:
    """(reason the row is skipped up front or None, which image is the winner) - written from the spec."""
    caption, img0, img1, l0, l1 = row
    if caption is None:
        return "missing_caption", None
    valid = {0.0, 0.5, 1.0}
    if l0 not in valid or l1 not in valid or l0 + l1 != 1.0:
        return "bad_label", None
    if img0 is None or img1 is None:
        return "missing_image", None
    if l0 == 0.5:
        return "tie", None
    return None, 0 if l0 == 1.0 else 1


def _fetch_reason(row, winner: int) -> str | None:
    for image in (row[1 + winner], row[2 - winner]):  # the winner is decoded first
        if image == JUNK:
            return "undecodable_image"
        if image == SMALL:
            return "image_too_small"
    return None


def _dataset(rows):
    import datasets

    names = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Value("binary"),
                                  "jpg_1": datasets.Value("binary"), "label_0": datasets.Value("float64"),
                                  "label_1": datasets.Value("float64")})
    return datasets.Dataset.from_dict({n: [r[i] for r in rows] for i, n in enumerate(names)}, features=features)


@SETTINGS
@given(rows=ROWS)
@pytest.mark.slow
def test_lenient_parser_keeps_valid_rows_and_counts_every_skip(rows):
    from collections import Counter

    from diffalign.data import load_pairs

    pairs = load_pairs(_dataset(rows), min_size=8)
    expected = [_oracle(r) for r in rows]
    kept = [i for i, (reason, _) in enumerate(expected) if reason is None]
    assert [pairs.row(i) for i in range(len(pairs))] == kept
    pairs.validate_images(progress=False)
    report = pairs.report()
    want = Counter(reason for reason, _ in expected if reason)
    want.update(_fetch_reason(rows[i], expected[i][1]) for i in kept)
    for reason in ("missing_caption", "bad_label", "missing_image", "tie", "undecodable_image", "image_too_small"):
        assert report[reason] == want[reason], reason
    assert report["rows"] == len(rows) and report["pairs"] == len(kept)
    up_front = sum(report[k] for k in ("missing_caption", "bad_caption", "bad_label", "missing_image", "tie"))
    assert report["pairs"] + up_front == report["rows"]  # kept + skipped == total
    assert report["usable_pairs"] + report["undecodable_image"] + report["image_too_small"] == report["pairs"]
    for n, i in enumerate(kept):  # usable pairs come out with the caption and the winner the labels name
        item, winner = pairs[n], expected[i][1]
        if isinstance(item, dict):
            assert item["caption"] == rows[i][0] and item["row"] == i
            assert item["image_w"].getpixel((0, 0)) == COLOUR[rows[i][1 + winner]]
            assert item["image_l"].getpixel((0, 0)) == COLOUR[rows[i][2 - winner]]


@SETTINGS
@given(rows=ROWS)
@pytest.mark.slow
def test_strict_parser_stops_at_the_first_bad_row(rows):
    from diffalign.data import load_pairs

    reasons = [_oracle(r)[0] for r in rows]
    first = next((i for i, r in enumerate(reasons) if r not in (None, "tie")), None)
    if first is not None:
        with pytest.raises(UserError, match=rf"row {first}, column '[^']+': {reasons[first]} "):
            load_pairs(_dataset(rows), strict=True, min_size=8)
        return
    pairs = load_pairs(_dataset(rows), strict=True, min_size=8)
    kept = [i for i, r in enumerate(reasons) if r is None]
    for n, i in enumerate(kept):
        bad = _fetch_reason(rows[i], _oracle(rows[i])[1])
        if bad:
            with pytest.raises(UserError, match=rf"row {i}, column 'jpg_[01]': {bad} "):
                pairs[n]
            return
        assert pairs[n]["row"] == i
