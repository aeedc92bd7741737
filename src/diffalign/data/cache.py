"""Latent and text-embedding cache: encode every pair once, train many times without the VAE and text encoders.

`build_cache(pairs, family, resolution=..., cache_dir=...)` encodes each valid pair into safetensors shards:
`latents_w`, `latents_l`, `prompt_embeds`, `index` (position in `pairs`), `row` (row in the source split), and
for SDXL `text_embeds`, `time_ids_w`, `time_ids_l`. Captions sit in each shard's metadata. Every image is
center-cropped; `flips=True` adds the horizontally flipped view of every pair (`latents_w_flip`, `latents_l_flip`,
`time_ids_*_flip`), so a run with `random_flip` picks per pair the view the pixel path would have drawn
(`CachedPairs.flip_seed`). Random crops would need one latent per position and are not cached. Latents are the VAE
posterior mean, in the family's dtype.

`manifest.json` holds the fingerprint: a hash of the data (source paths with file sizes and mtimes or the
dataset fingerprint, split, columns, ties, swap, max_samples, min_size), the model (path, UNet/VAE/text-encoder
config hashes, VAE/text-encoder weight file sizes and mtimes when local, dtypes), the family, the resolution,
the cache format and `fingerprint_extra`. `fingerprint(...)` computes it without building; `open_cache(dir,
expected)` returns the cache only when it is complete and was built for exactly that key (None otherwise;
`cache_miss_reason` says why).

Shards are written atomically (temp file + rename) and cover fixed position ranges, so an interrupted build
resumes: rerun `build_cache` with the same inputs and finished shards are kept. A cache built for other inputs
in the same folder is replaced (only its own files are removed). With several processes, build on the main
process only and let the others wait, then `open_cache` everywhere.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..fsutil import atomic_write_text
from .pairs import SkippedPair, is_skipped
from .transforms import PairTransform

if TYPE_CHECKING:
    from ..models import ModelFamily

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
BUILDING = "building.json"
_SHARD_GLOB = "shard-*.safetensors"
_MAX_OPEN_SHARDS = 64


# ------------------------------------------------------------------------------------------- fingerprint
def _clean_config(config: Any) -> dict:
    """A model config without bookkeeping keys (paths, library versions) that do not change the weights' maths."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    drop = {"transformers_version", "name_or_path", "architectures", "dtype", "torch_dtype"}
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in drop}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _config_path(module) -> str:
    cfg = module.config
    value = cfg.get("_name_or_path") if isinstance(cfg, dict) else getattr(cfg, "_name_or_path", None)
    return str(value or getattr(cfg, "name_or_path", "") or "")


def _weight_stats(path: str, subfolders: tuple[str, ...]) -> list | None:
    """Sizes and mtimes of local weight files (so re-trained weights under the same path change the key)."""
    root = Path(path)
    if not path or not root.is_dir():
        return None
    out = []
    for sub in subfolders:
        folder = root / sub if sub else root
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
                    st = f.stat()
                    out.append([f"{sub}/{f.name}" if sub else f.name, st.st_size, st.st_mtime_ns])
    return out


def model_identity(family: ModelFamily) -> dict:
    """What in the model decides cached latents and embeddings: path, configs, local weight files, dtypes."""
    model_path = _config_path(family.unet)
    vae_path = _config_path(family.vae)
    encoders = [f"text_encoder{'' if i == 0 else f'_{i + 1}'}" for i in range(len(family.text_encoders))]
    weights = {"model": _weight_stats(model_path, ("vae", *encoders))}
    if vae_path and vae_path != model_path:
        weights["vae"] = _weight_stats(vae_path, ("", "vae"))
    return {
        "family": family.name,
        "path": model_path,
        "vae_path": vae_path,
        "configs": {
            "unet": _hash(_clean_config(family.unet.config)),
            "vae": _hash(_clean_config(family.vae.config)),
            **{name: _hash(_clean_config(enc.config)) for name, enc in zip(encoders, family.text_encoders)},
        },
        "weights": weights,
        "dtypes": {"vae": str(next(family.vae.parameters()).dtype), "unet": str(family.dtype),
                   "text_encoders": [str(next(e.parameters()).dtype) for e in family.text_encoders]},
    }


class RandomCropNotCacheable(UserError):
    """A random crop (``center_crop: false``) has room to move in some image: one cached latent per image cannot
    stand for it. ``use_cache: auto`` catches it and trains on pixels."""


