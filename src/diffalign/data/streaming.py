"""Preference pairs read as a stream (``streaming: true``): Pick-a-Pic v2 is about half a terabyte, and a run of
2000 steps x 128 pairs reads a fraction of it. The rows come from ``datasets.load_dataset(..., streaming=True)``
(a hub dataset, optionally only some of its files with ``data_files``; parquet files; a folder of parquet files),
are validated by the same code as without streaming (``load_pairs``, run on each chunk of rows as it arrives: the
same reasons, the same counts, the same strict errors, naming the row's position in the stream), and go to
training in stream order, or through a shuffle buffer seeded by (seed + epoch).

Order and resume: micro-batch m of the run is the m-th run of ``train_batch_size x processes`` usable pairs of
the stream (an incomplete last batch of an epoch is dropped, and the next epoch reshuffles), each process keeping
its rows ``rank::world`` as ``BatchStream`` does; a pair's augmentation is seeded by (seed, epoch, its position
in the epoch). So the batches are a function of (seed, micro-batch) only, and a resumed run reaches its position
by reading the stream from the start again, validating rows but decoding no image: it trains on exactly the
batches an uninterrupted run does (the cost: the rows before the position are read once more).
"""

from __future__ import annotations

import glob
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import UserError
from .pairs import FETCH_REASONS, ROW_REASONS, count_parts, is_skipped, load_pairs
from .prefetch import Prefetching
from .transforms import deterministic_rng

_GLOB_CHARS = set("*?[")
_MEMORY = "in-memory dataset"


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def open_row_stream(dataset_name: str, *, split: str, data_files: Sequence[str] = ()) -> tuple[Any, str]:
    """(a ``datasets.IterableDataset`` of the raw rows, its description for messages)."""
    import datasets

    text = os.fspath(dataset_name)
    path = Path(text).expanduser()
    local = path.exists() or bool(_GLOB_CHARS & set(text))
    if data_files and local:
        raise UserError(f"data_files selects files of a hub dataset; {text!r} is local: give its files as "
                        "dataset_name (a parquet file or a glob such as 'data/train-*.parquet') and no data_files")
    if path.is_file() or (_GLOB_CHARS & set(text) and not path.exists()):
        files = [path] if path.is_file() else sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        if not files:
            raise UserError(f"no files match {text!r}; check the pattern (e.g. 'data/train-*.parquet')")
        bad = [str(f) for f in files if f.suffix.lower() != ".parquet"]
        if bad:
            raise UserError(f"streaming reads parquet files; {bad[0]!r} is not one (or set streaming: false)")
        args, kwargs = ("parquet",), dict(data_files=[str(f.resolve()) for f in files], split="train")
        shown = f"parquet {text!r}" + (f" ({len(files)} files)" if len(files) > 1 else "")
    elif path.is_dir():
        if not (any(path.glob("*.parquet")) or any(path.glob("data/*.parquet"))) or (path / "state.json").is_file() \
                or (path / "dataset_dict.json").is_file():
            raise UserError(f"streaming reads hub datasets and parquet files; folder {text!r} holds neither (a "
                            "save_to_disk or image folder is read whole: set streaming: false)")
        args, kwargs = (str(path),), dict(split=split)
        shown = f"dataset folder {text!r} split {split!r}"
    elif text.startswith(("/", "./", "../", "~")) or path.suffix.lower() == ".parquet" or text.count("/") > 1:
        raise UserError(f"dataset path {text!r} does not exist; give parquet file(s), a folder of them or a hub id")
    else:
        args, kwargs = (text,), dict(split=split, data_files=list(data_files) if data_files else None)
        shown = f"hub dataset {text!r} split {split!r}" + (f" (data_files {', '.join(data_files)})" if data_files else "")
    try:
        ds = datasets.load_dataset(*args, streaming=True, **kwargs)
    except Exception as exc:
        raise UserError(f"cannot stream {shown}: {_first_line(exc)}") from exc
    return ds, shown


