"""What a boot test leaves behind: its result as data and its records.

::

    BootResult (Stage, Check)   the outcome ``run_boot_test`` returns or attaches
    write_running(out, ...)     boot-test.json before QEMU starts
    write_result(result)        boot-test.json and boot-test.junit.xml of a
                                finished run (passed or failed)
    write_stopped(out, ...)     the same for a run stopped half-way
    bench_table(rows)           vmsocket against virtio-serial per cell (min,
                                median, max of the repetitions, the ratio of
                                the medians, the host-only ceiling), as data
    format_bench_table(rows)    the same as text (bench.txt, the terminal)

``boot-test.json`` is ``{"schema": 1, "status": ...}``: "running" while the
boot runs, "done" when it finished (``ok`` says how), "terminated" (SIGTERM,
SIGINT) or "failed" (an unexpected error) with the ``stage`` it stopped in.
Every file is written atomically (``qemupatch.records``).
"""

from __future__ import annotations

import statistics
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
    bench_info: dict = field(default_factory=dict)   # reps, smp: how the figures were taken

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
            "bench_table": bench_table(self.bench), "bench_info": self.bench_info,
            "guest_rc": self.guest_rc, "qemu_exit": self.qemu_exit,
            "servers": self.servers, "seconds": round(self.seconds, 3),
        }


def junit_cases(stages: Sequence[Stage], tests: Sequence[GuestTest] = (),
                checks: Sequence[Check] = (), bench: Sequence[BenchRow] = ()) -> list[Case]:
    cases = [Case("boot-test.stage", s.name, s.status, s.seconds, s.detail) for s in stages]
    cases += [Case("boot-test.guest", t.name, t.status, detail=t.line) for t in tests]
    cases += [Case("boot-test.host", c.name, c.status, detail=c.detail) for c in checks]
    # One case per channel and cell, as before repetitions: failed if any failed.
    cells: dict[str, list[BenchRow]] = {}
    for b in bench:
        cells.setdefault(f"{b.channel}.{b.kind}.{b.size or ''}".rstrip("."), []).append(b)
    for name, reps in cells.items():
        errors = [b.error for b in reps if b.error]
        cases.append(Case("boot-test.bench", name, FAIL if errors else PASS,
                          detail="; ".join(dict.fromkeys(errors))))
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


# The benchmark's channels, in table order: what is compared, then the
# ceiling (the host servers alone, with the same client program on the host
# over AF_UNIX: no channel can go faster than that).
VMSOCKET, VMSOCKET_V1, VIRTIO_SERIAL, CEILING = ("vmsocket", "vmsocket-v1", "virtio-serial",
                                                 "host-unix")
CHANNELS = (VMSOCKET, VMSOCKET_V1, VIRTIO_SERIAL, CEILING)
KINDS = ("g2h", "h2g", "rtt64")
# Issue 9's goals for stream mode: vmsocket/virtio-serial of the medians.
GOALS = {("g2h", 4096): (">=", 1.0), ("g2h", 65536): (">=", 2.0), ("g2h", 1 << 20): (">=", 2.0),
         ("h2g", 4096): (">=", 1.0), ("h2g", 65536): (">=", 2.0), ("h2g", 1 << 20): (">=", 2.0),
         ("rtt64", None): ("<=", 0.5)}
RATIO_READS = {
    "higher": "vmsocket/virtio-serial of the median MB/s: above 1 vmsocket is faster",
    "lower": "vmsocket/virtio-serial of the median usec: below 1 vmsocket is faster"}


def stats(values: Sequence[float]) -> dict | None:
    """min, median and max of one cell's repetitions (None: no value)."""
    if not values:
        return None
    return {"n": len(values), "min": min(values), "median": round(statistics.median(values), 3),
            "max": max(values), "values": list(values)}


def _cell_key(r: BenchRow) -> tuple[str, int | None]:
    return (r.kind, None if r.kind == "rtt64" else r.size)


def _cell_order(key: tuple[str, int | None]) -> tuple:
    kind, size = key
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), kind, size or 0)


def _channel_order(names: set[str]) -> list[str]:
    return [c for c in CHANNELS if c in names] + sorted(names - set(CHANNELS))


