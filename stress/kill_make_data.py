"""Crash safety of `refseg make-data`: SIGKILL it at random moments; no half-written data set may load.

    python stress/kill_make_data.py                  # 12 kills of `make-data --preset tiny`
    python stress/kill_make_data.py --kills 30 --seed 1 --work /tmp/kmd --keep

A reference data set is generated once without a kill. Then, --kills
times: `refseg make-data` into a new folder (--workers 1 and 2 in turn; a
kill reaches the pool workers too), SIGKILLed at a random moment: in
start-up, after a random share of the images is drawn (read from its
progress lines), or after the last image, while the annotation files are
assembled, written and renamed into place. After each kill:
  - the output folder either does not exist or is complete: it loads and
    its files are byte-identical to the reference's;
  - every staging sibling it left (`.OUT.tmp-<pid>-*`) is refused by
    `load_refer` as incomplete, unless its marker was already removed,
    in which case every file is already written (byte-identical);
  - running the same command again succeeds, deletes the dead run's
    staging folder and gives the reference's bytes.
Prints how many kills left nothing loadable / a complete folder; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import killing  # noqa: E402  (stress/killing.py; this checkout's refseg comes first too)


def digest(folder: Path) -> dict:
    """SHA-256 of every file of a data set, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_data(out: Path, workers: int, log: Path, fork: bool, preset: str = "tiny") -> killing.Child:
    args = ["make-data", "--preset", preset, "--seed", "0", "--out", str(out), "--workers", str(workers)]
    return killing.Child(log, argv=killing.refseg(args), target=killing.cli_main, args=(args,), fork=fork)


def wait_for_progress(child: killing.Child, images: int) -> None:
    """Wait until make-data reports at least `images` images drawn ("  k/n images"), or ends."""
    while child.running():
        done = [int(m) for m in re.findall(r"(\d+)/\d+ images", child.log.read_text(errors="replace"))]
        if done and max(done) >= images:
            return
        time.sleep(0.02)


def check_after_kill(out: Path, reference: dict) -> str:
    """The checks listed in the module docstring; returns what the kill left."""
    from refseg.data import ReferFormatError, load_refer
    from refseg.data.atomic import INCOMPLETE_MARKER

    left = "nothing loadable"
    if out.exists():
        load_refer(out)
        assert digest(out) == reference, f"{out} exists but differs from the reference"
        left = "a complete data set"
    for staged in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        if (staged / INCOMPLETE_MARKER).exists():
            try:
                load_refer(staged)
            except ReferFormatError as e:
                assert "incomplete" in str(e), e
            else:
                raise AssertionError(f"{staged} loaded although it is marked incomplete")
        else:  # killed between the last write and the rename: complete, only not yet in place
            assert digest(staged) == reference, f"{staged} has no marker but is not complete"
    return left


def run(kills: int = 12, seed: int = 0, work: Path = None, fork: bool = False, rerun_every: int = 1,
        preset: str = "tiny", verbose: bool = True) -> dict:
    """Run the experiment; returns the figures. Raises AssertionError / RuntimeError on a failure.

    rerun_every: re-run the killed command to completion after every this-many kills (and after the last).
    """
    from refseg.data import load_refer

    rng = random.Random(seed)
    work = Path(work or tempfile.mkdtemp(prefix="kill-make-data-"))
    work.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    t0 = time.monotonic()
    shutil.rmtree(work / "reference", ignore_errors=True)
    t_ref = killing.run_to_end(make_data(work / "reference", 1, work / "reference.log", fork, preset))
    reference = digest(work / "reference")
    n_images = len(list((work / "reference" / "images").iterdir()))
    say(f"reference: {len(reference)} files ({n_images} images) in {t_ref:.1f} s")
    outcomes = {"nothing loadable": 0, "a complete data set": 0}
    reruns, finished, k, trial = 0, 0, 0, 0
    while k < kills:
        out = work / f"out-{trial:02d}"
        shutil.rmtree(out, ignore_errors=True)
        workers = 1 + trial % 2
        child = make_data(out, workers, work / f"trial-{trial:02d}.log", fork, preset)
        trial += 1
        stage = rng.choice(["start-up", "drawing", "drawing", "writing"])
        if stage == "start-up":
            time.sleep(rng.uniform(0.05, 1.0))
        else:
            target = n_images if stage == "writing" else rng.randint(1, 9) * n_images // 10
            wait_for_progress(child, target)
            time.sleep(rng.uniform(0.0, 0.3))
        if not child.kill():  # it finished first: the result must be complete, and it is no kill
            assert child.wait() == 0, child.tail()
            assert digest(out) == reference, f"{out} differs from the reference"
            finished += 1
            continue
        left = check_after_kill(out, reference)
        outcomes[left] += 1
        staged = len(list(work.glob(f".{out.name}.tmp-*")))
        say(f"kill {k + 1:2d} ({stage}, --workers {workers}): left {left}, {staged} staging folder(s)")
        if left == "nothing loadable" and ((k + 1) % rerun_every == 0 or k == kills - 1):
            killing.run_to_end(make_data(out, workers, work / f"rerun-{k:02d}.log", fork, preset))
            assert digest(out) == reference, f"the re-run into {out} differs from the reference"
            load_refer(out)
            leftovers = list(work.glob(f".{out.name}.tmp-*"))
            assert not leftovers, f"the re-run left the dead run's staging folder: {leftovers}"
            reruns += 1
        k += 1
    figures = {"kills": kills, "outcomes": outcomes, "reruns": reruns, "finished_before_the_kill": finished,
               "seconds": round(time.monotonic() - t0, 1)}
    say(f"kills: {kills}; {outcomes['nothing loadable']} left nothing loadable, {outcomes['a complete data set']} "
        f"a complete data set; never a partial one. {reruns} re-runs cleaned up and matched the reference "
        f"byte for byte; {figures['seconds']} s")
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary one)")
    p.add_argument("--fork", action="store_true", help="fork the runs from this process instead of starting refseg")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    args = p.parse_args()
    return killing.run_in_workdir(args.work, "kill-make-data-", args.keep,
                                  lambda work: run(args.kills, args.seed, work, fork=args.fork))


if __name__ == "__main__":
    sys.exit(main())
