"""Start-up and memory of `refseg predict` and `refseg demo`, per backend (the "Start-up" tables of docs/RESULTS.md).

    python benchmarks/startup.py --model lts-synthref --repeat 3

For each backend (--backends, default torch and auto): the phases of a fresh
process doing what `refseg predict --image X --text T --out Y` does (imports;
model load; first set_image + predict), timed with time.perf_counter in a child;
then the whole `refseg predict` command (wall time and peak RSS from
os.wait4), --repeat times; then `refseg demo` (seconds from the process start
to the first 200 of GET /health, polled every 50 ms; one POST /segment; the
server's peak RSS, VmHWM). Graphs are built first when the cache lacks them
(printed: the first use of a model). Uses $REFSEG_CACHE as the commands do.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TEXT = "the red square"
PHASES = """
import sys, time
t0 = time.perf_counter()
import refseg
from refseg.backends import load_predictor
from refseg.data.image import load_image_rgb
if sys.argv[2] == "torch":
    import refseg.predictor, refseg.modeling.base  # what the PyTorch path imports before loading
else:
    import refseg.export
t1 = time.perf_counter()
p = load_predictor(sys.argv[1], backend=sys.argv[2])
t2 = time.perf_counter()
p.set_image(load_image_rgb(sys.argv[3]))
p.predict([sys.argv[4]])
t3 = time.perf_counter()
print({"imports_s": t1 - t0, "load_s": t2 - t1, "first_inference_s": t3 - t2, "predictor": type(p).__name__})
"""


def refseg_cmd() -> list:
    return [sys.executable, "-m", "refseg.cli"]


def run_measured(cmd: list) -> dict:
    """Run ``cmd``; wall seconds and the child's peak RSS (MiB, from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo(model: str, backend: str, image: Path) -> dict:
    """Start `refseg demo`, time GET /health, one POST /segment, the server's VmHWM."""
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(refseg_cmd() + ["demo", "--model", model, "--backend", backend, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"refseg demo exited: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.05)
        health_s = time.perf_counter() - t0
        boundary = "refsegboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + image.read_bytes() + (
                f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n{TEXT}\r\n"
                f"--{boundary}--\r\n").encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/segment", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        t1 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=300) as r:
            json.loads(r.read())
        segment_s = time.perf_counter() - t1
        hwm = next(line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                   if line.startswith("VmHWM")).split()[1]
        return {"health_s": health_s, "loaded_at_health": health["loaded"], "first_segment_s": segment_s,
                "peak_rss_mib": int(hwm) / 1024}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lts-synthref")
    ap.add_argument("--backends", default="torch,auto", help="comma-separated: torch, auto, onnx")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement")
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args()
    import numpy as np
    from PIL import Image

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "in.png"
        rng = np.random.default_rng(0)
        rgb = rng.integers(60, 200, (320, 320, 3)).astype(np.uint8)
        rgb[50:114, 50:114] = (230, 40, 40)
        Image.fromarray(rgb).save(image)
        for backend in args.backends.split(","):
            from refseg.backends import needs_build

            if backend != "torch" and needs_build(args.model, backend):
                print(f"{backend}: building the graphs first (the first use of {args.model})", flush=True)
                run_measured([sys.executable, "-c", PHASES, args.model, backend, str(image), TEXT])
            phases = [json.loads(subprocess.run([sys.executable, "-c", PHASES, args.model, backend, str(image), TEXT],
                                                capture_output=True, text=True, check=True).stdout.replace("'", '"'))
                      for _ in range(args.repeat)]
            cli = [run_measured(refseg_cmd() + ["predict", "--backend", backend, "--model", args.model, "--image",
                                                str(image), "--text", TEXT, "--out", str(Path(tmp) / "o.png")])
                   for _ in range(args.repeat)]
            servers = [] if args.no_demo else [demo(args.model, backend, image) for _ in range(args.repeat)]
            out[backend] = {"phases": phases, "predict": cli, "demo": servers}

            def span(rows, key, fmt="{:.2f}"):
                values = sorted(r[key] for r in rows)
                return fmt.format(values[0]) + ("" if len(values) == 1 else "-" + fmt.format(values[-1]))

            print(f"{backend}: predictor {phases[0]['predictor']}; imports {span(phases, 'imports_s')} s, "
                  f"load {span(phases, 'load_s')} s, first inference {span(phases, 'first_inference_s')} s; "
                  f"`refseg predict` wall {span(cli, 'wall_s')} s, peak RSS {span(cli, 'peak_rss_mib', '{:.0f}')} MiB"
                  + ("" if not servers else
                     f"; `refseg demo` /health after {span(servers, 'health_s')} s, "
                     f"peak RSS {span(servers, 'peak_rss_mib', '{:.0f}')} MiB"), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
