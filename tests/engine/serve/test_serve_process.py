"""`python -m engine.serve` as a real process: kill -9 during a burst of adds, restart, and every
acknowledged image is there (and nothing unasked-for); SIGTERM shuts down gracefully with the
gallery checkpointed; bad command lines exit 2 with one line."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx", reason="the service tests need the serve extra: pip install 'bssan-engine[serve]'")
pytest.importorskip("faiss", reason="the service needs the serve extra: pip install 'bssan-engine[serve]'")

from tests.engine.serve.conftest import ServerProcess  # noqa: E402

KEY = "process-test-key-0123456789"


def test_kill_9_during_adds_then_restart(serve_artifact, gallery_dir, serve_photos, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    index = tmp_path / "index"
    server = ServerProcess(["--model", str(serve_artifact), "--gallery", str(gallery_dir), "--index", str(index),
                            "--api-key-file", str(key_file)], tmp_path / "server.log").start()
    acknowledged, attempted, stop = [], [], threading.Event()
    lock = threading.Lock()

    def add(worker: int):
        with httpx.Client(base_url=server.url, timeout=30, headers={"X-API-Key": KEY}) as client:
            n = 0
            while not stop.is_set():
                image_id = f"burst-{worker}-{n}.png"
                photo = serve_photos[(worker + n) % len(serve_photos)]
                with lock:
                    attempted.append(image_id)
                try:
                    response = client.put(f"/v1/images/{image_id}", files={"image": (photo.name, photo.read_bytes(), "image/png")})
                except httpx.HTTPError:
                    return  # the server died under us: this one was never acknowledged
                if response.status_code in (200, 201):
                    with lock:
                        acknowledged.append(image_id)
                n += 1

    workers = [threading.Thread(target=add, args=(w,)) for w in range(3)]
    try:
        for w in workers:
            w.start()
        deadline = time.time() + 60
        while len(acknowledged) < 6 and time.time() < deadline:
            time.sleep(0.05)
        server.kill()  # SIGKILL with writes in flight
        stop.set()
        for w in workers:
            w.join()
        assert len(acknowledged) >= 6, f"only {len(acknowledged)} adds acknowledged in 60 s"
        server.start()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            ids = set(client.get("/v1/images", params={"limit": 1000}).json()["ids"])
            assert set(acknowledged) <= ids, sorted(set(acknowledged) - ids)
            assert ids <= set(attempted) | {p.name for p in gallery_dir.iterdir() if p.is_file()}
            assert client.get(f"/v1/images/{acknowledged[-1]}").status_code == 200
            hits = client.post("/v1/search", json={"text": "a photo", "top_k": 3}).json()["results"]
            assert len(hits) == 3
        # graceful: uvicorn finishes the requests, our lifespan checkpoints the gallery, then uvicorn
        # re-raises the SIGTERM it caught (the conventional exit status of a process ended by a signal)
        assert server.terminate() in (0, -signal.SIGTERM)
        assert (index / "log.bin").stat().st_size == 0  # checkpointed into the snapshot
        assert (index / "snapshot" / "cache.json").is_file()
        assert "Traceback" not in server.log.read_text()
    finally:
        stop.set()
        server.kill()


def test_bad_command_lines_exit_2_with_one_line(serve_artifact, tmp_path):
    for args, message in ((["--model", str(tmp_path / "missing"), "--gallery", str(tmp_path)], "missing"),
                          (["--model", str(serve_artifact), "--gallery", str(tmp_path / "nope")], "--gallery"),
                          (["--model", str(serve_artifact), "--index-kind", "annoy"], "--index-kind"),
                          (["--model", str(serve_artifact), "--index", str(tmp_path), "--import-store", str(tmp_path)], "--import-store"),
                          (["--model", str(serve_artifact), "--gallery", str(tmp_path), "--import-store", str(tmp_path / "no-store")],
                           "no-store")):
        done = subprocess.run([sys.executable, "-m", "engine.serve", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
