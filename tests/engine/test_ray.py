"""--ray (engine/distributed/): feature extraction and ranking of a small real gallery (13 Flickr8K photos
+ one corrupt file) on ONE local Ray instance shared by the module (2 CPUs, 2 workers of 1 thread),
against the single-process commands: byte-identical stores and rankings, a worker SIGKILLed mid-run
(BSSAN_RAY_KILL_UNIT) changes nothing, and a killed job resumes from what it had written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.distributed import KILL_UNIT_ENV, RAY_EXTRA
from engine.features import PROGRESS_NAME, ExtractConfig, extract
from engine.files import KILL_AT_WRITE_ENV
from engine.journal import STOP_AFTER_ENV
from tests.conftest import REPO_ROOT, build_store

PHOTOS = 13  # 4 extraction batches of 4 with the corrupt file; 2 scoring units of 8 image rows
BATCH = 4
CORRUPT = "corrupt_0000.jpg"
SCORE = ["--backend", "onnxruntime-cpu", "--threads", "1"]


def store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module (start-up costs seconds): what the commands' --ray joins."""
    ray = pytest.importorskip("ray", reason=f"the Ray tests need Ray ({RAY_EXTRA})")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def gallery(flickr8k, tmp_path_factory) -> tuple[Path, Path]:
    """A Flickr8K-format test split: PHOTOS real photos (symlinked) and one corrupt file, with their captions."""
    root = tmp_path_factory.mktemp("ray-gallery")
    (root / "images").mkdir()
    names = [n.strip() for n in (flickr8k / "split_test.txt").read_text().splitlines()]
    names = [n for n in names if (flickr8k / "images" / n).is_file()][:PHOTOS]
    for name in names:
        (root / "images" / name).symlink_to(flickr8k / "images" / name)
    (root / "images" / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    (root / "split_test.txt").write_text("".join(n + "\n" for n in names + [CORRUPT]))
    keep = set(names)
    lines = [line for line in (flickr8k / "captions.txt").read_text(encoding="utf-8").splitlines() if line.split("#")[0] in keep]
    lines += [f"{CORRUPT}#{i}\tA picture that cannot be opened ." for i in range(5)]
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "images", root / "captions.txt"


@pytest.fixture(scope="module")
def config_for(gallery, backbone_assets, tmp_path_factory):
    cache = tmp_path_factory.mktemp("word-cache")

    def make(out: Path) -> ExtractConfig:
        return ExtractConfig(images=gallery[0], captions=gallery[1], out=out, splits=("test",), assets=backbone_assets,
                             word_features=("glove50",), batch_size=BATCH, threads=1, cache_dir=cache)

    return make


@pytest.fixture(scope="module")
def one_process_store(config_for, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "one-process"
    extract(config_for(out))
    return out


def test_ray_extraction_with_a_killed_worker_equals_one_process(one_process_store, config_for, ray_address, tmp_path, monkeypatch):
    from engine.distributed.features import extract_on_ray

    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_UNIT_ENV, f"1:{marker}")  # the worker given batch 1 dies by SIGKILL, once
    monkeypatch.setattr("engine.features.WORD_CHUNK", 32)  # 3 chunks of captions: the words on workers too (GloVe: same bytes)
    computed: list[int] = []
    reports = extract_on_ray(config_for(tmp_path / "ray"), "local", workers=2, observe=lambda split, b: computed.append(b))
    assert marker.exists(), "no worker was killed"
    assert computed == [0, 1, 2, 3] and reports["test"].computed == PHOTOS + 1 and len(reports["test"].bad_images) == 1
    assert store_files(tmp_path / "ray") == store_files(one_process_store)


def test_a_killed_ray_job_resumes_from_its_finished_batches(one_process_store, config_for, ray_address, tmp_path):
    """The driver of a --ray job is killed (kill -9 at a write point after its first listed batch); the
    rerun computes only the batches not listed and ends with the same bytes."""
    from engine.distributed.features import extract_on_ray

    config = config_for(tmp_path / "ray")
    argv = ["--images", config.images, "--captions", config.captions, "--splits", "test", "--out", config.out,
            "--assets", config.assets, "--batch-size", BATCH, "--threads", 1, "--ray", ray_address, "--ray-workers", 1]
    env = {**os.environ, KILL_AT_WRITE_ENV: "11", "BSSAN_CACHE": str(config.cache_dir), "PYTHONPATH": str(REPO_ROOT),
           "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": "5"}  # a dead job's CPU reservation: 5 s, not 180 (docs/ray.md)
    killed = subprocess.run([sys.executable, "-m", "engine.features", *map(str, argv)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    done = json.loads((config.out / "test" / PROGRESS_NAME).read_text())["done"]
    assert done and len(done) < 4
    computed: list[int] = []
    extract_on_ray(config, ray_address, workers=2, observe=lambda split, b: computed.append(b))
    assert computed == [b for b in range(4) if b not in done]
    assert store_files(config.out) == store_files(one_process_store)


def score(capsys, *argv) -> str:
    from engine.score import main

    code = main([str(a) for a in argv] + SCORE)
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def test_ray_ranking_with_a_killed_worker_is_byte_identical(one_process_store, image_artifact, ray_address, tmp_path, capsys,
                                                            monkeypatch):
    """The real gallery's store through an artifact of real feature sizes, exhaustive, both directions: the image
    shard and the 2 scoring units on Ray, the worker of scoring unit 1 killed."""
    argv = ["--model", image_artifact, "--images", one_process_store, "--split", "test", "--direction", "both", "--top-k", 5]
    score(capsys, *argv, "--out", tmp_path / "one.jsonl")
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_UNIT_ENV, f"1:{marker}")  # encoding has 1 unit (0); scoring unit 1 is killed
    err = score(capsys, *argv, "--out", tmp_path / "ray.jsonl", "--ray", "--ray-workers", 2)
    assert marker.exists() and "ray: " in err
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_ray_shortlist_ranking_resumes_a_killed_job_byte_identical(tiny_artifact, ray_address, tmp_path, capsys):
    """Shortlist mode (first stage, fused re-rank) on the synthetic store: a one-process job killed after its
    first journaled unit is finished by --ray (only the rest of the units), same bytes as one process alone."""
    from engine.journal import UNIT_SHORTLIST_IMAGES

    store = build_store(tmp_path / "store", splits={"test": UNIT_SHORTLIST_IMAGES + 4})  # 2 units of images' re-rank pairs
    argv = ["--model", tiny_artifact, "--images", store, "--direction", "both", "--top-k", 5, "--shortlist-k", 8]
    score(capsys, *argv, "--out", tmp_path / "one.jsonl")
    out = tmp_path / "ray.jsonl"
    env = {**os.environ, STOP_AFTER_ENV: "1", "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.run([sys.executable, "-m", "engine.score", *map(str, argv), "--out", str(out), *SCORE], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    journal = tmp_path / ".ray.jsonl.partial"
    assert len(json.loads((journal / "progress.json").read_text())["done"]) == 1
    score(capsys, *argv, "--out", out, "--ray", "--ray-workers", 2)
    assert out.read_bytes() == (tmp_path / "one.jsonl").read_bytes() and not journal.exists()


def test_without_ray_installed_the_error_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    import importlib.util

    from engine.features import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    code = main(["--images", str(tmp_path), "--captions", str(tmp_path / "c.txt"), "--out", str(tmp_path / "s"), "--ray"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Ray is not installed" in err and RAY_EXTRA in err


def test_an_unreachable_address_is_one_line(tmp_path, capsys):
    pytest.importorskip("ray", reason=f"needs Ray ({RAY_EXTRA})")
    from engine.score import main

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main(["--model", str(tmp_path), "--images", str(tmp_path), "--query", "a dog", "--ray", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"--ray 127.0.0.1:{port}: cannot reach a Ray cluster there" in err
    code = main(["--model", str(tmp_path), "--images", str(tmp_path), "--query", "a dog", "--ray", "nowhere"])
    assert code == 2 and "expected HOST:PORT" in capsys.readouterr().err


def test_a_sharded_gallery_ranks_on_ray_byte_identical(tiny_artifact, ray_address, tmp_path, capsys):
    """--image-shards with --ray: 1,100 synthetic images in 2 shards (the real first-stage tile, 1,024 rows) encoded on
    workers, the t2i first stage fanned out one unit per shard (workers on the driver's BLAS threads) and merged, the
    re-rank units on workers that read their images from the shards: the in-memory run's bytes, both directions."""
    store = build_store(tmp_path / "store", splits={"test": 1100}, captions_per_image=1)
    argv = ["--model", tiny_artifact, "--images", store, "--direction", "both", "--top-k", 3, "--shortlist-k", 4]
    score(capsys, *argv, "--out", tmp_path / "one.jsonl")
    err = score(capsys, *argv, "--out", tmp_path / "ray.jsonl", "--image-shards", tmp_path / "shards", "--shard-size", 1024,
                "--ray", "--ray-workers", 2)
    assert "ray: " in err and (tmp_path / "shards" / "shard-00001" / "cache.json").is_file()
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_a_user_error_comes_out_of_rays_wrappers():
    """Ray Data wraps a worker's exception (RayTaskError -> UserCodeException -> the error, via .cause and
    __cause__); the command re-raises the user's own one-line error (engine.distributed.unwrap)."""
    from engine.distributed import unwrap
    from engine.errors import ImageError

    class Wrapper(Exception):
        def __init__(self, cause):
            super().__init__("worker failed")
            self.cause = cause

    original = ImageError("photo.jpg: cannot identify image file; expected a JPEG, PNG or ...")
    inner = RuntimeError("UserCodeException")
    inner.__cause__ = original
    assert unwrap(Wrapper(inner)) is original
    plain = Wrapper(RuntimeError("a bug"))
    assert unwrap(plain) is plain  # not a user error: Ray's own exception is kept, traceback and all
