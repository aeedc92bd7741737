"""Does `dataloader_num_workers` hide image decoding behind the training step? (BatchStream's loading threads)

Pick-a-Pic-like data: 768x768 JPEG pairs (photographic-noise content, ~quality 90), decoded, resized to 512
and cropped by the loop's own PixelPairs / PairTransform. The training step is stood in for by a fixed wait
that releases the CPU, as a GPU step does (the host only waits for the device): what is measured is how much
of the data work the threads take off the critical path. On a CPU-bound run the threads compete with torch
for the same cores instead, so do not read these figures for CPU training.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_loading.py [--step-ms 150] [--batch 8] [--steps 30]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    from PIL import Image, ImageFilter

    noise = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    img = Image.fromarray(noise).resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _dataset(folder: Path, n: int, size: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = [{"caption": f"pair {i}", "jpg_0": _jpeg(rng, size), "jpg_1": _jpeg(rng, size), "label_0": 1.0,
             "label_1": 0.0} for i in range(n)]
    path = folder / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def run(path: Path, workers: int, batch: int, steps: int, step_s: float, resolution: int) -> float:
    from diffalign.data import PairTransform, load_pairs
    from diffalign.training.batches import BatchStream, PixelPairs

    pairs = load_pairs(str(path))
    stream = BatchStream(PixelPairs(pairs, PairTransform(resolution), seed=0), batch, seed=0, workers=workers)
    try:
        stream.get(0)  # warm-up (and the first look-ahead)
        start = time.perf_counter()
        for m in range(1, steps + 1):
            stream.get(m)
            time.sleep(step_s)
        return (time.perf_counter() - start) / steps
    finally:
        stream.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step-ms", type=float, default=150.0, help="stand-in for the accelerator's step time")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--resolution", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = _dataset(Path(tmp), args.batch * (args.steps + 2), args.size)
        data_only = run(path, 0, args.batch, args.steps, 0.0, args.resolution)
        rows = [(w, run(path, w, args.batch, args.steps, args.step_ms / 1000, args.resolution)) for w in (0, 1, 2)]
    print(f"{args.batch} pairs of {args.size}px JPEGs per step -> {args.resolution}px; step stand-in "
          f"{args.step_ms:g} ms; loading alone {1000 * data_only:.0f} ms/step\n")
    print("| dataloader_num_workers | ms / step | data on the critical path (ms / step) | vs 0 workers |")
    print("|---|---|---|---|")
    base = rows[0][1]
    for w, t in rows:
        print(f"| {w} | {1000 * t:.0f} | {1000 * (t - args.step_ms / 1000):.0f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
