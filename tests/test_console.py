"""The console protocol: parsing what the guest prints."""

from __future__ import annotations

from qemupatch.console import ConsoleFollower, parse_console

CONSOLE = """\
SeaBIOS (version 1.16.2)
[    0.000000] Linux version 6.1.0-56-amd64
QEMUPATCH-GUEST-START kernel=6.1.0-56-amd64 vmsocket_module=1 test_program=1
QEMUPATCH-STEP insmod-virtio PASS
[    1.2] virtio_console: loaded
QEMUPATCH-STEP virtio-serial-echo PASS bytes=26
QEMUPATCH-PCI vmsocket=4
QEMUPATCH-STEP insmod-vmsocket PASS devices=/dev/vmsocket0,/dev/vmsocket1
VMSOCKET-TEST short PASS bytes=15
VMSOCKET-TEST large PASS bytes=3145728 fnv=a1b2c3d4e5f60718 seconds=0.812
VMSOCKET-TEST many-small PASS count=1000 bytes=100321
VMSOCKET-TEST reconnect PASS bytes=15
VMSOCKET-TEST-DONE pass=4 fail=0
VMSOCKET-TEST connect-refused FAIL errno=ENOENT
VMSOCKET-BENCH vmsocket g2h size=65536 bytes=33554432 seconds=0.400 mbps=83.9
VMSOCKET-BENCH virtio-serial g2h size=65536 bytes=33554432 seconds=0.100 mbps=335.5
VMSOCKET-BENCH vmsocket rtt64 count=2000 usec=50.0
VMSOCKET-BENCH virtio-serial rtt64 count=2000 usec=130.0
VMSOCKET-BENCH vmsocket h2g size=4096 FAIL err=EIO
[    9.1] WARNING: CPU: 0 PID: 1 at drivers/misc/kvm_vmsocket.c:100 probe+0x10
QEMUPATCH-GUEST-DONE rc=1
"""


def test_parse_console_reads_every_line_kind():
    r = parse_console(CONSOLE)
    assert r.started and r.kernel == "6.1.0-56-amd64" and r.done_rc == 1
    assert r.vmsocket_pci == 4 and r.selftest_done == (4, 0)
    by = {t.name: t for t in r.tests}
    assert by["large"].status == "pass" and by["large"].get("fnv") == "a1b2c3d4e5f60718"
    assert by["connect-refused"].status == "fail"
    assert by["init.insmod-vmsocket"].get("devices") == "/dev/vmsocket0,/dev/vmsocket1"
    assert r.panic is None
    assert r.kernel_errors == ("WARNING: CPU: 0 PID: 1 at drivers/misc/kvm_vmsocket.c:100 probe+0x10",)
    (bad,) = [b for b in r.bench if b.error]
    assert (bad.channel, bad.kind, bad.size, bad.error) == ("vmsocket", "h2g", 4096, "EIO")


def test_parse_console_finds_panic_and_markers_in_noise():
    r = parse_console("junk\r\n[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n"
                      "\x1b[0mQEMUPATCH-GUEST-START kernel=x\r\n")
    assert r.panic == "Kernel panic - not syncing: VFS: Unable to mount root fs"
    assert r.started and r.done_rc is None


def test_follower_hands_out_whole_lines_only(tmp_path):
    path = tmp_path / "console.log"
    follow = ConsoleFollower(path)
    assert follow.poll() == []                          # not written yet
    path.write_bytes(b"one\r\ntw")
    assert follow.poll() == ["one"]
    with open(path, "ab") as f:
        f.write(b"o\nthree\n")
    assert follow.poll() == ["two", "three"]
    assert follow.tail(2) == "two\nthree"
