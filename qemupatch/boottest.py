"""``qemupatch boot-test``: boot the patched QEMU with a guest and test vmsocket.

One boot does everything::

    host servers (qemupatch.servers)      QEMU (-S, QMP on a private socket)
      echo, refused, sink, source  <---   -vmsocket unix:...  x4  (/dev/vmsocket0..3)
      vs-echo, vs-sink, vs-source  <---   virtio-serial ports qp.echo/qp.sink/qp.source
                                          console -> <out>/console.log

Stages, each with its own deadline (``Deadlines``); a console watchdog ends
the run when the guest prints nothing for ``Deadlines.idle``:

``qemu-start``   launch, connect QMP, ``query-pci`` finds the vmsocket
                 functions (1af4:10f0), ``cont``
``kernel-boot``  until /init prints ``QEMUPATCH-GUEST-START``
``guest-tests``  until ``QEMUPATCH-GUEST-DONE rc=N``
``shutdown``     until QEMU exits by itself (the guest runs ``poweroff -f``)

Failure classes (``qemupatch.errors``), first match wins:

* ``QemuStartError`` (21): QEMU did not start, QMP did not answer, or the
  vmsocket devices are missing;
* ``GuestCrash`` (22): "Kernel panic" on the console (``panic=-1`` plus
  ``-no-reboot`` turns a panic into exit 0, so the console decides), QEMU
  killed by a signal or exiting non-zero, or exiting without the done marker;
* ``BootDeadline`` (24): a stage deadline or the watchdog;
* ``GuestTestFailed`` (23): the guest finished but a test, a kernel
  warning or a host-side cross-check failed.

Whatever happens, ``<out>`` keeps ``console.log``, ``qemu.log`` (QEMU's
stdout and stderr), ``qmp.jsonl`` (QMP transcript), ``qemu.cmdline``,
``boot-test.json`` (``{"schema": 1, ...}``), ``boot-test.junit.xml`` (and
``bench.txt`` when the benchmark ran), and
no QEMU outlives ``QemuMachine``'s ``with`` block.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qemupatch.errors import (BootDeadline, BootTestError, CommandTimeout, GuestCrash,
                              GuestTestFailed, QemuStartError)
from qemupatch.guest import VPORT_NAMES, GuestImage
from qemupatch.run import run
from qemupatch.servers import ServerSet

SCHEMA = 1
VMSOCKET_VENDOR, VMSOCKET_DEVICE = 0x1AF4, 0x10F0
# /dev/vmsocketN order: echo, refused, sink, source.
VMSOCKET_SERVERS = ("echo", "refused", "sink", "source")
VMSOCKET_SLOTS = (0x10, 0x11, 0x12, 0x13)
LARGE_BYTES = 3 << 20
SHORT_BYTES = len("hello vmsocket\n")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Deadlines:
    """Seconds per stage (TCG on 2 shared cores is slow: be generous)."""

    qemu_start: float = 30
    kernel_boot: float = 120
    tests: float = 600
    bench: float = 900          # replaces ``tests`` when the benchmark runs
    shutdown: float = 30
    idle: float = 120           # console watchdog
    test_program: float = 180   # per vmsocket-test run inside the guest
    kvm_probe: float = 15


# ------------------------------------------------------------ console parsing


@dataclass(frozen=True)
class GuestTest:
    """One result line: a vmsocket-test test or a /init step."""

    name: str
    status: str                       # "pass" | "fail" | "skip"
    fields: tuple[tuple[str, str], ...]
    line: str

    def get(self, key: str, default: str | None = None) -> str | None:
        return dict(self.fields).get(key, default)


@dataclass(frozen=True)
class BenchRow:
    channel: str
    kind: str                 # "g2h" | "h2g" | "rtt64"
    size: int | None = None
    bytes: int | None = None
    seconds: float | None = None
    mbps: float | None = None
    count: int | None = None
    usec: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class ConsoleReport:
    started: bool
    kernel: str | None
    done_rc: int | None
    tests: tuple[GuestTest, ...]
    bench: tuple[BenchRow, ...]
    panic: str | None                  # the "Kernel panic" line
    kernel_errors: tuple[str, ...]     # BUG:/Oops/WARNING lines
    vmsocket_pci: int | None
    selftest_done: tuple[int, int] | None


_KV = re.compile(r"(\w[\w.-]*)=(\S*)")
_PANIC = re.compile(r"Kernel panic - not syncing.*|Kernel panic.*")
_KERNEL_ERR = re.compile(r"\b(BUG: .*|Oops: .*|WARNING: .*|general protection fault.*|"
                         r"Unable to handle kernel .*|kernel BUG at .*)")


def _fields(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(_KV.findall(text))


def _num(value: str | None, kind: type = int):
    try:
        return kind(value) if value is not None else None
    except ValueError:
        return None


def parse_console(text: str) -> ConsoleReport:
    """Everything the boot test reads from the serial console."""
    started, kernel, done_rc, panic, pci, st_done = False, None, None, None, None, None
    tests: list[GuestTest] = []
    bench: list[BenchRow] = []
    kerr: list[str] = []
    for raw in text.splitlines():
        line = raw.replace("\r", "").strip()
        # kernel lines may be interleaved: find our markers anywhere
        if m := re.search(r"QEMUPATCH-GUEST-START(.*)", line):
            started = True
            kernel = dict(_fields(m.group(1))).get("kernel")
        elif m := re.search(r"QEMUPATCH-GUEST-DONE rc=(-?\d+)", line):
            done_rc = int(m.group(1))
        elif m := re.search(r"QEMUPATCH-STEP (\S+) (PASS|FAIL|SKIP)(.*)", line):
            tests.append(GuestTest(f"init.{m.group(1)}", m.group(2).lower(),
                                   _fields(m.group(3)), line))
        elif m := re.search(r"QEMUPATCH-PCI vmsocket=(\d+)", line):
            pci = int(m.group(1))
        elif m := re.search(r"VMSOCKET-TEST-DONE pass=(\d+) fail=(\d+)", line):
            st_done = (int(m.group(1)), int(m.group(2)))
        elif m := re.search(r"VMSOCKET-TEST (\S+) (PASS|FAIL)(.*)", line):
            tests.append(GuestTest(m.group(1), m.group(2).lower(), _fields(m.group(3)), line))
        elif m := re.search(r"VMSOCKET-BENCH (\S+) (\S+)(.*)", line):
            f = dict(_fields(m.group(3)))
            err = None
            if " FAIL" in m.group(3) or m.group(2) == "open":
                err = f.get("err", "FAIL")
            bench.append(BenchRow(
                channel=m.group(1), kind=m.group(2), size=_num(f.get("size")),
                bytes=_num(f.get("bytes")), seconds=_num(f.get("seconds"), float),
                mbps=_num(f.get("mbps"), float), count=_num(f.get("count")),
                usec=_num(f.get("usec"), float), error=err))
        if panic is None and (m := _PANIC.search(line)):
            panic = m.group(0)
        if "QEMUPATCH-" not in line and (m := _KERNEL_ERR.search(line)):
            kerr.append(m.group(0))
    return ConsoleReport(started, kernel, done_rc, tuple(tests), tuple(bench), panic,
                         tuple(dict.fromkeys(kerr)), pci, st_done)


# ------------------------------------------------------------------ QEMU


@dataclass(frozen=True)
class QemuExit:
    returncode: int | None        # None: still running when we killed it
    killed_by_us: bool
    how: str                      # "exited", "quit", "killed"

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
        return f"QEMU exited with status {self.returncode}"


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when we die, so even a
    ``kill -9`` of qemupatch leaves no QEMU behind (libc is loaded before
    the fork: the child only makes the one call)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return preexec


class QemuMachine:
    """A QEMU process with a QMP connection; a context manager that always
    ends and reaps QEMU (after QEMU's python/qemu ``machine.py``).

    ``shutdown()``: QMP ``quit``, wait, then SIGKILL the process group, then
    always close QMP, the event loop thread and the log files.
    """

    def __init__(self, argv: Sequence[str], out_dir: Path, qmp_path: Path) -> None:
        self.argv = tuple(str(a) for a in argv)
        self.out_dir = out_dir
        self.qmp_path = qmp_path
        self.proc: subprocess.Popen | None = None
        self.exit: QemuExit | None = None
        self._log = None
        self._transcript = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._qmp = None
        self._t0 = time.monotonic()
        self._events: list[dict] = []
        self._pump: asyncio.Task | None = None

    # -- lifecycle
    def __enter__(self) -> QemuMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def launch(self, timeout: float) -> None:
        """Start QEMU and connect QMP within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        (self.out_dir / "qemu.cmdline").write_text(shlex.join(self.argv) + "\n")
        self._log = open(self.out_dir / "qemu.log", "wb")
        self._transcript = open(self.out_dir / "qmp.jsonl", "w", encoding="utf-8")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent())
        except OSError as exc:
            raise QemuStartError(f"could not run {self.argv[0]}: {exc}") from exc
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="qemupatch-qmp", daemon=True)
        self._thread.start()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise QemuStartError(self._start_failure(
                    f"QEMU exited with status {self.proc.returncode} during start-up"))
            try:
                self._call(self._connect(), max(0.1, min(5, deadline - time.monotonic())))
                return
            except (OSError, QemuStartError, FutureTimeout) as exc:
                last = exc
                time.sleep(0.1)
        raise QemuStartError(self._start_failure(
            f"QMP did not answer on {self.qmp_path} within {timeout:.0f} s ({last})"))

    def _start_failure(self, what: str) -> str:
        return (f"{what}\ncommand: {shlex.join(self.argv)}\n"
                f"QEMU output (tail):\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if self._log and not self._log.closed:
            self._log.flush()
        try:
            text = (self.out_dir / "qemu.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    async def _connect(self) -> None:
        from qemu.qmp import ConnectError, QMPClient

        client = QMPClient("qemupatch")
        try:
            await client.connect(str(self.qmp_path))
        except ConnectError as exc:
            raise QemuStartError(f"QMP connect: {exc}") from exc
        self._qmp = client
        self._note("greeting", {"QMP": "connected"})
        self._pump = asyncio.get_running_loop().create_task(self._pump_events(client))

    async def _close_qmp(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            try:
                await self._pump
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self._qmp is not None:
            await self._qmp.disconnect()

    async def _pump_events(self, client) -> None:
        from qemu.qmp import EventListener

        listener = EventListener()
        with client.listen(listener):
            async for event in listener:
                self._events.append(dict(event))
                self._note("event", dict(event))

    def _note(self, kind: str, msg: object) -> None:
        if self._transcript and not self._transcript.closed:
            self._transcript.write(json.dumps(
                {"t": round(time.monotonic() - self._t0, 3), "kind": kind, "msg": msg},
                default=str) + "\n")
            self._transcript.flush()

    def _call(self, coro, timeout: float):
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise

    def qmp(self, cmd: str, args: Mapping[str, object] | None = None,
            timeout: float = 10) -> object:
        """Run one QMP command; every command and answer goes to qmp.jsonl."""
        from qemu.qmp import ExecuteError

        if self._qmp is None:
            raise QemuStartError(f"QMP '{cmd}': not connected")
        self._note("command", {"execute": cmd, "arguments": dict(args or {})})
        try:
            ret = self._call(self._qmp.execute(cmd, dict(args) if args else None), timeout)
        except ExecuteError as exc:
            self._note("error", str(exc))
            raise
        except FutureTimeout:
            self._note("error", f"no answer within {timeout} s")
            raise
        self._note("return", ret)
        return ret

    @property
    def events(self) -> list[dict]:
        return list(self._events)

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def wait(self, timeout: float) -> int | None:
        if not self.proc:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def shutdown(self, timeout: float = 10) -> QemuExit | None:
        """QMP quit, then kill; always reap and close everything."""
        try:
            if self.proc and self.exit is None:
                rc = self.proc.poll()
                how, ours = "exited", False
                if rc is None:
                    ours, how = True, "quit"
                    try:
                        if self._qmp is not None:
                            self.qmp("quit", timeout=min(5, timeout))
                    except Exception as exc:  # noqa: BLE001 - QEMU may be wedged: kill below
                        self._note("error", f"quit failed: {exc}")
                    rc = self.wait(timeout)
                    if rc is None:
                        how = "killed"
                        try:
                            os.killpg(self.proc.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                        rc = self.proc.wait(30)
                self.exit = QemuExit(rc, ours, how)
        finally:
            self._post_shutdown()
        return self.exit

    def _post_shutdown(self) -> None:
        if self.proc and self.proc.poll() is None:       # never leave one behind
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        if self._loop is not None:
            try:
                self._call(self._close_qmp(), 5)
            except Exception:  # noqa: BLE001 - best effort on a dead peer
                pass
            self._qmp = None
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread:
                self._thread.join(10)
            if not self._loop.is_running():
                self._loop.close()
            self._loop = None
        for f in (self._log, self._transcript):
            if f and not f.closed:
                f.close()


# ---------------------------------------------------------------- KVM probe


def probe_accel(qemu: Path, kernel: Path, *, timeout: float = 15) -> str:
    """``"kvm"`` if a guest really runs under KVM within ``timeout``, else ``"tcg"``.

    The presence of /dev/kvm proves nothing (seen: KVM_CREATE_VM works, then
    the guest hangs).  The probe boots ``kernel`` with no root file system and
    expects its first console line and its "no root" panic in time.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    argv = [qemu, "-accel", "kvm", "-m", "256", "-nographic", "-no-reboot", "-nic", "none",
            "-L", "/usr/share/qemu", "-L", "/usr/share/seabios", "-monitor", "none",
            "-serial", "stdio", "-kernel", kernel,
            "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"]
    try:
        done = run(argv, timeout=timeout, check=False)
    except CommandTimeout:
        return "tcg"
    ok = done.returncode == 0 and "Linux version" in done.output
    return "kvm" if ok else "tcg"


# --------------------------------------------------------------- results


@dataclass(frozen=True)
class Stage:
    name: str
    status: str           # "pass" | "fail" | "skip"
    seconds: float
    detail: str = ""


@dataclass(frozen=True)
class Check:
    """A host-side cross-check (QMP, servers) reported like a test."""

    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class BootResult:
    ok: bool
    failure: str | None               # error class name, None when ok
    message: str
    exit_code: int
    accel: str
    qemu: str
    spelling: str
    image: GuestImage
    stages: tuple[Stage, ...]
    tests: tuple[GuestTest, ...]
    checks: tuple[Check, ...]
    bench: tuple[BenchRow, ...]
    guest_rc: int | None
    qemu_exit: str
    out_dir: Path
    servers: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA, "status": "done",
            "ok": self.ok, "failure": self.failure, "message": self.message,
            "exit_code": self.exit_code, "accel": self.accel, "qemu": self.qemu,
            "spelling": self.spelling, "image": self.image.to_json(),
            "stages": [asdict(s) for s in self.stages],
            "tests": [{"name": t.name, "status": t.status, "fields": dict(t.fields),
                       "line": t.line} for t in self.tests],
            "checks": [asdict(c) for c in self.checks],
            "bench": [asdict(b) for b in self.bench],
            "bench_table": bench_table(self.bench),
            "guest_rc": self.guest_rc, "qemu_exit": self.qemu_exit,
            "servers": self.servers, "seconds": round(self.seconds, 3),
        }


def bench_table(rows: Sequence[BenchRow]) -> list[dict]:
    """vmsocket against virtio-serial, row by row (ratio > 1: vmsocket wins).

    Throughput rows compare MB/s; rtt64 compares microseconds, so there the
    ratio is virtio-serial / vmsocket (still > 1 when vmsocket is faster).
    """
    def key(r: BenchRow) -> tuple:
        return (r.kind, r.size)

    vs = {key(r): r for r in rows if r.channel == "vmsocket" and not r.error}
    vio = {key(r): r for r in rows if r.channel == "virtio-serial" and not r.error}
    table = []
    for k in sorted(set(vs) | set(vio), key=lambda k: (k[0], k[1] or 0)):
        a, b = vs.get(k), vio.get(k)
        if k[0] == "rtt64":
            va, vb = (a.usec if a else None), (b.usec if b else None)
            ratio = vb / va if va and vb else None
            unit = "usec"
        else:
            va, vb = (a.mbps if a else None), (b.mbps if b else None)
            ratio = va / vb if va and vb else None
            unit = "MB/s"
        table.append({"test": k[0], "size": k[1], "unit": unit, "vmsocket": va,
                      "virtio_serial": vb, "ratio": round(ratio, 3) if ratio else None})
    return table


def format_bench_table(rows: Sequence[BenchRow]) -> str:
    lines = [f"{'test':<6} {'size':>8} {'unit':>5} {'vmsocket':>10} {'virtio-serial':>14} "
             f"{'vmsocket/virtio-serial':>23}"]
    for r in bench_table(rows):
        def f(v):
            return "-" if v is None else f"{v:.1f}"
        size = "-" if r["size"] is None else str(r["size"])
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"{r['test']:<6} {size:>8} {r['unit']:>5} {f(r['vmsocket']):>10} "
                     f"{f(r['virtio_serial']):>14} {ratio:>23}")
    return "\n".join(lines)


def write_junit(result: BootResult, path: Path) -> None:
    suite = ET.Element("testsuite", name="qemupatch.boot-test")
    cases: list[tuple[str, str, str, str]] = []   # classname, name, status, detail
    cases += [("stage", s.name, s.status, s.detail) for s in result.stages]
    cases += [("guest", t.name, t.status, t.line) for t in result.tests]
    cases += [("host", c.name, c.status, c.detail) for c in result.checks]
    cases += [("bench", f"{b.channel}.{b.kind}.{b.size or ''}".rstrip("."),
               "fail" if b.error else "pass", b.error or "") for b in result.bench]
    failures = skips = 0
    for classname, name, status, detail in cases:
        tc = ET.SubElement(suite, "testcase", classname=f"boot-test.{classname}", name=name)
        if status == "fail":
            failures += 1
            ET.SubElement(tc, "failure", message=detail[:200]).text = detail
        elif status == "skip":
            skips += 1
            ET.SubElement(tc, "skipped", message=detail[:200])
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(failures))
    suite.set("skipped", str(skips))
    suite.set("time", f"{result.seconds:.3f}")
    if not result.ok:
        ET.SubElement(suite, "system-err").text = result.message
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


# ------------------------------------------------------------------ argv


def _opt(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return str(value).replace(",", ",,")


def qemu_argv(qemu: Path, image: GuestImage, *, accel: str, console: Path, qmp: Path,
              paths: Mapping[str, Path], vmsocket: bool, spelling: str,
              append: str, extra: Sequence[str] = ()) -> list[str]:
    argv = [str(qemu), "-S", "-accel", accel, "-m", "512", "-nographic", "-no-reboot",
            "-nic", "none", "-L", "/usr/share/qemu", "-L", "/usr/share/seabios",
            "-monitor", "none", "-parallel", "none",
            "-chardev", f"file,id=console0,path={_opt(console)}", "-serial", "chardev:console0",
            "-chardev", f"socket,id=qmp0,path={_opt(qmp)},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
            "-append", append]
    if vmsocket:
        for i, (name, slot) in enumerate(zip(VMSOCKET_SERVERS, VMSOCKET_SLOTS, strict=True)):
            if spelling == "option":
                argv += ["-vmsocket", f"unix:{paths[name]}"]
            elif spelling == "device":
                argv += ["-device",
                         f"vmsocket,id=vmsocket{i},path={_opt(paths[name])},addr={slot:#x}"]
            else:
                raise ValueError(f"unknown vmsocket spelling {spelling!r}: option or device")
    argv += ["-device", "virtio-serial-pci,id=vser0"]
    for kind, port in VPORT_NAMES.items():
        argv += ["-chardev", f"socket,id=vs{kind},path={_opt(paths['vs-' + kind])}",
                 "-device", f"virtserialport,bus=vser0.0,chardev=vs{kind},name={port}"]
    return argv + list(extra)


# --------------------------------------------------------------- the run


class _Stop(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind       # panic | exit | deadline | watchdog


class _Console:
    """Follows console.log as QEMU writes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = bytearray()
        self.last_output = time.monotonic()
        self._pos = 0

    def poll(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                new = f.read()
        except FileNotFoundError:
            return []
        if not new:
            return []
        self._pos += len(new)
        self.last_output = time.monotonic()
        start = self.data.rfind(b"\n") + 1
        self.data += new
        end = self.data.rfind(b"\n") + 1
        return self.data[start:end].decode("utf-8", "replace").splitlines() if end > start else []

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.text.rstrip().splitlines()[-lines:])


def _default_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _wait(machine: QemuMachine, console: _Console, until: Callable[[str], bool],
          timeout: float, idle: float, stage: str, on_line: Callable[[str], None]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for line in console.poll():
            on_line(line)
            if _PANIC.search(line):
                raise _Stop("panic", f"kernel panic during {stage}: {line.strip()}")
            if until(line):
                return
        rc = machine.poll()
        if rc is not None:
            console.poll()
            raise _Stop("exit", f"QEMU ended during {stage} "
                        f"({QemuExit(rc, False, 'exited').describe()})")
        now = time.monotonic()
        if now > deadline:
            raise _Stop("deadline", f"stage {stage} ran past its {timeout:.0f} s deadline")
        if now - console.last_output > idle:
            raise _Stop("watchdog", f"no console output for {idle:.0f} s during {stage}")
        time.sleep(0.05)


def run_boot_test(qemu: Path, image: GuestImage, out_dir: Path, *, bench: bool = False,
                  accel: str = "auto", vmsocket: bool = True, spelling: str = "option",
                  tests: bool = True, deadlines: Deadlines = Deadlines(),
                  progress: Progress | None = _default_progress,
                  extra_args: Sequence[str] = ()) -> BootResult:
    """Boot ``image`` in ``qemu`` and run the vmsocket tests (and the benchmark).

    ``accel``: "auto" (KVM probe, else TCG), "kvm" or "tcg".  ``vmsocket``:
    False boots without vmsocket devices (stock QEMU).  ``spelling``:
    "option" (``-vmsocket unix:PATH``) or "device" (``-device vmsocket,path=,addr=``).
    Returns the result when everything passed; otherwise writes the same
    files and raises the stage's ``BootTestError`` with ``.result`` set.
    """
    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)

    def note(msg: str) -> None:
        say(f"[{time.monotonic() - t0:7.1f}s] {msg}")

    for name in ("console.log", "qemu.log", "qmp.jsonl"):
        (out_dir / name).unlink(missing_ok=True)
    if accel == "auto":
        note("kvm-probe: start")
        accel = probe_accel(qemu, image.kernel, timeout=deadlines.kvm_probe)
        note(f"kvm-probe: using {accel}")
    specs = {name: ("refused" if name == "refused" else name) for name in VMSOCKET_SERVERS}
    specs.update({f"vs-{k}": k for k in VPORT_NAMES})
    append = (f"console=ttyS0 panic=-1 loglevel=4 qemupatch.tests={int(tests)} "
              f"qemupatch.bench={int(bench)} qemupatch.timeout={int(deadlines.test_program)}")
    console_path = out_dir / "console.log"
    stages: list[Stage] = []
    checks: list[Check] = []
    stop: _Stop | None = None
    start_error: QemuStartError | None = None
    pci_count: int | None = None
    server_json: dict = {}

    def on_line(line: str) -> None:
        if re.search(r"QEMUPATCH-STEP|VMSOCKET-TEST|VMSOCKET-BENCH", line):
            note(f"guest: {line.strip()}")

    # fnv_limit=0: the sink serves only the benchmark, which must not pay
    # per-byte Python work; vmsocket-test treats fnv 0 as "not computed".
    with ServerSet(specs, fnv_limit=0) as servers:
        qmp_path = servers.dir / "qmp.sock"   # type: ignore[operator]
        argv = qemu_argv(qemu, image, accel=accel, console=console_path, qmp=qmp_path,
                         paths=servers.paths, vmsocket=vmsocket, spelling=spelling,
                         append=append, extra=extra_args)
        console = _Console(console_path)
        # What this run uses, written before QEMU starts so that it survives a kill.
        (out_dir / "boot-test.json").write_text(json.dumps(
            {"schema": SCHEMA, "ok": None, "status": "running", "accel": accel,
             "qemu": str(qemu), "argv": argv, "image": image.to_json(),
             "deadlines": asdict(deadlines)}, indent=2) + "\n")
        with QemuMachine(argv, out_dir, qmp_path) as machine:
            stage, t_stage = "qemu-start", time.monotonic()
            note(f"{stage}: {qemu} ({accel})")
            try:
                machine.launch(deadlines.qemu_start)
                pci = machine.qmp("query-pci")
                found = _vmsocket_functions(pci)
                pci_count = len(found)
                (out_dir / "query-pci.json").write_text(json.dumps(pci, indent=1))
                if vmsocket:
                    problem = _check_pci(found, spelling)
                    checks.append(Check("qmp.query-pci", "fail" if problem else "pass",
                                        problem or f"vmsocket functions at slots "
                                        f"{[f['slot'] for f in found]}"))
                    if problem:
                        raise QemuStartError(f"query-pci: {problem}")
                machine.qmp("cont")
                stages.append(Stage(stage, "pass", time.monotonic() - t_stage))
                note(f"{stage}: done")
                plan = [("kernel-boot", lambda ln: "QEMUPATCH-GUEST-START" in ln,
                         deadlines.kernel_boot),
                        ("guest-tests", lambda ln: "QEMUPATCH-GUEST-DONE" in ln,
                         deadlines.bench if bench else deadlines.tests)]
                for stage, until, limit in plan:
                    t_stage = time.monotonic()
                    note(f"{stage}: waiting (deadline {limit:.0f} s)")
                    _wait(machine, console, until, limit, deadlines.idle, stage, on_line)
                    stages.append(Stage(stage, "pass", time.monotonic() - t_stage))
                    note(f"{stage}: done")
                stage, t_stage = "shutdown", time.monotonic()
                rc = machine.wait(deadlines.shutdown)
                if rc is None:
                    raise _Stop("deadline", f"guest did not power off within "
                                f"{deadlines.shutdown:.0f} s after the done marker")
                stages.append(Stage(stage, "pass", time.monotonic() - t_stage))
                note(f"{stage}: done")
            except QemuStartError as exc:
                start_error = exc
                stages.append(Stage(stage, "fail", time.monotonic() - t_stage, str(exc)))
            except _Stop as exc:
                stop = exc
                stages.append(Stage(stage, "fail", time.monotonic() - t_stage, str(exc)))
            except (OSError, FutureTimeout) as exc:
                start_error = QemuStartError(f"{stage}: QMP failed: {exc!r}")
                stages.append(Stage(stage, "fail", time.monotonic() - t_stage, str(exc)))
        qexit = machine.exit or QemuExit(None, False, "never started")
        console.poll()
        note(f"qemu: {qexit.describe()}")
        report = parse_console(console.text)
        if report.done_rc is not None:
            checks.extend(_cross_check(report, servers, pci_count, tests))
            if bench:
                for channel in (("vmsocket",) if vmsocket else ()) + ("virtio-serial",):
                    rows = [b for b in report.bench if b.channel == channel and not b.error]
                    checks.append(Check(f"bench-{channel}-ran", "pass" if rows else "fail",
                                        f"{len(rows)} {channel} benchmark rows"))
        server_json = {n: s.to_json() for n, s in servers.all_stats().items()}
        qemu_tail = machine.log_tail()

    done_names = {s.name for s in stages}
    for name in ("qemu-start", "kernel-boot", "guest-tests", "shutdown"):
        if name not in done_names:
            stages.append(Stage(name, "skip", 0.0, "an earlier stage failed"))

    error = _classify(start_error, stop, qexit, report, checks, console.tail(), qemu_tail)
    result = BootResult(
        ok=error is None, failure=type(error).__name__ if error else None,
        message=str(error) if error else "boot test passed",
        exit_code=error.exit_code if error else 0, accel=accel, qemu=str(qemu),
        spelling=spelling if vmsocket else "none", image=image, stages=tuple(stages),
        tests=report.tests, checks=tuple(checks), bench=report.bench,
        guest_rc=report.done_rc, qemu_exit=qexit.describe(), out_dir=out_dir,
        servers=server_json, seconds=time.monotonic() - t0)
    (out_dir / "boot-test.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    write_junit(result, out_dir / "boot-test.junit.xml")
    if report.bench:
        table = format_bench_table(report.bench)
        (out_dir / "bench.txt").write_text(
            f"accel={accel} kernel={image.kernel_version} qemu={qemu}\n{table}\n")
        say(table)
    note(f"boot-test: {'PASS' if result.ok else 'FAIL'}: {result.message.splitlines()[0]}")
    if error is not None:
        error.result = result   # type: ignore[attr-defined]
        raise error
    return result


def _vmsocket_functions(pci: object) -> list[dict]:
    found = []
    for bus in pci or []:  # type: ignore[union-attr]
        for dev in bus.get("devices", []):
            ids = dev.get("id", {})
            if ids.get("vendor") == VMSOCKET_VENDOR and ids.get("device") == VMSOCKET_DEVICE:
                found.append({"bus": dev.get("bus"), "slot": dev.get("slot"),
                              "function": dev.get("function"), "qdev_id": dev.get("qdev_id")})
    return sorted(found, key=lambda f: (f["bus"], f["slot"], f["function"]))


def _check_pci(found: list[dict], spelling: str) -> str | None:
    if len(found) != len(VMSOCKET_SERVERS):
        return (f"expected {len(VMSOCKET_SERVERS)} vmsocket functions "
                f"({VMSOCKET_VENDOR:04x}:{VMSOCKET_DEVICE:04x}), QEMU has {len(found)}")
    if spelling == "device":
        got = [(f["slot"], f["qdev_id"]) for f in found]
        want = [(s, f"vmsocket{i}") for i, s in enumerate(VMSOCKET_SLOTS)]
        if got != want:
            return f"vmsocket slots/ids {got}, expected {want}"
    return None


def _cross_check(report: ConsoleReport, servers: ServerSet, pci_count: int | None,
                 tests: bool) -> list[Check]:
    """What the guest says against what QMP and the host servers saw."""
    out: list[Check] = []
    if report.vmsocket_pci is not None:
        ok = report.vmsocket_pci == pci_count
        out.append(Check("guest-pci-matches-qmp", "pass" if ok else "fail",
                         f"guest sees {report.vmsocket_pci} vmsocket functions, "
                         f"QMP lists {pci_count}"))
    by = {t.name: t for t in report.tests}
    echo = servers.stats("echo")
    large, short, small = by.get("large"), by.get("short"), by.get("many-small")
    if large and large.status == "pass":
        want = int(large.get("fnv", "0"), 16)
        small_bytes = _num(small.get("bytes")) if small else None
        prefix = SHORT_BYTES if short and short.status == "pass" else 0
        seen = []
        for conn in echo.connections:
            if conn.bytes_in < prefix + LARGE_BYTES:
                continue
            got = servers.input_fnv("echo", conn.index, prefix, LARGE_BYTES)
            seen.append(f"conn{conn.index}: {conn.bytes_in} bytes in, "
                        f"fnv {got:016x}" if got is not None else f"conn{conn.index}: not kept")
            if got == want and (small_bytes is None or
                                conn.bytes_in == prefix + LARGE_BYTES + small_bytes):
                out.append(Check("host-echo-large", "pass",
                                 f"echo server conn{conn.index} got the 3 MiB, fnv {want:016x}"))
                break
        else:
            out.append(Check("host-echo-large", "fail",
                             f"no echo connection carried the guest's 3 MiB with fnv "
                             f"{want:016x}: {'; '.join(seen) or 'no large connection'}"))
    if tests and by.get("reconnect", None) and by["reconnect"].status == "pass":
        ok = len(echo.connections) >= 3
        out.append(Check("host-echo-connections", "pass" if ok else "fail",
                         f"echo server saw {len(echo.connections)} connections "
                         "(shell echo, selftest, reconnect, signal...)"))
    refused = by.get("connect-refused")
    if refused is not None:
        # The host end is a socket bound but not listening: exactly ECONNREFUSED.
        got = refused.get("errno")
        out.append(Check("host-refused-errno", "pass" if got == "ECONNREFUSED" else "fail",
                         f"guest got errno {got} connecting to a bound, non-listening "
                         "socket; expected ECONNREFUSED"))
    vs_echo = servers.stats("vs-echo")
    step = by.get("init.virtio-serial-echo")
    if step and step.status == "pass":
        want = _num(step.get("bytes")) or 0
        ok = vs_echo.bytes_in >= want
        out.append(Check("host-virtio-serial-echo", "pass" if ok else "fail",
                         f"virtio-serial echo server got {vs_echo.bytes_in} bytes, "
                         f"guest sent {want}"))
    for channel, sink, source in (("vmsocket", "sink", "source"),
                                  ("virtio-serial", "vs-sink", "vs-source")):
        g2h = sum(b.bytes or 0 for b in report.bench if b.channel == channel and b.kind == "g2h")
        h2g = sum(b.bytes or 0 for b in report.bench if b.channel == channel and b.kind == "h2g")
        if g2h:
            got = servers.stats(sink).bytes_in
            out.append(Check(f"host-{channel}-sink", "pass" if got >= g2h else "fail",
                             f"sink took {got} bytes, guest reports {g2h}"))
        if h2g:
            sent = servers.stats(source).bytes_out
            out.append(Check(f"host-{channel}-source", "pass" if sent >= h2g else "fail",
                             f"source sent {sent} bytes, guest reports {h2g}"))
    return out


def _classify(start_error: QemuStartError | None, stop: _Stop | None, qexit: QemuExit,
              report: ConsoleReport, checks: Sequence[Check], console_tail: str,
              qemu_tail: str) -> BootTestError | None:
    """The one error that describes the run, or None if it passed."""
    ctx = (f"\nQEMU: {qexit.describe()}\nconsole (tail):\n{console_tail}"
           f"\nQEMU output (tail):\n{qemu_tail}")
    if start_error is not None:
        return start_error
    if report.panic:
        return GuestCrash(f"guest kernel panic: {report.panic}{ctx}")
    if stop is not None and stop.kind == "panic":
        return GuestCrash(f"{stop}{ctx}")
    if qexit.signal and not qexit.killed_by_us:
        return GuestCrash(f"QEMU crashed: {qexit.describe()}{ctx}")
    if qexit.returncode not in (0, None) and not qexit.killed_by_us:
        return GuestCrash(f"QEMU failed: {qexit.describe()}{ctx}")
    if stop is not None and stop.kind == "exit":
        return GuestCrash(f"{stop} before the guest printed its done marker{ctx}")
    if stop is not None:
        return BootDeadline(f"{stop}{ctx}")
    if report.done_rc is None:
        return GuestCrash(f"the guest never printed QEMUPATCH-GUEST-DONE{ctx}")
    problems = [f"{t.name}: {t.line}" for t in report.tests if t.status == "fail"]
    problems += [f"{c.name}: {c.detail}" for c in checks if c.status == "fail"]
    problems += [f"bench {b.channel} {b.kind} size={b.size}: {b.error}"
                 for b in report.bench if b.error]
    problems += [f"guest kernel: {e}" for e in report.kernel_errors]
    if report.selftest_done and report.selftest_done[1]:
        problems.append(f"vmsocket-test selftest: {report.selftest_done[1]} failed")
    if report.done_rc != 0 and not problems:
        problems.append(f"/init finished with rc={report.done_rc}")
    if problems:
        return GuestTestFailed("guest tests failed:\n  " + "\n  ".join(problems) +
                               "\nconsole: see console.log")
    return None


__all__ = ["BenchRow", "BootResult", "Check", "ConsoleReport", "Deadlines", "GuestTest",
           "QemuExit", "QemuMachine", "Stage", "bench_table", "format_bench_table",
           "parse_console", "probe_accel", "qemu_argv", "run_boot_test", "write_junit"]
