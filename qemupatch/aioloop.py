"""One asyncio event loop in a background thread, driven from plain code.

The QMP client (``machine.py``) and the host socket servers (``servers.py``)
are asyncio code living beside a synchronous boot test.  Each owns one
:class:`LoopThread`; ``call(coro, timeout)`` runs a coroutine on it and
waits, ``close()`` stops the loop and joins the thread.  Errors are the
coroutine's own, plus :class:`TimeoutError` (the coroutine is cancelled)
and :class:`LoopClosed` (a call after ``close()``): each caller turns them
into its own error type.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopClosed(RuntimeError):
    """``call()`` after ``close()``: a bug in the caller, said plainly."""


class LoopThread:
    """An event loop running forever in a daemon thread named ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._loop.is_closed()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop; its result, or TimeoutError after
        ``timeout`` seconds (the coroutine is cancelled then)."""
        if self._loop.is_closed() or not self._thread.is_alive():
            coro.close()
            raise LoopClosed(f"event loop {self.name} is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def close(self, timeout: float = 10) -> None:
        """Stop the loop and join its thread; a second close does nothing."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        if not self._loop.is_running():
            self._loop.close()
