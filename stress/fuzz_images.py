"""Damaged image files of every format Pillow opens: each one an RGB array or ImageReadError, never another exception.

    python stress/fuzz_images.py                     # 20,000 cases, seed 0, the server's 40 MP limit
    python stress/fuzz_images.py --cases 100000 --seed 3 --max-pixels 178956970

The long form of tests/test_image_fuzz.py, with its seed corpus (every
format Pillow writes here, hand-made headers for the ones it only reads,
headers that lie) and its mutations (truncation, flipped bytes, extreme
header fields, dropped / repeated chunks, magic + noise). Every case goes
through `read_image` from bytes (the server's path) and every fifth also
through `load_image_rgb` from a file (the CLI's and the data sets' path).
Prints the outcome per format, the slowest case and the peak RSS; exits 1
if any case raised something other than ImageReadError.
"""

from __future__ import annotations

import argparse
import collections
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests"), str(Path(__file__).resolve().parent.parent)]
import test_image_fuzz as corpus  # noqa: E402  (tests/test_image_fuzz.py: the seeds and the mutations)

from refseg.data.image import ImageReadError, load_image_rgb, read_image  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=20_000, help="damaged files in all (spread over the seeds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="the limit passed to the decoder")
    args = p.parse_args()
    seeds = {**corpus._written_seeds(), **corpus._handmade_seeds(), **corpus._lying_seeds()}
    rng = np.random.default_rng(args.seed)
    per_seed = max(1, args.cases // len(seeds))
    outcome = collections.defaultdict(collections.Counter)
    failures, slowest, n = [], (0.0, ""), 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case"
        for name, data in sorted(seeds.items()):
            fmt = name.split("-")[0]
            for k, bad in enumerate(corpus._mutants(data, rng, per_seed)):
                label = f"{name} mutant {k}"
                t = time.perf_counter()
                result = _decode(lambda: read_image(bad, max_pixels=args.max_pixels, name=label), label, failures)
                if k % 5 == 0:
                    path.write_bytes(bad)
                    _decode(lambda: load_image_rgb(path, max_pixels=args.max_pixels), label, failures)
                dt = time.perf_counter() - t
                slowest = max(slowest, (dt, f"{label} ({len(bad)} bytes)"))
                outcome[fmt][result] += 1
                n += 1
    elapsed = time.perf_counter() - start
    for fmt, counts in sorted(outcome.items()):
        print(f"{fmt:>10}: {counts['read']:6d} read  {counts['refused']:6d} refused  {counts['FAILED']:4d} failed")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} cases from {len(seeds)} seeds in {elapsed:.1f} s; slowest {slowest[0] * 1000:.0f} ms ({slowest[1]}); "
          f"peak RSS {peak_mb:.0f} MB")
    for label, err in failures[:20]:
        print(f"FAILED {label}: {err}")
    print(f"{len(failures)} case(s) raised something other than ImageReadError")
    return 1 if failures else 0


def _decode(fn, label: str, failures: list) -> str:
    try:
        out = fn()
    except ImageReadError:
        return "refused"
    except Exception as e:  # noqa: BLE001  (what this check exists to find)
        failures.append((label, f"{type(e).__name__}: {e}"))
        return "FAILED"
    if not (out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags["C_CONTIGUOUS"]):
        failures.append((label, f"not an (H, W, 3) uint8 array: {out.dtype} {out.shape}"))
        return "FAILED"
    return "read"


if __name__ == "__main__":
    sys.exit(main())