class StreamingPairs:
    """Validated preference pairs of a stream, epoch by epoch; ``report()`` and ``summary()`` count the rows read
    so far (each row once, however many epochs or replays)."""

    streaming = True

    def __init__(self, dataset_name: str, *, split: str = "train", data_files: Sequence[str] = (),
                 caption_column: str = "caption", image_columns: Sequence[str] = ("jpg_0", "jpg_1"),
                 label_columns: Sequence[str] = ("label_0", "label_1"), ties: str = "drop", strict: bool = False,
                 max_samples: int | None = None, min_size: int = 0, seed: int = 0, shuffle_buffer_size: int = 1000,
                 chunk_rows: int = 64, image_root: str | None = None):
        from datasets import Image

        self._raw, self.description = open_row_stream(dataset_name, split=split, data_files=data_files)
        self.image_columns, self.label_columns = tuple(image_columns), tuple(label_columns)
        self.load_kwargs = dict(split=split, caption_column=caption_column, image_columns=self.image_columns,
                                label_columns=self.label_columns, ties=ties, strict=strict, min_size=min_size,
                                image_root=image_root, confine_paths=True)  # rows read from files: paths confined
        needed = [caption_column, *self.image_columns, *self.label_columns]
        present = self._raw.column_names
        if present is not None:
            missing = [c for c in needed if c not in present]
            if missing:
                raise UserError(f"{self.description} has no column {missing[0]!r}; columns present: "
                                f"{', '.join(present)}. Map yours with caption_column/image_columns/label_columns")
            self._raw = self._raw.select_columns(needed)
        features = self._raw.features
        if features is not None:
            for name in self.image_columns:  # images stay encoded until a pair is fetched (and checked then)
                if isinstance(features.get(name), Image) and features[name].decode:
                    self._raw = self._raw.cast_column(name, Image(decode=False))
        self.max_samples, self.seed, self.buffer = max_samples, int(seed), int(shuffle_buffer_size)
        self.chunk_rows = int(chunk_rows)
        self._counts: Counter = Counter()
        self._counted_rows = 0  # rows of epoch 0 whose counts are in _counts
        self._fetch_failed: dict[int, str] = {}  # stream row (epoch 0 numbering) -> reason, seen at fetch time

    def stream(self, epoch: int):
        """The raw rows of `epoch`: the first max_samples rows, through the shuffle buffer seeded by seed + epoch."""
        ds = self._raw
        if self.max_samples is not None:
            ds = ds.take(int(self.max_samples))
        if self.buffer > 0:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer)
            ds.set_epoch(epoch)
        return ds

    def _validate(self, batch: dict, offset: int):
        import datasets

        features = self._raw.features
        chunk = datasets.Dataset.from_dict(batch, features=features) if features is not None \
            else datasets.Dataset.from_dict(batch)
        try:
            return load_pairs(chunk, **self.load_kwargs)
        except UserError as exc:  # strict data or ties=error: name the row by its place in the stream
            message = re.sub(r"^in-memory dataset: row (\d+)",
                             lambda m: f"{self.description}: row {offset + int(m.group(1))} of the stream", str(exc))
            raise UserError(message.replace(_MEMORY, self.description)) from None

    def refs(self, epoch: int) -> Iterator[tuple[int, int, Any, int]]:
        """(position of the pair in the epoch, stream row, its chunk, index in the chunk) of every kept pair."""
        offset = position = 0
        for batch in self.stream(epoch).iter(batch_size=self.chunk_rows):
            n = len(next(iter(batch.values()))) if batch else 0
            chunk = self._validate(batch, offset)
            if epoch == 0 and offset >= self._counted_rows:
                report = chunk.report()
                self._counts.update({k: v for k, v in report.items() if k not in FETCH_REASONS})
                self._counted_rows = offset + n
            for i in range(len(chunk)):
                yield position, offset + chunk.row(i), chunk, i
                position += 1
            offset += n

    def fetch(self, ref, epoch: int):
        """The decoded pair of `ref` ({"index", "row", "caption", "image_w", "image_l"}), or None when an image fails
        to decode (counted once per row; strict data raises, naming the row of the stream)."""
        _, row, chunk, i = ref
        try:
            raw = chunk[i]
        except UserError as exc:
            raise UserError(re.sub(r"^in-memory dataset: row \d+", f"{self.description}: row {row} of the stream",
                                   str(exc))) from None
        if is_skipped(raw):
            if epoch == 0:
                self._fetch_failed.setdefault(row, raw.reason)
            return None
        return {**raw, "row": row}

    def report(self) -> dict[str, int]:
        """The counts of ``PreferencePairs.report()``, over the rows read so far."""
        fetch = Counter(self._fetch_failed.values())
        out = {"rows": int(self._counts["rows"]), "pairs": int(self._counts["pairs"])}
        for reason in ROW_REASONS + FETCH_REASONS:
            out[reason] = int(self._counts[reason] + fetch[reason])
        out["empty_caption"] = int(self._counts["empty_caption"])
        out["usable_pairs"] = out["pairs"] - sum(fetch.values())
        return out

    def summary(self) -> str:
        r = self.report()
        parts = [f"{self.description}, streamed: {r['rows']} rows read -> {r['pairs']} pairs", *count_parts(r)]
        return "; ".join(parts)


