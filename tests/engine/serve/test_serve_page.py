"""The search page in a real headless Chromium (Debian's `chromium`, driven by Playwright): search,
see ranked results with scores, open the attention view (heat map over the photo, word weights),
upload a photo to rank captions; a screenshot is taken and inspected (not blank, the grid drawn)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the service needs the serve extra: pip install 'bssan-engine[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright (the serve extra)")

from tests.engine.serve.conftest import ServerProcess  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium (.ci/run does)")


@pytest.fixture(scope="module")
def server(serve_artifact, serve_photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    gallery = root / "gallery"
    gallery.mkdir()
    for photo in serve_photos[:5]:
        shutil.copy(photo, gallery / photo.name)
    captions = root / "captions.txt"
    captions.write_text("a cat with green eyes\nan astronaut in a white suit\na cup of coffee\na red rocket\n", encoding="utf-8")
    process = ServerProcess(["--model", str(serve_artifact), "--gallery", str(gallery), "--captions", str(captions)],
                            root / "server.log").start()
    yield process
    process.terminate()


def test_search_results_attention_and_upload(server, serve_photos, tmp_path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('info').textContent.includes('5 images')", timeout=15000)
            page.fill("#query", "a cat with green eyes")
            page.click("#search")
            page.wait_for_selector(".result img", timeout=20000)
            cards = page.query_selector_all(".result")
            assert len(cards) == 5
            scores = [float(c.inner_text().split("BSSAN ")[1].split(" ")[0]) for c in cards]
            assert scores == sorted(scores, reverse=True)
            page.wait_for_function("[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)",
                                   timeout=15000)
            cards[0].click()
            page.wait_for_selector("#attention[data-ready='1']", timeout=20000)
            words = [w.inner_text() for w in page.query_selector_all("#words .word")]
            assert words == ["a", "cat", "with", "green", "eyes"]
            page.click("#words .word >> nth=1")  # one word's own region map
            page.set_input_files("#photo", str(serve_photos[5]))
            page.click("#rank")
            page.wait_for_selector("#captions li.caption", timeout=20000)
            assert len(page.query_selector_all("#captions li.caption")) == 4
            shot = Path(os.environ.get("BSSAN_PAGE_SCREENSHOT", tmp_path / "page.png"))
            page.screenshot(path=str(shot), full_page=True)
            heatmap = page.locator("#heatmap").screenshot()
            assert not errors, errors
        finally:
            browser.close()
    check_screenshot(shot.read_bytes(), heatmap)


def test_docs_page_renders_offline(server):
    """Swagger UI at /docs renders every endpoint with all traffic outside the server refused."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            outside = []

            def only_the_server(route):
                if route.request.url.startswith(server.url + "/"):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()

            page.route("**/*", only_the_server)
            page.goto(server.url + "/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=20000)
            shown = {e.inner_text().replace("\u200b", "") for e in page.query_selector_all(".opblock-summary-path")}
            assert {"/v1/search", "/v1/captions", "/v1/score", "/healthz"} <= shown, shown
            assert not outside, outside
        finally:
            browser.close()


def check_screenshot(png: bytes, heatmap_png: bytes) -> None:
    from PIL import Image

    page = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    assert page.shape[0] >= 600 and page.shape[1] >= 1000
    assert page.std() > 20, "the screenshot is (nearly) blank"
    header = np.median(page[5:40, 5:600].reshape(-1, 3), axis=0)  # the bar's colour (its white title is a minority)
    assert abs(header - [29, 53, 87]).max() < 20, f"the header bar is not drawn: {header}"
    photos = page[150:600, 30:760]  # the results grid: photos, so many distinct colours
    assert len(np.unique(photos.reshape(-1, 3).astype(np.uint8), axis=0)) > 2000, "the results grid shows no photos"
    heat = np.asarray(Image.open(io.BytesIO(heatmap_png)).convert("RGB"), dtype=np.float32)
    assert heat.shape[0] > 100 and heat.std() > 10, "the attention heat map is blank"
