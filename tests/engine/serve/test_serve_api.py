"""The HTTP API in-process (FastAPI's TestClient, lifespan included): search, captions, pairs,
attention, writes with the API key, metrics, OpenAPI, and every bad request answered by a
one-line JSON 4xx while the server stays up."""

from __future__ import annotations

import io
import json
import time

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'bssan-engine[serve]'")
pytest.importorskip("faiss", reason="the service needs the serve extra: pip install 'bssan-engine[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from engine.serve.app import ServeConfig, create_app  # noqa: E402
from engine.serve.service import Limits  # noqa: E402

KEY = "test-key-0123456789abcdef"
CAPTIONS = ["an astronaut in a white suit", "a cat with green eyes", "a cup of coffee on a saucer",
            "a man with a camera on a tripod", "a rocket on the launch pad", "a horse in a field"]


def wait_ready(client: TestClient, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"not ready after {seconds} s: {client.get('/readyz').json()}")


@pytest.fixture(scope="module")
def client(serve_artifact, serve_photos, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("serve-api")
    gallery = root / "gallery"
    gallery.mkdir()
    for photo in serve_photos[:4]:
        shutil.copy(photo, gallery / photo.name)
    (gallery / "notes.txt").write_text("not an image")
    captions = root / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    config = ServeConfig(model=serve_artifact, gallery=gallery, captions=captions, api_key=KEY, progress=False,
                         limits=Limits(max_body_bytes=2 * 2**20, max_image_pixels=4_000_000))
    with TestClient(create_app(config), raise_server_exceptions=False) as test_client:
        wait_ready(test_client)
        test_client.photos = serve_photos
        yield test_client


def assert_error(response, status: int, field: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert "\n" not in body["error"] and "Traceback" not in body["error"], body
    assert body["error"].startswith(field), (field, body["error"])


def test_health_info_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "gallery": 4}
    info = client.get("/v1/info").json()
    assert info["gallery"] == 4 and info["captions"] == len(CAPTIONS) and info["writes"] is True
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/search", "/v1/captions", "/v1/score", "/v1/images/{image_id}"} <= set(paths)
    assert "text/html" in client.get("/").headers["content-type"]


def test_docs_page_needs_no_internet(client):
    """/docs is Swagger UI whose script, style and favicon this server serves itself (no CDN)."""
    import re

    html = client.get("/docs").text
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html)
    assert len(assets) >= 3 and all(a.startswith("/docs-static/") for a in assets), assets
    assert "https://" not in html and "http://" not in html, html
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 1000, asset
    assert b"SwaggerUIBundle" in client.get("/docs-static/swagger-ui-bundle.js").content


def test_sessions_do_not_spin(client):
    """The service opens its ONNX Runtime sessions without busy-waiting intra-op threads (shared cores)."""
    runner = client.app.state.holder["state"].scorer.runner
    assert runner.spinning is False and runner.sessions
    for name, session in runner.sessions.items():
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0", name
        if name.endswith("_text"):  # a query's few words: one intra-op thread
            assert session.get_session_options().intra_op_num_threads == 1, name


def test_search_ranks_gallery_images(client):
    body = client.post("/v1/search", json={"text": "a cat with green eyes", "top_k": 3, "rerank_k": 4}).json()
    hits = body["results"]
    assert len(hits) == 3
    assert {h["id"] for h in hits} <= set(client.get("/v1/images").json()["ids"])
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all("attention" not in h for h in hits)


def test_search_with_attention(client):
    hits = client.post("/v1/search", json={"text": "a cat with green eyes", "top_k": 2, "attention": True}).json()["results"]
    attention = hits[0]["attention"]
    assert attention["words"] == ["a", "cat", "with", "green", "eyes"]
    assert attention["grid"] == [7, 7]
    assert len(attention["word_to_region"]) == 5 and len(attention["word_to_region"][0]) == 49
    assert abs(sum(attention["word_to_region"][0]) - 1) < 1e-2
    assert len(attention["word_weights"]) == 5


def test_rank_captions_for_an_upload(client):
    photo = client.photos[4]
    response = client.post("/v1/captions", files={"image": (photo.name, photo.read_bytes(), "image/png")},
                           data={"top_k": "3", "attention": "true"})
    assert response.status_code == 200, response.text
    hits = response.json()["results"]
    assert len(hits) == 3 and all(h["caption"] in CAPTIONS for h in hits)
    assert hits[0]["attention"]["grid"] == [7, 7]


def test_score_pairs_agrees_with_search(client):
    hits = client.post("/v1/search", json={"text": "a rocket on the launch pad", "top_k": 2}).json()["results"]
    pairs = [{"image_id": h["id"], "caption": "a rocket on the launch pad"} for h in hits]
    scored = client.post("/v1/score", json={"pairs": pairs, "attention": True}).json()["results"]
    assert [s["score"] for s in scored] == pytest.approx([h["score"] for h in hits], abs=1e-5)
    assert scored[0]["attention"]["words"] == ["a", "rocket", "on", "the", "launch", "pad"]


def test_bad_requests_get_one_line_json_errors(client):
    post = client.post
    assert_error(post("/v1/search", content=b'{"text": "a dog"', headers={"Content-Type": "application/json"}), 422, "body: malformed JSON")
    assert_error(post("/v1/search", json={"text": 12}), 422, "text:")
    assert_error(post("/v1/search", json={"text": "a dog", "top_k": "ten"}), 422, "top_k:")
    assert_error(post("/v1/search", json={}), 422, "text: missing")
    assert_error(post("/v1/search", json={"text": "a dog", "colour": "red"}), 422, "colour:")
    assert_error(post("/v1/search", json=["a dog"]), 422, "body")
    assert_error(post("/v1/search", json={"text": "a dog", "top_k": 0}), 400, "top_k: 0")
    assert_error(post("/v1/search", json={"text": "a dog", "top_k": 101}), 400, "top_k: 101")
    assert_error(post("/v1/search", json={"text": "a dog", "top_k": 10, "rerank_k": 5}), 400, "rerank_k: 5")
    assert_error(post("/v1/search", json={"text": "a dog", "rerank_k": 5000}), 400, "rerank_k: 5000")
    assert_error(post("/v1/search", json={"text": "dog " * 400}), 400, "text: 1600 characters")
    assert_error(post("/v1/search", json={"text": " ... !"}), 400, "text: no word")
    assert_error(post("/v1/search", content=b"x" * (3 * 2**20), headers={"Content-Type": "application/json"}), 413, "body:")
    assert_error(post("/v1/captions", files={"image": ("a.txt", b"plain text", "text/plain")}), 415, "image: not an image")
    assert_error(post("/v1/captions", files={"image": ("a.png", b"", "image/png")}), 400, "image: empty")
    assert_error(post("/v1/captions", data={"top_k": "3"}), 422, "image: missing")
    assert_error(post("/v1/captions", files={"image": ("big.png", big_png(), "image/png")}), 413, "image: 3000x2000")
    assert_error(post("/v1/score", json={"pairs": [{"image_id": "nope.png", "caption": "a dog"}]}), 404, "pairs[0].image_id")
    assert_error(post("/v1/score", json={"pairs": []}), 400, "pairs: 0 pairs")
    assert_error(post("/v1/score", json={"pairs": [{"image_id": "x"}]}), 422, "pairs.0.caption: missing")
    assert_error(client.get("/v1/images/nope.png"), 404, "image_id: 'nope.png'")
    assert_error(client.get("/v1/nothing-here"), 404, "/v1/nothing-here")
    assert_error(client.get("/v1/images", params={"limit": "many"}), 422, "limit:")
    assert client.get("/healthz").status_code == 200


def big_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_writes_need_the_key(client):
    photo = client.photos[5]
    files = {"image": (photo.name, photo.read_bytes(), "image/png")}
    assert_error(client.put("/v1/images/new.png", files=files), 401, "X-API-Key: missing")
    assert_error(client.put("/v1/images/new.png", files=files, headers={"X-API-Key": "wrong"}), 401, "X-API-Key: wrong")
    assert_error(client.delete("/v1/images/new.png", headers={"X-API-Key": KEY + "x"}), 401, "X-API-Key: wrong")
    assert_error(client.put("/v1/images/bad%2Fid", files=files, headers={"X-API-Key": KEY}), 404, "/v1/images/bad/id")


def test_add_replace_remove(client):
    headers = {"X-API-Key": KEY}
    photo, other = client.photos[5], client.photos[4]
    added = client.put("/v1/images/new.png", files={"image": (photo.name, photo.read_bytes(), "image/png")}, headers=headers)
    assert added.status_code == 201 and added.json() == {"id": "new.png", "replaced": False, "gallery": 5}
    assert client.get("/v1/images/new.png").content == photo.read_bytes()
    found = client.post("/v1/search", json={"text": "anything at all", "top_k": 5, "rerank_k": 5}).json()["results"]
    assert "new.png" in [h["id"] for h in found]
    replaced = client.put("/v1/images/new.png", files={"image": (other.name, other.read_bytes(), "image/png")}, headers=headers)
    assert replaced.status_code == 200 and replaced.json()["replaced"] is True and replaced.json()["gallery"] == 5
    assert client.get("/v1/images/new.png").content == other.read_bytes()
    assert client.delete("/v1/images/new.png", headers=headers).json() == {"id": "new.png", "removed": True, "gallery": 4}
    assert_error(client.delete("/v1/images/new.png", headers=headers), 404, "image_id: 'new.png'")
    ids = [h["id"] for h in client.post("/v1/search", json={"text": "anything", "top_k": 4, "rerank_k": 10}).json()["results"]]
    assert "new.png" not in ids and len(ids) == 4


def test_metrics(client):
    client.post("/v1/search", json={"text": "a horse", "top_k": 2})
    text = client.get("/metrics").text
    for name in ("bssan_request_seconds_bucket", "bssan_queue_depth", "bssan_pairs_scored_total",
                 "bssan_pairs_per_second", "bssan_gallery_images 4.0", "bssan_batch_size"):
        assert name in text, name
    assert 'route="/v1/search"' in text
    client.post("/v1/search", json={"text": "a horse", "top_k": 0})
    client.get("/no/such/page")
    text = client.get("/metrics").text
    assert 'bssan_request_seconds_count{method="POST",route="/v1/search",status="400"}' in text  # an error keeps its route
    assert 'bssan_request_seconds_count{method="GET",route="unmatched",status="404"}' in text


def test_read_only_without_a_key(serve_artifact, gallery_dir, tmp_path, serve_photos):
    config = ServeConfig(model=serve_artifact, gallery=gallery_dir, index_dir=tmp_path / "index", progress=False)
    with TestClient(create_app(config), raise_server_exceptions=False) as ro:
        wait_ready(ro)
        photo = serve_photos[5]
        response = ro.put("/v1/images/x.png", files={"image": (photo.name, photo.read_bytes(), "image/png")},
                          headers={"X-API-Key": KEY})
        assert_error(response, 403, "X-API-Key: this server is read-only")
        assert_error(ro.post("/v1/captions", files={"image": (photo.name, photo.read_bytes(), "image/png")}), 400, "captions:")
        assert json.loads(ro.get("/v1/info").text)["writes"] is False


def test_an_internal_error_is_a_500_without_traceback(client, monkeypatch):
    service = client.app.state.holder["state"].service

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nTraceback (most recent call last): secret internals")

    monkeypatch.setattr(service, "score_pairs", broken)
    response = client.post("/v1/score", json={"pairs": [{"image_id": "chelsea.png", "caption": "a cat"}]})
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (logged by the server)"}
    assert client.get("/healthz").status_code == 200
