"""The one place qemupatch runs external commands.

Every command gets a deadline, its own process group (so a timeout kills the
whole tree, not just the first child), a request to Linux to kill it when
qemupatch dies (even by ``kill -9``), and a debug log line with the exact
argv.  Callers pass ``cwd``; nothing here or elsewhere calls ``os.chdir``::

    run(argv, timeout=)      to completion, output captured   -> Completed
    stream(argv, timeout=)   to completion, lines to a log    -> Completed
    git(repo, *args)         run() with a neutral git config  -> Completed
    spawn(argv, deadline=)   a long-lived process (QEMU, the podman
                             service) that the caller stops   -> Process
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


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the child's whole process group (it leads its own)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


STOP_GRACE = 5.0


def _stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE) -> int:
    """SIGTERM the group, then SIGKILL after ``grace`` seconds; reap.

    SIGTERM first because some children keep grandchildren in process
    groups of their own (ninja does, for every job) and only clean those up
    when asked; a SIGKILL would orphan them."""
    if proc.poll() is None:
        _kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc, signal.SIGKILL)   # whatever is left in the group
    return proc.wait()


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when the thread that
    started it dies (PR_SET_PDEATHSIG), so a ``kill -9`` of qemupatch
    leaves nothing behind.  libc is loaded before the fork: the child only
    makes the one call."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return preexec


def _popen(args: tuple[str, ...], **kwargs) -> subprocess.Popen:
    """The one Popen: own process group, dies with qemupatch."""
    return subprocess.Popen(args, start_new_session=True,
                            preexec_fn=_die_with_parent(), **kwargs)


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
    proc = _popen(
        args,
        cwd=cwd,
        env=full_env,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=not binary,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        out, err = proc.communicate()
        raise CommandTimeout(args, timeout, _text(out) + _text(err)) from None
    except BaseException:
        _stop_group(proc)
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
        proc = _popen(
            args, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace",
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
                    _stop_group(proc)
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
            _stop_group(proc)
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


class Process:
    """A long-lived child started by :func:`spawn`.

    It leads its own process group, dies with qemupatch, and is stopped
    (its whole group) at its deadline by a watchdog thread, or by
    :meth:`stop`: SIGTERM, ``grace`` seconds, then SIGKILL.  ``expired``
    tells whether the deadline stopped it.
    """

    def __init__(self, args: tuple[str, ...], popen: subprocess.Popen, deadline: float):
        self.argv = args
        self.popen = popen
        self.deadline = deadline
        self.expired = False
        self._done = threading.Event()
        threading.Thread(target=self._watch, name=f"deadline-{popen.pid}",
                         daemon=True).start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _watch(self) -> None:
        if not self._done.wait(max(0.0, self.deadline - time.monotonic())):
            if self.popen.poll() is None:
                log.warning("%s ran past its deadline; stopping it", self.argv[0])
                self.expired = True
                self.stop(grace=5)

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if still running after ``timeout`` s."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 10.0) -> int:
        """End the process group (SIGTERM, then SIGKILL after ``grace`` s)
        and reap the process; returns its exit status."""
        rc = _stop_group(self.popen, grace)
        self._done.set()
        return rc


def spawn(
    argv: Sequence[str | os.PathLike],
    *,
    deadline: float,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    stdout: int | Path | None = None,
    pass_fds: Sequence[int] = (),
) -> Process:
    """Start a long-lived process that must be gone within ``deadline``
    seconds (the caller stops it earlier with ``Process.stop``).

    ``stdout``: a file to write stdout and stderr to, or ``subprocess.DEVNULL``
    (the default).  ``pass_fds``: descriptors the child inherits (QMP over a
    socketpair).
    """
    args = tuple(str(a) for a in argv)
    log.debug("spawn (cwd=%s, deadline=%ss): %s", cwd, deadline, " ".join(args))
    full_env = {**os.environ, **env} if env else None
    if isinstance(stdout, Path):
        with open(stdout, "ab") as out:
            popen = _popen(args, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                           stdout=out, stderr=subprocess.STDOUT, pass_fds=tuple(pass_fds))
    else:
        target = subprocess.DEVNULL if stdout is None else stdout
        popen = _popen(args, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                       stdout=target, stderr=subprocess.STDOUT, pass_fds=tuple(pass_fds))
    return Process(args, popen, time.monotonic() + deadline)
