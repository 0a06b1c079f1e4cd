"""The guest driver's review tests (docs/vmsocket-driver.md), in a real boot.

``vmsocket-test driver`` runs inside the guest against six vmsocket devices
whose host ends are chosen per test (echo, a silent source, a server that
hangs up at once, a source that floods and so stops reading, a device for
the raw-register "foreign action" tests, a second echo).  The standard
image's ``/init`` (guest.py) is not used: a second cpio appended to the
same initramfs adds ``/driver-init`` and the kernel runs it (``rdinit=``).
Each failing point prints ``VMSOCKET-TEST <name> FAIL ...`` with what it saw.

Run it against another build of the module (e.g. the driver before a fix):
``QEMUPATCH_VMSOCKET_KO=/path/kvm_vmsocket.ko`` with the other QEMUPATCH_*
variables (see guestinputs.py).
"""

from __future__ import annotations

import gzip
import re
import socket
import time
from pathlib import Path

import pytest
from guestinputs import real_image, real_inputs

from qemupatch import console as markers
from qemupatch.boottest import KERNEL_ARGS
from qemupatch.console import ConsoleFollower, panic_line, parse_console
from qemupatch.guest import Cpio, GuestImage
from qemupatch.machine import QemuMachine
from qemupatch.pvh import direct_kernel
from qemupatch.servers import ServerSet

# /dev/vmsocketN order (PCI slot order) and each one's host server.
DEVICES = (("echo", "echo"), ("silent", "source"), ("hangup", "hangup"),
           ("stall", "source"), ("foreign", "source"), ("echo2", "echo"),
           ("lie600", "echo"), ("lie512", "echo"), ("liepos", "echo"),
           ("liewrite0", "echo"), ("lieread513", "echo"))
# The device's test knob (ABI v2 contract, last section): STATUS lies.
DEVICE_PROPS = {"lie600": "x-lie-action=connect,x-lie-status=-600",
                "lie512": "x-lie-action=connect,x-lie-status=-512",
                "liepos": "x-lie-action=connect,x-lie-status=5",
                "liewrite0": "x-lie-action=write,x-lie-status=0",
                "lieread513": "x-lie-action=read,x-lie-status=-513"}
# Run in both modes: the driver's default (stream, where the device has it)...
TESTS = ("open-busy-while-read-blocked", "poll-wakeup-after-write", "nonblock-read-collects",
         "poll-pollout-starts-no-read", "poll-no-pollout-when-peer-stalls",
         "poll-eof-rdhup-hup", "probe-resets-device", "unbind-with-blocked-reader",
         "suspend-closes-connection",
         "close-with-foreign-pending-action", "hammered-device-calls-return",
         "full-duplex-write-while-read-blocked", "stream-integrity-odd-sizes",
         "poll-nonblock-integrity", "host-drop-econnreset")
# ... and again with stream=0 (names end in "@v1"). The STATUS lies run once:
# CONNECT is the same in both modes, the READ/WRITECOMMIT lies switch to v1.
LIE_TESTS = ("lie-connect-below-max-errno", "lie-connect-kernel-internal",
             "lie-connect-positive", "lie-writecommit-zero", "lie-read-kernel-internal")
ALL_TESTS = TESTS + LIE_TESTS + tuple(f"{t}@v1" for t in TESTS)
HOST_DROP = "VMSOCKET-HOST-DROP"
_HOST_DROP = re.compile(rf"{HOST_DROP} (\d+)")

