"""One prompt reader (`diffalign.data.prompts.read_prompts`) behind the three commands that take prompts: the same
source gives the same prompts to `diffalign train` (Self-NPO's data-free start), `diffalign pairs` and
`diffalign generate`."""

from __future__ import annotations

import argparse
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffalign.commands.generate import prompts_of
from diffalign.errors import UserError
from diffalign.generation import PairsConfig
from diffalign.generation.pairs.config import resolve_prompts
from diffalign.toy.prompts import toy_prompts
from diffalign.training.selfnpo_data import load_selfnpo_data


def read_three_ways(source: str) -> tuple[list[str], list[str], list[str]]:
    """The prompts train, pairs and generate read from `source`, each through its own entry point."""
    cfg = types.SimpleNamespace(selfnpo_start="noise", dataset_name=source, caption_column="caption",
                                dataset_split_name="train", max_train_samples=None)
    items = load_selfnpo_data(cfg, resolution=32).items
    train = [items.item(i, 0)["caption"] for i in range(len(items))]
    pairs = resolve_prompts(PairsConfig(prompts=source))
    generate = prompts_of(argparse.Namespace(prompt=None, prompts=source))
    return train, pairs, generate


def _same(source) -> list[str]:
    train, pairs, generate = read_three_ways(str(source))
    assert train == pairs == generate
    return train


def test_train_pairs_and_generate_read_a_source_alike(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\n  a blue square  \na red circle\n")
    assert _same(text) == ["a red circle", "a blue square", "a red circle"]  # a file is read as written

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a red circle"}\n{"caption": "a green diamond"}\n\n{"prompt": ""}\n')
    assert _same(jsonl) == ["a red circle", "a green diamond", ""]  # `caption` (the column) or `prompt`

    braces = tmp_path / "rows.txt"  # JSONL by its first line, whatever the suffix
    braces.write_text('{"prompt": "a small red circle"}\n')
    assert _same(braces) == ["a small red circle"]

    table = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"caption": ["b", "a", "b", None, "c"]}), table)
    assert _same(table) == ["b", "a", "b", "c"]  # a table's column row by row, missing values skipped
    assert _same(f"hf:{table}::caption") == ["b", "a", "c"]  # a prompt set: each prompt once

    assert _same("toy:heldout") == toy_prompts("heldout")
    assert _same("toy") == _same("toy:train") == toy_prompts("train")


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\nnot json\n', r"p.jsonl:2: not valid JSON"),
    ('{"prompt": 3}\n', r"p.jsonl:1: no string 'caption' \(or 'prompt'\) field"),
    ("\n\n", "holds no prompts"),
])
def test_train_pairs_and_generate_refuse_a_bad_file_alike(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    for read in (lambda: read_three_ways(str(path))[0], lambda: resolve_prompts(PairsConfig(prompts=str(path))),
                 lambda: prompts_of(argparse.Namespace(prompt=None, prompts=str(path)))):
        with pytest.raises(UserError, match=message):
            read()


def test_a_missing_prompts_file_is_named(tmp_path):
    with pytest.raises(UserError, match="prompts file .*missing.txt' does not exist"):
        prompts_of(argparse.Namespace(prompt=None, prompts=str(tmp_path / "missing.txt")))
