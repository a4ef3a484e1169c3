"""engine/files.py (THE atomic write and directory swap) and engine/cli.py (THE error-to-exit-code mapping)."""

from __future__ import annotations

import os

import pytest

from engine.cli import command
from engine.errors import ArtifactError, InputError
from engine.files import atomic_path, replace_directory, settle_directory, write_bytes_atomic, write_json_atomic


def test_atomic_path_leaves_the_old_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_write_json_atomic_takes_numpy_values(tmp_path):
    import numpy as np

    write_json_atomic(tmp_path / "a" / "r.json", {"b": np.float32(0.5), "a": np.arange(2)})
    assert (tmp_path / "a" / "r.json").read_text() == '{\n  "a": [\n    0,\n    1\n  ],\n  "b": 0.5\n}\n'


def test_replace_directory_and_settle_undo_an_interrupted_swap(tmp_path):
    target, tmp = tmp_path / "d", tmp_path / ".d.tmp-1"
    target.mkdir(); (target / "f").write_text("old")
    tmp.mkdir(); (tmp / "f").write_text("new")
    replace_directory(tmp, target)
    assert (target / "f").read_text() == "new" and not tmp.exists() and not (tmp_path / ".d.old").exists()
    target.rename(tmp_path / ".d.old")  # killed between the two renames of a later swap
    settle_directory(target)
    assert (target / "f").read_text() == "new"


def test_command_maps_user_errors_to_one_line_and_exit_code(capsys):
    @command
    def main(argv=None):
        raise ArtifactError("model/manifest.json: expected format 'bssan-artifact', got None")

    assert main([]) == 2
    assert capsys.readouterr().err == "error: model/manifest.json: expected format 'bssan-artifact', got None\n"

    @command
    def buggy(argv=None):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        buggy([])
    assert command(lambda argv=None: 0)() == 0 and issubclass(InputError, Exception)


def test_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from engine.files import remove_dead_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    (tmp_path / f".out.jsonl.tmp-{dead_pid}").write_text("half a result")
    (tmp_path / f".artifact.tmp-{dead_pid}").mkdir()
    (tmp_path / f".artifact.tmp-{dead_pid}" / "graph.onnx").write_bytes(b"x")
    live = tmp_path / f".out.jsonl.tmp-{os.getppid()}"  # the parent of this process is alive
    live.write_text("being written")
    remove_dead_temps(tmp_path / "out.jsonl")
    remove_dead_temps(tmp_path / "artifact")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_an_fsynced_write_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else None)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_json_atomic(tmp_path / "progress.json", {"done": [1]}, fsync=True)
    assert len(synced) == 2 and synced[1] in (True, None)  # the file, then the folder holding its new name
