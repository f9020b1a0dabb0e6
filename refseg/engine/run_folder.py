"""The run folder of a training run: refused when it holds a run (unless resumed or overwritten), locked while
a process trains in it, and the checkpoint a resume continues from chosen and checked.

    lock = open_run(run, cfg)               # RunLock (fcntl.flock on RUN/.lock); TrainError when refused
    found, state = choose_resume_point(run)  # the newest whole checkpoint (last/, an interrupted save, .last.prev, best/)
    check_resume_config(cfg, saved, source)  # a resume keeps the settings the data order depends on (RESUME_FIXED)
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from refseg.engine.config import TrainConfig, flag_of, flat_fields, flat_view
from refseg.engine.state import StateError


class TrainError(ValueError):
    """A configuration or data problem, reported to the user in one line."""


# ---- -----------------------------------------------------------------

LOCK_FILE = ".lock"

# settings the data order and a checkpoint's position in it depend on: a resumed run must keep them
# (flat names; a training method adds its own: resume_fixed())
RESUME_FIXED = ("model", "method", "supervision", "size", "train_subset", "split_by",
                "accurate_fraction", "weak_seed", "batch_size", "images_per_batch", "group_refs", "flip", "seed")


class RunLock:
    """An exclusive lock on a run folder: fcntl.flock on RUN/.lock (created with the folder when missing).

    The kernel drops the lock when the process ends, however it ends (SIGKILL
    included), so a dead run's lock never blocks the next one. RUN/.lock holds
    the holder's pid, which a refused process names. Raises TrainError when
    another process holds it.
    """

    def __init__(self, run: Path):
        self.run, self.fd = run, None
        self.created = not run.exists()
        run.mkdir(parents=True, exist_ok=True)
        path = run / LOCK_FILE
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise TrainError(f"{run} is in use: another refseg train (pid {holder}) trains in it; "
                                     "wait for it to end, or train into another --out") from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the folder was replaced (--overwrite) between open and flock: lock what is there now
        else:
            raise TrainError(f"{run} keeps being replaced by another process; cannot lock it")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self.fd = fd

    def release(self) -> None:
        """Unlock; a folder this lock created that holds nothing but the lock file is removed."""
        if self.fd is None:
            return
        try:
            if self.created and [p.name for p in self.run.iterdir()] == [LOCK_FILE]:
                (self.run / LOCK_FILE).unlink()
                self.run.rmdir()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _same_folder(a: Any, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def open_run(run: Path, cfg: TrainConfig) -> RunLock:
    """Check and lock the run folder `run` before anything is written to it; returns the held lock.

    A folder that already holds anything (but the lock file, and the weak
    split RUN/data that a run with accurate_fraction reuses) is refused
    unless cfg.run.resume names it, or cfg.run.overwrite is set: then the old run is
    renamed aside in one step (to .<name>.replaced-* beside it, nothing
    deleted) and removed once the new run has saved its first complete
    checkpoint (drop_replaced), so a new run that fails before that leaves
    the old one recoverable.
    """
    if cfg.run.overwrite and cfg.run.resume:
        raise TrainError("--overwrite starts a new run and --resume continues one: give only one of them")
    if run.exists() and not run.is_dir():
        raise TrainError(f"--out {run}: exists and is not a folder")
    lock = RunLock(run)
    try:
        keep = {LOCK_FILE} | ({"data"} if cfg.data.accurate_fraction is not None else set())
        held = sorted((p.name for p in run.iterdir() if p.name not in keep), key=lambda n: (n.startswith("."), n))
        if held and not (cfg.run.resume and _same_folder(cfg.run.resume, run)):
            if not cfg.run.overwrite:
                listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
                raise TrainError(f"--out {run} already holds a run ({listed}): continue it with --resume {run}, "
                                 "or replace it with --overwrite")
            lock = _replace_run(run, lock, cfg.run.progress)
    except BaseException:
        lock.release()
        raise
    return lock


def _replace_run(run: Path, lock: RunLock, say: bool) -> RunLock:
    """--overwrite: an empty, locked folder at `run`; the old one renamed to .<name>.replaced-<tag>."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = run.parent / f".{run.name}.new-{tag}"
    aside = run.parent / f".{run.name}.replaced-{tag}"
    new = RunLock(staging)
    try:
        os.replace(run, aside)
        os.replace(staging, run)
    except BaseException:
        if aside.exists() and not run.exists():
            os.replace(aside, run)
        new.release()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    new.run, new.created = run, False
    lock.release()
    if say:
        print(f"refseg train: --overwrite: the run that was in {run} is kept in {aside} until this run's "
              "first checkpoint", file=sys.stderr)
    return new


def drop_replaced(run: Path) -> None:
    """Delete what --overwrite set aside (.<name>.replaced-*, and staging folders of an interrupted swap)."""
    for old in [*run.parent.glob(f".{run.name}.replaced-*"), *run.parent.glob(f".{run.name}.new-*")]:
        shutil.rmtree(old, ignore_errors=True)


def resume_fixed() -> Tuple[str, ...]:
    """RESUME_FIXED and each training method's own (flat names: wrel_bank_batch ...)."""
    from refseg.engine.config import method_sections

    extra = [f"{name}_{f}" for name, cls in method_sections().items() for f in getattr(cls, "RESUME_FIXED", ())]
    return RESUME_FIXED + tuple(extra)


def check_resume_config(cfg: TrainConfig, saved: Dict[str, Any], source: Path) -> None:
    """Raise TrainError naming the field and both values when `cfg` changes a RESUME_FIXED setting of the
    config `saved` (read from `source`, nested or flat) that a resumed run continues."""
    now, before, where = cfg.to_flat(), flat_view(saved), flat_fields()
    for name in resume_fixed():
        if name in before and before[name] != now[name]:
            section, field = where[name]
            raise TrainError(f"--resume {cfg.run.resume}: {section}.{field} is {now[name]!r} here but "
                             f"{before[name]!r} in {source}; a resumed run keeps the data order it was saved in "
                             f"(drop {flag_of(section, field)}, or train a new run into another --out)")


def choose_resume_point(run: Path) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """(checkpoint folder, its state.json) that --resume continues from; (None, None) when the run holds no
    checkpoint at all (it stopped before its first: it starts over).

    Every candidate (checkpoint.resume_candidates) is checked completely
    (checkpoint.verify_resume_point); the newest whole one wins, last/ on a
    tie. When that is not last/, the reason is printed on stderr. Raises
    TrainError with each candidate's reason when none is whole.
    """
    from refseg.engine import checkpoint as ckpt

    problems: List[str] = []
    whole = []
    for folder in ckpt.resume_candidates(run):
        try:
            state = ckpt.verify_resume_point(folder)
        except (ckpt.CheckpointError, StateError) as e:
            problems.append(" ".join(str(e).split()))
            continue
        whole.append((state["step"], folder.name == "last", folder, state))
    if not whole:
        if problems:
            raise TrainError(f"--resume {run}: no checkpoint to continue from is whole: {'; '.join(problems)}")
        return None, None
    step, _, folder, state = max(whole, key=lambda w: w[:2])
    if folder != run / "last":
        why = problems[0] if (run / "last").exists() and problems else f"{run / 'last'} is missing"
        print(f"refseg train: {why}; resuming from {folder} (step {step}) instead", file=sys.stderr)
    return folder, state


