"""The REST API of refseg.serve through FastAPI's TestClient: health, models, /segment and each 4xx.

Models: `RedModel` (its mask is the red square of the test image, so the
mask can be checked pixel for pixel) and the tiny LTS written with
`export_heads` and loaded by path, as a trained checkpoint would be.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as mask_utils

from _serve_fixtures import SQUARE, RedModel, png_bytes, red_square_image, tiny_lts_file
from refseg.serve import create_app, ensure_examples

MAX_PIXELS = 20_000
MAX_BYTES = 300_000


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    weights = tiny_lts_file(tmp_path_factory.mktemp("tiny-lts"))
    app = create_app({"red": RedModel(), "tiny": str(weights)}, default="red", demo=False,
                     max_pixels=MAX_PIXELS, max_upload_bytes=MAX_BYTES)
    with TestClient(app) as c:
        yield c


def post(client, image=None, texts=("the red square",), model=None, filename="img.png", mime="image/png"):
    files = {} if image is None else {"image": (filename, image, mime)}
    data = {"text": list(texts)}
    if model is not None:
        data["model"] = model
    return client.post("/segment", files=files or None, data=data)


def square_mask(h=90, w=120):
    m = np.zeros((h, w), bool)
    y0, x0, y1, x1 = SQUARE
    m[y0:y1, x0:x1] = True
    return m


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["default_model"] == "red"


def test_models(client):
    r = client.get("/models")
    assert r.status_code == 200
    body = r.json()
    assert body["default"] == "red"
    assert [m["name"] for m in body["models"]] == ["red", "tiny"]
    assert all(m["shipped"] is False for m in body["models"])


def test_segment_masks_match_the_object(client):
    r = post(client, png_bytes(red_square_image()), texts=["the red square", "nothing at all"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["width"], body["height"]) == ("red", 120, 90)
    first, second = body["results"]
    assert first["text"] == "the red square" and not first["no_target"]
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(first["mask_png"])))) > 127
    rle = first["rle"]
    from_rle = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
    assert png.shape == from_rle.shape == (90, 120)
    assert (png == from_rle).all()
    assert first["area"] == int(png.sum())
    assert iou(png, square_mask()) > 0.9
    x, y, w, h = first["bbox"]
    y0, x0, y1, x1 = SQUARE
    assert abs(x - x0) <= 2 and abs(y - y0) <= 2 and abs(x + w - x1) <= 2 and abs(y + h - y1) <= 2
    assert 0.5 < first["score"] <= 1.0
    assert second["no_target"] and second["area"] == 0 and second["bbox"] is None and second["score"] == 0.0


def test_segment_honours_exif_orientation(client):
    img = Image.fromarray(red_square_image())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif)
    r = post(client, buf.getvalue(), filename="img.jpg", mime="image/jpeg")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (90, 120)
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["results"][0]["mask_png"])))) > 127
    assert iou(png, np.rot90(square_mask(), k=-1)) > 0.85


def test_segment_with_a_checkpoint_loaded_by_path(client):
    r = post(client, png_bytes(red_square_image()), texts=["the red square", "the blue circle"], model="tiny")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and len(body["results"]) == 2
    for res in body["results"]:
        assert res["rle"]["size"] == [90, 120]
        assert 0.0 <= res["score"] <= 1.0 and 0.0 <= res["no_target_prob"] <= 1.0
    assert {m["name"]: m["loaded"] for m in client.get("/models").json()["models"]}["tiny"] is True


def _error(r, status, code):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"]["code"] == code and body["error"]["message"]


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        (dict(image=None), 400, "missing_image"),
        (dict(image=b""), 400, "missing_image"),
        (dict(image=b"this is not an image at all", filename="notes.txt", mime="text/plain"), 415, "not_an_image"),
        (dict(image=png_bytes(red_square_image())[:-40]), 422, "bad_image"),
        (dict(image=png_bytes(red_square_image()), texts=()), 400, "missing_text"),
        (dict(image=png_bytes(red_square_image()), texts=("the red square", "   ")), 422, "empty_text"),
        (dict(image=png_bytes(red_square_image()), texts=["x"] * 40), 422, "too_many_texts"),
        (dict(image=png_bytes(red_square_image()), model="no-such-model"), 404, "unknown_model"),
        (dict(image=png_bytes(np.zeros((150, 200, 3), np.uint8))), 413, "image_too_large"),
    ],
    ids=["no-image", "empty-image", "not-an-image", "truncated", "no-text", "empty-text", "too-many-texts",
         "unknown-model", "too-many-pixels"],
)
def test_segment_client_errors(client, kwargs, status, code):
    _error(post(client, **kwargs), status, code)


def test_request_too_large_by_content_length(client):
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)  # ~480 kB as PNG
    _error(post(client, png_bytes(noise)), 413, "request_too_large")


def test_request_too_large_when_streamed_without_length(client):
    def chunks():  # no Content-Length: the server must count what arrives
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 10_000
        yield b"\r\n--b--\r\n"

    r = client.post("/segment", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    _error(r, 413, "request_too_large")


def test_not_multipart(client):
    _error(client.post("/segment", json={"text": "x"}), 400, "missing_image")


def test_demo_is_mounted_beside_the_api(tmp_path):
    app = create_app({"red": RedModel()}, demo=True, examples=False, cache_dir=tmp_path)
    with TestClient(app) as c:
        page = c.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert c.get("/health").json()["status"] == "ok"
        _error(post(c, b"not an image"), 415, "not_an_image")


def test_examples_are_generated_once(tmp_path):
    examples = ensure_examples(tmp_path, n_images=3)
    assert len(examples) == 3
    for path, texts in examples:
        assert Image.open(path).size == (320, 320)
        assert texts.strip() and all(line.strip() for line in texts.splitlines())
    folder = next(tmp_path.iterdir())
    stamp = (folder / "synthref.json").stat().st_mtime_ns
    assert ensure_examples(tmp_path, n_images=3) == examples
    assert (folder / "synthref.json").stat().st_mtime_ns == stamp


def test_demo_command_serves_a_checkpoint(tmp_path):
    weights = tiny_lts_file(tmp_path / "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "refseg.cli", "demo", "--model", str(weights), "--port", str(port), "--no-examples"]
    proc = subprocess.Popen(cmd, env={**os.environ, "REFSEG_CACHE": str(tmp_path / "cache")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"refseg demo exited early:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "refseg demo did not answer /health within 120 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        assert health["default_model"] == "tiny-lts" and health["loaded"] == ["tiny-lts"]
        assert str(tmp_path) not in json.dumps(health)  # clients never see server paths
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_demo_command_rejects_a_missing_model(tmp_path, capsys):
    from refseg.cli import main as cli

    assert cli(["demo", "--model", str(tmp_path / "nope")]) == 2
    assert "neither a shipped model" in capsys.readouterr().err


def test_openapi_describes_segment_as_it_answers(client):
    """/api/openapi.json (served as /api/docs) documents /segment's form fields and answer; a real answer has
    exactly the documented keys, and a bad request's body has the documented error shape."""
    spec = client.get("/api/openapi.json").json()
    op = spec["paths"]["/segment"]["post"]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"image", "text", "model"} and set(form["required"]) == {"image", "text"}
    answer = op["responses"]["200"]["content"]["application/json"]["schema"]
    result = answer["properties"]["results"]["items"]
    body = post(client, png_bytes(red_square_image()), texts=["the red square"]).json()
    assert set(body) == set(answer["properties"]) == set(answer["required"])
    assert set(body["results"][0]) == set(result["properties"]) == set(result["required"])
    error = op["responses"]["4XX"]["content"]["application/json"]["schema"]
    bad = post(client, b"not an image")
    assert 400 <= bad.status_code < 500 and set(bad.json()) == set(error["properties"])
    assert set(bad.json()["error"]) == set(error["properties"]["error"]["required"])
    assert client.get("/api/docs").status_code == 200
