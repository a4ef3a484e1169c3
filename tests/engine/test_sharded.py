"""engine.score --image-shards (engine/distributed/sharded.py, gallery.py): a gallery kept as memory-mapped shards and
ranked shard by shard writes the same bytes as the in-memory command, resumes a killed shard write, reuses its shards,
and refuses bad options with one line. (The same on Ray: tests/engine/test_ray.py.)

Most tests shrink the first stage's tile (engine.runtime.FIRST_STAGE_TILE, 1024) to 64 so that a few hundred synthetic
images make several tiles and shards; the subprocess test keeps the real tile with 1,100 images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engine.files import KILL_AT_WRITE_ENV
from tests.conftest import REPO_ROOT, build_store
from tests.engine.test_fusion import FUSION, fused_artifact, fused_checkpoint  # noqa: F401  (fixtures: an artifact that fuses)

SCORE = ["--backend", "onnxruntime-cpu", "--threads", "1"]
TILE = 64


@pytest.fixture
def small_tile(monkeypatch):
    monkeypatch.setattr("engine.runtime.FIRST_STAGE_TILE", TILE)


@pytest.fixture(scope="module")
def store300(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store300"), splits={"test": 300})


def score(capsys, *argv) -> str:
    from engine.score import main

    code = main([str(a) for a in argv] + SCORE)
    err = capsys.readouterr().err
    assert code == 0, err
    return err


@pytest.mark.parametrize("mode", [["--shortlist-k", 7], []], ids=["shortlist", "exhaustive"])
def test_sharded_ranking_is_byte_identical_to_in_memory(fused_artifact, store300, tmp_path, capsys, small_tile, mode):
    """Both directions, 300 images in shards of 128 (128, 128, 44: tiles of 64, units of 64 or 8 images), scores fused
    with the first stage: the same --out bytes as the in-memory path, and without --out the same printed rankings."""
    from engine.distributed.gallery import ShardedGallery

    images = 300 if mode else 150  # exhaustive: 150 x 750 pairs (shards of 128 and 22)
    store = store300 if mode else build_store(tmp_path / "store", splits={"test": images})
    argv = ["--model", fused_artifact, "--images", store, "--direction", "both", "--top-k", 5, *mode]
    assert f"fusion {FUSION}" in score(capsys, *argv, "--out", tmp_path / "memory.jsonl")
    shards = tmp_path / "shards"
    err = score(capsys, *argv, "--out", tmp_path / "sharded.jsonl", "--image-shards", shards, "--shard-size", 128)
    assert (tmp_path / "sharded.jsonl").read_bytes() == (tmp_path / "memory.jsonl").read_bytes()
    assert not (tmp_path / ".sharded.jsonl.partial").exists() and "kept" not in err
    gallery = ShardedGallery.load(shards)
    assert gallery.bounds == [(a, min(a + 128, images)) for a in range(0, images, 128)] and len(gallery) == images
    # a later run on the same gallery reuses every shard; without --out the printed rankings are the in-memory ones
    from engine.score import main

    assert main([str(a) for a in argv] + SCORE) == 0
    printed = capsys.readouterr().out
    assert main([str(a) for a in argv + ["--image-shards", shards, "--shard-size", 128]] + SCORE) == 0
    again = capsys.readouterr()
    assert again.out == printed and f"kept {len(gallery.bounds)} shards already encoded ({images} images)" in again.err


def test_shards_are_memory_mapped_and_the_first_stage_merges_exactly(tiny_artifact, store300, tmp_path, small_tile):
    """A shard's arrays are np.memmap (nothing read until used); the first stage fanned out over the shards equals
    Scorer.shortlist over the whole cache, indices and dot products bit for bit; rows() copies the listed rows."""
    from engine.distributed.gallery import ShardedGallery
    from engine.runtime import Scorer, first_stage_dots
    from engine.store import FeatureStore

    split = FeatureStore(store300).split("test")
    with Scorer.load(tiny_artifact, "onnxruntime-cpu", threads=1) as scorer:
        images, captions = scorer.encode_images(split), scorer.encode_captions(split)
        want = scorer.shortlist(images, captions, 9, "t2i")
    gallery = ShardedGallery.save(images, tmp_path / "gallery", rows_per_shard=128)
    assert gallery.bounds == [(0, 128), (128, 256), (256, 300)] and gallery.ids == images.ids
    shard = gallery.shard(1)
    assert all(isinstance(a, np.memmap) for a in shard.arrays.values()) and shard.ids == images.ids[128:256]
    indices, scores = gallery.top_k(captions.arrays["text_vectors"], 9)
    assert np.array_equal(indices, want)
    dots = first_stage_dots(captions.arrays["text_vectors"], images.arrays["image_vectors"])
    assert np.array_equal(scores, np.take_along_axis(dots, want, 1))
    rows = np.array([299, 3, 140, 3])
    hits = gallery.rows(rows)
    assert hits.ids == [images.ids[i] for i in rows] and all(type(a) is np.ndarray for a in hits.arrays.values())
    for name, array in images.arrays.items():
        assert hits.arrays[name].tobytes() == np.ascontiguousarray(array[rows]).tobytes()
    stamp = (tmp_path / "gallery" / "shard-00001" / "cache.json").stat().st_mtime_ns
    again = ShardedGallery.save(images, tmp_path / "gallery", rows_per_shard=128)  # a rerun keeps the saved shards
    assert (tmp_path / "gallery" / "shard-00001" / "cache.json").stat().st_mtime_ns == stamp and len(again) == 300


def test_a_killed_shard_write_resumes_with_the_same_bytes(tiny_artifact, tmp_path, capsys, monkeypatch):
    """The real tile (1,024): 1,100 images in 2 shards. The command is SIGKILLed inside the save of shard 1 (the
    temp folder written, not yet renamed: BSSAN_KILL_AT_WRITE); the rerun keeps shard 0 untouched, encodes shard 1
    and writes the bytes of the in-memory run."""
    import engine.files
    from engine.cache import ImageCache

    store = build_store(tmp_path / "store", splits={"test": 1100}, captions_per_image=1)
    argv = ["--model", tiny_artifact, "--images", store, "--direction", "both", "--top-k", 3, "--shortlist-k", 4]
    score(capsys, *argv, "--out", tmp_path / "memory.jsonl")
    # where shard 1's save begins, counted in a rehearsal (write points are counted while BSSAN_KILL_AT_WRITE is set)
    monkeypatch.setenv(KILL_AT_WRITE_ENV, str(10**9))
    monkeypatch.setattr(engine.files, "_write_points", 0)
    starts = []
    real_save = ImageCache.save
    monkeypatch.setattr(ImageCache, "save", lambda self, d: (starts.append((d.name, engine.files._write_points)), real_save(self, d))[1])
    sharded = ["--shard-size", 1024]
    score(capsys, *argv, *sharded, "--out", tmp_path / "rehearsal.jsonl", "--image-shards", tmp_path / "rehearsal")
    kill_at = dict(starts)["shard-00001"] + 1  # replace_directory's first write point: the temp folder is complete
    monkeypatch.undo()

    shards, out = tmp_path / "shards", tmp_path / "sharded.jsonl"
    cmd = [sys.executable, "-m", "engine.score", *map(str, argv), "--out", str(out), "--image-shards", str(shards), "--shard-size", "1024", *SCORE]
    killed = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, KILL_AT_WRITE_ENV: str(kill_at), "PYTHONPATH": str(REPO_ROOT)},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (shards / "shard-00000" / "cache.json").is_file() and not (shards / "shard-00001").exists()
    assert any(p.name.startswith(".shard-00001.tmp-") for p in shards.iterdir())  # the killed writer's temp folder
    stamp = (shards / "shard-00000" / "cache.json").stat().st_mtime_ns
    err = score(capsys, *argv, *sharded, "--out", out, "--image-shards", shards)
    assert "kept 1 shards already encoded (1024 images)" in err
    assert (shards / "shard-00000" / "cache.json").stat().st_mtime_ns == stamp
    assert not any(p.name.startswith(".shard-") for p in shards.iterdir())
    assert out.read_bytes() == (tmp_path / "memory.jsonl").read_bytes()
    assert json.loads((shards / "shards.json").read_text())["count"] == 1100


def test_bad_shard_options_are_one_line_errors(tiny_artifact, store300, tmp_path, capsys, small_tile):
    from engine.score import main

    base = ["--model", str(tiny_artifact), "--images", str(store300), "--top-k", "3", "--shortlist-k", "5"]

    def error(*extra) -> str:
        code = main(base + [str(a) for a in extra] + SCORE)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        return err

    assert "--shard-size 128: given without --image-shards" in error("--shard-size", 128)
    assert "--shard-size 100: expected a multiple of 64" in error("--image-shards", tmp_path / "a", "--shard-size", 100)
    assert "--evaluate with --image-shards: expected one of them" in error("--image-shards", tmp_path / "a", "--evaluate")
    (tmp_path / "file").write_text("x")
    assert "--image-shards" in error("--image-shards", tmp_path / "file") and "is a file" in error("--image-shards", tmp_path / "file")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "photo.jpg").write_text("the user's")
    assert "holds files but no gallery.json; expected an empty folder" in error("--image-shards", tmp_path / "used")
    score(capsys, *base, "--direction", "t2i", "--image-shards", tmp_path / "mine", "--shard-size", 128)
    other = build_store(tmp_path / "other", splits={"test": 20})
    code = main(["--model", str(tiny_artifact), "--images", str(other), "--image-shards", str(tmp_path / "mine")] + SCORE)
    err = capsys.readouterr().err  # found once the artifact is loaded (its fingerprint is part of the key): after the backend line
    assert code == 2 and err.count("error:") == 1 and err.splitlines()[-1].startswith(
        f"error: --image-shards {tmp_path / 'mine'}: holds the shards of another gallery, artifact, precision or shard size")
    assert (tmp_path / "used" / "photo.jpg").read_text() == "the user's" and len(list((tmp_path / "mine").glob("shard-*"))) == 3


class InProcessCluster:
    """Cluster.run's contract (units as JSON, results pickled, in order) without Ray: the --ray code paths of
    --image-shards (encoding units, the first stage per shard, re-rank blocks, exhaustive units) run in this process."""

    workers, cpus, gpus = 1, 1.0, 0.0

    def __init__(self):
        self.runs = []

    def run(self, worker, init, works, what):
        import pickle

        self.runs.append((worker.__name__, len(works)))
        unit = worker(**init)
        for work in works:
            yield pickle.loads(pickle.dumps(unit.run(json.loads(json.dumps(work)))))


@pytest.mark.parametrize("mode", [["--shortlist-k", 6], []], ids=["shortlist", "exhaustive"])
def test_the_ray_paths_of_image_shards_equal_in_memory(fused_artifact, tmp_path, capsys, small_tile, monkeypatch, mode):
    """The --ray side of --image-shards with Cluster.run done in this process (tests/engine/test_ray.py runs the
    shortlist on a real Ray instance): same bytes as the in-memory run, every kind of unit used."""
    pytest.importorskip("ray", reason="--ray checks that Ray is installed")
    cluster = InProcessCluster()
    monkeypatch.setattr("engine.distributed.score.Cluster.connect", lambda *a, **k: cluster)
    monkeypatch.setattr("engine.distributed.gallery.to_object_store", lambda value: value)
    store = build_store(tmp_path / "store", splits={"test": 200 if mode else 90})
    argv = ["--model", fused_artifact, "--images", store, "--direction", "both", "--top-k", 4, *mode]
    score(capsys, *argv, "--out", tmp_path / "memory.jsonl")
    score(capsys, *argv, "--out", tmp_path / "ray.jsonl", "--image-shards", tmp_path / "shards", "--shard-size", 128, "--ray")
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "memory.jsonl").read_bytes()
    kinds = [name for name, _ in cluster.runs]
    assert kinds == (["ScoreWorker", "ShardTopKWorker", "ShardedScoreWorker"] if mode else ["ScoreWorker", "ShardedScoreWorker"])


@pytest.mark.parametrize("mode", [["--shortlist-k", 7], []], ids=["shortlist", "exhaustive"])
def test_an_interrupted_sharded_ranking_resumes_its_units(fused_artifact, tmp_path, capsys, small_tile, monkeypatch, mode):
    """Interrupted after 3 journaled units (Ctrl-C: the journal stays), the rerun scores only the units progress.json
    does not list (the t2i first stage is one of them) and writes the in-memory run's bytes."""
    from engine.cli import INTERRUPT_EXIT_CODE
    from engine.distributed import sharded
    from engine.journal import Journal
    from engine.score import main

    store = build_store(tmp_path / "store", splits={"test": 300 if mode else 40})
    argv = ["--model", fused_artifact, "--images", store, "--direction", "both", "--top-k", 5, *mode]
    score(capsys, *argv, "--out", tmp_path / "memory.jsonl")
    out, sharded_argv = tmp_path / "sharded.jsonl", ["--image-shards", tmp_path / "shards", "--shard-size", 128]
    finish, seen = Journal.finish_unit, []

    def interrupting(self, unit, *arrays):
        finish(self, unit, *arrays)
        seen.append(unit)
        if len(seen) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "finish_unit", interrupting)
    assert main([str(a) for a in argv + ["--out", out] + sharded_argv] + SCORE) == INTERRUPT_EXIT_CODE
    capsys.readouterr()
    progress = tmp_path / ".sharded.jsonl.partial" / "progress.json"  # absent when no unit was listed yet (the journal
    listed = json.loads(progress.read_text())["done"] if progress.exists() else []  # lists units once its caches are saved)
    assert len(listed) <= 3 and (tmp_path / ".sharded.jsonl.partial").is_dir() and not out.exists()
    monkeypatch.setattr(Journal, "finish_unit", finish)
    calls = []
    for name in ("score_unit", "block_i2t"):
        real = getattr(sharded, name)
        monkeypatch.setattr(sharded, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    grid = []
    real_grid = sharded.Scorer.score_grid
    monkeypatch.setattr(sharded.Scorer, "score_grid", lambda self, *a, **k: (grid.append(1), real_grid(self, *a, **k))[1])
    score(capsys, *argv, "--out", out, *sharded_argv)
    assert out.read_bytes() == (tmp_path / "memory.jsonl").read_bytes()
    if mode:  # 300 images: 5 units of 64, and the t2i first stage
        assert calls.count("score_unit") == 5 - len([u for u in listed if u.startswith("pairs")])
    else:  # 40 images: 5 units of 8 rows
        assert len(grid) == 5 - len(listed)
