"""Host overlay mounts: a source tree made writable without writing to it.

QEMU's ``configure`` fails on a read-only source, and a copy of a QEMU tree
costs seconds and a gigabyte.  A kernel overlay (the tree as the lower
layer, changes in a temporary upper layer) costs nothing and is discarded
after.  Both container builds (``engine.run`` for ``Mount(mode="overlay")``)
and host builds use this one helper::

    with host_overlay(source, enabled=settings.host_overlay) as merged:
        tree = merged or copy_of(source)    # None: no overlay to be had

Only root can mount, and the mount options cannot name a path with a comma
or a colon; in those cases, or when the mount fails, the caller gets None
and falls back to a copy.  The overlay is always unmounted (lazily if a
process still holds it) and its temporary folder removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qemupatch.errors import CommandFailed, CommandTimeout
from qemupatch.run import run

log = logging.getLogger(__name__)
PREFIX = "qemupatch-overlay-"
MOUNT_TIMEOUT = 60.0


@contextmanager
def host_overlay(source: Path, *, enabled: bool) -> Iterator[Path | None]:
    """A writable view of ``source`` for the block, or None when none can be made."""
    if not enabled or os.geteuid() != 0 or any(c in str(source) for c in ",:"):
        yield None
        return
    tmp = Path(tempfile.mkdtemp(prefix=PREFIX))
    for sub in ("upper", "work", "merged"):
        (tmp / sub).mkdir()
    if not _mount(source, tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        yield None
        return
    try:
        yield tmp / "merged"
    finally:
        _unmount(tmp)


def _mount(source: Path, tmp: Path) -> bool:
    try:
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={source},upperdir={tmp}/upper,workdir={tmp}/work", tmp / "merged"],
            timeout=MOUNT_TIMEOUT)
    except (CommandFailed, CommandTimeout, OSError) as exc:
        log.debug("host overlay of %s failed, the caller copies instead: %s", source, exc)
        return False
    return True


def _unmount(tmp: Path) -> None:
    """Unmount (lazily when busy); the folder goes only once nothing is
    mounted on it."""
    merged = tmp / "merged"
    try:
        run(["umount", merged], timeout=MOUNT_TIMEOUT)
    except (CommandFailed, CommandTimeout, OSError):
        log.warning("could not unmount %s; detaching it lazily", merged, exc_info=True)
        try:
            run(["umount", "-l", merged], timeout=MOUNT_TIMEOUT)
        except (CommandFailed, CommandTimeout, OSError):
            log.error("overlay %s is still mounted", merged)
            return
    shutil.rmtree(tmp, ignore_errors=True)
