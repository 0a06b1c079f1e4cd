"""The benchmark's host side (qemupatch.bench) and the guest program's bench
loop, run on the host over real UNIX sockets against the real servers."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from qemupatch import bench
from qemupatch.bootreport import bench_table
from qemupatch.console import parse_console
from qemupatch.guest import Cpio
from qemupatch.servers import ServerSet

REPO = Path(__file__).resolve().parents[1]
KINDS = {"echo": "echo", "sink": "sink", "source": "source"}


def initramfs(path: Path, files: dict[str, bytes]) -> Path:
    cpio = Cpio()
    cpio.dir("bin")
    for name, data in files.items():
        cpio.file(name, data, 0o755)
    path.write_bytes(gzip.compress(cpio.finish()))
    return path


def test_initramfs_file_finds_a_member(tmp_path):
    img = initramfs(tmp_path / "i.gz", {"bin/a": b"x" * 5, "bin/vmsocket-test": b"prog\0\1"})
    assert bench.initramfs_file(img, "bin/vmsocket-test") == b"prog\0\1"
    assert bench.initramfs_file(img, "/bin/a") == b"xxxxx"
    assert bench.initramfs_file(img, "bin/none") is None


def test_ceiling_without_the_program_is_a_failed_row(tmp_path):
    img = initramfs(tmp_path / "i.gz", {"bin/other": b""})
    (row,) = bench.run_ceiling(img, {}, tmp_path, reps=1, timeout=10)
    assert row.channel == "host-unix" and "no bin/vmsocket-test" in row.error
    (row,) = bench.run_ceiling(tmp_path / "missing.gz", {}, tmp_path, reps=1, timeout=10)
    assert row.error and "missing.gz" in row.error


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    """vmsocket-test built on the host as the guest's is (static)."""
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed (ci/setup-debian.sh installs it)"
    out = tmp_path_factory.mktemp("prog") / "vmsocket-test"
    subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-static", "-o", out,
                    REPO / "guest" / "vmsocket-test.c", "-lpthread"], check=True, timeout=120)
    return out


@pytest.mark.real
def test_bench_interleaves_channels_and_rotates_the_order(program):
    """Two channels, two repetitions: every cell takes turns, the first
    channel of a cell changes with the repetition, each row says its rep."""
    with ServerSet(KINDS, fnv_limit=0) as s:
        dev = [f"unix:{s.paths[k]}" for k in ("echo", "sink", "source")]
        done = subprocess.run([program, "bench", "2", "a", *dev, "b", *dev],
                              capture_output=True, text=True, timeout=600)
        sink = s.stats("sink")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = parse_console(done.stdout).bench
    assert not [r for r in rows if r.error]
    cells = [(r.kind, r.size) for r in rows]
    assert len(rows) == 2 * 2 * 7
    order = [(r.rep, r.channel) for r in rows]
    assert order[:2] == [(0, "a"), (0, "b")] and order[14:16] == [(1, "b"), (1, "a")]
    assert cells[:2] == [("g2h", 4096)] * 2 and cells[12:14] == [("rtt64", None)] * 2
    assert len(sink.connections) == 2        # each channel's sink opened once for the run
    for t in bench_table(rows):
        assert t["channels"]["a"]["stats"]["n"] == 2 and t["channels"]["b"]["stats"]["n"] == 2


@pytest.mark.real
def test_ceiling_runs_the_initramfs_program(program, tmp_path):
    img = initramfs(tmp_path / "i.gz", {"bin/vmsocket-test": program.read_bytes()})
    with ServerSet(KINDS, fnv_limit=0) as s:
        rows = bench.run_ceiling(img, s.paths, tmp_path, reps=1, timeout=300)
        source = s.stats("source")
    assert not [r for r in rows if r.error], rows
    assert {r.channel for r in rows} == {"host-unix"}
    assert sorted((r.kind, r.size or 0) for r in rows) == sorted(
        [("g2h", n) for n in (4096, 65536, 1 << 20)] + [("h2g", n) for n in (4096, 65536, 1 << 20)]
        + [("rtt64", 0)])
    assert source.bytes_out >= 3 * (32 << 20)
    assert all(r.mbps and r.mbps > 0 for r in rows if r.kind != "rtt64")
