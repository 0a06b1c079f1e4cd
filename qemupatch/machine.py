"""One QEMU process and its QMP connection (after QEMU's
``python/qemu/machine/machine.py``); nothing about guests or tests.

::

    QemuMachine(argv, out_dir, deadline=)    a context manager
      launch(timeout)       spawn QEMU (qemupatch.run.spawn), QMP over a
                            socketpair (no socket path, no connect retries)
      qmp(cmd, args)        one command; qmp.jsonl keeps every message
      poll() / wait(t)      QEMU's exit status, if it has one
      shutdown()            QMP quit, wait, Process.stop(); always reaps and
                            closes QMP, its loop thread and the log files
      exit                  QemuExit: how it ended, and whether we ended it

A :class:`Runstate` guards the calls: ``launch`` once, ``qmp`` only while
running; a call in the wrong state raises :class:`MachineStateError`.

:func:`probe_accel` decides KVM or TCG by booting a kernel under KVM for a
few seconds (``/dev/kvm`` existing proves nothing here); the answer is
remembered per QEMU, kernel and host boot.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import json
import os
import shlex
import signal
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import EventListener, QMPClient, QMPError

from qemupatch.aioloop import LoopClosed, LoopThread
from qemupatch.errors import CommandFailed, CommandTimeout, QemuStartError
from qemupatch.records import write_json
from qemupatch.run import Process, spawn, stream


class Runstate(enum.Enum):
    IDLE = "idle"                    # created, not launched
    LAUNCHING = "launching"
    RUNNING = "running"              # QMP connected (QEMU may have exited since)
    SHUTTING_DOWN = "shutting-down"
    SHUTDOWN = "shutdown"            # reaped, everything closed


class MachineStateError(RuntimeError):
    """A call the machine's :class:`Runstate` does not allow: a bug."""


@dataclass(frozen=True)
class QemuExit:
    returncode: int | None        # None: never started
    killed_by_us: bool
    how: str                      # "exited", "quit", "killed", "deadline", "never started"

    @property
    def signal(self) -> int | None:
        if self.returncode is not None and self.returncode < 0:
            return -self.returncode
        return None

    def describe(self) -> str:
        if self.killed_by_us:
            return f"killed by qemupatch ({self.how})"
        if self.signal:
            return f"QEMU died from signal {signal.Signals(self.signal).name}"
        if self.returncode is None:
            return "QEMU never started"
        return f"QEMU exited with status {self.returncode}"


NEVER_STARTED = QemuExit(None, False, "never started")
# What a QMP call to a QEMU that is exiting or wedged may raise; anything
# else (Terminated above all) goes through.
_QMP_GONE = (QMPError, EOFError, OSError, TimeoutError, LoopClosed)


