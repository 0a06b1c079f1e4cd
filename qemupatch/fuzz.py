"""Seeded fuzzing of the vmsocket device, as an untrusted guest would attack it.

No guest kernel: QEMU runs with the ``qtest`` accelerator and this module
plays the guest through the qtest protocol (``writel ADDR VAL``, ``outl``,
``read ADDR SIZE`` ...), as QEMU's own qtests and ``tests/qtest/fuzz`` do.
It finds the device by PCI config cycles, maps its BARs, and then runs a
seeded stream of hostile operations:

* register writes and reads of every width (1, 2, 4 and 8 bytes), at every
  offset of BAR0 including misaligned ones, with boundary values;
* buffer reads and writes in BAR1/BAR2, across their ends;
* stream mode (ABI version 2): MODE and DOORBELL writes, garbage indices
  and flags anywhere in the BAR3 control page, and well-formed ring
  traffic (bytes in the output ring, TX_PROD bumped, DOORBELL.TX; input
  ring bytes taken, RX_CONS bumped, DOORBELL.RX; WANT_* toggled) so that
  the hostile values meet a device that is really streaming;
* PCI config writes (command register, BARs, the MSI capability), MSI
  enabled with its address aimed at the device's own BAR0;
* ``system_reset`` and hot-unplug (``device_del`` + the ACPI eject) followed
  by ``device_add``;

while the host server behind the socket misbehaves per connection: hangs
up, stalls, floods, resets, echoes.  QEMU is expected to be built with
ASan and UBSan (:func:`sanitizer_options`); any sanitizer report, crash or
hang (a qtest command unanswered within ``hang_seconds``) is a finding,
printed with the seed that reproduces it.  The operation stream depends on
the seed alone; ``ops.log`` lists what ran.
"""

from __future__ import annotations

import os
import random
import re
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from qemu.qmp import QMPError

from qemupatch import workflow
from qemupatch.build import BuildResult, QemuBuildOptions, build_qemu
from qemupatch.config import Config
from qemupatch.errors import Failed, QemuStartError
from qemupatch.machine import QemuMachine
from qemupatch.records import write_json
from qemupatch.progress import Progress
from qemupatch.runner import Runner
from qemupatch.series import read_series

