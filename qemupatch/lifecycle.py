"""Stopping on request: SIGTERM and SIGINT become :class:`Terminated`.

CI cancels a job with a plain ``kill`` (SIGTERM); a user presses Ctrl-C
(SIGINT).  Both are turned into an exception in the main thread (tuxmake's
``Terminated.handle_signal``), so the ``finally`` blocks and context
managers that own containers, QEMU, the podman service and overlay mounts
all run, and records say where the run stopped.  A second signal during
that cleanup is ignored: every cleanup step has its own deadline.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from qemupatch.errors import Terminated

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within this block, SIGTERM/SIGINT raise Terminated once (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if raised.is_set():
            log.warning("%s during cleanup: ignored, cleanup goes on",
                        signal.Signals(signum).name)
            return
        raised.set()
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
