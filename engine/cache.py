"""Gallery caches: the image-side and caption-side graph outputs, encoded once, saved, loaded, appended.

    cache = scorer.encode_images(paths)                  # engine/runtime.py makes them
    cache.save("gallery/images")                         # a directory, written atomically
    cache = ImageCache.load("gallery/images", expect=scorer.fingerprint)   # memory-mapped
    cache = cache.append(scorer.encode_images(more_paths))
    cache.save("gallery/images")                         # replaces the old directory atomically

An ImageCache holds, per image, the outputs of the artifact's image graphs (regions_attn,
regions_values, objects_attn, objects_mlp, image_vectors: the ones the artifact has).
A CaptionCache holds, per caption, the outputs of the text graphs. Arrays along the words
axis (words, gates_words, states) are stored RAGGED: one row per real word of every caption,
[total words, ...], with `lengths` saying how many belong to each caption. Padding every
caption to max_words would make the caption cache ~2.5x larger on real captions (gates_words
is 4H floats per word: 4 kB at the flickr8k preset), so `block(rows)` pads only the captions of
one block, to that block's longest caption (a length bucket when the rows are sorted by length).

Directory layout (format version CACHE_VERSION; a newer one is refused):

    cache.json    {"format": "bssan-image-cache" | "bssan-caption-cache", "version", "artifact":
                   fingerprint of the artifact's graphs, "precision": float dtype of the encoders,
                   "count", "arrays": {name: {"dtype", "shape", "axis": "item" | "word"}},
                   "ids": [...], and for captions "texts", "image_ids"}
    <array>.npy   one file per array

A cache is tied to the artifact that encoded it: loading with `expect=` a different fingerprint
(another model, another export) is an ArtifactError; so is appending caches of two artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.artifact import Artifact
from engine.errors import ArtifactError, InputError
from engine.files import remove_dead_temps, replace_directory, settle_directory, temp_sibling

CACHE_VERSION = 1
CACHE_FORMATS = {"image": "bssan-image-cache", "caption": "bssan-caption-cache"}
CACHE_JSON = "cache.json"
WORD_ARRAYS = ("words", "gates_words", "states")  # the ragged ones (CaptionCache)


def artifact_fingerprint(artifact: Artifact) -> str:
    """sha256 over the artifact's graph files (path and content hash): what a cache is tied to."""
    digest = hashlib.sha256()
    files = artifact.manifest["files"]
    for rel in sorted(files):
        if rel.startswith("graphs/"):
            digest.update(f"{rel}\t{files[rel]['sha256']}\n".encode())
    return digest.hexdigest()


