"""File helpers shared by every package: content hashes, THE atomic file write, THE directory swap.

Every artifact, store, cache, checkpoint and report in this project is written by
write-then-rename, so a reader never sees half a file or half a directory:

    with atomic_path("out.jsonl") as tmp: tmp.write_text(...)     # any writer (np.save, PIL, torch.save)
    write_bytes_atomic(path, data); write_text_atomic(path, text); write_json_atomic(path, payload)
    replace_directory(tmp_dir, target)     # swap a finished sibling temp dir into place
    settle_directory(target)               # undo a swap interrupted between its two renames
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """`.<name>.<tag>-<pid>` beside `path`: same filesystem (the rename is atomic), one per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True):
    """Yield a temp path beside `path`; when the block ends without an error, the temp file is
    (fsynced and) renamed over `path`; on an error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")


def jsonable(value):
    """json.dumps `default=`: numpy scalars and arrays, paths."""
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: str | os.PathLike, payload, sort_keys: bool = True, indent: int | None = 2,
                      fsync: bool = False) -> None:
    """Write JSON (numpy values allowed) next to `path` then rename, so a reader never sees half a file."""
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys, default=jsonable) + "\n"
    write_text_atomic(path, text, fsync)


def settle_directory(directory: str | os.PathLike) -> None:
    """Undo a `replace_directory` interrupted between its two renames: with the target gone the
    previous version comes back; with both present, the leftover backup is deleted."""
    directory = Path(directory)
    backup = directory.with_name(f".{directory.name}.old")
    if backup.is_dir():
        if directory.exists():
            shutil.rmtree(backup)
        else:
            os.replace(backup, directory)


def replace_directory(tmp: str | os.PathLike, directory: str | os.PathLike, fsync: bool = True) -> None:
    """Publish the finished directory `tmp` as `directory`: its files are fsynced, an existing
    `directory` is renamed to `.<name>.old`, `tmp` renamed into place, the old one deleted. A crash
    between the renames is undone by `settle_directory` (called here first and by readers)."""
    tmp, directory = Path(tmp), Path(directory)
    settle_directory(directory)
    if fsync:
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_file(path)
    if directory.exists():
        os.replace(directory, directory.with_name(f".{directory.name}.old"))
    os.replace(tmp, directory)
    settle_directory(directory)


def package_versions(names) -> dict:
    """Installed version of each distribution name (None when it is not installed)."""
    import importlib.metadata

    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
