"""A short run of stress/server_load.py against an in-process server (RedModel: no model cost).

Four clients for a few seconds over real loopback sockets, with two clients
trickling a body byte by byte and one aborting mid-body every half second:
no 5xx, no connection error, answers keep coming, and oversize uploads,
too many pixels and non-images get 413 / 415 while the load runs. The time
limits here are loose (CI machines are shared); the 60-second run with 20
clients and the shipped model, which reports the timings, is the script.
"""

import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from _serve_fixtures import RedModel, png_bytes, red_square_image

from refseg.serve import create_app

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "stress"))
import server_load  # noqa: E402


@pytest.fixture(scope="module")
def port():
    app = create_app({"red": RedModel()}, default="red", demo=False, max_upload_bytes=2 << 20)
    port = server_load.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    server_load.wait_healthy(port, timeout=60)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def test_short_load_with_slow_and_aborted_clients(port):
    samples = [(png_bytes(red_square_image()), ["the red square", "the grey background", "nothing"]),
               (png_bytes(red_square_image(60, 200)), ["the red square"])]
    figures = server_load.run_load(port, samples, clients=4, duration=6.0, slow_clients=2, abort_every=0.5)
    assert server_load.failures(figures, probe_limit=10.0) == [], server_load.report(figures)
    assert figures["served_2xx"] >= 8 and figures["aborted_clients"] >= 5, server_load.report(figures)
    assert figures["slow_bytes_trickled"] >= 2  # the slow clients were really sending while the others were served
    assert figures["longest_gap_between_answers_s"] < 5.0, server_load.report(figures)


def test_slow_client_does_not_block_a_later_request(port):
    stop = threading.Event()
    counter = [0]
    slow = [threading.Thread(target=server_load.slow_client, args=(port, stop, counter), daemon=True)
            for _ in range(8)]
    for t in slow:
        t.start()
    time.sleep(0.5)
    body = server_load.multipart(png_bytes(red_square_image()), ["the red square"])
    status, seconds, _ = server_load.probe_post(port, body)
    stop.set()
    assert status == 200 and seconds < 10.0