# Sanitized QEMU: ASan and UBSan, the rest as the normal build.
SANITIZER_ARGS = ("--enable-asan", "--enable-ubsan")
LEGACY_SANITIZER_ARGS = ("--enable-sanitizers",)
SANITIZER_ENV = {
    # Coroutines make LeakSanitizer noisy; a UBSan finding stops QEMU.
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
REPORT_PATTERNS = re.compile(
    r"ERROR: AddressSanitizer|runtime error:|SUMMARY: \w+Sanitizer|"
    r"Assertion .* failed|qemu: hardware error|Segmentation fault")
QTEST_TARGET = "tests/qtest/vmsocket-test"
ROM_ARGS = ("-L", "/usr/share/seabios", "-L", "/usr/share/qemu")

# The device (docs/vmsocket-abi.md).
VENDOR_DEVICE = 0x10F01AF4
SLOT = 4
REGS = (0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70)
BAR0, BAR1, BAR2, BAR3 = 0xE2000000, 0xE0000000, 0xE1000000, 0xE2010000
BUFSIZE = 4096
RING_SIZE = 4096
REG_MODE, REG_DOORBELL = 0x18, 0x70
# BAR3, the control page: the guest's fields, then the device's.
TX_PROD, RX_CONS, GUEST_FLAGS = 0x00, 0x04, 0x08
TX_CONS, RX_PROD, DEV_FLAGS, DEV_ERROR = 0x40, 0x44, 0x48, 0x4C
RING_FIELDS = (TX_PROD, RX_CONS, GUEST_FLAGS, TX_CONS, RX_PROD, DEV_FLAGS, DEV_ERROR)
TX_KICK, RX_KICK = 1, 2
MSI_CAP_ID = 0x05
ACPI_EJECT_PORT = 0xAE08   # piix4 PCI hotplug: write (1 << slot) to eject
VALUES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, BUFSIZE - 1, BUFSIZE, BUFSIZE + 1,
          0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
SERVER_MODES = ("echo", "hangup", "stall", "flood", "reset", "slow")


class FuzzHang(Failed):
    """QEMU stopped answering: a hang is a finding like a crash."""


@dataclass(frozen=True)
class FuzzResult:
    seed: int
    operations: int
    seconds: float
    findings: tuple[str, ...]
    op_counts: dict = field(default_factory=dict)
    server_modes: dict = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def ops_per_second(self) -> float:
        return self.operations / self.seconds if self.seconds else 0.0

    def reproduce(self, qemu: Path) -> str:
        return f"qemupatch fuzz --qemu {qemu} --seed {self.seed} --ops {self.operations}"


def sanitizer_args(source: Path) -> tuple[str, ...]:
    """configure's spelling of ASan+UBSan in the QEMU at ``source``: QEMU 8.1
    split 7.2's ``--enable-sanitizers`` into ``--enable-asan --enable-ubsan``."""
    options = (source / "meson_options.txt").read_text()
    return SANITIZER_ARGS if "option('asan'" in options else LEGACY_SANITIZER_ARGS


def sanitizer_options(base: QemuBuildOptions, source: Path,
                      build_dir: Path | None = None) -> QemuBuildOptions:
    """``base`` plus ASan and UBSan, in a build folder of its own."""
    return replace(base, configure_args=(*base.configure_args, *sanitizer_args(source)),
                   build_dir=build_dir)


# -- the host side: a server that misbehaves on purpose ----------------------------


class HostileServer:
    """A UNIX socket server whose every connection gets a mode drawn from
    the seed: echo, hang up at once, stall (never read), flood, reset (RST
    on close), slow (one byte at a time)."""

    def __init__(self, path: Path, seed: int):
        self.path = path
        self.rng = random.Random(seed ^ 0x5EED)
        self.modes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, name="fuzz-server", daemon=True)

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        for c in self._conns:
            c.close()
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            mode = self.rng.choice(SERVER_MODES)
            self.modes[mode] += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, mode), daemon=True).start()

    def _serve(self, conn: socket.socket, mode: str) -> None:
        conn.settimeout(0.2)
        try:
            if mode == "hangup":
                conn.close()
            elif mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                conn.close()
            elif mode == "stall":
                self._stop.wait()
            elif mode == "flood":
                chunk = os.urandom(65536)
                while not self._stop.is_set():
                    try:
                        conn.send(chunk)
                    except TimeoutError:
                        continue
            else:
                self._relay(conn, slow=mode == "slow")
        except OSError:
            pass   # the device closed, reset or was unplugged: that is the point

    def _relay(self, conn: socket.socket, *, slow: bool) -> None:
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            for i in range(0, len(data), 1 if slow else len(data)):
                conn.sendall(data[i:i + (1 if slow else len(data))])


# -- the guest side: the qtest protocol --------------------------------------------


