"""Issue 9: bad configs fail before any model loads, naming the key; bad data stops (strict) with row, column
and reason, or is skipped, counted and reported (lenient); dataset paths cannot leave their folder."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from diffalign.errors import UserError


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: every config error must be found before one."""
    import diffalign.models
    from diffalign.training import setup

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was found")

    monkeypatch.setattr(setup, "load_family", refuse)
    monkeypatch.setattr(diffalign.models, "load_family", refuse)


def _train_cli(tmp_path, capsys, text: str, *overrides: str) -> str:
    from diffalign.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(text)
    code = main(["train", str(path), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("diffalign train: error: ") and err.count("\n") == 1  # one line, no traceback
    return err


def _base(tmp_path, **changes) -> str:
    cfg = {"method": "mapo", "pretrained_model_name_or_path": "toy", "dataset_name": "pairs.parquet",
           "output_dir": str(tmp_path / "run"), "report_to": "none"}
    cfg.update(changes)
    return yaml.safe_dump({k: v for k, v in cfg.items() if v != "<drop>"}, sort_keys=False)


CONFIG_CORPUS = [
    # (changes to a valid MaPO config, substrings the one-line error must contain)
    ({"learning_rat": 1e-4}, ["unknown config key 'learning_rat'", "did you mean 'learning_rate'"]),
    ({"train_batch_size": "four"}, ["'train_batch_size'", "expected int, got 'four'"]),
    ({"mixed_precision": "fp23"}, ["'mixed_precision'", "expected one of no, fp16, bf16"]),
    ({"method": "<drop>"}, ["method is not set"]),
    ({"rank": 0}, ["rank must be >= 1"]),
    ({"learning_rate": -1e-4}, ["learning_rate must be > 0"]),
    ({"learning_rate": float("inf")}, ["learning_rate must be a finite number"]),
    ({"train_batch_size": 0}, ["train_batch_size must be >= 1"]),
    ({"checkpoints_total_limit": 0}, ["checkpoints_total_limit must be >= 1"]),
    ({"checkpointing_steps": 0}, ["checkpointing_steps must be >= 1"]),
    ({"max_consecutive_nonfinite": 0}, ["max_consecutive_nonfinite must be >= 1"]),
    ({"resolution": 30}, ["resolution must be a positive multiple of 8"]),
    ({"max_train_samples": 2, "train_batch_size": 4}, ["max_train_samples=2 is smaller than one batch"]),
    ({"lr_warmup_steps": 10}, ["lr_warmup_steps=10 has no effect with lr_scheduler=constant"]),
    ({"min_image_size": 0}, ["min_image_size must be >= 1"]),
    # Contradictions: MaPO has no reference model, so nothing that configures one applies to it.
    ({"beta": 5000}, ["beta does not apply to mapo_preset=official"]),
    ({"loss_type": "hinge"}, ["loss_type=hinge only applies to DPO/NPO with a reference"]),
    ({"npo_objective": "mapo"}, ["npo_objective=mapo only applies to method=npo"]),
    ({"use_ema": True}, ["use_ema applies to train_mode=full"]),
    ({"method": "dpo"}, ["beta is required for DPO"]),
    ({"method": "dpo", "beta": 2000, "dataset_name": "toy"}, ["dataset_name=toy", "only method=selfnpo"]),
    # Self-NPO learns without preference labels: preference-data settings contradict it.
    ({"method": "selfnpo", "ties": "error"}, ["ties=error is about preference pairs"]),
    ({"method": "selfnpo", "label_columns": ["label_0", "score"]}, ["label_columns=", "method=selfnpo"]),
    ({"method": "selfnpo", "selfnpo_start": "images", "dataset_name": "toy", "image_columns": ["image"]},
     ["dataset_name=toy gives prompts only"]),
    ({"method": "sft", "teacher_steps": 3}, ["teacher_steps=3 only applies to method=selfnpo"]),
    ({"resume_from_checkpoint": "/no/such/checkpoint-5"}, ["resume_from_checkpoint", "not an existing checkpoint"]),
]


CONFIG_IDS = ["unknown_key", "wrong_type_int", "wrong_literal", "missing_method", "lora_rank_0", "negative_lr",
              "infinite_lr", "batch_0", "checkpoint_limit_0", "checkpointing_steps_0", "max_consecutive_nonfinite_0",
              "resolution_30", "max_train_samples_below_batch", "warmup_with_constant", "min_image_size_0",
              "mapo_with_beta", "mapo_with_loss_type", "npo_objective_without_npo", "ema_with_lora", "dpo_without_beta",
              "dpo_with_toy_prompts", "selfnpo_with_ties", "selfnpo_with_label_columns",
              "selfnpo_images_from_toy_prompts", "sft_with_teacher_steps", "resume_missing_folder"]


@pytest.mark.parametrize("changes,expected", CONFIG_CORPUS, ids=CONFIG_IDS)
def test_bad_config_fails_before_any_model_loads(tmp_path, capsys, no_model_load, changes, expected):
    err = _train_cli(tmp_path, capsys, _base(tmp_path, **changes))
    for text in expected:
        assert text in err


@pytest.mark.parametrize("text,overrides,expected", [
    ("method: mapo\nlearning_rate: 1e-4\nlearning_rate: 2e-4\n", [], "key 'learning_rate' is given twice (line 3)"),
    ("method: [mapo\n", [], "is not valid YAML"),
    ("- method: mapo\n", [], "must be a mapping of key: value lines"),
    ("method: mapo\n", ["--max_train_step=3"], "unknown config key 'max_train_step' on the command line; did you mean"),
    ("method: mapo\n", ["--learning_rate=fast"], "config key 'learning_rate' on the command line: expected float"),
    ("method: mapo\n", ["--seed"], "override '--seed' on the command line needs a value"),
], ids=["duplicate_key", "yaml_syntax", "yaml_not_a_mapping", "unknown_override", "wrong_type_override",
        "override_without_value"])
def test_bad_yaml_and_overrides_fail_before_any_model_loads(tmp_path, capsys, no_model_load, text, overrides,
                                                            expected):
    assert expected in _train_cli(tmp_path, capsys, text, *overrides)


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path, capsys, no_model_load):
    ckpt = tmp_path / "run" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"global_step": 4, "files": {}}))
    err = _train_cli(tmp_path, capsys, _base(tmp_path))
    assert "already holds checkpoints of an earlier run (newest: checkpoint-4)" in err
    assert "--resume_from_checkpoint=latest" in err