class QemuMachine:
    """A QEMU process with a QMP connection; a context manager that always
    ends and reaps QEMU.

    ``argv`` is QEMU's command line without the QMP monitor, which the
    machine adds (``-chardev socket,fd=N`` on one end of a socketpair).
    ``deadline``: seconds after which ``run.spawn``'s watchdog stops QEMU
    whatever happens.  ``out_dir`` receives ``qemu.cmdline``, ``qemu.log``
    (QEMU's stdout and stderr) and ``qmp.jsonl``.  ``env``: added to
    QEMU's environment (sanitizer options).
    """

    def __init__(self, argv: Sequence[str], out_dir: Path, *, deadline: float,
                 env: Mapping[str, str] | None = None) -> None:
        self.argv = tuple(str(a) for a in argv)
        self.env = dict(env) if env else None
        self.out_dir = out_dir
        self.deadline = deadline
        self.state = Runstate.IDLE
        self.exit: QemuExit | None = None
        self._process: Process | None = None
        self._loop: LoopThread | None = None
        self._qmp = None
        self._pump = None
        self._sock: socket.socket | None = None
        self._transcript = None
        self._t0 = time.monotonic()

    def _require(self, call: str, *states: Runstate) -> None:
        if self.state not in states:
            raise MachineStateError(
                f"QemuMachine.{call} needs the machine "
                f"{' or '.join(s.value for s in states)}; it is {self.state.value}")

    # -- lifecycle
    def __enter__(self) -> QemuMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def log_path(self) -> Path:
        return self.out_dir / "qemu.log"

    def launch(self, timeout: float) -> None:
        """Start QEMU and finish the QMP handshake within ``timeout`` s."""
        self._require("launch()", Runstate.IDLE)
        self.state = Runstate.LAUNCHING
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = ours
        try:
            argv = (*self.argv, "-chardev", f"socket,id=qmp0,fd={theirs.fileno()}",
                    "-mon", "chardev=qmp0,mode=control")
            (self.out_dir / "qemu.cmdline").write_text(shlex.join(argv) + "\n")
            self.log_path.write_bytes(b"")
            self._transcript = open(self.out_dir / "qmp.jsonl", "w", encoding="utf-8")
            try:
                self._process = spawn(argv, deadline=self.deadline, stdout=self.log_path, env=self.env,
                                      pass_fds=(theirs.fileno(),))
            except OSError as exc:
                raise QemuStartError(f"could not run {self.argv[0]}: {exc}") from exc
        finally:
            theirs.close()
        self._loop = LoopThread("qemupatch-qmp")
        try:
            self._loop.call(self._connect(ours), timeout)
        except TimeoutError:
            raise QemuStartError(self._start_failure(
                f"QMP did not answer within {timeout:.0f} s")) from None
        except (QMPError, EOFError, OSError) as exc:   # QEMU's log says why
            rc = self._process.wait(1)
            what = (f"QEMU exited with status {rc} during start-up" if rc is not None
                    else f"QMP handshake failed: {exc}")
            raise QemuStartError(self._start_failure(what)) from exc
        self.state = Runstate.RUNNING

    def _start_failure(self, what: str) -> str:
        return (f"{what}\ncommand: {shlex.join(self.argv)}\n"
                f"QEMU output (tail):\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    async def _connect(self, sock: socket.socket) -> None:
        client = QMPClient("qemupatch")
        await client.connect(sock)
        self._qmp = client
        self._note("greeting", {"QMP": "connected"})
        self._pump = asyncio.get_running_loop().create_task(self._pump_events(client))

    async def _pump_events(self, client) -> None:
        listener = EventListener()
        with client.listen(listener):
            async for event in listener:
                self._note("event", dict(event))

    async def _close_qmp(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            try:
                await self._pump
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - ending it
                pass
        if self._qmp is not None:
            try:
                await self._qmp.disconnect()
            except (EOFError, OSError):
                pass          # QEMU hangs up after quit (python/qemu does the same)

    def _note(self, kind: str, msg: object) -> None:
        if self._transcript and not self._transcript.closed:
            self._transcript.write(json.dumps(
                {"t": round(time.monotonic() - self._t0, 3), "kind": kind, "msg": msg},
                default=str) + "\n")
            self._transcript.flush()

    def qmp(self, cmd: str, args: Mapping[str, object] | None = None,
            timeout: float = 10) -> object:
        """Run one QMP command; every command and answer goes to qmp.jsonl.
        Raises ``qemu.qmp.ExecuteError`` for an error answer and
        TimeoutError when QEMU does not answer."""
        self._require(f"qmp({cmd!r})", Runstate.RUNNING, Runstate.SHUTTING_DOWN)
        assert self._loop is not None and self._qmp is not None
        self._note("command", {"execute": cmd, "arguments": dict(args or {})})
        try:
            ret = self._loop.call(self._qmp.execute(cmd, dict(args) if args else None),
                                  timeout)
        except QMPError as exc:
            self._note("error", str(exc))
            raise
        except TimeoutError:
            self._note("error", f"no answer within {timeout} s")
            raise TimeoutError(f"no answer to QMP '{cmd}' within {timeout} s") from None
        self._note("return", ret)
        return ret

    def poll(self) -> int | None:
        return self._process.poll() if self._process else None

    def wait(self, timeout: float) -> int | None:
        """QEMU's exit status, or None if it still runs after ``timeout`` s."""
        return self._process.wait(timeout) if self._process else None

    def shutdown(self, timeout: float = 10) -> QemuExit:
        """QMP ``quit``, wait, then ``Process.stop``; always reap QEMU and
        close QMP, the loop thread and the log files.  Idempotent."""
        if self.state is Runstate.SHUTDOWN:
            return self.exit or NEVER_STARTED
        running = self.state is Runstate.RUNNING
        self.state = Runstate.SHUTTING_DOWN
        try:
            if self._process is None:
                self.exit = NEVER_STARTED
            else:
                rc, how, ours = self._process.poll(), "exited", False
                if rc is None:
                    ours, how = True, "quit"
                    if running:
                        try:
                            self.qmp("quit", timeout=min(5, timeout))
                        except _QMP_GONE as exc:      # QEMU may be wedged: stop below
                            self._note("error", f"quit failed: {exc}")
                        rc = self._process.wait(timeout)
                    if rc is None:
                        how = "killed"
                        rc = self._process.stop(grace=2)
                elif self._process.expired:
                    ours, how = True, "deadline"
                self.exit = QemuExit(rc, ours, how)
        finally:
            self._post_shutdown()
        return self.exit

    def _post_shutdown(self) -> None:
        try:
            if self._process is not None:
                self._process.stop(grace=2)    # reaps; kills stragglers in the group
        finally:
            if self._loop is not None:
                try:
                    self._loop.call(self._close_qmp(), 5)
                except _QMP_GONE:
                    pass      # best effort on a dead peer
                self._loop.close()
            self._qmp = None
            if self._sock is not None:
                self._sock.close()
            if self._transcript and not self._transcript.closed:
                self._transcript.close()
            self.state = Runstate.SHUTDOWN


# ---------------------------------------------------------------- KVM probe


PROBE_IDLE = 3.0


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


@functools.cache
def _probe_cached(key: str, qemu: Path, kernel: Path, timeout: float) -> str:
    return _probe(qemu, kernel, timeout)


def probe_accel(qemu: Path, kernel: Path, *, timeout: float = 15,
                cache_dir: Path | None = None) -> str:
    """``"kvm"`` if a guest really runs under KVM within ``timeout``, else ``"tcg"``.

    The presence of /dev/kvm proves nothing (seen: KVM_CREATE_VM works, then
    the guest hangs), so the probe boots ``kernel`` and expects its first
    console line and its "no root" panic in time.  A hang costs a few
    seconds of silence (``PROBE_IDLE``), so the answer is kept for this
    process, and in ``cache_dir`` for later ones.  KVM working is a
    property of the host, not of a QEMU build: the key is QEMU's path (not
    its contents, so a rebuilt QEMU does not pay again), the kernel and the
    host's boot.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    key = hashlib.sha256(f"{qemu.resolve()}\n{_file_key(kernel)}\n{_boot_id()}".encode()
                         ).hexdigest()[:16]
    record = cache_dir / f"accel-{key}.json" if cache_dir else None
    if record is not None and record.is_file():
        try:
            accel = json.loads(record.read_text())["accel"]
            if accel in ("kvm", "tcg"):
                return accel
        except (OSError, ValueError, KeyError, TypeError):
            pass
    accel = _probe_cached(key, qemu, kernel, timeout)
    if record is not None:
        try:
            write_json(record, {"accel": accel, "qemu": str(qemu), "kernel": str(kernel)})
        except OSError:
            pass          # a read-only cache: the next process probes again
    return accel


def _probe(qemu: Path, kernel: Path, timeout: float) -> str:
    argv = [qemu, "-accel", "kvm", "-m", "256", "-nographic", "-no-reboot", "-nic", "none",
            "-L", "/usr/share/qemu", "-L", "/usr/share/seabios", "-monitor", "none",
            "-serial", "stdio", "-kernel", kernel,
            "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"]
    # A booting kernel under KVM prints without pause: PROBE_IDLE s of
    # silence is the hang, not the whole timeout.
    with tempfile.TemporaryDirectory(prefix="qemupatch-kvm-probe-") as tmp:
        try:
            done = stream(argv, timeout=timeout, idle_timeout=PROBE_IDLE,
                          log_path=Path(tmp) / "probe.log")
        except (CommandTimeout, CommandFailed):
            return "tcg"
    return "kvm" if "Linux version" in done.output else "tcg"