class Qtest:
    """QEMU's qtest protocol on a socket QEMU connects to; every command
    must be answered within ``hang_seconds``."""

    def __init__(self, listener: socket.socket, hang_seconds: float):
        listener.settimeout(hang_seconds)
        self.sock, _ = listener.accept()
        self.sock.settimeout(hang_seconds)
        self.hang_seconds = hang_seconds
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def cmd(self, line: str) -> str:
        try:
            self.sock.sendall(line.encode() + b"\n")
            while True:
                if b"\n" in self._buf:
                    answer, self._buf = self._buf.split(b"\n", 1)
                    text = answer.decode(errors="replace")
                    if text.startswith("IRQ"):
                        continue     # only with irq_intercept; not used
                    return text
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError("QEMU closed the qtest connection")
                self._buf += chunk
        except TimeoutError:
            raise FuzzHang(f"no answer to qtest '{line}' within {self.hang_seconds} s") from None

    def read(self, width: int, addr: int) -> int:
        answer = self.cmd(f"read{'bwlq'[width.bit_length() - 1]} {addr:#x}")
        return int(answer.split()[1], 16) if answer.startswith("OK ") else -1

    def write(self, width: int, addr: int, value: int) -> None:
        self.cmd(f"write{'bwlq'[width.bit_length() - 1]} {addr:#x} {value:#x}")

    def out(self, width: int, port: int, value: int) -> None:
        self.cmd(f"out{'bwl'[width.bit_length() - 1]} {port:#x} {value:#x}")

    def inp(self, width: int, port: int) -> int:
        answer = self.cmd(f"in{'bwl'[width.bit_length() - 1]} {port:#x}")
        return int(answer.split()[1], 16) if answer.startswith("OK ") else -1

    # PCI configuration mechanism #1, bus 0.
    def cfg_read(self, slot: int, reg: int, width: int = 4) -> int:
        self.out(4, 0xCF8, 0x80000000 | slot << 11 | (reg & 0xFC))
        return self.inp(width, 0xCFC + (reg & 3))

    def cfg_write(self, slot: int, reg: int, value: int, width: int = 4) -> None:
        self.out(4, 0xCF8, 0x80000000 | slot << 11 | (reg & 0xFC))
        self.out(width, 0xCFC + (reg & 3), value & ((1 << 8 * width) - 1))


# -- the operations ---------------------------------------------------------------


class _Device:
    """The device as the fuzzer has mapped it."""

    def __init__(self, qt: Qtest):
        self.qt = qt
        self.msi_cap = 0

    def map(self) -> None:
        found = self.qt.cfg_read(SLOT, 0)
        if found != VENDOR_DEVICE:
            raise QemuStartError(f"no vmsocket device at slot {SLOT}: "
                                 f"config space reads {found:#010x}")
        for bar, addr in enumerate((BAR0, BAR1, BAR2, BAR3)):
            self.qt.cfg_write(SLOT, 0x10 + 4 * bar, addr)
        self.qt.cfg_write(SLOT, 0x04, 0x0006, 2)   # memory space + bus master
        cap = self.qt.cfg_read(SLOT, 0x34, 1)
        while cap and cap != 0xFF:
            if self.qt.cfg_read(SLOT, cap, 1) == MSI_CAP_ID:
                self.msi_cap = cap
                break
            cap = self.qt.cfg_read(SLOT, cap + 1, 1)


def _value(rng: random.Random, width: int) -> int:
    v = rng.choice(VALUES) if rng.random() < 0.6 else rng.getrandbits(32)
    return v & ((1 << 8 * width) - 1) if width < 8 else v | rng.getrandbits(32) << 32


def _width(rng: random.Random) -> int:
    return rng.choice((1, 2, 4, 4, 4, 8))


def _op_register(dev: _Device, rng: random.Random) -> str:
    offset = rng.choice(REGS) if rng.random() < 0.8 else rng.randrange(0x100)
    offset += rng.choice((0, 0, 0, 0, 1, 2, 3, 4))        # misaligned too
    width = _width(rng)
    if rng.random() < 0.75:
        value = _value(rng, width)
        dev.qt.write(width, BAR0 + offset, value)
        return f"write{width} BAR0+{offset:#x} {value:#x}"
    dev.qt.read(width, BAR0 + offset)
    return f"read{width} BAR0+{offset:#x}"


def _op_buffer(dev: _Device, rng: random.Random) -> str:
    base, name = rng.choice(((BAR1, "BAR1"), (BAR2, "BAR2")))
    offset = rng.choice((0, BUFSIZE - 8, BUFSIZE - 1, BUFSIZE, rng.randrange(BUFSIZE)))
    size = rng.choice((1, 4, 16, 256))
    if rng.random() < 0.5:
        data = rng.getrandbits(8 * size).to_bytes(size, "little").hex()
        dev.qt.cmd(f"write {base + offset:#x} {size} 0x{data}")
        return f"write {name}+{offset:#x} {size}"
    dev.qt.cmd(f"read {base + offset:#x} {size}")
    return f"read {name}+{offset:#x} {size}"


