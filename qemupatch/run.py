"""The one place qemupatch runs external commands.

Every command gets a deadline, its own process group (so a timeout kills the
whole tree, not just the first child), captured output and a debug log line
with the exact argv.  Callers pass ``cwd``; nothing here or elsewhere calls
``os.chdir``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qemupatch.errors import CommandFailed, CommandTimeout

log = logging.getLogger(__name__)

# Git must behave the same for every user: no personal config may change
# what format-patch writes or how am applies.
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "qemupatch",
    "GIT_AUTHOR_EMAIL": "qemupatch@localhost",
    "GIT_COMMITTER_NAME": "qemupatch",
    "GIT_COMMITTER_EMAIL": "qemupatch@localhost",
    "LC_ALL": "C",
}


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(
    argv: Sequence[str | os.PathLike],
    *,
    timeout: float,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    input: str | bytes | None = None,
    check: bool = True,
) -> Completed:
    """Run ``argv`` to completion within ``timeout`` seconds."""
    args = tuple(str(a) for a in argv)
    log.debug("run (cwd=%s, timeout=%ss): %s", cwd, timeout, " ".join(args))
    full_env = {**os.environ, **env} if env else None
    binary = isinstance(input, bytes)
    start = time.monotonic()
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=full_env,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=not binary,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise CommandTimeout(args, timeout, _text(out) + _text(err)) from None
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    done = Completed(args, proc.returncode, _text(out), _text(err),
                     time.monotonic() - start)
    if check and proc.returncode != 0:
        raise CommandFailed(args, proc.returncode, done.output)
    return done


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data


def stream(
    argv: Sequence[str | os.PathLike],
    *,
    timeout: float,
    log_path: Path,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    idle_timeout: float | None = None,
) -> Completed:
    """Run a long command, writing every output line to ``log_path`` as it
    comes and handing it to ``on_line`` (for progress).

    ``idle_timeout`` is a watchdog: the command is killed when it prints
    nothing for that long.  stdout and stderr are merged, as a terminal
    would show them.
    """
    args = tuple(str(a) for a in argv)
    log.debug("stream (cwd=%s, timeout=%ss): %s", cwd, timeout, " ".join(args))
    full_env = {**os.environ, **env} if env else None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    last_output = [start]
    lines: list[str] = []
    with open(log_path, "w", encoding="utf-8") as logf:
        logf.write(f"$ {' '.join(args)}\n")
        logf.flush()
        proc = subprocess.Popen(
            args, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
        )
        reason: list[str] = []

        def watchdog() -> None:
            while proc.poll() is None:
                now = time.monotonic()
                if now - start > timeout:
                    reason.append("deadline")
                elif idle_timeout and now - last_output[0] > idle_timeout:
                    reason.append("idle")
                if reason:
                    _kill_group(proc)
                    return
                time.sleep(0.2)

        dog = threading.Thread(target=watchdog, daemon=True)
        dog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                last_output[0] = time.monotonic()
                logf.write(line)
                logf.flush()
                lines.append(line)
                if on_line:
                    on_line(line.rstrip("\n"))
            proc.wait()
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        finally:
            dog.join(timeout=1)
    output = "".join(lines)
    if reason:
        limit = timeout if reason[0] == "deadline" else idle_timeout or timeout
        raise CommandTimeout(args, limit, output)
    done = Completed(args, proc.returncode, output, "", time.monotonic() - start)
    if proc.returncode != 0:
        raise CommandFailed(args, proc.returncode, output)
    return done


def git(
    repo: str | os.PathLike,
    *args: str | os.PathLike,
    timeout: float = 600,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run git in ``repo`` with a neutral configuration."""
    return run(
        ["git", "-C", repo, *args],
        timeout=timeout,
        env={**GIT_ENV, **(env or {})},
        check=check,
        input=input,
    )
