"""Time SynthRef generation: wall-clock seconds for a preset, per domain.

    python benchmarks/synthref_speed.py --preset small --workers 2

Each run writes into a temporary folder that is deleted afterwards. The
target (the SynthRef generator budget): `small` (1400 images) in under
2 minutes on 2 cores.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from refseg.data.synthref.generate import generate
from refseg.data.synthref.vocab import DOMAINS, PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--domain", choices=DOMAINS + ("both",), default="both")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = sum(PRESETS[args.preset])
    domains = DOMAINS if args.domain == "both" else (args.domain,)
    with tempfile.TemporaryDirectory(prefix="synthref-speed-") as tmp:
        for domain in domains:
            start, cpu = time.perf_counter(), os.times()
            generate(Path(tmp) / domain, domain, args.preset, args.seed, workers=args.workers)
            seconds = time.perf_counter() - start
            cpu_end = os.times()
            cpu_seconds = sum(cpu_end[:4]) - sum(cpu[:4])  # user + system, this process and its workers
            print(f"{domain:>8} {args.preset}: {images} images in {seconds:.1f} s wall "
                  f"({images / seconds:.1f} images/s, {cpu_seconds:.1f} s CPU, {args.workers} workers)")


if __name__ == "__main__":
    main()