def _op_action(dev: _Device, rng: random.Random) -> str:
    """A well-formed action, so the fuzz reaches connected states."""
    reg, value = rng.choice(((0x20, 1), (0x20, 1), (0x30, 1), (0x50, 1),
                             (0x40, rng.choice((1, 64, BUFSIZE, BUFSIZE + 1))),
                             (0x60, rng.choice((1, 64, BUFSIZE, 0)))))
    dev.qt.write(4, BAR0 + reg, value)
    dev.qt.read(4, BAR0)
    return f"action BAR0+{reg:#x} {value:#x}"


def _op_config(dev: _Device, rng: random.Random) -> str:
    reg = rng.choice((0x04, 0x04, 0x10, 0x14, 0x18, 0x3C, rng.randrange(0x100)))
    width = rng.choice((1, 2, 4))
    value = _value(rng, width)
    dev.qt.cfg_write(SLOT, reg, value, width)
    return f"config {reg:#x} width {width} {value:#x}"


def _op_msi(dev: _Device, rng: random.Random) -> str:
    if not dev.msi_cap:
        return "msi (no capability)"
    cap = dev.msi_cap
    own = rng.random() < 0.5
    addr = BAR0 + rng.choice(REGS) if own else 0xFEE00000
    dev.qt.cfg_write(SLOT, cap + 4, addr)
    dev.qt.cfg_write(SLOT, cap + 8, rng.getrandbits(16), 2)
    dev.qt.cfg_write(SLOT, cap + 0x0C, rng.getrandbits(16), 2)
    enable = rng.random() < 0.8
    dev.qt.cfg_write(SLOT, cap + 2, 1 if enable else 0, 2)
    dev.qt.write(4, BAR0 + 0x10, 1)                  # IMR: interrupts on
    return f"msi {'on' if enable else 'off'} -> {'BAR0' if own else 'LAPIC'} {addr:#x}"


def _op_mode(dev: _Device, rng: random.Random) -> str:
    """MODE, mostly STREAM and often followed by CONNECT, so that the
    stream operations below meet a connected stream."""
    value = rng.choice((1, 1, 1, 0, 0xFFFFFFFF, rng.getrandbits(32)))
    dev.qt.write(4, BAR0 + REG_MODE, value)
    if rng.random() < 0.6:
        dev.qt.write(4, BAR0 + 0x20, 1)
        dev.qt.read(4, BAR0)
        return f"mode {value:#x} + connect"
    return f"mode {value:#x}"


def _op_doorbell(dev: _Device, rng: random.Random) -> str:
    width = rng.choice((4, 4, 4, 2, 1))
    value = rng.choice((1, 2, 3, 3, 0, 0xFFFFFFFF, rng.getrandbits(32)))
    value &= (1 << 8 * width) - 1
    dev.qt.write(width, BAR0 + REG_DOORBELL, value)
    return f"doorbell{width} {value:#x}"


def _op_ring(dev: _Device, rng: random.Random) -> str:
    """Hostile control page: garbage indices and flags, in the guest's
    fields and in the device's own, anywhere in the page, then a doorbell
    now and then so the device looks at them at once."""
    offset = rng.choice(RING_FIELDS) if rng.random() < 0.8 else rng.randrange(RING_SIZE)
    width = rng.choice((4, 4, 4, 1, 2, 8))
    offset = min(offset, RING_SIZE - width)
    if rng.random() < 0.2:
        dev.qt.read(width, BAR3 + offset)
        return f"read{width} BAR3+{offset:#x}"
    cur = dev.qt.read(4, BAR3 + (offset & ~3))
    value = rng.choice((_value(rng, width), (cur + rng.choice((1, BUFSIZE, BUFSIZE + 1,
                                                               -1, 0x80000000))) & 0xFFFFFFFF))
    dev.qt.write(width, BAR3 + offset, value & ((1 << 8 * width) - 1) if width < 8 else value)
    text = f"write{width} BAR3+{offset:#x} {value:#x}"
    if rng.random() < 0.5:
        bell = rng.choice((1, 2, 3))
        dev.qt.write(4, BAR0 + REG_DOORBELL, bell)
        text += f" + doorbell {bell}"
    return text