DRIVER_INIT = r"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "{start} kernel=$(uname -r) vmsocket_module=1 test_program=1"
insmod /lib/modules/kvm_vmsocket.ko
n=0
while [ ! -c /dev/vmsocket{last} ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
timeout 900 /bin/vmsocket-test driver {devs} {only}; rc=$?
echo 0 > /sys/module/kvm_vmsocket/parameters/stream
timeout 900 /bin/vmsocket-test driver {devs} {only_v1} || rc=$((rc ? rc : 1))
dmesg | grep -E 'kvm_vmsocket|BUG:|Oops|WARNING:|Call Trace|blocked for more' | head -40 | sed 's/^/{dmesg} /'
echo "{done} rc=$rc"
poweroff -f
"""


def driver_init(only: tuple[str, ...] = ()) -> bytes:
    """The /driver-init script (console markers from qemupatch.console);
    ``only``: run just these tests (default all), stream mode first, then
    those of TESTS again with stream=0."""
    known = TESTS + LIE_TESTS
    unknown = sorted(set(only) - set(known))
    if unknown:
        raise ValueError(f"unknown driver test(s) {unknown}; known: {', '.join(known)}")
    first = only or known
    again = tuple(t for t in first if t in TESTS)
    devs = " ".join(f"/dev/vmsocket{i}" for i in range(len(DEVICES)))
    return DRIVER_INIT.format(start=markers.GUEST_START, done=markers.GUEST_DONE,
                              dmesg=markers.DMESG, last=len(DEVICES) - 1, devs=devs,
                              only=" ".join(first),
                              only_v1=" ".join(again) if again else "no-test").encode()


def appended_initramfs(image: GuestImage, out: Path, name: str,
                       files: dict[str, bytes]) -> Path:
    """``image``'s initramfs with a second archive holding ``files`` (all
    executable) appended (the kernel unpacks concatenated archives in order)."""
    cpio = Cpio()
    for path, data in files.items():
        cpio.file(path, data, 0o755)
    target = out / f"initramfs-{name}.cpio.gz"
    target.write_bytes(image.initramfs.read_bytes()
                       + gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    return target


def driver_initramfs(image: GuestImage, out: Path, only: tuple[str, ...] = ()) -> Path:
    return appended_initramfs(image, out, "driver", {"driver-init": driver_init(only)})


def guest_argv(qemu: Path, image: GuestImage, initrd: Path, console: Path, *, append: str,
               devices: list[tuple[Path, str]], memory: int = 512) -> list[str]:
    """A TCG boot of ``image``'s kernel with ``initrd``, the console in a
    file, and a vmsocket device per ``(socket path, extra properties)`` in
    ``devices``, at slots 0x10, 0x11, ..."""
    argv = [str(qemu), "-accel", "tcg", "-smp", "2", "-m", str(memory), "-nographic",
            "-no-reboot", "-nic", "none", "-L", "/usr/share/qemu", "-L", "/usr/share/seabios",
            "-monitor", "none", "-parallel", "none",
            "-chardev", f"file,id=console0,path={console}", "-serial", "chardev:console0",
            "-kernel", str(direct_kernel(image.kernel)), "-initrd", str(initrd),
            "-append", f"{KERNEL_ARGS} {append}"]
    for i, (path, props) in enumerate(devices):
        argv += ["-device", f"vmsocket,id=vs{i},path={path},addr={0x10 + i:#x}"
                 + (f",{props}" if props else "")]
    return argv


def driver_argv(qemu: Path, image: GuestImage, initrd: Path, paths: dict[str, Path],
                console: Path) -> list[str]:
    devices = [(paths[name], DEVICE_PROPS.get(name, "")) for name, _ in DEVICES]
    return guest_argv(qemu, image, initrd, console, devices=devices,
                      append="iomem=relaxed rdinit=/driver-init")


def host_drops(lines: list[str]) -> list[int]:
    """Device indexes the guest asked to drop (``VMSOCKET-HOST-DROP <i>``)."""
    return [int(m.group(1)) for ln in lines if (m := _HOST_DROP.search(ln))]


def follow_boot(argv: list[str], out: Path, console_path: Path, timeout: float) -> str:
    """Run QEMU until the guest says it is done (or panics, or ``timeout``);
    the console's text.  A guest's ``VMSOCKET-HOST-DROP i`` is answered by
    dropping vs{i}'s connection from the host, as the ABI lets it."""
    follower = ConsoleFollower(console_path)
    with QemuMachine(argv, out, deadline=timeout + 60) as machine:
        machine.launch(30)
        end = time.monotonic() + timeout
        while time.monotonic() < end and machine.poll() is None:
            lines = follower.poll()
            for i in host_drops(lines):      # the host always wins (ABI)
                machine.qmp("qom-set", {"path": f"/machine/peripheral/vs{i}",
                                        "property": "connected", "value": False})
            if any(markers.GUEST_DONE in ln or panic_line(ln) for ln in lines):
                machine.wait(30)
                break
            time.sleep(0.2)
    follower.poll()
    return follower.text


def run_driver_boot(qemu: Path, image: GuestImage, out: Path, timeout: float = 1500,
                    only: tuple[str, ...] = ()):
    """Boot once and run ``vmsocket-test driver``; the parsed console."""
    out.mkdir(parents=True, exist_ok=True)
    initrd = driver_initramfs(image, out, only)
    console_path = out / "console.log"
    console_path.unlink(missing_ok=True)
    with ServerSet(dict(DEVICES)) as servers:
        argv = driver_argv(qemu, image, initrd, servers.paths, console_path)
        return parse_console(follow_boot(argv, out, console_path, timeout))


# ----------------------------------------------------------------- fast


