"""``qemupatch boot-test``: boot the patched QEMU with a guest and test vmsocket.

This module is the orchestration only; the pieces live apart::

    qemupatch.servers     host servers (echo, refused, sink, source, vs-*)
    qemupatch.machine     QEMU, QMP, shutdown, the KVM/TCG probe
    qemupatch.console     the console markers, parser and follower
    qemupatch.pvh         the guest kernel without its self-decompression
    qemupatch.bootreport  BootResult, boot-test.json, JUnit, the bench table

One boot does everything::

    host servers (qemupatch.servers)      QEMU (-S, QMP on a socketpair)
      echo, refused, sink, source  <---   -vmsocket unix:...  x4  (/dev/vmsocket0..3)
      vs-echo, vs-sink, vs-source  <---   virtio-serial ports qp.echo/qp.sink/qp.source
      ceil-echo, ceil-sink, ...    <---   (benchmark) the same program on the host,
                                          after QEMU: the servers' ceiling
                                          console -> <out>/console.log

The benchmark (``bench=True``): one guest process measures every cell
``bench_reps`` times on both channels, interleaved (``vmsocket-test
bench``); then the host runs the same program against its own instances
of the same servers (``qemupatch.bench``) for the ceiling.  Each side's
devices are opened once; virtio-serial's ports use QEMU's socket chardev.

Stages, each with its own deadline (``Deadlines``); a console watchdog ends
the run when the guest prints nothing for ``Deadlines.idle``:

``qemu-start``   launch, QMP, ``query-pci`` finds the vmsocket
                 functions (1af4:10f0), ``cont``
``kernel-boot``  until /init prints its start marker
``guest-tests``  until /init prints its done marker
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

Whatever happens, even a ``Terminated`` (SIGTERM) at any point, ``<out>``
keeps ``console.log``, ``qemu.log``, ``qmp.jsonl``, ``qemu.cmdline``,
``boot-test.json`` (which says where a stopped run stopped),
``boot-test.junit.xml`` (and ``bench.txt`` when the benchmark ran), and no
QEMU or host server outlives ``run_boot_test``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from qemu.qmp import QMPError

from qemupatch import console as markers
from qemupatch.bench import CEILING_CHANNEL, run_ceiling
from qemupatch.bootreport import (BootResult, Check, Stage, bench_table, format_bench_table,
                                  write_result, write_running, write_stopped)
from qemupatch.console import (BenchRow, ConsoleFollower, ConsoleReport, GuestTest, number,
                               panic_line, parse_console)
from qemupatch.errors import (BootDeadline, BootTestError, GuestCrash, GuestTestFailed,
                              QemuStartError, Terminated)
from qemupatch.guest import VPORT_NAMES, GuestImage
from qemupatch.machine import NEVER_STARTED, QemuExit, QemuMachine, probe_accel
from qemupatch.pvh import direct_kernel
from qemupatch.records import atomic_write
from qemupatch.servers import ServerSet

VMSOCKET_VENDOR, VMSOCKET_DEVICE = 0x1AF4, 0x10F0
# /dev/vmsocketN order: echo, refused, sink, source.
VMSOCKET_SERVERS = ("echo", "refused", "sink", "source")
VMSOCKET_SLOTS = (0x10, 0x11, 0x12, 0x13)
# A benchmark boot adds /dev/vmsocket4..6 (slots 0x14..): the channel
# "vmsocket-v1", which /init opens with the driver's stream parameter off.
BENCH_V1_SERVERS = ("v1-echo", "v1-sink", "v1-source")
LARGE_BYTES = 3 << 20
SHORT_BYTES = len("hello vmsocket\n")
BENCH_REPS = 5                # repetitions of every benchmark cell (qemupatch.bench_reps=)
# The ceiling's own server instances (same code as the channels'): the
# guest's byte counts stay the only ones on the channels' servers.
CEILING_SERVERS = {"ceil-echo": "echo", "ceil-sink": "sink", "ceil-source": "source"}
# Issue 9's goals are for a 2-vCPU TCG guest (full duplex needs a second
# vCPU); a benchmark boot gets -smp 2 unless the caller chose its own.
BENCH_SMP = 2
STAGES = ("qemu-start", "kernel-boot", "guest-tests", "shutdown")
OUTPUTS = ("console.log", "qemu.log", "qmp.jsonl", "qemu.cmdline", "query-pci.json",
           "boot-test.json", "boot-test.junit.xml", "bench.txt")
# The guest's kernel command line, before the qemupatch.* switches for /init.
# Under TCG every boot pays for what the kernel checks and calibrates; a
# throwaway test guest needs none of: CPU-bug mitigations (also patched in
# at boot), crypto self-tests, the IO-APIC timer check, the TSC watchdog.
KERNEL_ARGS = ("console=ttyS0 panic=-1 loglevel=4 mitigations=off cryptomgr.notests "
               "no_timer_check tsc=reliable")

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

    def total(self, bench: bool) -> float:
        """The most a whole boot may take: QEMU's own deadline."""
        return (self.qemu_start + self.kernel_boot + (self.bench if bench else self.tests)
                + self.shutdown + 30)