def _ring_segments(off: int, n: int) -> list[tuple[int, int]]:
    """``n`` ring bytes from offset ``off``: (offset, size) up to the ring's
    end, then from its start (empty pieces left out)."""
    first = min(n, BUFSIZE - off)
    return [(base, size) for base, size in ((off, first), (0, n - first)) if size]


def _op_stream(dev: _Device, rng: random.Random) -> str:
    """One well-formed ring step, as a driver does it (on a device that
    may not be streaming, or has failed: harmless then)."""
    mask = BUFSIZE - 1
    what = rng.choice(("send", "send", "recv", "recv", "want"))
    if what == "want":
        flags = rng.randrange(4)
        dev.qt.write(4, BAR3 + GUEST_FLAGS, flags)
        return f"stream want {flags}"
    if what == "send":
        prod = dev.qt.read(4, BAR3 + TX_PROD) & 0xFFFFFFFF
        room = BUFSIZE - ((prod - dev.qt.read(4, BAR3 + TX_CONS)) & 0xFFFFFFFF)
        n = min(max(room, 0), rng.choice((1, 7, 64, 1000, BUFSIZE)))
        off = prod & mask
        for base, size in _ring_segments(off, n):
            data = rng.getrandbits(8 * size).to_bytes(size, "little").hex()
            dev.qt.cmd(f"write {BAR2 + base:#x} {size} 0x{data}")
        dev.qt.write(4, BAR3 + TX_PROD, (prod + n) & 0xFFFFFFFF)
        if dev.qt.read(4, BAR3 + DEV_FLAGS) & TX_KICK or rng.random() < 0.1:
            dev.qt.write(4, BAR0 + REG_DOORBELL, 1)
        return f"stream send {n} at {off:#x}"
    cons = dev.qt.read(4, BAR3 + RX_CONS) & 0xFFFFFFFF
    avail = (dev.qt.read(4, BAR3 + RX_PROD) - cons) & 0xFFFFFFFF
    n = min(avail, rng.choice((1, 16, 500, BUFSIZE))) if avail <= BUFSIZE else 0
    off = cons & mask
    for base, size in _ring_segments(off, n):
        dev.qt.cmd(f"read {BAR1 + base:#x} {size}")
    dev.qt.write(4, BAR3 + RX_CONS, (cons + n) & 0xFFFFFFFF)
    if dev.qt.read(4, BAR3 + DEV_FLAGS) & RX_KICK or rng.random() < 0.1:
        dev.qt.write(4, BAR0 + REG_DOORBELL, 2)
    return f"stream recv {n} at {off:#x}"


def _op_remap(dev: _Device, rng: random.Random) -> str:
    dev.map()
    return "remap"


OPERATIONS: tuple[tuple[str, float, Callable[[_Device, random.Random], str]], ...] = (
    ("register", 0.40, _op_register),
    ("action", 0.25, _op_action),
    ("buffer", 0.15, _op_buffer),
    ("config", 0.08, _op_config),
    ("msi", 0.05, _op_msi),
    ("remap", 0.05, _op_remap),
    ("mode", 0.04, _op_mode),
    ("doorbell", 0.05, _op_doorbell),
    ("ring", 0.08, _op_ring),
    ("stream", 0.15, _op_stream),
)
RESET_SHARE, UNPLUG_SHARE = 0.012, 0.004
DEFAULT_OPERATIONS = 3000


# -- a run --------------------------------------------------------------------------


