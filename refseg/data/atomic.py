"""Write a whole output folder or nothing: build it beside the target, then rename it into place.

    with staged_directory(out, overwrite=False) as tmp:
        ...write files under tmp...
    # out now exists, complete; on any exception (or a kill) it does not

On Linux the final step is one renameat2 call (RENAME_NOREPLACE for a new
folder, RENAME_EXCHANGE to replace an old one), so readers see either the
old folder or the new one, never a mix. Where the C library or file
system lacks renameat2, plain renames are used: a new folder still
appears in one step; a replaced one is first moved aside, leaving a short
moment with no folder.

A killed run (SIGKILL, power loss) leaves a `.NAME.tmp-<pid>-*` sibling.
Until everything is written it holds the marker file `INCOMPLETE_MARKER`,
which `load_refer` refuses, so a half-written folder never loads as a data
set; the next run into the same target deletes such leftovers of dead
processes of this machine.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

INCOMPLETE_MARKER = ".refseg-incomplete"  # present in a staged folder until all its files are written
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2); False where it is unavailable, OSError on a real failure."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    if not os.path.lexists(target):
        if _renameat2(tmp, target, _RENAME_NOREPLACE):
            return
        os.rename(tmp, target)
        return
    if not overwrite:
        raise FileExistsError(errno.EEXIST, "output exists (pass --overwrite to replace it)", str(target))
    if _renameat2(tmp, target, _RENAME_EXCHANGE):
        _remove(tmp)  # now holds the old content
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, aside / target.name)
    os.rename(tmp, target)
    shutil.rmtree(aside)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(target: Path) -> list:
    """Delete `.NAME.tmp-*` siblings of `target` left by killed runs of this machine; returns them.

    Only folders whose marker names this host and a process that no longer
    exists are removed, so a run still writing (here or on another machine
    sharing the file system) is left alone.
    """
    removed = []
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            owner = json.loads((tmp / INCOMPLETE_MARKER).read_text())
            if owner.get("host") != socket.gethostname() or _alive(int(owner["pid"])):
                continue
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # no readable marker: not ours to judge
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


@contextmanager
def staged_directory(target, overwrite: bool = False):
    """Yield an empty temporary folder beside `target`; on success it becomes `target` atomically.

    Raises FileExistsError up front (and at the end) if `target` exists and
    `overwrite` is False. On an exception the temporary folder is removed
    and `target` is left as it was.
    """
    target = Path(target).absolute()
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(errno.EEXIST, "output exists (pass --overwrite to replace it)", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new folder
    marker = tmp / INCOMPLETE_MARKER
    try:
        marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "target": str(target)}) + "\n")
        yield tmp
        marker.unlink()  # every file is written: from here on the folder is complete
        _commit(tmp, target, overwrite)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