def test_an_unwritable_output_dir_fails_before_any_model_loads(tmp_path, capsys, no_model_load):
    (tmp_path / "file").write_text("")
    err = _train_cli(tmp_path, capsys, _base(tmp_path, output_dir=str(tmp_path / "file" / "run")))
    assert "is not writable" in err and "--output_dir" in err


# ------------------------------------------------------------------------------------------------ bad data
def _png(side: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, format="PNG")
    return buf.getvalue()


GOOD = ("a red square", _png(32), _png(32, (30, 30, 200)), 1.0, 0.0)


def _parquet(path: Path, rows, drop=()) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
    cols = {n: [r[i] for r in rows] for i, n in enumerate(names) if n not in drop}
    pq.write_table(pa.table(cols), path)
    return path


# One broken row (row 1) per dataset, between good rows: (row, extra config, expected message).
DATA_CORPUS = {
    "undecodable": (("x", _png(32), b"\x89PNG\r\n\x1a\n garbage", 1.0, 0.0), {}, "row 1, column 'jpg_1': undecodable_image"),
    "label_2": (("x", _png(32), _png(32), 2.0, -1.0), {}, "row 1, column 'label_0': bad_label (labels (2, -1)"),
    "label_0.3": (("x", _png(32), _png(32), 0.3, 0.7), {}, "row 1, column 'label_0': bad_label"),
    "label_missing": (("x", _png(32), _png(32), None, 1.0), {}, "row 1, column 'label_0': bad_label (labels (missing, 1)"),
    "caption_missing": ((None, _png(32), _png(32), 1.0, 0.0), {}, "row 1, column 'caption': missing_caption"),
    "image_missing": (("x", None, _png(32), 0.0, 1.0), {}, "row 1, column 'jpg_0': missing_image"),
    "too_small": (("x", _png(8), _png(32), 1.0, 0.0), {"min_image_size": 32}, "row 1, column 'jpg_0': image_too_small"),
    "tie": (("x", _png(32), _png(32), 0.5, 0.5), {"ties": "error"}, "row 1 is a tie"),
}


def _train_cfg(model, data, out, **kw):
    from diffalign.training.config import TrainConfig

    base = dict(method="mapo", pretrained_model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out),
                resolution=32, train_batch_size=2, max_train_steps=2, learning_rate=1e-3, rank=4, seed=0,
                report_to="none", checkpointing_steps=1000)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("case", list(DATA_CORPUS))
@pytest.mark.slow
def test_strict_data_stops_naming_row_column_and_reason(tiny_pipelines, tmp_path, case):
    from diffalign.training.loop import train

    row, extra, expected = DATA_CORPUS[case]
    data = _parquet(tmp_path / f"{case}.parquet", [GOOD, row, GOOD, GOOD])
    with pytest.raises(UserError) as info:
        train(_train_cfg(tiny_pipelines["sd"], data, tmp_path / "run", strict_data=True, **extra))
    assert expected in str(info.value) and f"{case}.parquet" in str(info.value)