def run_fuzz(qemu: Path, out_dir: Path, *, seed: int, operations: int | None = None,
             seconds: float | None = None, hang_seconds: float = 10.0,
             env: dict[str, str] | None = None, say: Callable[[str], None] = print,
             ) -> FuzzResult:
    """Fuzz the device in ``qemu`` with ``seed`` for ``operations`` (or for
    ``seconds``); returns what was found (sanitizer reports, crash, hang)."""
    if operations is None and seconds is None:
        raise ValueError("give operations or seconds")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qemupatch-fuzz-") as sockets:
        # Socket paths must stay short (108 bytes), so not under out_dir.
        return _run_fuzz(qemu, out_dir, Path(sockets), seed=seed, operations=operations,
                         seconds=seconds, hang_seconds=hang_seconds, env=env, say=say)


def _run_fuzz(qemu: Path, out_dir: Path, sockets: Path, *, seed: int, operations: int | None,
              seconds: float | None, hang_seconds: float, env: dict[str, str] | None,
              say: Callable[[str], None]) -> FuzzResult:
    rng = random.Random(seed)
    server_path = sockets / "host.sock"
    qtest_path = sockets / "qtest.sock"
    device = f"vmsocket,id=vs0,addr={SLOT:#x},path={server_path},bufsize={BUFSIZE}"
    argv = [str(qemu), *ROM_ARGS, "-machine", "pc", "-accel", "qtest", "-display", "none",
            "-nodefaults", "-qtest", f"unix:{qtest_path}", "-device", device]
    budget = (seconds or 0) + 0.05 * (operations or 0) + 120
    counts: Counter[str] = Counter()
    findings: list[str] = []
    done = 0
    start = time.monotonic()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(qtest_path))
    listener.listen(1)
    with (HostileServer(server_path, seed) as server,
          open(out_dir / "ops.log", "w") as ops_log,
          QemuMachine(argv, out_dir, deadline=budget,
                      env={**SANITIZER_ENV, **(env or {})}) as machine):
        machine.launch(60)
        qt = Qtest(listener, hang_seconds)
        dev = _Device(qt)
        try:
            dev.map()
            kinds, weights = zip(*((k, w) for k, w, _ in OPERATIONS))
            funcs = {k: f for k, _, f in OPERATIONS}
            last_say = start
            while (done < operations if operations is not None
                   else time.monotonic() - start < seconds):
                roll = rng.random()
                if roll < RESET_SHARE:
                    kind, text = "reset", _reset(machine, dev)
                elif roll < RESET_SHARE + UNPLUG_SHARE:
                    kind, text = "unplug", _unplug(machine, dev, device)
                else:
                    kind = rng.choices(kinds, weights)[0]
                    text = funcs[kind](dev, rng)
                counts[kind] += 1
                done += 1
                ops_log.write(f"{done} {text}\n")
                if time.monotonic() - last_say > 10:
                    last_say = time.monotonic()
                    rate = done / (last_say - start)
                    say(f"fuzz seed {seed}: {done} operations, {rate:.0f}/s")
        except (FuzzHang, ConnectionError, OSError, QMPError) as exc:
            # A dying QEMU (ASan printing its report) drops the socket before
            # it exits: give it a moment so the finding names the exit.
            rc = machine.wait(0 if isinstance(exc, FuzzHang) else 10)
            findings.append(f"after operation {done}: "
                            + (f"QEMU exited with status {rc}" if rc is not None
                               else f"{type(exc).__name__}: {exc}"))
        finally:
            qt.close()
            listener.close()
            qemu_exit = machine.shutdown()
        elapsed = time.monotonic() - start
        if qemu_exit.how not in ("quit",) and not findings:
            findings.append(f"QEMU ended: {qemu_exit.describe()}")
        modes = dict(server.modes)
    log = machine.log_path.read_text(errors="replace")
    findings += sanitizer_reports(log)
    result = FuzzResult(seed, done, round(elapsed, 2), tuple(findings), dict(counts),
                        modes, out_dir)
    write_json(out_dir / "fuzz.json", {
        "seed": seed, "operations": done, "seconds": result.seconds,
        "ops_per_second": round(result.ops_per_second, 1), "ok": result.ok,
        "findings": list(findings), "op_counts": dict(counts), "server_modes": modes,
        "reproduce": result.reproduce(qemu)})
    return result