def bench_table(rows: Sequence[BenchRow]) -> list[dict]:
    """One entry per cell (g2h/h2g x size, rtt64): every channel's min,
    median and max over its repetitions, and vmsocket/virtio-serial of the
    medians (``ratio``; ``better`` says which way it reads: MB/s higher is
    better, rtt64's usec lower).  ``ratios`` has the same for every channel
    compared (vmsocket-v1 too); ``ceiling`` is the host servers alone.
    ``goal`` and ``met``: issue 9's target for ``ratio``.  Failed
    repetitions are counted in ``failed``, never averaged in.
    """
    cells: dict[tuple, dict[str, list[BenchRow]]] = {}
    for r in rows:
        if r.kind in KINDS:
            cells.setdefault(_cell_key(r), {}).setdefault(r.channel, []).append(r)
    table = []
    for key in sorted(cells, key=_cell_order):
        kind, size = key
        rtt = kind == "rtt64"
        by = cells[key]
        chans = {}
        for ch in _channel_order(set(by)):
            good = [(r.usec if rtt else r.mbps) for r in by[ch] if not r.error]
            chans[ch] = {"stats": stats([v for v in good if v is not None]),
                         "failed": sum(1 for r in by[ch] if r.error),
                         "errors": sorted({r.error for r in by[ch] if r.error})}

        def median(ch: str) -> float | None:
            st = chans.get(ch, {}).get("stats")
            return st["median"] if st else None

        base = median(VIRTIO_SERIAL)
        ratios = {f"{ch}/{VIRTIO_SERIAL}": (round(m / base, 3) if m and base else None)
                  for ch in chans if ch not in (VIRTIO_SERIAL, CEILING)
                  for m in [median(ch)]}
        ratio = ratios.get(f"{VMSOCKET}/{VIRTIO_SERIAL}")
        goal = GOALS.get(key)
        met = None
        if goal and ratio is not None:
            met = ratio >= goal[1] if goal[0] == ">=" else ratio <= goal[1]
        better = "lower" if rtt else "higher"
        table.append({"test": kind, "size": size, "unit": "usec" if rtt else "MB/s",
                      "better": better, "channels": chans, "ratio": ratio,
                      "ratio_reads": RATIO_READS[better], "ratios": ratios,
                      "ceiling": chans.get(CEILING, {}).get("stats"),
                      "goal": f"{goal[0]}{goal[1]:g}x" if goal else None, "met": met})
    return table


def _size(size: int | None) -> str:
    if size is None:
        return ""
    for unit, shift in (("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def format_bench_table(rows: Sequence[BenchRow]) -> str:
    """The table as text (bench.txt, the terminal): per channel
    min/median/max, the ratio of the medians and the ceiling beside them."""
    table = bench_table(rows)
    if not table:
        return "bench: no figures"
    chans = _channel_order({c for t in table for c in t["channels"]})
    compared = [c for c in chans if c not in (VIRTIO_SERIAL, CEILING)]
    reps = max((st["n"] for t in table for c in t["channels"].values()
                if (st := c["stats"])), default=0)
    head = ["cell", "unit"] + [f"{c} min/med/max" for c in chans]
    goals = any(t["ratio"] is not None for t in table)   # nothing to hold to a goal without
    head += [f"{c}/{VIRTIO_SERIAL}" for c in compared] + (["goal"] if goals else [])
    lines = [head]

    def cell(c: dict | None) -> str:
        if not c:
            return "-"
        st = c["stats"]
        text = f"{st['min']:.1f} / {st['median']:.1f} / {st['max']:.1f}" if st else "-"
        return text + (f" ({c['failed']} failed)" if c["failed"] else "")

    for t in table:
        line = [f"{t['test']} {_size(t['size'])}".strip(), t["unit"]]
        line += [cell(t["channels"].get(c)) for c in chans]
        line += ["-" if (r := t["ratios"].get(f"{c}/{VIRTIO_SERIAL}")) is None else f"{r:.2f}x"
                 for c in compared]
        goal = t["goal"] or "-"
        if t["met"] is not None:
            goal += " met" if t["met"] else " not met"
        lines.append(line + ([goal] if goals else []))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                      for i, (v, w) in enumerate(zip(line, widths, strict=True))).rstrip()
            for line in lines]
    notes = [f"{reps} repetitions per cell, channels interleaved; min / median / max of them",
             "ratio = vmsocket / virtio-serial of the medians: MB/s higher is better "
             "(> 1: vmsocket faster), rtt64 usec lower is better (< 1: vmsocket faster)"]
    if CEILING in chans:
        notes.append(f"{CEILING} = the ceiling: the same host servers with the same client "
                     "program on the host over AF_UNIX (no QEMU)")
    return "\n".join(notes + text)
