"""Load on the REST API: concurrent clients, oversize uploads, slow and aborted clients.

    python stress/server_load.py                         # 20 clients, 60 s, shipped lts-synthref
    python stress/server_load.py --clients 40 --duration 120 --json load.json

Starts `refseg demo --no-demo` (REST only) on 127.0.0.1 with the model, and
measures it from outside, over real sockets:
  - --clients threads POST /segment back to back for --duration seconds
    (SynthRef tiny test images with 1-3 of their expressions each;
    --big-clients of them send a 12 MP JPEG instead), each over its own
    keep-alive connection; every answer's status and latency is recorded;
  - from 1/6 of the run on, --slow-clients connections trickle a request
    body at 1 byte per second for the rest of the run and one client every
    2 s sends half a body and resets the connection: the other clients'
    latencies before and after they start are compared, and the longest
    gap between two completed requests is reported;
  - under full load: an upload announced at 64 MiB (413), one streamed in
    chunks with no length (413), a 20 000 x 20 000 image in a 100-byte PNG
    (413), a 49 MP one (413), bytes that are no image (415); each must
    answer within --probe-limit seconds;
  - the server's resident memory (VmRSS sampled every 0.25 s, and VmHWM)
    from /proc;
  - after the load: the worst request the limits allow (a blank square PNG
    of --max-megapixels with as many expressions as --max-work-megapixels
    and 32 allow), its peak RSS growth (VmHWM); then --stalled connections
    that never finish their request (a third send half a head, a third a
    head and half a body, a third nothing), the RSS meanwhile, whether a
    normal client is still served while they are open, and how many the
    server has closed after its deadlines.
Prints requests served, status counts (5xx must be 0), p50/p90/p99/max
latency, throughput, peak RSS and the probes' answers; exits 1 when a 5xx,
a connection error or a failed probe is seen.

The figures depend on the machine: on a shared CPU (another job training)
latencies are dominated by queueing for the cores.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import killing  # noqa: E402  (stress/killing.py: env(), refseg())

BOUNDARY = "refsegloadtestboundary"


# ---- request bodies ---------------------------------------------------------------------------------


def multipart(image: bytes, texts, filename: str = "image.png") -> bytes:
    """A multipart/form-data body with one 'image' file and one 'text' field per expression."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n"]
    for t in texts:
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="text"\r\n\r\n{t}\r\n'.encode())
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def png_claiming(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def synthref_samples(data: Path, n_images: int = 10) -> list:
    """[(png bytes, [expressions])] from the test split of a refer data set."""
    from refseg.data import load_refer

    d = load_refer(data)
    by_image: dict = {}
    for s in d.samples("test"):
        by_image.setdefault(s.image_id, []).append(s.text)
    out = []
    for image_id, texts in list(by_image.items())[:n_images]:
        out.append(((d.images_dir / d.images[image_id]["file_name"]).read_bytes(), texts))
    return out


def big_jpeg(png: bytes, size=(4000, 3000)) -> bytes:
    """A SynthRef image upscaled to 12 MP, as JPEG (~1-2 MB)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").resize(size).save(buf, "JPEG", quality=85)
    return buf.getvalue()


# ---- the server ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, threads: int, max_concurrent: int, log: Path, extra=()) -> subprocess.Popen:
    args = ["demo", "--no-demo", "--no-examples", "--host", "127.0.0.1", "--port", port, "--model", model,
            "--max-concurrent", max_concurrent, *extra]
    if threads:
        args += ["--threads", threads]
    with open(log, "w") as f:
        return subprocess.Popen(killing.refseg(args), stdout=f, stderr=subprocess.STDOUT, env=killing.env(),
                                start_new_session=True)


def wait_healthy(port: int, proc=None, timeout: float = killing.TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"no answer on /health within {timeout} s")


class MemorySampler(threading.Thread):
    """VmRSS of a process every `every` seconds: (seconds since start, MiB)."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.stop = pid, every, [], threading.Event()
        self.t0 = time.monotonic()

    def status(self, key: str) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def run(self):
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic() - self.t0, self.status("VmRSS")))
            except OSError:
                return
            self.stop.wait(self.every)