def test_missing_column_is_named_with_the_columns_present(tiny_pipelines, tmp_path):
    from diffalign.training.loop import train

    data = _parquet(tmp_path / "nolabel.parquet", [GOOD] * 4, drop=("label_1",))
    with pytest.raises(UserError, match=r"has no column 'label_1'; columns present: caption, jpg_0, jpg_1, label_0"):
        train(_train_cfg(tiny_pipelines["sd"], data, tmp_path / "run"))


@pytest.mark.slow
def test_lenient_data_skips_counts_and_reports_every_reason(tiny_pipelines, tmp_path, capsys):
    from diffalign.training.loop import train

    rows = [GOOD, GOOD, GOOD, ("", _png(32), _png(32), 0.0, 1.0)]  # an empty caption is kept (and counted)
    rows += [DATA_CORPUS[c][0] for c in ("undecodable", "too_small")]  # found when fetched
    rows += [DATA_CORPUS[c][0] for c in ("label_2", "label_0.3", "caption_missing", "image_missing", "tie")]
    data = _parquet(tmp_path / "mixed.parquet", rows)
    # 6 pairs survive the up-front checks: batch 2 x 3 steps fetches every one of them once.
    out = train(_train_cfg(tiny_pipelines["sd"], data, tmp_path / "run", max_train_steps=3, min_image_size=32))
    counts = json.loads((out / "train_report.json").read_text())["data"]
    assert counts["rows"] == 11 and counts["pairs"] == 6 and counts["usable_pairs"] == 4
    assert (counts["bad_label"], counts["missing_caption"], counts["missing_image"], counts["tie"]) == (2, 1, 1, 1)
    assert (counts["undecodable_image"], counts["image_too_small"], counts["empty_caption"]) == (1, 1, 1)
    skipped_up_front = sum(counts[k] for k in ("tie", "bad_label", "missing_caption", "bad_caption", "missing_image"))
    assert counts["pairs"] + skipped_up_front == counts["rows"]
    assert counts["usable_pairs"] + counts["undecodable_image"] + counts["image_too_small"] == counts["pairs"]
    log = capsys.readouterr().out
    assert "skipped 1 tie, 2 bad_label, 1 missing_caption, 1 missing_image" in log
    assert "skipped at fetch 1 undecodable_image, 1 image_too_small" in log


@pytest.mark.slow
def test_no_usable_rows_is_a_clear_error(tiny_pipelines, tmp_path):
    from diffalign.training.loop import train

    data = _parquet(tmp_path / "bad.parquet", [DATA_CORPUS["label_2"][0]] * 3)
    with pytest.raises(UserError, match=r"0 usable rows.*nothing to train on .*3 rows -> 0 pairs; skipped 3 bad_label"):
        train(_train_cfg(tiny_pipelines["sd"], data, tmp_path / "run"))


# ------------------------------------------------------------------------------------ paths inside datasets
def _image_folder(root: Path, names: list[str]) -> Path:
    for sub in ("w", "l"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "w" / "ok.png").write_bytes(_png(32))
    (root / "l" / "ok.png").write_bytes(_png(32))
    entries = [{"file_name": "ok.png", "caption": "fine"}] + [{"file_name": n, "caption": "x"} for n in names]
    (root / "captions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return root


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "symlinked_folder"])
def test_image_folder_paths_cannot_escape_the_dataset_folder(tmp_path, kind, strict):
    from diffalign.data import load_pairs

    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(32))
    root = tmp_path / "data"
    name = {"dotdot": "../secret.png", "absolute": str(outside), "symlink": "link.png",
            "symlinked_folder": "sub/secret.png"}[kind]
    _image_folder(root, [name])
    if kind == "symlink":
        os.symlink(outside, root / "w" / "link.png")
        (root / "l" / "link.png").write_bytes(_png(32))
    if kind == "symlinked_folder":
        os.symlink(tmp_path, root / "w" / "sub")
    reason = {"dotdot": "a path with '..'", "absolute": "an absolute path", "symlink": f"a symlink to {outside}",
              "symlinked_folder": f"a symlink to {outside}"}[kind]
    with pytest.raises(UserError) as info:
        load_pairs(str(root), strict=strict, cache_dir=tmp_path / "hf")
    assert f"row 1 of captions.jsonl names {name!r}, {reason} outside the dataset folder" in str(info.value)


def test_symlinks_inside_the_dataset_folder_are_fine(tmp_path):
    from diffalign.data import load_pairs

    root = _image_folder(tmp_path / "data", ["same.png"])
    os.symlink(root / "w" / "ok.png", root / "w" / "same.png")  # reuse a file: stays inside
    os.symlink(root / "l" / "ok.png", root / "l" / "same.png")
    pairs = load_pairs(str(root), strict=True, cache_dir=tmp_path / "hf")
    assert len(pairs) == 2 and pairs[1]["image_w"].size == (32, 32)
