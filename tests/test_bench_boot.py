"""vmsocket against virtio-serial in one real boot.  Prints figures; no
timed assertions.  Run: pytest -m benchmark -s tests/test_bench_boot.py"""

from __future__ import annotations

from pathlib import Path

import pytest

from qemupatch.boottest import bench_table, format_bench_table, run_boot_test
from guestinputs import real_image, real_inputs, stock_qemu


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
    channels = {b.channel for b in result.bench}
    assert channels == {"vmsocket", "virtio-serial"}, channels
    assert all(r["ratio"] is not None for r in bench_table(result.bench))


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
    assert {b.channel for b in result.bench} == {"virtio-serial"}
    assert not [b for b in result.bench if b.error]


def _prog() -> Path:
    return real_inputs()[2]
