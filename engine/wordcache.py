"""The word-vector cache: a word table converted once into a memory-mappable form.

A cache entry is a folder `<cache>/glove/<key>/` holding `vocab.json` (the words, in table
order), `meta.json` (source file, sha256, format, counts) and, for a user's text file,
`vectors.npy` (float32 [V, E]). The key contains the source's size and sha256, so a changed
file gets a new entry. Entries are written into a temporary folder and renamed into place,
so a reader never sees half an entry and an interrupted conversion leaves nothing behind.
The cache lives in `$BSSAN_CACHE`, else `~/.cache/bssan`. Used by engine/text.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from engine.errors import AssetError, DataError


def cache_dir_default() -> Path:
    return Path(os.environ.get("BSSAN_CACHE") or Path.home() / ".cache" / "bssan")


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a fully written temporary folder into place; if another process won, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def write_entry(entry: Path, words: list[str], meta: dict) -> None:
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "vocab.json").write_text(json.dumps(words, ensure_ascii=False), encoding="utf-8")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    publish_dir(tmp, entry)


def read_entry(entry: Path) -> tuple[list[str], dict]:
    try:
        vocab = json.loads((entry / "vocab.json").read_text(encoding="utf-8"))
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AssetError(f"{entry}: unreadable word-vector cache ({exc}); delete the folder to rebuild it") from None
    return vocab, meta


def _parse_floats(parts: list[str], where: str) -> np.ndarray:
    try:
        values = np.array(parts, dtype=np.float32)
    except ValueError:
        bad = next(p for p in parts if not _is_float(p))
        raise DataError(f"{where}: value {bad[:20]!r} is not a number") from None
    if not np.isfinite(values).all():
        bad = parts[int(np.flatnonzero(~np.isfinite(values))[0])]
        raise DataError(f"{where}: value {bad[:20]!r} is not finite; expected finite word vectors")
    return values


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def convert_text_file(path: Path, sha: str, entry: Path) -> None:
    """One pass to count lines, one to parse into a preallocated .npy memory map (rows past
    the last kept word stay zero and are never indexed), then an atomic rename into the cache."""
    with open(path, "rb") as handle:
        lines = sum(1 for _ in handle)
        handle.seek(0)
        first = handle.readline().decode("utf-8", errors="replace").split()
    header = len(first) == 2 and all(p.isdigit() for p in first)
    dim = int(first[1]) if header else len(first) - 1
    if dim < 1:
        raise DataError(f"{path.name} line 1: expected 'word v1 v2 ...' or a word2vec header 'count dim', got {' '.join(first)[:60]!r}")
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _parse_text_file(path, sha, tmp, lines, header, dim)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted conversion leaves nothing behind
        raise
    publish_dir(tmp, entry)


def _parse_text_file(path: Path, sha: str, tmp: Path, lines: int, header: bool, dim: int) -> None:
    from numpy.lib.format import open_memmap
    from tqdm import tqdm

    table = open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=(lines - header, dim))  # [V, E]
    words: list[str] = []
    seen: set[str] = set()
    skipped = {"duplicate": 0, "multi_token": 0, "undecodable": 0}
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}") as bar:
        for number, raw in enumerate(handle, start=1):
            bar.update(len(raw))
            if header and number == 1:
                continue
            try:
                line = raw.decode("utf-8").rstrip("\r\n").rstrip(" ")
            except UnicodeDecodeError:
                skipped["undecodable"] += 1
                continue
            parts = line.split(" ")
            where = f"{path.name} line {number}"
            if len(parts) - 1 < dim:
                raise DataError(f"{where}: expected a word and {dim} values, got {len(parts) - 1} values")
            if len(parts) - 1 > dim:
                if all(_is_float(p) for p in parts[1 : len(parts) - dim]):
                    raise DataError(f"{where}: expected a word and {dim} values, got {len(parts) - 1} values")
                skipped["multi_token"] += 1  # GloVe 840B has entries like ". . ."; our tokenizer never makes them
                continue
            word = parts[0]
            values = _parse_floats(parts[1:], where)
            if word in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(word)
            table[len(words)] = values
            words.append(word)
    if not words:
        raise DataError(f"{path}: no word vectors found; expected 'word v1 v2 ...' lines")
    table.flush()
    del table
    meta = {"file": str(path.resolve()), "sha256": sha, "size": path.stat().st_size, "words": len(words),
            "format": "word2vec" if header else "glove", "skipped": skipped}
    (tmp / "vocab.json").write_text(json.dumps(words, ensure_ascii=False), encoding="utf-8")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