def fingerprint_components(pairs, family: ModelFamily, *, resolution: int, extra: dict | None = None,
                           flips: bool = False) -> dict:
    return {
        "format": CACHE_FORMAT,
        "data": pairs.identity(),
        "model": model_identity(family),
        "family": family.name,
        "resolution": int(resolution),
        "augmentation": "center-crop, flipped variants" if flips else "center-crop, no flip",
        "extra": dict(extra or {}),
    }


def fingerprint(pairs, family: ModelFamily, *, resolution: int, extra: dict | None = None, flips: bool = False) -> str:
    """The cache key for these pairs, model and resolution (pass the same `extra` as `fingerprint_extra`, and
    `flips` as `build_cache`)."""
    return _hash(fingerprint_components(pairs, family, resolution=resolution, extra=extra, flips=flips))


# ----------------------------------------------------------------------------------------------- build
def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _remove_cache_files(cache_dir: Path) -> None:
    for f in [*cache_dir.glob(_SHARD_GLOB), *cache_dir.glob(".shard-*.tmp"), cache_dir / MANIFEST, cache_dir / BUILDING]:
        if f.is_file():
            f.unlink()


def _read_json(file: Path) -> dict | None:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cached_text(family: ModelFamily, captions: list[str]) -> dict[str, torch.Tensor]:
    """The text part of cached pairs, as a shard stores it: `prompt_embeds` (and SDXL's pooled `text_embeds`) of
    `captions`, on the CPU. `cached_text(family, [""])` is the empty caption in that form, which caption dropout
    (`proportion_empty_prompts`) puts in place of a cached pair's own embeddings."""
    cond = family.encode_prompts(list(captions))
    out = {"prompt_embeds": cond.prompt_embeds.cpu()}
    if cond.text_embeds is not None:
        out["text_embeds"] = cond.text_embeds.cpu()
    return out


def _encode_views(views: list[dict], family: ModelFamily, resolution: int, suffix: str = "") -> dict[str, torch.Tensor]:
    """Latents (and SDXL time ids) of transformed pairs, keyed `latents_w{suffix}`, `time_ids_w{suffix}`, ..."""
    pixels = torch.stack([v["pixel_w"] for v in views] + [v["pixel_l"] for v in views])
    latents = family.encode_images(pixels, chunk_size=len(views)).cpu()
    n = len(views)
    out = {f"latents_w{suffix}": latents[:n], f"latents_l{suffix}": latents[n:]}
    target = (resolution, resolution)
    for side in ("w", "l"):
        ids = family.time_ids([v[f"original_size_{side}"] for v in views], [v[f"crop_top_left_{side}"] for v in views], target)
        if ids is not None:
            out[f"time_ids_{side}{suffix}"] = ids.cpu()
    return out


def _encode_batch(items: list[dict], family: ModelFamily, resolution: int, flips: bool = False,
                  require_fixed_crop: bool = False) -> dict[str, torch.Tensor]:
    transform = PairTransform(resolution, random_flip=False, center_crop=True)
    if require_fixed_crop:
        for it in items:
            for side in ("w", "l"):
                if transform.crop_room(it[f"image_{side}"]) != (0, 0):
                    raise RandomCropNotCacheable(
                        f"pair {it['index']} (row {it['row']}) has an image of {it[f'image_{side}'].size[0]}x"
                        f"{it[f'image_{side}'].size[1]} px that a random crop to {resolution} px can move in")
    views = [transform.view(it, flip=False) for it in items]
    out = {
        "index": torch.tensor([v["index"] for v in views], dtype=torch.long),
        "row": torch.tensor([v["row"] for v in views], dtype=torch.long),
        **_encode_views(views, family, resolution),
        **cached_text(family, [v["caption"] for v in views]),
    }
    if flips:  # the mirrored view of every pair, encoded through the VAE as the pixel path would see it
        out.update(_encode_views([transform.view(it, flip=True) for it in items], family, resolution, "_flip"))
    return out


