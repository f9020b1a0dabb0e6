"""The demo in a real browser: the server (REST + Gradio) on a free localhost port, headless Chromium via Playwright.

Needs Debian's Chromium at /usr/bin/chromium (or $REFSEG_CHROMIUM);
scripts/test.sh installs it. Without it the test fails, it is never skipped.
Every request the page makes to anything but the local server is blocked
and recorded: the demo must render and work offline.
"""

import base64
import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _serve_fixtures import SQUARE, RedModel, png_bytes, red_square_image

CHROMIUM = os.environ.get("REFSEG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
TIMEOUT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of the real server (uvicorn in a thread), serving RedModel with the SynthRef examples."""
    import uvicorn

    from refseg.serve import create_app

    app = create_app({"red": RedModel()}, cache_dir=tmp_path_factory.mktemp("cache"))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    """A Chromium page on the demo; ``page.external`` lists blocked off-host requests."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: run scripts/test.sh (it installs Debian's chromium) "
                    "or `apt-get install -y chromium`, or set REFSEG_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.set_default_timeout(TIMEOUT_MS)
        external = []

        def route(r):
            if r.request.url.startswith(server):
                r.continue_()
            else:
                external.append(r.request.url)
                r.abort()

        pg.route("**/*", route)
        pg.external = external
        pg.goto(server + "/")
        pg.locator("#segment").wait_for()
        yield pg
        browser.close()


def _fetch_png(page, src: str) -> np.ndarray:
    body = page.request.get(src if src.startswith("http") else page.url.rstrip("/") + src).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def test_upload_type_segment_shows_the_mask(page, tmp_path):
    rgb = red_square_image()
    path = tmp_path / "red.png"
    Image.fromarray(rgb).save(path)
    page.locator("#input-image input[type=file]").set_input_files(str(path))
    page.get_by_label("Expressions (one per line)").fill("the red square")
    page.locator("#segment").click()
    result = page.locator("#result img")
    result.wait_for()
    out = _fetch_png(page, result.get_attribute("src"))

    h, w = rgb.shape[:2]
    k = out.shape[1] // w  # the demo upscales small images by an integer factor
    assert k >= 1 and out.shape[1] == k * w and out.shape[0] > k * h, out.shape
    shown = out[: k * h]
    expected = np.repeat(np.repeat(rgb, k, 0), k, 1).astype(int)
    assert shown.std() > 5, "the result image is blank"
    y0, x0, y1, x1 = (v * k for v in SQUARE)
    m = 3 * k  # away from the mask edge
    inside = np.abs(shown[y0 + m : y1 - m, x0 + m : x1 - m].astype(int) - expected[y0 + m : y1 - m, x0 + m : x1 - m])
    assert inside.mean() > 5, "the masked region is not tinted"
    outside = np.ones(shown.shape[:2], bool)
    outside[y0 - m : y1 + m, x0 - m : x1 + m] = False
    assert np.abs(shown[outside].astype(int) - expected[outside]).max() <= 1, "pixels outside the mask changed"
    band = out[k * h :]
    assert band.shape[0] >= 10 and (band.max(-1) > 100).any(), "no caption under the image"
    assert "the red square" in page.locator("#scores").inner_text()
    assert page.external == []


def test_rest_api_from_the_page(page):
    b64 = base64.b64encode(png_bytes(red_square_image())).decode()
    answer = page.evaluate(
        """async (b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const form = (text) => {
                const fd = new FormData();
                fd.append('image', new Blob([bytes], {type: 'image/png'}), 'red.png');
                if (text !== null) fd.append('text', text);
                return fd;
            };
            const ok = await fetch('/segment', {method: 'POST', body: form('the red square')});
            const bad = await fetch('/segment', {method: 'POST', body: form(null)});
            const health = await fetch('/health');
            return {ok: [ok.status, await ok.json()], bad: [bad.status, await bad.json()],
                    health: [health.status, await health.json()]};
        }""",
        b64,
    )
    status, body = answer["ok"]
    assert status == 200 and body["results"][0]["area"] > 1000 and not body["results"][0]["no_target"]
    assert answer["bad"][0] == 400 and answer["bad"][1]["error"]["code"] == "missing_text"
    assert answer["health"] == [200, {**answer["health"][1], "status": "ok"}]
    assert page.external == []


def test_examples_fill_the_inputs(page):
    page.get_by_text("Examples (SynthRef tiny, test split)").wait_for()
    page.locator("[data-testid='dataset-cell-0-1']").click()  # first example, its expressions cell
    page.wait_for_function("() => document.querySelector('#expressions textarea').value.includes('\\n')")
    lines = page.locator("#expressions textarea").input_value().splitlines()
    assert len(lines) >= 2 and all(line.strip() for line in lines)
    page.wait_for_function("() => (document.querySelector('#input-image img') || {}).src?.includes('test_00000')")
    assert page.external == []
