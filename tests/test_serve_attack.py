"""The server attacked as an outsider would: over HTTP, through the demo's Gradio API and the REST API.

- file read: a client names a server file (a secret, /etc/passwd, a server-side image) as the
  image of the Gradio segment endpoint, then asks the file routes for it, with ``..`` and a symlink;
- uploads: a non-image upload is deleted at once; a real upload is segmented and served back;
- limits on every route: body size, expression length and number, pixels x expressions;
- models: only those the server was started with; a model that outputs NaN gives a JSON error;
- crafted files of every format Pillow writes, corrupted: a 4xx JSON answer, never a 5xx;
- connections that never finish their request are closed, and a normal client is served meanwhile;
- `refseg demo` exits 2 on bad options; the worst request the limits allow stays within a memory bound.
"""

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from _serve_fixtures import RedModel, png_bytes, red_square_image, tiny_lts_file
from refseg.cli import main as cli
from refseg.serve import create_app

SECRET = b"TOP-SECRET-4f1c9a"
MAX_BYTES = 300_000


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(client, app, folder with the server's secret files) of a server with the demo mounted."""
    root = tmp_path_factory.mktemp("server-files")
    (root / "secret.txt").write_bytes(SECRET)
    Image.fromarray(red_square_image()).save(root / "server.png")
    app = create_app({"red": RedModel()}, default="red", examples=False, cache_dir=root, max_upload_bytes=MAX_BYTES)
    with TestClient(app) as c:
        yield c, app, root


def _call(client, payload, text="the red square", model="red"):
    """POST the Gradio segment endpoint, read its event stream; returns the stream's text."""
    r = client.post("/gradio_api/call/segment", json={"data": [payload, text, model]})
    if r.status_code != 200:
        return r.text
    return client.get(f"/gradio_api/call/segment/{r.json()['event_id']}").text


def _file_data(path):
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def _upload(client, name, data, mime="image/png"):
    return client.post("/gradio_api/upload", files=[("files", (name, data, mime))])


def _all_files(folder):
    return [p for p in Path(folder).rglob("*") if p.is_file()]


@pytest.mark.parametrize("target", ["secret.txt", "/etc/passwd", "server.png"])
def test_gradio_api_reads_no_server_file(demo, target):
    client, app, root = demo
    path = root / target if not target.startswith("/") else Path(target)
    stream = _call(client, _file_data(path))
    assert "event: complete" not in stream and "event: error" in stream, stream  # no overlay of a server image
    assert SECRET.decode() not in stream
    leaked = [p for p in _all_files(app.state.upload_dir) if p.name == path.name]
    assert leaked == []  # nothing was copied where the file routes could serve it
    for url in (f"/gradio_api/file={path}", f"/file={path}", f"/gradio_api/file/{path}",
                f"/gradio_api/file={app.state.upload_dir}/../../../..{path}"):
        r = client.get(url)
        assert r.status_code == 404 and SECRET not in r.content and b"root:" not in r.content, url


def test_file_routes_resolve_symlinks(demo):
    client, app, root = demo
    link = app.state.upload_dir / "link.txt"
    link.symlink_to(root / "secret.txt")
    try:
        for url in (f"/gradio_api/file={link}", f"/gradio_api/file={app.state.upload_dir}/link.txt"):
            r = client.get(url)
            assert r.status_code == 404 and SECRET not in r.content
        stream = _call(client, _file_data(link))
        assert "event: complete" not in stream and SECRET.decode() not in stream
    finally:
        link.unlink()


def test_an_upload_is_segmented_and_served_back(demo):
    client, app, _ = demo
    r = _upload(client, "red.png", png_bytes(red_square_image()))
    assert r.status_code == 200, r.text
    (path,) = r.json()
    stream = _call(client, _file_data(path))
    assert "event: complete" in stream, stream
    result = json.loads(stream.split("event: complete\ndata:")[1].strip().splitlines()[0])[0]
    image = client.get(result["url"].replace("http://testserver", ""))
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size[0] >= 120


def test_a_non_image_upload_is_refused_and_deleted(demo):
    client, app, _ = demo
    before = set(_all_files(app.state.upload_dir))
    r = _upload(client, "notes.png", b"not an image at all, " * 50, "text/plain")
    assert r.status_code == 415 and r.json()["error"]["code"] == "not_an_image"
    assert set(_all_files(app.state.upload_dir)) == before


def test_gradio_routes_have_the_rest_limits(demo):
    client, _, _ = demo
    r = client.post("/gradio_api/queue/join", content=b"{" + b" " * (MAX_BYTES + 10) + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    path = _upload(client, "red.png", png_bytes(red_square_image())).json()[0]
    assert "over 1000 characters" in _call(client, _file_data(path), text="red " * 2000)
    assert "at most 32 per request" in _call(client, _file_data(path), text="red\n" * 40)
    assert "unknown model" in _call(client, _file_data(path), model="lts-synthref")
    assert "must be text" in _call(client, _file_data(path), text={"a": 1})


@pytest.fixture(scope="module")
def rest():
    class NaNModel(RedModel):
        def decode(self, vis, txt, image_index):
            out = super().decode(vis, txt, image_index)
            return {**out, "mask_logits": out["mask_logits"] * float("nan")}

    app = create_app({"red": RedModel(), "nan": NaNModel()}, default="red", demo=False, max_pixels=4_000_000,
                     max_work=20_000_000)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _post(client, image, texts=("the red square",), **data):
    return client.post("/segment", files={"image": ("x", image, "application/octet-stream")},
                       data={"text": list(texts), **data})


def test_rest_limits_on_expressions(rest):
    r = _post(rest, png_bytes(red_square_image()), ["red " * 300])
    assert r.status_code == 422 and r.json()["error"]["code"] == "text_too_long"
    big = png_bytes(np.zeros((2000, 2000, 3), np.uint8))  # 4 MP: 5 expressions fit in 20 MP of masks
    assert _post(rest, big, ["x"] * 5).status_code == 200
    r = _post(rest, big, ["x"] * 6)
    assert r.status_code == 422 and "at most 5" in r.json()["error"]["message"]


def test_a_model_that_outputs_nan_gives_a_json_error(rest):
    r = _post(rest, png_bytes(red_square_image()), model="nan")
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed"


def test_only_the_models_the_server_was_started_with():
    import refseg

    app = create_app(demo=False)
    assert app.state.pool.names() == ["lts-synthref"] and "lts-aerial" in refseg.available_models()
    with TestClient(app) as c:
        r = _post(c, png_bytes(red_square_image()), model="lts-aerial")
        assert r.status_code == 404 and app.state.pool.loaded() == []


def _crafted_files():
    """(name, bytes): a small image in every format Pillow writes, then truncated and with bytes flipped."""
    Image.init()  # every plugin registered, not only the common ones
    rng = np.random.default_rng(0)
    img = Image.fromarray(red_square_image(24, 32))
    out = []
    for fmt in sorted(set(Image.SAVE)):
        buf = io.BytesIO()
        try:
            im = img.convert("L") if fmt in ("XBM", "MPO") else img
            im.save(buf, format=fmt)
        except Exception:  # noqa: BLE001  (a writer that needs other modes or options)
            continue
        data = buf.getvalue()
        if len(data) < 16:
            continue
        out.append((f"{fmt}-truncated", data[: len(data) // 2]))
        for k in range(3):
            bad = bytearray(data)
            for i in rng.integers(0, min(len(bad), 64 if k == 0 else len(bad)), 8):
                bad[i] = int(rng.integers(0, 256))
            out.append((f"{fmt}-flipped{k}", bytes(bad)))
        out.append((f"{fmt}-huge-size", data[:16] + b"\xff" * 16 + data[32:]))
    return out


def test_crafted_files_of_every_format_get_a_json_answer_never_a_5xx(rest):
    files = _crafted_files()
    assert len({name.split("-")[0] for name, _ in files}) >= 15
    bad = []
    for name, data in files:
        r = _post(rest, data)
        if r.status_code >= 500 or not r.headers["content-type"].startswith("application/json"):
            bad.append((name, r.status_code, r.text[:100]))
    assert bad == []


def test_stalled_connections_are_closed_and_others_served():
    import uvicorn

    from refseg.serve import server_options

    app = create_app({"red": RedModel()}, default="red", demo=False, body_timeout=1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           **server_options(head_timeout=1.0, keep_alive=1.0)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        stalled = []
        for i in range(60):
            c = socket.create_connection(("127.0.0.1", port))
            head = "POST /segment HTTP/1.1\r\nHost: x\r\n"
            if i % 3 == 1:  # a complete head, half of the body
                head += "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000\r\n\r\n--b\r\n"
            elif i % 3 == 2:  # nothing at all
                head = ""
            c.sendall(head.encode())
            stalled.append(c)
        body = {"text": "the red square"}
        files = {"image": ("x.png", png_bytes(red_square_image()), "image/png")}
        import httpx

        r = httpx.post(f"http://127.0.0.1:{port}/segment", data=body, files=files, timeout=10)
        assert r.status_code == 200
        time.sleep(2.5)
        closed = 0
        for c in stalled:
            c.settimeout(2)
            try:
                data = c.recv(4096)
                closed += data == b"" or data.startswith(b"HTTP/1.1 408")
            except OSError:
                closed += 1
            c.close()
        assert closed == len(stalled)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("args", [["--model", "no-such-model"], ["--port", "70000"], ["--port", "x"],
                                  ["--max-upload-mb", "0"], ["--max-megapixels", "nan"], ["--max-concurrent", "0"],
                                  ["--threshold", "1"], ["--threads", "-1"]])
def test_demo_exits_2_on_bad_options(args, capsys):
    try:
        code = cli(["demo", "--no-examples", "--no-demo", *args])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("refseg demo: error:") and "\n" not in err and "Traceback" not in err


def test_demo_exits_2_when_the_port_is_taken(tmp_path, capsys):
    weights = tiny_lts_file(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli(["demo", "--model", str(weights), "--no-demo", "--no-examples", "--port", str(port)]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def _vm(pid, key):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))


def test_worst_allowed_request_stays_within_a_memory_bound(tmp_path):
    """32 expressions on a blank 2000 x 2000 PNG (the limits: 4 MP, 32 expressions): the server's peak RSS
    grows by under 48 bytes per pixel (192 MiB); one float32 logit map per expression alone would be 512 MiB."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "stress"))
    import server_load

    weights = tiny_lts_file(tmp_path)
    port = server_load.free_port()
    cmd = [sys.executable, "-m", "refseg.cli", "demo", "--no-demo", "--no-examples", "--model", str(weights),
           "--port", str(port), "--max-megapixels", "4", "--max-concurrent", "1", "--threads", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        server_load.wait_healthy(port, proc, timeout=120)
        small = server_load.multipart(png_bytes(red_square_image()), ["the red square"])
        assert server_load.probe_post(port, small)[0] == 200  # warm up: the model's own memory is in
        before = _vm(proc.pid, "VmHWM")
        blank = png_bytes(np.zeros((2000, 2000, 3), np.uint8))
        status, seconds, _ = server_load.probe_post(port, server_load.multipart(blank, [f"thing {i}" for i in range(32)]))
        grown = _vm(proc.pid, "VmHWM") - before
        assert status == 200
        assert grown < 192, f"peak RSS grew by {grown:.0f} MiB for the worst allowed request"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
