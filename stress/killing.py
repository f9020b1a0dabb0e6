"""Helpers of the crash-safety scripts (kill_train.py, kill_make_data.py) and their in-suite tests.

A `Child` is a process to SIGKILL: `refseg <args>` started as a new
interpreter (what a user runs), or the same work forked from the current
process (`fork=True`: no interpreter start-up or imports, for the fast
in-suite tests). Either way it runs in its own session, so the kill reaches
it and any worker it forked at once, as a crash or an OOM kill would; its
stdout and stderr go to a log file.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = float(os.environ.get("REFSEG_STRESS_TIMEOUT", 3600))  # seconds one child may run (a starved CPU is slow)


def env() -> dict:
    """The environment of a child: this checkout's refseg first, one thread per process."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p])
    out.setdefault("OMP_NUM_THREADS", "1")
    return out


def cli_main(args: Sequence[str]) -> int:
    """`refseg <args>` in this process."""
    from refseg.cli import main

    return main([str(a) for a in args])


def _forked(target: Callable, args: tuple, log: str) -> None:
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    try:
        rc = int(target(*args) or 0)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001  (report it in the log, exit non-zero)
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


class Child:
    """`target(*args)` forked (fork=True), or `argv` as a new process; output into `log`."""

    def __init__(self, log: Path, argv: Optional[Sequence[str]] = None, target: Optional[Callable] = None,
                 args: tuple = (), fork: bool = False):
        self.log = Path(log)
        self.started = time.time()
        if fork:
            self.log.write_text("")  # exists from the start, as with a new process
            self.proc = multiprocessing.get_context("fork").Process(target=_forked, args=(target, args, str(log)))
            self.proc.start()
            self.pid = self.proc.pid
        else:
            with open(log, "w") as f:
                self.proc = subprocess.Popen([str(a) for a in argv], stdout=f, stderr=subprocess.STDOUT, env=env(),
                                             start_new_session=True)
            self.pid = self.proc.pid

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """The exit status (negative: killed by that signal), or None if still running after `timeout` s."""
        if isinstance(self.proc, subprocess.Popen):
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        self.proc.join(timeout)
        return self.proc.exitcode

    def running(self) -> bool:
        return self.wait(0) is None

    def kill(self) -> bool:
        """SIGKILL the process group; True if that is what ended it (False: it had already exited)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rc = self.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until no process of the group is left (pool workers die with it)
            try:
                os.killpg(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        return rc == -signal.SIGKILL

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def run_to_end(child: Child, timeout: float = TIMEOUT) -> float:
    """Wait for a child; raise with its log's tail unless it exits 0. Returns its wall time."""
    rc = child.wait(timeout)
    if rc is None:
        child.kill()
        raise RuntimeError(f"{child.log.name}: ran over {timeout} s")
    if rc != 0:
        raise RuntimeError(f"{child.log.name}: exited {rc}:\n{child.tail()}")
    return time.time() - child.started


def refseg(args: Sequence) -> list:
    """argv of `refseg <args>` run with this interpreter."""
    return [sys.executable, "-m", "refseg.cli", *map(str, args)]


def run_in_workdir(work: Optional[Path], prefix: str, keep: bool, body: Callable[[Path], None]) -> int:
    """A stress script's main: run ``body(work)`` in ``work`` (default: a new temporary folder);
    a failed check prints FAIL and keeps the folder (exit 1), success removes it unless ``keep``."""
    import shutil
    import tempfile

    work = Path(work or tempfile.mkdtemp(prefix=prefix))
    try:
        body(work)
    except (AssertionError, RuntimeError) as e:
        print(f"FAIL: {e}\n(working folder kept: {work})", file=sys.stderr)
        return 1
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0