# ---- clients ------------------------------------------------------------------------------------------


def client_loop(port: int, bodies: list, deadline: float, seed: int, records: list, t0: float) -> None:
    """POST /segment back to back on one keep-alive connection until `deadline`.

    Appends (start s, latency s, status or 0 for a connection error, error text) to `records`.
    """
    rng = random.Random(seed)
    conn = None
    while time.monotonic() < deadline:
        body = rng.choice(bodies)
        start = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            conn.request("POST", "/segment", body=body,
                         headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
            resp = conn.getresponse()
            payload = resp.read()
            status, error = resp.status, "" if resp.status < 400 else payload[:200].decode(errors="replace")
        except (OSError, http.client.HTTPException) as e:
            status, error = 0, f"{type(e).__name__}: {e}"
            if conn is not None:
                conn.close()
            conn = None
        records.append((start - t0, time.monotonic() - start, status, error))
    if conn is not None:
        conn.close()


def slow_client(port: int, stop: threading.Event, counter: list) -> None:
    """Announce a 2 kB body and send it one byte per second until stopped (then drop the connection)."""
    body = multipart(b"\x89PNG" + b"\0" * 1500, ["slow"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode())
        for i, byte in enumerate(body):
            if stop.wait(1.0):
                break
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            counter[0] += 1


def aborted_client(port: int, body: bytes) -> None:
    """Send half of a request body, then reset the connection (SO_LINGER 0)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall(f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
    time.sleep(0.05)
    s.close()


# ---- probes: answers that must come at once, whatever the load ------------------------------------------


def _status_line(s: socket.socket) -> int:
    """The status code of the answer on `s` (0 if the connection ends without one)."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:  # reset after the answer was read, or before it came
        pass
    return int(data.split(b" ")[1]) if data.startswith(b"HTTP/") and len(data.split(b" ")) > 1 else 0


def _upload(port: int, headers: str, send_body) -> tuple:
    """Send request headers, then `send_body(sock, answered)` from a thread while this one waits for the
    status line; returns (status, seconds from the first byte sent to the status line)."""
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                  f"{headers}\r\n".encode())
        answered = threading.Event()
        sender = threading.Thread(target=send_body, args=(s, answered), daemon=True)
        sender.start()
        status = _status_line(s)
        seconds = time.monotonic() - t
        answered.set()
        sender.join(timeout=10)
    return status, seconds


def probe_announced_oversize(port: int, announced: int = 64 << 20) -> tuple:
    """Headers announcing `announced` bytes, then the body in 64 kB blocks: 413 should come at once."""
    def send(s, answered):
        block = b"\0" * (64 << 10)
        for _ in range(announced // len(block)):
            if answered.is_set():
                return
            try:
                s.sendall(block)
            except OSError:  # the server answered and closed
                return

    return _upload(port, f"Content-Length: {announced}\r\n", send)


def probe_chunked_oversize(port: int, limit: int = 64 << 20) -> tuple:
    """A chunked upload with no length, streamed until the server answers (it should once over its limit)."""
    def send(s, answered):
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'.encode()
        block = b"\0" * (256 << 10)
        try:
            s.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
            for _ in range(limit // len(block)):
                if answered.is_set():
                    return
                s.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
        except OSError:
            return

    return _upload(port, "Transfer-Encoding: chunked\r\n", send)


def probe_post(port: int, body: bytes) -> tuple:
    t = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/segment", body=body, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    code = json.loads(payload).get("error", {}).get("code") if r.status >= 400 else None
    return r.status, time.monotonic() - t, code


# ---- the experiment -------------------------------------------------------------------------------------


def percentile(values: list, q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def run_load(port: int, samples: list, clients: int, duration: float, big: bytes = None, big_clients: int = 0,
             slow_clients: int = 5, abort_every: float = 2.0, probes: bool = True, seed: int = 0,
             server_pid: int = None) -> dict:
    """Drive a running server (see the module docstring); returns the figures."""
    bodies = [multipart(png, texts[: 1 + i % 3]) for i, (png, texts) in enumerate(samples)]
    big_bodies = [multipart(big, [samples[0][1][0]], "big.jpg")] if big else []
    sampler = MemorySampler(server_pid) if server_pid else None
    if sampler:
        sampler.start()
    records: list = []
    t0 = time.monotonic()
    deadline = t0 + duration
    threads = [threading.Thread(target=client_loop, daemon=True,
                                args=(port, big_bodies if i < big_clients and big_bodies else bodies, deadline,
                                      seed * 1000 + i, records, t0))
               for i in range(clients)]
    for t in threads:
        t.start()
    # slow and aborted clients from 1/6 of the run on
    disturb_at = duration / 6
    time.sleep(disturb_at)
    stop = threading.Event()
    trickled = [0]
    slow = [threading.Thread(target=slow_client, args=(port, stop, trickled), daemon=True) for _ in range(slow_clients)]
    for t in slow:
        t.start()
    probe_results: dict = {}

    def run_probes():  # at mid-run, under full load
        time.sleep(max(0.0, t0 + duration / 2 - time.monotonic()))
        probe_results["announced 64 MiB upload"] = probe_announced_oversize(port)
        probe_results["chunked upload, no length"] = probe_chunked_oversize(port)
        for name, body in (("20000 x 20000 PNG header", multipart(png_claiming(20_000, 20_000), ["x"])),
                           ("7000 x 7000 PNG header (49 MP)", multipart(png_claiming(7_000, 7_000), ["x"])),
                           ("not an image", multipart(b"just some text, not an image", ["x"], "x.png"))):
            probe_results[name] = probe_post(port, body)[:2]

    prober = threading.Thread(target=run_probes, daemon=True)
    if probes:
        prober.start()
    aborted = 0
    next_abort = time.monotonic()
    while time.monotonic() < deadline:
        if abort_every and time.monotonic() >= next_abort:
            aborted_client(port, bodies[aborted % len(bodies)])
            aborted += 1
            next_abort += abort_every
        time.sleep(0.02)
    stop.set()
    for t in threads + slow + ([prober] if probes else []):
        t.join(timeout=330)
    if sampler:
        sampler.stop.set()
        sampler.join()

    ok = [r for r in records if 200 <= r[2] < 300]
    lat = [r[1] for r in ok]
    before = [r[1] for r in ok if r[0] + r[1] < disturb_at]
    after = [r[1] for r in ok if r[0] >= disturb_at]
    ends = sorted(r[0] + r[1] for r in ok)
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    statuses: dict = {}
    for r in records:
        statuses[r[2]] = statuses.get(r[2], 0) + 1
    figures = {
        "clients": clients, "duration_s": duration, "requests": len(records), "served_2xx": len(ok),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "errors_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "connection_errors": statuses.get(0, 0),
        "first_errors": sorted({r[3] for r in records if r[2] >= 400 or r[2] == 0})[:5],
        "throughput_rps": round(len(ok) / duration, 2),
        "latency_s": {"p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99),
                      "max": max(lat) if lat else float("nan")},
        "latency_p50_before_slow_clients_s": percentile(before, 50),
        "latency_p50_with_slow_clients_s": percentile(after, 50),
        "longest_gap_between_answers_s": max(gaps) if gaps else float("nan"),
        "slow_clients": slow_clients, "slow_bytes_trickled": trickled[0], "aborted_clients": aborted,
        "probes": {k: {"status": v[0], "seconds": round(v[1], 3)} for k, v in probe_results.items()},
    }
    if sampler and sampler.samples:
        rss = [m for _, m in sampler.samples]
        first_half = [m for t, m in sampler.samples if t < duration / 2]
        figures["rss_mib"] = {"start": round(rss[0], 1), "peak_sampled": round(max(rss), 1),
                              "peak_first_half": round(max(first_half), 1) if first_half else None,
                              "end": round(rss[-1], 1)}
        try:
            figures["rss_mib"]["VmHWM"] = round(sampler.status("VmHWM"), 1)
        except OSError:
            pass
    return figures


def report(f: dict) -> str:
    lat = f["latency_s"]
    lines = [
        f"{f['clients']} clients for {f['duration_s']:.0f} s: {f['requests']} requests, {f['served_2xx']} served (2xx), "
        f"{f['errors_5xx']} 5xx, {f['connection_errors']} connection errors; statuses {f['status_counts']}",
        f"throughput {f['throughput_rps']} req/s; latency p50 {lat['p50']:.2f} s, p90 {lat['p90']:.2f} s, "
        f"p99 {lat['p99']:.2f} s, max {lat['max']:.2f} s",
        f"slow clients: {f['slow_clients']} trickling ({f['slow_bytes_trickled']} bytes in all), "
        f"{f['aborted_clients']} aborted mid-body; p50 before them {f['latency_p50_before_slow_clients_s']:.2f} s, "
        f"with them {f['latency_p50_with_slow_clients_s']:.2f} s; longest gap between answers "
        f"{f['longest_gap_between_answers_s']:.2f} s",
    ]
    if "rss_mib" in f:
        m = f["rss_mib"]
        lines.append(f"server RSS: {m['start']} MiB at start, peak {m['peak_sampled']} MiB (first half "
                     f"{m['peak_first_half']}), {m['end']} MiB at the end, VmHWM {m.get('VmHWM')} MiB")
    for name, p in f["probes"].items():
        lines.append(f"probe {name}: {p['status']} in {p['seconds']:.3f} s")
    if "worst_request" in f:
        w = f["worst_request"]
        lines.append(f"worst allowed request: {w['image']} x {w['expressions']} expressions -> {w['status']} in "
                     f"{w['seconds']} s; peak RSS +{w['peak_growth_mib']} MiB (from {w['rss_before_mib']} MiB)")
    if "stalled" in f:
        lines.append(f"stalled connections: {json.dumps(f['stalled'])}")
    if f["first_errors"]:
        lines.append(f"errors seen: {f['first_errors']}")
    return "\n".join(lines)


def failures(f: dict, probe_limit: float) -> list:
    out = []
    if f["errors_5xx"]:
        out.append(f"{f['errors_5xx']} 5xx answers")
    if f["connection_errors"]:
        out.append(f"{f['connection_errors']} connection errors")
    if f["served_2xx"] == 0:
        out.append("nothing served")
    expected = {"announced 64 MiB upload": 413, "chunked upload, no length": 413, "20000 x 20000 PNG header": 413,
                "7000 x 7000 PNG header (49 MP)": 413, "not an image": 415}
    if "worst_request" in f and f["worst_request"]["status"] != 200:
        out.append(f"worst allowed request: {f['worst_request']['status']}")
    if "stalled" in f:
        st = f["stalled"]
        if st["normal_client_status"] != 200:
            out.append(f"normal client with stalled connections open: {st['normal_client_status']}")
        if next(v for k, v in st.items() if k.startswith("closed_by_server")) < st["connections"] - st["refused_by_client_os"]:
            out.append("some stalled connections were never closed by the server")
    for name, p in f["probes"].items():
        if p["status"] != expected[name] or p["seconds"] > probe_limit:
            out.append(f"probe {name}: {p['status']} in {p['seconds']:.2f} s (want {expected[name]} within "
                       f"{probe_limit} s)")
    return out


def worst_request(port: int, pid: int, megapixels: float, work_megapixels: float) -> dict:
    """The largest request the limits allow: peak RSS growth (VmHWM) and its answer."""
    side = int((megapixels * 1e6) ** 0.5)
    texts = max(1, min(32, int(work_megapixels * 1e6) // (side * side)))
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, "PNG")
    sampler = MemorySampler(pid)
    before = sampler.status("VmHWM")
    status, seconds, code = probe_post(port, multipart(buf.getvalue(), [f"the thing number {i}" for i in range(texts)]))
    return {"image": f"{side}x{side} blank PNG ({len(buf.getvalue())} bytes)", "expressions": texts, "status": status,
            "code": code, "seconds": round(seconds, 2), "rss_before_mib": round(sampler.status("VmRSS"), 1),
            "peak_growth_mib": round(sampler.status("VmHWM") - before, 1)}


def stalled_connections(port: int, pid: int, n: int, wait: float) -> dict:
    """Open n connections that never finish their request; probe a normal client; count those closed after wait s."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sampler = MemorySampler(pid)
    socks, refused = [], 0
    for i in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            head = "" if i % 3 == 2 else "POST /segment HTTP/1.1\r\nHost: x\r\n"
            if i % 3 == 1:
                head += f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: 5000\r\n\r\n--"
            s.sendall(head.encode())
            socks.append(s)
        except OSError:
            refused += 1
    rss_open = sampler.status("VmRSS")
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (120, 90), (200, 30, 30)).save(png, "PNG")
    probe = probe_post(port, multipart(png.getvalue(), ["the red image"]))
    time.sleep(wait)
    closed = 0
    for s in socks:
        s.settimeout(0.5)
        try:
            data = s.recv(4096)
            closed += data == b"" or data.startswith(b"HTTP/1.1 408")
        except socket.timeout:
            pass
        except OSError:
            closed += 1
        s.close()
    return {"connections": n, "refused_by_client_os": refused, "rss_with_them_open_mib": round(rss_open, 1),
            "normal_client_status": probe[0], "normal_client_seconds": round(probe[1], 2),
            f"closed_by_server_after_{wait:g}s": closed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lts-synthref")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--big-clients", type=int, default=2, help="clients that send a 12 MP JPEG")
    p.add_argument("--slow-clients", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: torch's default)")
    p.add_argument("--max-concurrent", type=int, default=2, help="the server's --max-concurrent")
    p.add_argument("--max-megapixels", type=float, default=40.0, help="the server's --max-megapixels")
    p.add_argument("--max-work-megapixels", type=float, default=400.0, help="the server's --max-work-megapixels")
    p.add_argument("--stalled", type=int, default=1100, help="connections that never finish their request (0: skip)")
    p.add_argument("--probe-limit", type=float, default=5.0, help="seconds within which a probe must be answered")
    p.add_argument("--data", type=Path, default=None, help="refer data set for the images (default: SynthRef tiny)")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="server-load-"))
    work.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = work / "synthref-tiny"
        if not data.exists():
            subprocess.run(killing.refseg(["make-data", "--preset", "tiny", "--seed", "0", "--out", data,
                                           "--workers", "1"]), env=killing.env(), check=True, capture_output=True)
    samples = synthref_samples(data)
    big = big_jpeg(samples[0][0]) if args.big_clients else None
    port = free_port()
    server = start_server(args.model, port, args.threads, args.max_concurrent, work / "server.log",
                          ["--max-megapixels", args.max_megapixels, "--max-work-megapixels", args.max_work_megapixels])
    try:
        t = time.monotonic()
        health = wait_healthy(port, server)
        print(f"server up in {time.monotonic() - t:.1f} s on 127.0.0.1:{port}, model {health['default_model']}",
              flush=True)
        figures = run_load(port, samples, args.clients, args.duration, big, args.big_clients, args.slow_clients,
                           server_pid=server.pid)
        figures["health_after"] = wait_healthy(port, server, timeout=30)["status"]
        figures["worst_request"] = worst_request(port, server.pid, args.max_megapixels, args.max_work_megapixels)
        if args.stalled:
            figures["stalled"] = stalled_connections(port, server.pid, args.stalled, wait=40.0)
        figures["health_end"] = wait_healthy(port, server, timeout=30)["status"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    figures.update(model=args.model, max_concurrent=args.max_concurrent, big_clients=args.big_clients,
                   nice=os.nice(0), cpus=os.cpu_count())
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    bad = failures(figures, args.probe_limit)
    for line in bad:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
