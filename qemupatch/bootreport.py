"""What a boot test leaves behind: its result as data and its records.

::

    BootResult (Stage, Check)   the outcome ``run_boot_test`` returns or attaches
    write_running(out, ...)     boot-test.json before QEMU starts
    write_result(result)        boot-test.json and boot-test.junit.xml of a
                                finished run (passed or failed)
    write_stopped(out, ...)     the same for a run stopped half-way
    bench_table(rows)           vmsocket against virtio-serial, as data
    format_bench_table(rows)    the same as text (bench.txt, the terminal)

``boot-test.json`` is ``{"schema": 1, "status": ...}``: "running" while the
boot runs, "done" when it finished (``ok`` says how), "terminated" (SIGTERM,
SIGINT) or "failed" (an unexpected error) with the ``stage`` it stopped in.
Every file is written atomically (``qemupatch.records``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qemupatch.console import BenchRow, GuestTest
from qemupatch.guest import GuestImage
from qemupatch.records import FAIL, PASS, Case, write_json, write_junit

SCHEMA = 1
SUITE = "qemupatch.boot-test"


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


def junit_cases(stages: Sequence[Stage], tests: Sequence[GuestTest] = (),
                checks: Sequence[Check] = (), bench: Sequence[BenchRow] = ()) -> list[Case]:
    cases = [Case("boot-test.stage", s.name, s.status, s.seconds, s.detail) for s in stages]
    cases += [Case("boot-test.guest", t.name, t.status, detail=t.line) for t in tests]
    cases += [Case("boot-test.host", c.name, c.status, detail=c.detail) for c in checks]
    cases += [Case("boot-test.bench", f"{b.channel}.{b.kind}.{b.size or ''}".rstrip("."),
                   FAIL if b.error else PASS, detail=b.error or "") for b in bench]
    return cases


def write_result(result: BootResult) -> None:
    """boot-test.json and boot-test.junit.xml of a finished run."""
    write_json(result.out_dir / "boot-test.json", result.to_json())
    write_junit(result.out_dir / "boot-test.junit.xml", SUITE,
                junit_cases(result.stages, result.tests, result.checks, result.bench),
                seconds=result.seconds, error=None if result.ok else result.message)


def write_stopped(out_dir: Path, *, status: str, stage: str, message: str,
                  stages: Sequence[Stage], seconds: float, context: dict) -> None:
    """The records of a run that stopped half-way: where, and why."""
    write_json(out_dir / "boot-test.json", {
        "schema": SCHEMA, "status": status, "ok": False, "stage": stage,
        "message": message, **context, "stages": [asdict(s) for s in stages],
        "seconds": round(seconds, 3)})
    write_junit(out_dir / "boot-test.junit.xml", SUITE, junit_cases(stages),
                seconds=seconds, error=f"{status} during {stage}: {message}")


def write_running(out_dir: Path, context: dict) -> None:
    """What this run uses, written before QEMU starts so that it survives a kill."""
    write_json(out_dir / "boot-test.json",
               {"schema": SCHEMA, "ok": None, "status": "running", **context})


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

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    for r in bench_table(rows):
        size = "-" if r["size"] is None else str(r["size"])
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"{r['test']:<6} {size:>8} {r['unit']:>5} {cell(r['vmsocket']):>10} "
                     f"{cell(r['virtio_serial']):>14} {ratio:>23}")
    return "\n".join(lines)