def test_driver_init_runs_every_device():
    text = driver_init().decode()
    assert "/dev/vmsocket0 /dev/vmsocket1" in text and "/dev/vmsocket5" in text
    assert markers.GUEST_DONE in text and markers.GUEST_START in text
    assert "/dev/vmsocket10" in text and "parameters/stream" in text
    one = driver_init(("poll-eof-rdhup-hup",)).decode()
    assert one.count("/dev/vmsocket9 /dev/vmsocket10 poll-eof-rdhup-hup") == 2
    lie = driver_init(("lie-connect-positive",)).decode()
    assert "/dev/vmsocket10 lie-connect-positive" in lie and "/dev/vmsocket10 no-test" in lie
    with pytest.raises(ValueError, match="no-such-test"):
        driver_init(("no-such-test",))


def test_driver_argv_has_the_lie_devices(tmp_path):
    img = GuestImage(kernel=tmp_path / "k", initramfs=tmp_path / "i", kernel_version="x",
                     kernel_name="x", digest="0", modules=(), vmsocket_module=True,
                     test_program=True)
    (tmp_path / "k").write_bytes(b"")
    paths = {name: tmp_path / f"{name}.sock" for name, _ in DEVICES}
    argv = [a for a in driver_argv(Path("qemu"), img, tmp_path / "i", paths, tmp_path / "c")
            if a.startswith("vmsocket,")]
    assert len(argv) == 11
    assert argv[6].endswith(",x-lie-action=connect,x-lie-status=-600")
    assert argv[9].endswith(",x-lie-action=write,x-lie-status=0")
    assert "x-lie" not in argv[0]


def test_host_drops_parses_the_marker():
    assert host_drops(["VMSOCKET-HOST-DROP 0", "x", "[ 1.0] VMSOCKET-HOST-DROP 3\r"]) == [0, 3]
    assert host_drops(["VMSOCKET-HOST-DROP", "VMSOCKET-HOST-DROP x"]) == []


def test_hangup_server_closes_at_once():
    with ServerSet({"h": "hangup"}) as servers:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(servers.paths["h"]))
        assert s.recv(16) == b""             # end of file, no bytes
        s.close()
        for _ in range(50):
            conns = servers.stats("h").connections
            if conns and conns[0].closed:
                break
            time.sleep(0.05)
        assert len(conns) == 1 and conns[0].closed


def test_appended_initramfs_keeps_the_base(tmp_path):
    base = tmp_path / "base.cpio.gz"
    c = Cpio()
    c.file("init", b"#!/bin/sh\n", 0o755)
    base.write_bytes(gzip.compress(c.finish(), mtime=0))
    img = GuestImage(kernel=tmp_path / "k", initramfs=base, kernel_version="x",
                     kernel_name="x", digest="0", modules=(), vmsocket_module=True,
                     test_program=True)
    out = driver_initramfs(img, tmp_path)
    data = out.read_bytes()
    assert data.startswith(base.read_bytes())
    second = gzip.decompress(data[len(base.read_bytes()):])
    assert b"driver-init" in second and b"vmsocket-test driver" in second


# ----------------------------------------------------------------- real


def _check(report, out: Path) -> None:
    got = {t.name: t for t in report.tests}
    failed = [f"{t.name}: {t.line}" for t in report.tests if t.status == "fail"]
    assert report.done_rc is not None, (out / "console.log").read_text()[-3000:]
    assert set(got) == set(ALL_TESTS), sorted(set(ALL_TESTS) ^ set(got))
    assert not failed, "\n".join(failed)
    assert not report.kernel_errors, report.kernel_errors
    assert report.done_rc == 0





@pytest.mark.real
@pytest.mark.timeout(2400)
def test_real_driver_review_points(tmp_path):
    """Every driver review point that a guest can show, in one 6.1 boot."""
    qemu, module, prog = real_inputs()
    img = real_image(module, prog)
    _check(run_driver_boot(qemu, img, tmp_path / "out"), tmp_path / "out")


@pytest.mark.real
@pytest.mark.timeout(2400)
def test_real_driver_review_points_612(tmp_path):
    """The same on Debian's 6.12 kernel, the module built in the trixie container."""
    from qemupatch import build, config, guest
    from qemupatch.runner import Runner

    qemu, _, prog = real_inputs()
    cfg = config.load(Path(__file__).parents[1])
    with Runner.get("auto", cfg.settings) as runner:
        module = build.build_module(cfg.root / "guest" / "kvm_vmsocket", cfg.kernel("6.12"),
                                    tmp_path / "module-6.12", runner=runner,
                                    project_root=cfg.root).binary
    img = guest.make_guest_image(cfg, "6.12", vmsocket_module=module, test_program=prog)
    assert img.kernel_version.startswith("6.12")
    _check(run_driver_boot(qemu, img, tmp_path / "out"), tmp_path / "out")
