"""The one asyncio-loop-in-a-thread helper (used by QMP and the host servers)."""

import asyncio

import pytest

from qemupatch.aioloop import LoopClosed, LoopThread


def test_call_returns_the_result_and_raises_the_coroutines_error():
    loop = LoopThread("test")
    try:
        async def answer():
            return 42

        async def fail():
            raise OSError("boom")

        assert loop.call(answer(), 5) == 42
        with pytest.raises(OSError, match="boom"):
            loop.call(fail(), 5)
    finally:
        loop.close()


def test_timeout_cancels_the_coroutine():
    loop = LoopThread("test")
    cancelled = []

    async def forever():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    try:
        with pytest.raises(TimeoutError):
            loop.call(forever(), 0.2)
        loop.call(asyncio.sleep(0.1), 5)        # the loop still runs
        assert cancelled == [True]
    finally:
        loop.close()


def test_call_after_close_is_a_clear_error_and_close_twice_is_fine():
    loop = LoopThread("test")
    loop.close()
    loop.close()
    assert loop.closed
    with pytest.raises(LoopClosed, match="closed"):
        loop.call(asyncio.sleep(0), 1)
