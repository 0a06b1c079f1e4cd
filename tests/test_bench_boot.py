"""vmsocket against virtio-serial in one real boot, beside the host
servers' ceiling.  Prints figures; no timed assertions.
Run: pytest -m benchmark -s tests/test_bench_boot.py"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemupatch.boottest import BENCH_REPS, bench_table, format_bench_table, run_boot_test
from guestinputs import real_image, real_inputs, stock_qemu


def _check_table(result, channels: set[str]) -> list[dict]:
    """Every cell has every channel with all its repetitions, and the JSON
    record carries the same table."""
    assert {b.channel for b in result.bench} == channels
    table = bench_table(result.bench)
    assert [(t["test"], t["size"]) for t in table] == [
        ("g2h", 4096), ("g2h", 65536), ("g2h", 1 << 20),
        ("h2g", 4096), ("h2g", 65536), ("h2g", 1 << 20), ("rtt64", None)]
    for t in table:
        for ch in channels:
            st = t["channels"][ch]["stats"]
            assert st["n"] == BENCH_REPS and st["min"] <= st["median"] <= st["max"], (t, ch)
    data = json.loads((result.out_dir / "boot-test.json").read_text())
    assert data["bench_table"] == json.loads(json.dumps(table))
    assert data["bench_info"]["reps"] == BENCH_REPS and data["bench_info"]["smp"] == 2
    assert "host-unix" in (result.out_dir / "bench.txt").read_text()
    return table


@pytest.mark.benchmark
@pytest.mark.real
@pytest.mark.timeout(1800)
def test_bench_vmsocket_vs_virtio_serial(tmp_path):
    qemu, module, prog = real_inputs()
    img = real_image(module, prog)
    lines: list[str] = []
    result = run_boot_test(qemu, img, tmp_path / "out", bench=True, progress=lines.append)
    print()
    print(f"accel={result.accel} kernel={img.kernel_version} qemu={qemu}")
    print(format_bench_table(result.bench))
    # vmsocket-v1 is measured when the driver has its stream parameter.
    v1 = {"vmsocket-v1"} if b"parm=stream:" in module.read_bytes() else set()
    table = _check_table(result, {"vmsocket", "virtio-serial", "host-unix"} | v1)
    assert all(t["ratio"] is not None and t["ceiling"] for t in table)
    assert all(t["ratios"].get("vmsocket-v1/virtio-serial") for t in table) == bool(v1)


@pytest.mark.benchmark
@pytest.mark.real
@pytest.mark.timeout(900)
def test_bench_virtio_serial_on_stock_qemu(tmp_path):
    """The comparator alone, on the distribution's QEMU (no vmsocket)."""
    qemu = stock_qemu()
    img = real_image(None, Path(_prog()))
    result = run_boot_test(Path(qemu), img, tmp_path / "out", bench=True, vmsocket=False,
                           progress=None)
    print()
    print(format_bench_table(result.bench))
    _check_table(result, {"virtio-serial", "host-unix"})
    assert not [b for b in result.bench if b.error]


def _prog() -> Path:
    return real_inputs()[2]
