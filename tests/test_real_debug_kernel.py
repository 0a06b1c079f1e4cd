"""The guest driver under KASAN, lockdep and UBSAN (issue 9 §3).

Debian ships no kernel with these checkers, so qemupatch.debugkernel builds
one from Debian's linux-source-6.1.  Two boots of it: the driver's review
tests (tests/test_real_driver.py) and a stress run (guest/vmsocket-stress.c:
threads sharing a file, signals, killed readers, rmmod while open, unbind
under a blocked read).  Any checker report on the console fails the test.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from guestinputs import real_inputs
from test_real_driver import _check as check_driver_report
from test_real_driver import (
    appended_initramfs,
    follow_boot,
    guest_argv,
    run_driver_boot,
)

from qemupatch import build, config
from qemupatch import console as markers
from qemupatch.console import parse_console
from qemupatch.debugkernel import (
    CONFIG_FRAGMENT,
    REQUIRED,
    build_debug_kernel,
    checker_reports,
    debug_guest_image,
)
from qemupatch.guest import Cpio, GuestImage
from qemupatch.runner import Runner
from qemupatch.servers import ServerSet

REPO = Path(__file__).resolve().parents[1]

STRESS_INIT = r"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "{start} kernel=$(uname -r)"
waitdev() {{ n=0; while [ ! -c $1 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; }}
insmod /lib/modules/kvm_vmsocket.ko
waitdev /dev/vmsocket2
rc=0
/bin/vmsocket-stress run /dev/vmsocket0 /dev/vmsocket2 {seconds} 8 || rc=1
exec 3<>/dev/vmsocket1
if rmmod kvm_vmsocket 2>/dev/null; then
    echo "{test} rmmod-while-open FAIL the module unloaded under an open file"; rc=1
else
    echo "{test} rmmod-while-open PASS refused"
fi
exec 3>&-
if rmmod kvm_vmsocket && insmod /lib/modules/kvm_vmsocket.ko; then
    waitdev /dev/vmsocket2
    echo "{test} rmmod-after-close PASS reloaded"
else
    echo "{test} rmmod-after-close FAIL"; rc=1
fi
/bin/vmsocket-stress unbind /dev/vmsocket1 0000:00:11.0 || rc=1
dmesg | grep -E 'kvm_vmsocket|BUG:|UBSAN:|WARNING:|Oops|locking|blocked for more' | head -60 | sed 's/^/{dmesg} /'
echo "{done} rc=$rc"
poweroff -f
"""
STRESS_TESTS = {"stress-run", "rmmod-while-open", "rmmod-after-close", "stress-unbind"}


def stress_initramfs(image: GuestImage, stress: Path, out: Path, seconds: int) -> Path:
    init = STRESS_INIT.format(start=markers.GUEST_START, done=markers.GUEST_DONE,
                              dmesg=markers.DMESG, test=markers.TEST, seconds=seconds)
    return appended_initramfs(image, out, "stress", {"stress-init": init.encode(),
                                                     "bin/vmsocket-stress": stress.read_bytes()})


def run_stress_boot(qemu: Path, image: GuestImage, stress: Path, out: Path, *,
                    seconds: int = 40, timeout: float = 1200):
    """Boot the debug kernel with the stress init; (report, console text)."""
    out.mkdir(parents=True, exist_ok=True)
    initrd = stress_initramfs(image, stress, out, seconds)
    console = out / "console.log"
    with ServerSet({"echo": "echo", "silent": "source", "echo2": "echo"}) as servers:
        argv = guest_argv(qemu, image, initrd, console, memory=1024,
                          append="rdinit=/stress-init",
                          devices=[(servers.paths[n], "") for n in ("echo", "silent", "echo2")])
        text = follow_boot(argv, out, console, timeout)
    return parse_console(text), text


# ----------------------------------------------------------------- fast


def test_the_fragment_turns_on_every_required_checker():
    options = {line.split("=")[0].removeprefix("CONFIG_") for line in CONFIG_FRAGMENT.splitlines()}
    assert set(REQUIRED) <= options