class StreamItems:
    """A stream's pairs with their augmentation (``transform(pair, rng)``), seeded by (seed, epoch, position)."""

    streaming = True

    def __init__(self, pairs: StreamingPairs, transform: Callable, seed: int):
        self.pairs, self.transform, self.seed = pairs, transform, seed

    def item(self, ref, epoch: int):
        raw = self.pairs.fetch(ref, epoch)
        return None if raw is None else self.transform(raw, deterministic_rng(self.seed, epoch, ref[0]))

    def batches(self, batch_size: int, rank: int = 0, world: int = 1, workers: int = 0) -> "StreamBatches":
        return StreamBatches(self, batch_size, rank, world, workers)


class StreamBatches(Prefetching):
    """``BatchStream``'s interface (``get(micro)``, ``close()``) over a stream: micro-batch m is the m-th run of
    batch_size x world usable pairs; asked for a later micro-batch (a resume), it reads forward without decoding.
    ``workers > 0``: that many threads decode and augment the next micro-batches while one trains."""

    def __init__(self, items: StreamItems, batch_size: int, rank: int = 0, world: int = 1, workers: int = 0):
        self.items, self.batch_size, self.rank, self.world = items, batch_size, rank, world
        # A stream's epoch length is unknown until it ends: the fetch-failure guard (training/fetch_guard.py) then
        # treats the whole run as one epoch.
        self.per_epoch = 2**62
        self._start_prefetch(workers, "diffalign-stream")
        self._restart()

    def _restart(self) -> None:
        self._epoch, self._in_epoch, self._next = 0, 0, 0
        self._iter = self.items.pairs.refs(0)

    def _take(self) -> tuple[int, list]:
        size = self.batch_size * self.world
        refs: list = []
        while len(refs) < size:
            try:
                refs.append(next(self._iter))
            except StopIteration:
                if self._in_epoch == 0:
                    raise UserError(f"the stream has fewer usable pairs than one global batch ({self.batch_size} x "
                                    f"{self.world} processes): nothing to train on ({self.items.pairs.summary()}); "
                                    "fix the data (the counts say what was skipped and why) or lower "
                                    "train_batch_size") from None
                self._epoch, self._in_epoch, refs = self._epoch + 1, 0, []  # an incomplete last batch is dropped
                self._iter = self.items.pairs.refs(self._epoch)
        self._in_epoch += 1
        return self._epoch, refs

    def indices(self, micro: int) -> tuple[list, int]:
        """This process's pairs (references into the stream) of micro-batch `micro`, and their epoch; micro-batches
        are read in order, an earlier one restarts the stream."""
        if micro < self._next:
            self._restart()
        while self._next < micro:
            self._take()
            self._next += 1
        epoch, refs = self._take()
        self._next += 1
        return refs[self.rank :: self.world], epoch

    def _load(self, refs: list, epoch: int) -> list:
        return [self.items.item(ref, epoch) for ref in refs]


__all__ = ["StreamBatches", "StreamItems", "StreamingPairs", "open_row_stream"]