# ------------------------------------------------------------------ argv


def _opt(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return str(value).replace(",", ",,")


def qemu_argv(qemu: Path, image: GuestImage, *, accel: str, console: Path,
              paths: Mapping[str, Path], vmsocket: bool, spelling: str,
              append: str, extra: Sequence[str] = (), kernel: Path | None = None,
              bench: bool = False) -> list[str]:
    """QEMU's command line, without the QMP monitor (``QemuMachine`` adds it).
    ``kernel``: what to boot instead of ``image.kernel`` (its PVH vmlinux).
    ``bench``: with the benchmark's vmsocket-v1 devices."""
    argv = [str(qemu), "-S", "-accel", accel, "-m", "512", "-nographic", "-no-reboot",
            "-nic", "none", "-L", "/usr/share/qemu", "-L", "/usr/share/seabios",
            "-monitor", "none", "-parallel", "none",
            "-chardev", f"file,id=console0,path={_opt(console)}", "-serial", "chardev:console0",
            "-kernel", str(kernel or image.kernel), "-initrd", str(image.initramfs),
            "-append", append]
    if vmsocket:
        for i, name in enumerate(vmsocket_servers(bench)):
            slot = VMSOCKET_SLOTS[0] + i
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


def vmsocket_servers(bench: bool) -> tuple[str, ...]:
    """The host servers behind /dev/vmsocket0, 1, ... in order."""
    return VMSOCKET_SERVERS + (BENCH_V1_SERVERS if bench else ())


# --------------------------------------------------------------- the run


class _Stop(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind       # panic | exit | deadline | watchdog


def _default_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _wait(machine: QemuMachine, console: ConsoleFollower, until: str,
          timeout: float, idle: float, stage: str, on_line: Callable[[str], None]) -> None:
    """Follow the console until a line holds the marker ``until``."""
    deadline = time.monotonic() + timeout
    while True:
        for line in console.poll():
            on_line(line)
            if panic_line(line):
                raise _Stop("panic", f"kernel panic during {stage}: {line.strip()}")
            if until in line:
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


class _Stages:
    """The stages of one run, timed; ``current`` says where a stopped run stopped."""

    def __init__(self, note: Progress) -> None:
        self.done: list[Stage] = []
        self.current = "setup"
        self._t = time.monotonic()
        self._note = note

    def begin(self, name: str, what: str = "") -> None:
        self.current, self._t = name, time.monotonic()
        self._note(f"{name}: {what or 'start'}")

    def end(self, status: str = "pass", detail: str = "") -> None:
        self.done.append(Stage(self.current, status, time.monotonic() - self._t, detail))
        if status == "pass":
            self._note(f"{self.current}: done")

    def finished(self) -> tuple[Stage, ...]:
        """Every stage, those never reached as skipped."""
        seen = {s.name for s in self.done}
        return tuple(self.done) + tuple(Stage(n, "skip", 0.0, "an earlier stage failed")
                                        for n in STAGES if n not in seen)


def run_boot_test(qemu: Path, image: GuestImage, out_dir: Path, *, bench: bool = False,
                  accel: str = "auto", vmsocket: bool = True, spelling: str = "option",
                  tests: bool = True, deadlines: Deadlines = Deadlines(),
                  progress: Progress | None = _default_progress,
                  extra_args: Sequence[str] = (), bench_reps: int = BENCH_REPS) -> BootResult:
    """Boot ``image`` in ``qemu`` and run the vmsocket tests (and the benchmark).

    ``accel``: "auto" (KVM probe, else TCG), "kvm" or "tcg".  ``vmsocket``:
    False boots without vmsocket devices (stock QEMU).  ``spelling``:
    "option" (``-vmsocket unix:PATH``) or "device" (``-device vmsocket,path=,addr=``).
    ``bench_reps``: how many times the benchmark measures every cell.
    Returns the result when everything passed; otherwise writes the same
    files and raises the stage's ``BootTestError`` with ``.result`` set.
    A ``Terminated`` (or any other unexpected error) goes through, after
    QEMU and the servers are gone and boot-test.json says where it stopped.
    """
    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)

    def note(msg: str) -> None:
        say(f"[{time.monotonic() - t0:7.1f}s] {msg}")

    stages = _Stages(note)
    if bench and "-smp" not in extra_args:
        extra_args = ["-smp", str(BENCH_SMP), *extra_args]
    smp = next((extra_args[i + 1] for i, a in enumerate(extra_args[:-1]) if a == "-smp"), "1")
    context = {"accel": accel, "qemu": str(qemu), "image": image.to_json(),
               "deadlines": asdict(deadlines)}
    written = False
    stopped_by: BaseException | None = None
    try:
        for name in OUTPUTS:                 # nothing left from an earlier run
            (out_dir / name).unlink(missing_ok=True)
        stages.current = "kernel-unpack"
        kernel = direct_kernel(image.kernel)
        context["kernel"] = str(kernel)
        if accel == "auto":
            stages.current = "kvm-probe"
            note("kvm-probe: start")
            accel = probe_accel(qemu, kernel, timeout=deadlines.kvm_probe,
                                cache_dir=image.kernel.parent)
            note(f"kvm-probe: using {accel}")
        context["accel"] = accel
        result, error = _boot(qemu, image, kernel, out_dir, bench=bench, accel=accel,
                              vmsocket=vmsocket, spelling=spelling, tests=tests,
                              deadlines=deadlines, stages=stages, context=context,
                              note=note, extra_args=extra_args, t0=t0,
                              bench_reps=bench_reps)
        if bench:
            result = dataclasses.replace(result, bench_info={
                "reps": bench_reps, "smp": int(smp), "ceiling": CEILING_CHANNEL,
                "order": "cells in turn, channels interleaved, order rotating per repetition",
                # the host's load when done: on a shared machine, noise to weigh
                "loadavg": [round(x, 2) for x in os.getloadavg()]})
        stages.current = "report"
        write_result(result)
        written = True
        if result.bench:
            table = format_bench_table(result.bench)
            atomic_write(out_dir / "bench.txt",
                         f"accel={accel} kernel={image.kernel_version} qemu={qemu} "
                         f"reps={bench_reps} smp={smp} "
                         f"loadavg={'/'.join(map(str, result.bench_info['loadavg']))}\n"
                         f"{table}\n")
            say(table)
    except BaseException as exc:
        stopped_by = exc
        raise
    finally:
        if not written:
            status = ("terminated" if isinstance(stopped_by, (Terminated, KeyboardInterrupt))
                      else "failed")
            write_stopped(out_dir, status=status, stage=stages.current,
                          message=str(stopped_by) or type(stopped_by).__name__,
                          stages=stages.done, seconds=time.monotonic() - t0, context=context)
            note(f"boot-test: {status.upper()} during {stages.current}: {stopped_by}")
    note(f"boot-test: {'PASS' if result.ok else 'FAIL'}: {result.message.splitlines()[0]}")
    if error is not None:
        error.result = result   # type: ignore[attr-defined]
        raise error
    return result


def _boot(qemu: Path, image: GuestImage, kernel: Path, out_dir: Path, *, bench: bool,
          accel: str, vmsocket: bool, spelling: str, tests: bool, deadlines: Deadlines,
          stages: _Stages, context: dict, note: Progress, extra_args: Sequence[str],
          t0: float, bench_reps: int = BENCH_REPS) -> tuple[BootResult, BootTestError | None]:
    """The boot itself: servers, QEMU, the stages, the cross-checks; the
    result, and the error that describes it when it failed."""
    # Each one's kind is its name, after the channel's prefix (vs-, v1-, ceil-).
    specs = {name: name.split("-")[-1] for name in vmsocket_servers(bench)}
    specs.update({f"vs-{k}": k for k in VPORT_NAMES})
    if bench:
        specs.update(CEILING_SERVERS)
    append = (f"{KERNEL_ARGS} qemupatch.tests={int(tests)} "
              f"qemupatch.bench={int(bench)} qemupatch.timeout={int(deadlines.test_program)}")
    if bench:
        append += f" qemupatch.bench_reps={int(bench_reps)}"
    bench_rows: tuple[BenchRow, ...] = ()
    console_path = out_dir / "console.log"
    checks: list[Check] = []
    stop: _Stop | None = None
    start_error: QemuStartError | None = None
    pci_count: int | None = None

    def on_line(line: str) -> None:
        if markers.PROGRESS.search(line):
            note(f"guest: {line.strip()}")

    # fnv_limit=0: the sink serves only the benchmark, which must not pay
    # per-byte Python work; vmsocket-test treats fnv 0 as "not computed".
    stages.current = "servers"
    with ServerSet(specs, fnv_limit=0) as servers:
        argv = qemu_argv(qemu, image, accel=accel, console=console_path,
                         paths=servers.paths, vmsocket=vmsocket, spelling=spelling,
                         append=append, extra=extra_args, kernel=kernel, bench=bench)
        console = ConsoleFollower(console_path)
        context["argv"] = argv
        write_running(out_dir, context)
        with QemuMachine(argv, out_dir, deadline=deadlines.total(bench)) as machine:
            stages.begin("qemu-start", f"{qemu} ({accel})")
            try:
                machine.launch(deadlines.qemu_start)
                pci = machine.qmp("query-pci")
                found = _vmsocket_functions(pci)
                pci_count = len(found)
                atomic_write(out_dir / "query-pci.json", json.dumps(pci, indent=1))
                if vmsocket:
                    problem = _check_pci(found, spelling, len(vmsocket_servers(bench)))
                    checks.append(Check("qmp.query-pci", "fail" if problem else "pass",
                                        problem or f"vmsocket functions at slots "
                                        f"{[f['slot'] for f in found]}"))
                    if problem:
                        raise QemuStartError(f"query-pci: {problem}")
                machine.qmp("cont")
                stages.end()
                plan = [("kernel-boot", markers.GUEST_START, deadlines.kernel_boot),
                        ("guest-tests", markers.GUEST_DONE,
                         deadlines.bench if bench else deadlines.tests)]
                for stage, until, limit in plan:
                    stages.begin(stage, f"waiting (deadline {limit:.0f} s)")
                    _wait(machine, console, until, limit, deadlines.idle, stage, on_line)
                    stages.end()
                stages.begin("shutdown")
                if machine.wait(deadlines.shutdown) is None:
                    raise _Stop("deadline", f"guest did not power off within "
                                f"{deadlines.shutdown:.0f} s after the done marker")
                stages.end()
            except QemuStartError as exc:
                start_error = exc
                stages.end("fail", str(exc))
            except _Stop as exc:
                stop = exc
                stages.end("fail", str(exc))
            except (OSError, TimeoutError, QMPError) as exc:
                start_error = QemuStartError(f"{stages.current}: QMP failed: {exc!r}")
                stages.end("fail", str(exc))
        qexit = machine.exit or NEVER_STARTED
        stages.current = "cross-checks"
        console.poll()
        note(f"qemu: {qexit.describe()}")
        report = parse_console(console.text)
        bench_rows = report.bench
        if report.done_rc is not None:
            checks.extend(_cross_check(report, servers, pci_count, tests))
            if bench:
                stages.current = "bench-ceiling"
                note(f"bench-ceiling: the host servers alone, {bench_reps} repetitions")
                bench_rows += run_ceiling(
                    image.initramfs, {k: servers.paths[f"ceil-{k}"]
                                      for k in ("echo", "sink", "source")},
                    servers.dir, reps=bench_reps, timeout=deadlines.bench)
                stages.current = "cross-checks"
                for channel in ((("vmsocket",) if vmsocket else ()) +
                                ("virtio-serial", CEILING_CHANNEL)):
                    rows = [b for b in bench_rows if b.channel == channel and not b.error]
                    checks.append(Check(f"bench-{channel}-ran", "pass" if rows else "fail",
                                        f"{len(rows)} {channel} benchmark rows"))
        server_json = {n: s.to_json() for n, s in servers.all_stats().items()}
        qemu_tail = machine.log_tail()
    stages.current = "report"
    error = _classify(start_error, stop, qexit, report, checks, console.tail(), qemu_tail,
                      bench_rows)
    return BootResult(
        ok=error is None, failure=type(error).__name__ if error else None,
        message=str(error) if error else "boot test passed",
        exit_code=error.exit_code if error else 0, accel=accel, qemu=str(qemu),
        spelling=spelling if vmsocket else "none", image=image, stages=stages.finished(),
        tests=report.tests, checks=tuple(checks), bench=tuple(bench_rows),
        guest_rc=report.done_rc, qemu_exit=qexit.describe(), out_dir=out_dir,
        servers=server_json, seconds=time.monotonic() - t0), error


def _vmsocket_functions(pci: object) -> list[dict]:
    found = []
    for bus in pci or []:  # type: ignore[union-attr]
        for dev in bus.get("devices", []):
            ids = dev.get("id", {})
            if ids.get("vendor") == VMSOCKET_VENDOR and ids.get("device") == VMSOCKET_DEVICE:
                found.append({"bus": dev.get("bus"), "slot": dev.get("slot"),
                              "function": dev.get("function"), "qdev_id": dev.get("qdev_id")})
    return sorted(found, key=lambda f: (f["bus"], f["slot"], f["function"]))


def _check_pci(found: list[dict], spelling: str, count: int = len(VMSOCKET_SERVERS)
               ) -> str | None:
    if len(found) != count:
        return (f"expected {count} vmsocket functions "
                f"({VMSOCKET_VENDOR:04x}:{VMSOCKET_DEVICE:04x}), QEMU has {len(found)}")
    if spelling == "device":
        got = [(f["slot"], f["qdev_id"]) for f in found]
        want = [(VMSOCKET_SLOTS[0] + i, f"vmsocket{i}") for i in range(count)]
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
        small_bytes = number(small.get("bytes")) if small else None
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
        want = number(step.get("bytes")) or 0
        ok = vs_echo.bytes_in >= want
        out.append(Check("host-virtio-serial-echo", "pass" if ok else "fail",
                         f"virtio-serial echo server got {vs_echo.bytes_in} bytes, "
                         f"guest sent {want}"))
    for channel, sink, source in (("vmsocket", "sink", "source"),
                                  ("vmsocket-v1", "v1-sink", "v1-source"),
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
              qemu_tail: str, bench: Sequence[BenchRow] = ()) -> BootTestError | None:
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
                 for b in bench if b.error]
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
           "parse_console", "probe_accel", "qemu_argv", "run_boot_test"]