def test_checker_reports_pick_kasan_lockdep_ubsan_and_warnings():
    console = "\n".join([
        "[    1.0] ok line",
        "[    2.0] BUG: KASAN: slab-use-after-free in vmsocket_read+0x1/0x2",
        "[    3.0] WARNING: possible circular locking dependency detected",
        "[    4.0] UBSAN: array-index-out-of-bounds in drivers/x.c:1:2",
        "[    5.0] INFO: task vmsocket-stress:77 blocked for more than 120 seconds.",
        "VMSOCKET-TEST stress-run PASS ops=10",
    ])
    found = checker_reports(console)
    assert len(found) == 4 and not any("ok line" in f or "PASS" in f for f in found)


def test_stress_init_runs_every_stress_test(tmp_path):
    base = tmp_path / "base.cpio.gz"
    c = Cpio()
    c.file("init", b"#!/bin/sh\n", 0o755)
    base.write_bytes(gzip.compress(c.finish(), mtime=0))
    prog = tmp_path / "vmsocket-stress"
    prog.write_bytes(b"\x7fELF")
    img = GuestImage(kernel=tmp_path / "k", initramfs=base, kernel_version="x",
                     kernel_name="x", digest="0", modules=(), vmsocket_module=True,
                     test_program=True)
    data = stress_initramfs(img, prog, tmp_path, 7).read_bytes()
    second = gzip.decompress(data[len(base.read_bytes()):]).decode(errors="replace")
    assert "vmsocket-stress run /dev/vmsocket0 /dev/vmsocket2 7 8" in second
    for name in STRESS_TESTS - {"stress-run", "stress-unbind"}:
        assert f"{markers.TEST} {name} PASS" in second


# ----------------------------------------------------------------- real


@pytest.fixture(scope="module")
def debug_guest(tmp_path_factory):
    """(qemu, debug-kernel image, vmsocket-stress): the kernel build is
    about 15 min on 2 cores the first time, then reused."""
    cfg = config.load(REPO)
    out = tmp_path_factory.mktemp("debug-kernel")
    qemu, _, prog = real_inputs()
    with Runner.get("auto", cfg.settings) as runner:
        kernel = build_debug_kernel(cfg, cfg.cache_dir / "debug-kernel" / "out", runner)
        stress = build.build_guest_program(REPO / "guest" / "vmsocket-stress.c", out,
                                           runner=runner, project_root=cfg.root).binary
    return qemu, debug_guest_image(cfg, kernel, prog), stress


@pytest.mark.real
@pytest.mark.timeout(5400)
def test_real_driver_review_points_under_kasan_and_lockdep(debug_guest, tmp_path):
    qemu, image, _ = debug_guest
    report = run_driver_boot(qemu, image, tmp_path / "out")
    text = (tmp_path / "out" / "console.log").read_text(errors="replace")
    assert report.kernel == image.kernel_version, "the debug kernel did not boot"
    assert checker_reports(text) == []
    check_driver_report(report, tmp_path / "out")


@pytest.mark.real
@pytest.mark.timeout(3600)
def test_real_driver_stress_under_kasan_and_lockdep(debug_guest, tmp_path):
    qemu, image, stress = debug_guest
    report, text = run_stress_boot(qemu, image, stress, tmp_path / "out")
    print("\n".join(line for line in text.splitlines() if "VMSOCKET-" in line))
    assert report.done_rc is not None, text[-3000:]
    assert report.kernel == image.kernel_version, "the debug kernel did not boot"
    assert checker_reports(text) == []
    got = {t.name: t for t in report.tests}
    assert set(got) == STRESS_TESTS, sorted(got)
    assert not [t.line for t in report.tests if t.status == "fail"]
    assert int(got["stress-run"].get("ops", "0")) > 1000
    assert int(got["stress-run"].get("opens", "0")) > 10, "the open/close race never ran"