def _write_dir_atomic(directory: Path, files: dict[str, np.ndarray], meta: dict) -> None:
    """Write arrays + cache.json into a sibling temp dir, then swap it into place (engine.files.replace_directory)."""
    directory = Path(directory)
    settle_directory(directory)
    if directory.exists() and not (directory / CACHE_JSON).is_file():
        raise InputError(f"{directory}: exists and is not a cache directory; expected a new path or a cache to replace")
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(directory)  # the temp folder of a save killed mid-write
    tmp = temp_sibling(directory)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for name, array in files.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
        (tmp / CACHE_JSON).write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")
        replace_directory(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _read_meta(directory: Path, kind: str, expect: str | None, precision: str | None) -> dict:
    directory = Path(directory)
    settle_directory(directory)
    path = directory / CACHE_JSON
    if not path.is_file():
        raise InputError(f"{path}: not found; expected a {kind} cache directory (saved by {kind.capitalize()}Cache.save)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); the cache is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMATS[kind]:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"{path}: expected format {CACHE_FORMATS[kind]!r}, got {got!r}")
    version = meta.get("version")
    if not isinstance(version, int) or version > CACHE_VERSION:
        raise InputError(f"{path}: cache format version {version!r}; this engine reads up to {CACHE_VERSION} (upgrade bssan-engine)")
    if expect is not None and meta.get("artifact") != expect:
        raise ArtifactError(f"{path}: encoded by artifact {str(meta.get('artifact'))[:12]}, expected {expect[:12]} "
                            f"(the scorer's artifact); re-encode the gallery with this artifact")
    if precision is not None and meta.get("precision") != precision:
        raise ArtifactError(f"{path}: encoded at precision {meta.get('precision')!r}, expected {precision!r}; re-encode it")
    return meta


def _load_arrays(directory: Path, meta: dict, mmap: bool) -> dict[str, np.ndarray]:
    arrays = {}
    for name, spec in meta["arrays"].items():
        path = Path(directory) / f"{name}.npy"
        try:
            array = np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable .npy array ({exc}); the cache is incomplete") from None
        if str(array.dtype) != spec["dtype"] or list(array.shape) != spec["shape"]:
            raise InputError(f"{path}: {array.dtype} {list(array.shape)}, expected {spec['dtype']} {spec['shape']} from {CACHE_JSON}")
        arrays[name] = array
    return arrays


def _check_same(a, b, what: str) -> None:
    if a.fingerprint != b.fingerprint or a.precision != b.precision:
        raise ArtifactError(f"{what}: caches of artifact {a.fingerprint[:12]} ({a.precision}) and {b.fingerprint[:12]} "
                            f"({b.precision}); expected caches of the same artifact and precision")
    if set(a.arrays) != set(b.arrays):
        raise ArtifactError(f"{what}: arrays {sorted(a.arrays)} vs {sorted(b.arrays)}; expected the same graphs")


@dataclass
class ImageCache:
    """Image-graph outputs of N images, row i = image ids[i]."""

    ids: list[str]
    arrays: dict[str, np.ndarray]  # name -> [N, ...]
    fingerprint: str
    precision: str  # "fp32" or "fp16": the dtype the image graphs ran at

    kind = "image"

    def __post_init__(self) -> None:
        for name, array in self.arrays.items():
            if len(array) != len(self.ids):
                raise InputError(f"image cache {name}: {len(array)} rows, expected {len(self.ids)} (one per id)")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays of the listed rows, contiguous (a copy)."""
        return {name: np.ascontiguousarray(array[index]) for name, array in self.arrays.items()}

    def append(self, other: "ImageCache") -> "ImageCache":
        _check_same(self, other, "ImageCache.append")
        return ImageCache(self.ids + other.ids, {k: np.concatenate([v, other.arrays[k]]) for k, v in self.arrays.items()},
                          self.fingerprint, self.precision)

    def _meta(self) -> dict:
        return {"format": CACHE_FORMATS[self.kind], "version": CACHE_VERSION, "artifact": self.fingerprint,
                "precision": self.precision, "count": len(self),
                "arrays": {k: {"dtype": str(v.dtype), "shape": list(v.shape), "axis": "item"} for k, v in self.arrays.items()},
                "ids": self.ids}

    def save(self, directory: str | os.PathLike) -> Path:
        _write_dir_atomic(Path(directory), self.arrays, self._meta())
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, expect: str | None = None, precision: str | None = None,
             mmap: bool = True) -> "ImageCache":
        meta = _read_meta(Path(directory), cls.kind, expect, precision)
        return cls(list(meta["ids"]), _load_arrays(Path(directory), meta, mmap), meta["artifact"], meta["precision"])


@dataclass
class CaptionCache:
    """Text-graph outputs of N captions. Word arrays are ragged: caption i owns rows
    offsets[i] .. offsets[i+1] of words/gates_words/states; item arrays (text_vectors) have N rows."""

    ids: list[str]
    texts: list[str]
    image_ids: list[str]  # the image each caption describes, "" when unknown (evaluation needs them)
    lengths: np.ndarray  # int64 [N], >= 1
    arrays: dict[str, np.ndarray]  # words/gates_words/states: [total words, ...]; text_vectors: [N, K]
    fingerprint: str
    precision: str
    offsets: np.ndarray = field(init=False, repr=False)

    kind = "caption"

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        n = len(self.ids)
        if len(self.texts) != n or len(self.image_ids) != n or self.lengths.shape != (n,):
            raise InputError(f"caption cache: {n} ids, {len(self.texts)} texts, {len(self.image_ids)} image ids, "
                             f"lengths {list(self.lengths.shape)}; expected one of each per caption")
        if n and self.lengths.min() < 1:
            raise InputError(f"caption cache: caption {int(np.argmin(self.lengths))} has length {self.lengths.min()}; expected >= 1")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)  # [N + 1]
        for name, array in self.arrays.items():
            want = self.offsets[-1] if name in WORD_ARRAYS else n
            if len(array) != want:
                raise InputError(f"caption cache {name}: {len(array)} rows, expected {want}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) + self.lengths.nbytes

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if len(self) else 0

    def block(self, rows: np.ndarray, words: int | None = None, flat: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Arrays of the listed captions, word arrays padded with zeros to `words` (default: the
        longest of these captions): {"words": [B_txt, L, E], ..., "lengths": [B_txt], "text_vectors": ...}.
        Word arrays named in `flat` are not copied: the cache's own rows [total words, ...], with "word_offsets"
        [B_txt] (each listed caption's first row), for a consumer that reads ragged rows (engine/kernels)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]  # [B_txt]
        width = int(lengths.max()) if words is None else int(words)
        spans = list(zip(self.offsets[rows].tolist(), lengths.tolist()))  # (first word row, words) of each caption
        out = {"lengths": lengths}
        if flat:
            out["word_offsets"] = self.offsets[rows]
        for name, array in self.arrays.items():
            if name in flat:
                out[name] = array
            elif name in WORD_ARRAYS:
                # one contiguous copy per caption and a zeroed tail, no index arrays: the re-rank of a shortlist gathers
                # every pair's caption (~40 KB at the reference sizes), and a fancy-index gather plus a masked scatter
                # into a zeroed block took ~1.6x as long (~20% of score_pairs' CPU on Flickr8K test at K = 100)
                padded = np.empty((len(rows), width) + array.shape[1:], dtype=array.dtype)  # [B_txt, L, ...]
                for i, (start, length) in enumerate(spans):
                    padded[i, :length] = array[start:start + length]
                    padded[i, length:] = 0
                out[name] = padded
            else:
                out[name] = np.ascontiguousarray(array[rows])
        return out

    def append(self, other: "CaptionCache") -> "CaptionCache":
        _check_same(self, other, "CaptionCache.append")
        return CaptionCache(self.ids + other.ids, self.texts + other.texts, self.image_ids + other.image_ids,
                            np.concatenate([self.lengths, other.lengths]),
                            {k: np.concatenate([v, other.arrays[k]]) for k, v in self.arrays.items()},
                            self.fingerprint, self.precision)

    def _meta(self) -> dict:
        arrays = {k: {"dtype": str(v.dtype), "shape": list(v.shape), "axis": "word" if k in WORD_ARRAYS else "item"}
                  for k, v in self.arrays.items()}
        arrays["lengths"] = {"dtype": "int64", "shape": [len(self)], "axis": "item"}
        return {"format": CACHE_FORMATS[self.kind], "version": CACHE_VERSION, "artifact": self.fingerprint,
                "precision": self.precision, "count": len(self), "arrays": arrays,
                "ids": self.ids, "texts": self.texts, "image_ids": self.image_ids}

    def save(self, directory: str | os.PathLike) -> Path:
        _write_dir_atomic(Path(directory), {**self.arrays, "lengths": self.lengths}, self._meta())
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, expect: str | None = None, precision: str | None = None,
             mmap: bool = True) -> "CaptionCache":
        meta = _read_meta(Path(directory), cls.kind, expect, precision)
        arrays = _load_arrays(Path(directory), meta, mmap)
        lengths = np.asarray(arrays.pop("lengths"))
        return cls(list(meta["ids"]), list(meta["texts"]), list(meta["image_ids"]), lengths, arrays,
                   meta["artifact"], meta["precision"])


def append_saved(directory: str | os.PathLike, more: ImageCache | CaptionCache) -> ImageCache | CaptionCache:
    """Append `more` to the cache saved at `directory` (created if absent), atomically; returns the result."""
    directory = Path(directory)
    if not (directory / CACHE_JSON).is_file() and not directory.with_name(f".{directory.name}.old").is_dir():
        more.save(directory)
        return more
    combined = type(more).load(directory, expect=more.fingerprint, precision=more.precision, mmap=True).append(more)
    combined.save(directory)
    return combined