def sanitizer_reports(log: str) -> list[str]:
    """Each sanitizer or assertion report in QEMU's output, with context."""
    lines = log.splitlines()
    return ["\n".join(lines[max(0, i - 2):i + 12]) for i, line in enumerate(lines)
            if REPORT_PATTERNS.search(line)]


def _reset(machine: QemuMachine, dev: _Device) -> str:
    machine.qmp("system_reset")
    dev.map()
    return "system_reset"


def _unplug(machine: QemuMachine, dev: _Device, device: str) -> str:
    """Hot-unplug through ACPI (the guest's part done by hand), then plug
    the device back in."""
    machine.qmp("device_del", {"id": "vs0"})
    dev.qt.out(4, ACPI_EJECT_PORT, 1 << SLOT)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ids = [d.get("qdev_id") for bus in machine.qmp("query-pci") for d in bus["devices"]]
        if "vs0" not in ids:
            break
        time.sleep(0.05)
    else:
        raise FuzzHang("the device did not go away within 5 s of device_del + eject")
    driver, *props = device.split(",")
    args: dict[str, object] = dict(p.split("=", 1) for p in props)
    args["bufsize"] = int(str(args["bufsize"]))      # QMP wants the JSON type
    machine.qmp("device_add", {"driver": driver, **args})
    dev.map()
    return "unplug + replug"


def build_sanitized(cfg: Config, src: workflow.Source, out_dir: Path, *, runner: Runner,
                    progress: Progress | None = None) -> BuildResult:
    """The series carried onto a release (``src``) built with ASan and
    UBSan, and the series' qtest beside it, in ``out_dir`` (the build folder
    persists there and is reused while the source tree is the same; ccache
    is shared with the normal builds: only the flags differ)."""
    options = sanitizer_options(QemuBuildOptions(ccache_dir=cfg.cache_dir / "ccache-host",
                                                 extra_targets=(QTEST_TARGET,)),
                                src.worktree.path)
    return build_qemu(src.worktree.path, out_dir, release=src.release.name,
                      repacked=src.release.provenance.repacked, runner=runner,
                      project_root=cfg.root, patches=cfg.patches_dir, options=options,
                      progress=progress, source_id=src.tree_id)


def build_sanitized_qemu(cfg: Config, release: str | None = None, *,
                         runner: Runner) -> BuildResult:
    """:func:`build_sanitized` for ``release`` (default: the series' base),
    in ``<cache>/sanitized/<release>``."""
    series = read_series(cfg.patches_dir)
    src = workflow.carry_source(cfg, workflow.series_base(cfg, series, release))
    return build_sanitized(cfg, src, cfg.cache_dir / "sanitized" / src.release.name,
                           runner=runner)


def run_seeds(qemu: Path, out_dir: Path, *, first_seed: int | None = None, seeds: int = 1,
              operations: int | None = None, seconds: float | None = None,
              say: Callable[[str], None] = print) -> list[FuzzResult]:
    """``seeds`` runs, one fresh QEMU each, seeds ``first_seed`` onwards
    (default: a random first seed); 3000 operations each unless timed."""
    if first_seed is None:
        first_seed = random.SystemRandom().randrange(1 << 32)
    if operations is None and seconds is None:
        operations = DEFAULT_OPERATIONS
    results = []
    for seed in range(first_seed, first_seed + seeds):
        say(f"fuzz: seed {seed}, QEMU {qemu}")
        results.append(run_fuzz(qemu, out_dir / f"seed-{seed}", seed=seed,
                                operations=operations, seconds=seconds, say=say))
    return results