def _write_shard(cache_dir: Path, k: int, tensors: dict, captions: list[str], skipped: list[SkippedPair], fp: str) -> dict:
    from safetensors.torch import save_file

    name = _shard_name(k)
    tmp = cache_dir / f".{name}.tmp"
    metadata = {
        "format": str(CACHE_FORMAT), "fingerprint": fp, "count": str(len(captions)),
        "captions": json.dumps(captions), "skipped": json.dumps([list(s) for s in skipped]),
    }
    save_file({k2: v.contiguous() for k2, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, cache_dir / name)
    return {"file": name, "count": len(captions), "bytes": (cache_dir / name).stat().st_size}


def _read_shard_info(cache_dir: Path, k: int, fp: str) -> tuple[dict, list[SkippedPair]] | None:
    from safetensors import safe_open

    file = cache_dir / _shard_name(k)
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return None
    if meta.get("fingerprint") != fp:
        return None
    skipped = [SkippedPair(*s) for s in json.loads(meta.get("skipped", "[]"))]
    return {"file": file.name, "count": int(meta["count"]), "bytes": file.stat().st_size}, skipped


def build_cache(
    pairs,
    family: ModelFamily,
    *,
    resolution: int,
    cache_dir: str | os.PathLike,
    batch_size: int = 8,
    fingerprint_extra: dict | None = None,
    shard_size: int = 2048,
    progress: bool = True,
    flips: bool = False,
    require_fixed_crop: bool = False,
) -> Path:
    """Encode every valid pair of `pairs` with `family` into `cache_dir`; returns `cache_dir` (see module doc).

    `batch_size` pairs are fetched and encoded at a time (the VAE sees batch_size images per call). Pairs whose
    images fail to decode are skipped (lenient pairs) and recorded in the manifest and in `pairs.report()`.
    A complete cache with the same fingerprint is reused as is. `flips` also stores the horizontally flipped view
    of every pair (`latents_w_flip`, ...; what `random_flip` trains on); `require_fixed_crop` raises
    `RandomCropNotCacheable` at the first image a random crop could move in (before writing its shard).
    """
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create cache folder '{cache_dir}': {exc.strerror or exc}") from None
    components = fingerprint_components(pairs, family, resolution=resolution, extra=fingerprint_extra, flips=flips)
    fp = _hash(components)
    if cache_miss_reason(cache_dir, fp) is None:
        record_manifest_skips(pairs, _read_json(cache_dir / MANIFEST) or {})
        return cache_dir
    building = _read_json(cache_dir / BUILDING)
    if not (building and building.get("fingerprint") == fp):
        _remove_cache_files(cache_dir)
        atomic_write_text(cache_dir / BUILDING, json.dumps({"fingerprint": fp, "started": time.time()}))

    n, shard_size, batch_size = len(pairs), max(1, int(shard_size)), max(1, int(batch_size))
    shards, all_skipped = [], []
    bar = tqdm(total=n, desc="caching latents", unit="pair", disable=not progress)
    for k, start in enumerate(range(0, n, shard_size)):
        stop = min(start + shard_size, n)
        done = _read_shard_info(cache_dir, k, fp)
        if done is not None:
            shards.append(done[0])
            all_skipped.extend(done[1])
            bar.update(stop - start)
            continue
        parts, captions, skipped = [], [], []
        for b in range(start, stop, batch_size):
            items = [pairs[i] for i in range(b, min(b + batch_size, stop))]
            skipped.extend(it for it in items if isinstance(it, SkippedPair))
            good = [it for it in items if not is_skipped(it)]
            if good:
                parts.append(_encode_batch(good, family, resolution, flips, require_fixed_crop))
                captions.extend(it["caption"] for it in good)
            bar.update(len(items))
        if parts:
            tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        else:
            tensors = {"index": torch.empty(0, dtype=torch.long), "row": torch.empty(0, dtype=torch.long)}
        shards.append(_write_shard(cache_dir, k, tensors, captions, skipped, fp))
        all_skipped.extend(skipped)
    bar.close()

    if hasattr(pairs, "record_skipped"):
        pairs.record_skipped(all_skipped)
    manifest = {
        "format": CACHE_FORMAT,
        "fingerprint": fp,
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "family": family.name,
        "model": components["model"]["path"],
        "resolution": int(resolution),
        "augmentation": components["augmentation"],
        "data": pairs.identity(),
        "extra": components["extra"],
        "num_pairs": sum(s["count"] for s in shards),
        "shards": shards,
        "skipped": [list(s) for s in all_skipped],
        "report": pairs.report() if hasattr(pairs, "report") else {},
    }
    atomic_write_text(cache_dir / MANIFEST, json.dumps(manifest, indent=1, default=str))
    (cache_dir / BUILDING).unlink(missing_ok=True)
    return cache_dir


def record_manifest_skips(pairs, manifest: dict) -> None:
    """Count a reused cache's skipped pairs (its manifest's list) in `pairs.report()`, as a build counts them."""
    if hasattr(pairs, "record_skipped"):
        pairs.record_skipped(SkippedPair(*s) for s in manifest.get("skipped", []))


# ------------------------------------------------------------------------------------------------- open
def cache_miss_reason(cache_dir: str | os.PathLike, expected_fingerprint: str) -> str | None:
    """Why the cache in `cache_dir` cannot be used for `expected_fingerprint`, or None when it can."""
    cache_dir = Path(cache_dir)
    manifest_file = cache_dir / MANIFEST
    if not manifest_file.is_file():
        if (cache_dir / BUILDING).is_file():
            return f"the cache in '{cache_dir}' is incomplete (an interrupted build; building again resumes it)"
        return f"no cache in '{cache_dir}'"
    manifest = _read_json(manifest_file)
    if manifest is None:
        return f"'{manifest_file}' is not readable JSON"
    if manifest.get("format") != CACHE_FORMAT:
        return f"the cache in '{cache_dir}' has format {manifest.get('format')}, this version reads {CACHE_FORMAT}"
    if manifest.get("fingerprint") != expected_fingerprint:
        return (
            f"the cache in '{cache_dir}' was built for other inputs ({manifest.get('family')} model "
            f"{manifest.get('model')!r}, resolution {manifest.get('resolution')}; fingerprint "
            f"{str(manifest.get('fingerprint'))[:12]} != {str(expected_fingerprint)[:12]})"
        )
    if not manifest.get("complete"):
        return f"the cache in '{cache_dir}' is incomplete"
    for shard in manifest.get("shards", []):
        file = cache_dir / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            return f"cache shard '{file}' is missing or changed"
    return None


def open_cache(cache_dir: str | os.PathLike, expected_fingerprint: str) -> "CachedPairs | None":
    """The cache in `cache_dir` if it is complete and matches `expected_fingerprint`, else None (see
    `cache_miss_reason` for why)."""
    if cache_miss_reason(cache_dir, expected_fingerprint) is not None:
        return None
    return CachedPairs(cache_dir)


class CachedPairs(Dataset):
    """Pairs from a latent cache: {"index", "row", "caption", "latents_w", "latents_l", "prompt_embeds", and for
    SDXL "text_embeds", "time_ids_w", "time_ids_l"} (tensors without a batch dimension). `collate_pairs`
    stacks them. Shards are memory-mapped and opened lazily (a few at a time), also in DataLoader workers."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = Path(cache_dir)
        manifest = _read_json(self.cache_dir / MANIFEST)
        if manifest is None:
            raise UserError(f"no readable cache manifest in '{self.cache_dir}'")
        self.manifest = manifest
        self.fingerprint = manifest["fingerprint"]
        self._files = [s["file"] for s in manifest["shards"] if s["count"] > 0]
        self._starts = []
        total = 0
        for s in manifest["shards"]:
            if s["count"] > 0:
                self._starts.append(total)
                total += s["count"]
        self._len = total
        self._open: OrderedDict[str, tuple[Any, list[str]]] = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # file handles do not cross process boundaries
        return state

    def __len__(self) -> int:
        return self._len

    def report(self) -> dict:
        return dict(self.manifest.get("report", {}))

    def _shard(self, name: str):
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        from safetensors import safe_open

        handle = safe_open(str(self.cache_dir / name), framework="pt")
        entry = (handle, json.loads((handle.metadata() or {}).get("captions", "[]")))
        self._open[name] = entry
        if len(self._open) > _MAX_OPEN_SHARDS:
            self._open.popitem(last=False)
        return entry

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"cached pair {index} out of range for {self._len} pairs")
        k = bisect.bisect_right(self._starts, index) - 1
        j = index - self._starts[k]
        handle, captions = self._shard(self._files[k])
        item: dict[str, Any] = {}
        for key in handle.keys():
            value = handle.get_slice(key)[j : j + 1][0]
            item[key] = int(value) if key in ("index", "row") else value
        item["caption"] = captions[j]
        return item
