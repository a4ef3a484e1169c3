"""File helpers shared by every package: content hashes, THE atomic file write, THE directory swap.

Every artifact, store, cache, checkpoint and report in this project is written by
write-then-rename, so a reader never sees half a file or half a directory:

    with atomic_path("out.jsonl") as tmp: tmp.write_text(...)     # any writer (np.save, PIL, torch.save)
    write_bytes_atomic(path, data); write_text_atomic(path, text); write_json_atomic(path, payload)
    replace_directory(tmp_dir, target)     # swap a finished sibling temp dir into place
    settle_directory(target)               # undo a swap interrupted between its two renames
    with exclusive_lock(path, "..."):      # one writer per output (flock: dropped by the OS even on kill -9)
    remove_stale_temps(path)               # `.<name>.tmp-<pid>` left by a writer killed mid-write
    remove_dead_temps(path)                # the same without a lock: those whose process is gone

With fsync (the default of the byte and text writers), the file AND its folder are fsynced, so after
a power loss the new name points at the whole new content, never at an empty file.

Fault injection (tests): every write point (a temp file written, a rename, a journal step) calls
`write_point()`; with BSSAN_KILL_AT_WRITE=N in the environment the process SIGKILLs itself at
its N-th write point, so a test can kill a command at every point in turn (tests/engine/test_reliability.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

from engine.errors import InputError

KILL_AT_WRITE_ENV = "BSSAN_KILL_AT_WRITE"
_write_points = 0


def write_point() -> None:
    """A point where a kill leaves a partly written output; SIGKILL here when it is the N-th of
    BSSAN_KILL_AT_WRITE=N (a real kill -9: no finally block, no atexit runs)."""
    global _write_points
    target = os.environ.get(KILL_AT_WRITE_ENV)
    if not target:
        return
    _write_points += 1
    if _write_points == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


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


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so a rename inside it survives a power loss (a no-op where folders cannot be opened)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


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
        write_point()
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
        write_point()
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete `.<name>.tmp-<pid>` files beside `path` that a killed writer left. Call it only while
    holding the output's exclusive lock: then no other writer can be using them."""
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            if stale.is_file():
                stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by another user (or unknowable): keep its files
    return True


def remove_dead_temps(path: str | os.PathLike) -> None:
    """Delete `.<name>.tmp-<pid>` files and folders beside `path` whose process no longer runs (a writer
    killed mid-write): safe without a lock, since a live writer's temp is never touched."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive_lock(lock_file: str | os.PathLike, busy: str, error: type[Exception] | None = None, remove: bool = False):
    """Hold an exclusive flock on `lock_file` (created) for the block; the OS drops it when the process
    dies, even by kill -9, so a lock is never stale. Another holder: `error(busy)` (default InputError,
    a one-line user error). Without fcntl (not POSIX) there is no lock: keep to one writer.
    remove=True deletes the lock file when the block ends (still holding the lock; a process that
    opened the deleted file sees that its file is no longer the one at the path and opens it anew)."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        fcntl = None
    while True:
        handle = open(lock_file, "a")
        if fcntl is None:
            break
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise (error or InputError)(busy) from None
        try:
            if os.stat(lock_file).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()  # removed by the previous holder after we opened it: lock the new file
    try:
        yield handle
    finally:
        if remove:
            lock_file.unlink(missing_ok=True)
        handle.close()


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
    write_point()
    if directory.exists():
        os.replace(directory, directory.with_name(f".{directory.name}.old"))
        write_point()
    os.replace(tmp, directory)
    if fsync:
        fsync_dir(directory.parent)
    write_point()
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
