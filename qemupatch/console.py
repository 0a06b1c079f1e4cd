"""The guest's serial-console protocol: markers, parser and follower.

The guest prints one line per event; the marker strings below are the whole
protocol and are defined only here.  ``guest.py`` builds ``/init`` from them
and ``guest/vmsocket-test.c`` prints the ``VMSOCKET-*`` ones (a test checks
both against this file)::

    QEMUPATCH-GUEST-START kernel=<uname -r> vmsocket_module=0|1 test_program=0|1
    QEMUPATCH-STEP <name> PASS|FAIL|SKIP [key=value ...]
    QEMUPATCH-VPORTS echo=<dev> sink=<dev> source=<dev>
    QEMUPATCH-PCI vmsocket=<n>
    VMSOCKET-TEST <name> PASS|FAIL [key=value ...]          (vmsocket-test)
    VMSOCKET-TEST-DONE pass=<n> fail=<m>                   (vmsocket-test)
    VMSOCKET-BENCH <channel> <kind> [key=value ...]         (vmsocket-test)
    QEMUPATCH-DMESG <kernel warning line>
    QEMUPATCH-GUEST-DONE rc=<n>

:func:`parse_console` reads a whole console into a :class:`ConsoleReport`;
:class:`ConsoleFollower` follows ``console.log`` while QEMU writes it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

INIT_PREFIX = "QEMUPATCH-"
GUEST_START = INIT_PREFIX + "GUEST-START"
STEP = INIT_PREFIX + "STEP"
VPORTS = INIT_PREFIX + "VPORTS"
PCI = INIT_PREFIX + "PCI"
DMESG = INIT_PREFIX + "DMESG"
GUEST_DONE = INIT_PREFIX + "GUEST-DONE"
TEST = "VMSOCKET-TEST"
TEST_DONE = "VMSOCKET-TEST-DONE"
BENCH = "VMSOCKET-BENCH"

# What /init prints (guest.py) and what vmsocket-test prints (guest/*.c).
INIT_MARKERS = {"GUEST_START": GUEST_START, "STEP": STEP, "VPORTS": VPORTS, "PCI": PCI,
                "DMESG": DMESG, "GUEST_DONE": GUEST_DONE}
PROGRAM_MARKERS = (TEST, TEST_DONE, BENCH)
# Lines worth echoing as progress while the guest runs.
PROGRESS = re.compile(f"{STEP}|{TEST}|{BENCH}")


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
    rep: int | None = None    # which repetition (0-based); None: one-shot


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
# Kernel lines may interleave with ours: markers are searched anywhere in a line.
_START = re.compile(f"{GUEST_START}(.*)")
_DONE = re.compile(rf"{GUEST_DONE} rc=(-?\d+)")
_STEP = re.compile(rf"{STEP} (\S+) (PASS|FAIL|SKIP)(.*)")
_PCI = re.compile(rf"{PCI} vmsocket=(\d+)")
_TEST_DONE = re.compile(rf"{TEST_DONE} pass=(\d+) fail=(\d+)")
_TEST = re.compile(rf"{TEST} (\S+) (PASS|FAIL)(.*)")
_BENCH = re.compile(rf"{BENCH} (\S+) (\S+)(.*)")


def panic_line(line: str) -> str | None:
    """The "Kernel panic" part of ``line``, if it has one."""
    m = _PANIC.search(line)
    return m.group(0) if m else None


def _fields(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(_KV.findall(text))


def number(value: str | None, kind: type = int):
    """``value`` as ``kind``, or None when it is missing or garbled."""
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
        if m := _START.search(line):
            started = True
            kernel = dict(_fields(m.group(1))).get("kernel")
        elif m := _DONE.search(line):
            done_rc = int(m.group(1))
        elif m := _STEP.search(line):
            tests.append(GuestTest(f"init.{m.group(1)}", m.group(2).lower(),
                                   _fields(m.group(3)), line))
        elif m := _PCI.search(line):
            pci = int(m.group(1))
        elif m := _TEST_DONE.search(line):
            st_done = (int(m.group(1)), int(m.group(2)))
        elif m := _TEST.search(line):
            tests.append(GuestTest(m.group(1), m.group(2).lower(), _fields(m.group(3)), line))
        elif m := _BENCH.search(line):
            f = dict(_fields(m.group(3)))
            err = None
            if " FAIL" in m.group(3) or m.group(2) == "open":
                err = f.get("err", "FAIL")
            bench.append(BenchRow(
                channel=m.group(1), kind=m.group(2), size=number(f.get("size")),
                bytes=number(f.get("bytes")), seconds=number(f.get("seconds"), float),
                mbps=number(f.get("mbps"), float), count=number(f.get("count")),
                usec=number(f.get("usec"), float), error=err,
                rep=number(f.get("rep"))))
        if panic is None:
            panic = panic_line(line)
        # DMESG lines repeat kernel warnings already seen on the console.
        if INIT_PREFIX not in line and (m := _KERNEL_ERR.search(line)):
            kerr.append(m.group(0))
    return ConsoleReport(started, kernel, done_rc, tuple(tests), tuple(bench), panic,
                         tuple(dict.fromkeys(kerr)), pci, st_done)


class ConsoleFollower:
    """Follows console.log as QEMU writes it: new whole lines on each
    ``poll()``, and when the guest last printed anything (the watchdog)."""

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
