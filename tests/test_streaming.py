"""streaming: true, on local parquet files read through the streaming path (load_dataset(..., streaming=True)
works offline): the same rows and counts as without streaming, and exact resume."""

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from diffalign.data import load_pairs
from diffalign.data.streaming import StreamingPairs
from diffalign.errors import UserError
from diffalign.toy.render_pairs import write_pairs_parquet


@pytest.fixture(scope="module")
def flawed_pairs(tmp_path_factory):
    """24 style pairs, of which row 2 is a tie, row 5 has a bad label, row 7 no caption and row 11 a broken image."""
    folder = tmp_path_factory.mktemp("stream")
    good = write_pairs_parquet(folder / "good.parquet", 24, kind="style", seed=3)
    table = pq.read_table(good).to_pydict()
    table["label_0"][2] = table["label_1"][2] = 0.5
    table["label_0"][5] = 2.0
    table["caption"][7] = None
    table["jpg_1"][11] = b"not an image"
    path = folder / "flawed.parquet"
    pq.write_table(pa.table(table), path)
    return path


def _rows(pairs, items):
    """(stream or dataset row, caption, digest of both images) of every pair, in order; None for a failed fetch."""
    out = []
    for item in items:
        if item is None:
            out.append(None)
            continue
        digest = hashlib.sha256(item["image_w"].tobytes() + item["image_l"].tobytes()).hexdigest()[:16]
        out.append((item["row"], item["caption"], digest))
    return out


def _streamed(stream: StreamingPairs, epoch=0):
    return _rows(stream, [stream.fetch(ref, epoch) for ref in stream.refs(epoch)])


def _whole(pairs):
    return _rows(pairs, [None if not isinstance(pairs[i], dict) else pairs[i] for i in range(len(pairs))])


@pytest.mark.slow
def test_streaming_reads_the_rows_and_counts_of_the_whole_dataset(flawed_pairs):
    whole = load_pairs(str(flawed_pairs))
    expected = _whole(whole)
    assert len(expected) == 21 and expected.count(None) == 1  # tie, bad label, no caption dropped; row 11 fails

    in_order = StreamingPairs(str(flawed_pairs), shuffle_buffer_size=0, chunk_rows=5)
    assert _streamed(in_order) == expected  # the same rows, in the same order, chunk boundaries and all
    assert in_order.report() == whole.report()
    assert in_order.report()["tie"] == 1 and in_order.report()["bad_label"] == 1
    assert in_order.report()["missing_caption"] == 1 and in_order.report()["undecodable_image"] == 1
    assert "streamed: 24 rows read -> 21 pairs" in in_order.summary()

    shuffled = StreamingPairs(str(flawed_pairs), shuffle_buffer_size=4, seed=1, chunk_rows=5)
    first = _streamed(shuffled)
    content = lambda rows: sorted(str(r[1:]) if r else "failed" for r in rows)  # rows count positions in the stream
    assert first != expected and content(first) == content(expected)  # the same pairs, in another order
    assert _streamed(StreamingPairs(str(flawed_pairs), shuffle_buffer_size=4, seed=1, chunk_rows=7)) == first
    assert _streamed(shuffled, epoch=1) != first  # the next epoch reshuffles
    assert shuffled.report() == whole.report()  # each row counted once over epochs

    head = StreamingPairs(str(flawed_pairs), shuffle_buffer_size=0, max_samples=10)
    assert _streamed(head) == _whole(load_pairs(str(flawed_pairs), max_samples=10))
    assert head.report()["rows"] == 10


def test_streaming_strict_names_the_row_of_the_stream(flawed_pairs):
    stream = StreamingPairs(str(flawed_pairs), shuffle_buffer_size=0, chunk_rows=4, strict=True)
    # the tie (row 2) is dropped as without streaming; row 5 (the second chunk's second row) is the first bad one
    with pytest.raises(UserError, match=r"parquet .*flawed.parquet.*: row 5 of the stream, column 'label_0': bad_label"):
        list(stream.refs(0))
    with pytest.raises(UserError, match=r"row 5, column 'label_0': bad_label"):
        load_pairs(str(flawed_pairs), strict=True)
    with pytest.raises(UserError, match="has no column 'jpg_9'"):
        StreamingPairs(str(flawed_pairs), image_columns=("jpg_0", "jpg_9"))


def _cfg(model, data, out, **kw):
    from diffalign.training.config import TrainConfig

    base = dict(method="dpo", beta=5000.0, pretrained_model_name_or_path=str(model), dataset_name=str(data),
                output_dir=str(out), resolution=32, train_batch_size=2, gradient_accumulation_steps=2,
                max_train_steps=4, learning_rate=1e-3, rank=4, seed=0, report_to="none", checkpointing_steps=2,
                streaming=True, shuffle_buffer_size=4, max_train_samples=10)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_streaming_run_resumed_gives_the_weights_of_an_uninterrupted_run(tiny_pipelines, flawed_pairs, tmp_path,
                                                                         capsys):
    import json

    from diffalign.training.loop import train

    # 10 rows (a tie, a bad label and a missing caption among them: 7 pairs, 3 micro-batches of 2 an epoch, the
    # odd pair dropped): the 8 micro-batches of 4 steps run into the third epoch, each reshuffled.
    straight = train(_cfg(tiny_pipelines["sd"], flawed_pairs, tmp_path / "straight"))
    assert "a stream of pairs" in capsys.readouterr().out
    interrupted = tmp_path / "resumed"
    train(_cfg(tiny_pipelines["sd"], flawed_pairs, interrupted, max_train_steps=3))
    resumed = train(_cfg(tiny_pipelines["sd"], flawed_pairs, interrupted,
                         resume_from_checkpoint=str(interrupted / "checkpoint-2")))
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    data = json.loads((straight / "train_report.json").read_text())["data"]
    assert data["rows"] == 10 and data["pairs"] == 7 and data["tie"] == 1 and data["bad_label"] == 1
    assert data["missing_caption"] == 1

    # not streamed, the same rows give other weights (another order): the stream really was what trained
    whole = train(_cfg(tiny_pipelines["sd"], flawed_pairs, tmp_path / "whole", streaming=False))
    c = load_file(whole / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_streaming_keys_are_checked(tmp_path):
    with pytest.raises(UserError, match="latent cache"):
        _cfg("toy", "x.parquet", tmp_path / "r", use_cache=True).validate()
    with pytest.raises(UserError, match="shuffle_buffer_size must be >= 0"):
        _cfg("toy", "x.parquet", tmp_path / "r", shuffle_buffer_size=-1).validate()
    with pytest.raises(UserError, match="data_files selects files of a hub dataset"):
        StreamingPairs(str(tmp_path), data_files=("data/*.parquet",))
