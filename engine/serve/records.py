"""The gallery's log format and durable file writes (engine/serve/gallery.py writes and replays them).

    record = encode_record({"op": "put", "id": "cat.jpg"}, {"image_vectors": vector, ...})   # bytes to append
    records = read_log(Path("index/log.bin"))     # [(header, arrays)]; a torn tail is cut off the file
    log_segments(Path("index"))                   # the sealed segments log-<n>.bin, oldest first
    write_file_durable(path, data)                # temp file, fsync, rename, fsync the folder
    remove_directory_durable(path)                # rename to a temp name, fsync the folder, delete

A record is MAGIC | u32 payload length | u32 crc32 of the payload | payload, and the payload is
u32 header length | JSON header {"op": "put"|"del", "id", "arrays": [[name, dtype, shape]]} | raw arrays.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

from engine.files import fsync_dir, settle_directory, temp_sibling, write_bytes_atomic

LOG_MAGIC = b"BSL1"
LOG_HEAD = struct.Struct("<4sII")  # magic, payload length, crc32 of the payload
SEGMENT_PREFIX, SEGMENT_SUFFIX = "log-", ".bin"  # a sealed segment: log-000001.bin, log-000002.bin, ...


def write_file_durable(path: Path, data: bytes) -> None:
    """engine.files' atomic write (temp file, fsync, rename), then fsync the folder: the rename is on disk."""
    write_bytes_atomic(path, data, fsync=True)
    fsync_dir(path.parent)


def remove_directory_durable(directory: Path) -> None:
    """Delete a directory at once: renamed to a temp name (a reader sees it whole or not at all), then removed."""
    settle_directory(directory)
    if directory.exists():
        doomed = temp_sibling(directory)
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(directory, doomed)
        fsync_dir(directory.parent)
        shutil.rmtree(doomed)


def _segment_number(path: Path) -> int | None:
    digits = path.name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def log_segments(root: Path) -> list[Path]:
    """The sealed log segments in `root`, oldest (lowest number) first."""
    found = [(_segment_number(p), p) for p in Path(root).glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}")]
    return [p for n, p in sorted((n, p) for n, p in found if n is not None)]


def segment_path(root: Path, sealed: list[Path]) -> Path:
    """The name of the next sealed segment: one past the newest of `sealed` (the segments still on disk)."""
    number = _segment_number(sealed[-1]) + 1 if sealed else 1
    return Path(root) / f"{SEGMENT_PREFIX}{number:06d}{SEGMENT_SUFFIX}"


def encode_record(header: dict, arrays: dict[str, np.ndarray] | None = None) -> bytes:
    arrays = arrays or {}
    header = {**header, "arrays": [[k, str(v.dtype), list(v.shape)] for k, v in arrays.items()]}
    head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    payload = b"".join([struct.pack("<I", len(head)), head, *(np.ascontiguousarray(v).tobytes() for v in arrays.values())])
    return LOG_HEAD.pack(LOG_MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    (size,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4:4 + size].decode("utf-8"))
    arrays, pos = {}, 4 + size
    for name, dtype, shape in header["arrays"]:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        arrays[name] = np.frombuffer(payload[pos:pos + count], dtype=dtype).reshape(shape)
        pos += count
    return header, arrays


def read_log(path: Path) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """Every whole record of the log; a torn or corrupt tail is cut off (it was never acknowledged)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    records, pos = [], 0
    while pos < len(data):
        if len(data) - pos < LOG_HEAD.size:
            break
        magic, length, crc = LOG_HEAD.unpack_from(data, pos)
        payload = data[pos + LOG_HEAD.size:pos + LOG_HEAD.size + length]
        if magic != LOG_MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            break
        records.append(decode_payload(payload))
        pos += LOG_HEAD.size + length
    if pos < len(data):
        print(f"note: {path}: {len(data) - pos} bytes after record {len(records)} are a torn write (never acknowledged); "
              f"cut off", file=sys.stderr)
        with open(path, "r+b") as handle:
            handle.truncate(pos)
            os.fsync(handle.fileno())
    return records
