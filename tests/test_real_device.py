"""The vmsocket device's command-line and QMP surface, on the patched QEMU
built from patches/ (the guest-side behaviour is in test_boottest.py)."""

import subprocess

import pytest

from qemupatch.machine import QemuMachine
from guestinputs import device_qtest, real_inputs

pytestmark = pytest.mark.real

ROMS = ["-L", "/usr/share/qemu", "-L", "/usr/share/seabios"]


def qemu(*args, timeout=60):
    return subprocess.run([str(real_inputs()[0]), *ROMS, *args], capture_output=True,
                          text=True, timeout=timeout)


def test_vmsocket_help_explains_the_syntax():
    res = qemu("-vmsocket", "help")
    assert res.returncode == 0
    assert "unix:" in res.stdout + res.stderr


@pytest.mark.parametrize("spec", ["tcp:127.0.0.1:5", "unix:", "unix:/" + "x" * 200, "garbage"])
def test_bad_spec_is_a_startup_error_naming_it(spec):
    res = qemu("-machine", "none", "-display", "none", "-vmsocket", spec)
    assert res.returncode != 0
    shown = spec if len(spec) < 60 else "too long"
    assert shown in res.stderr, res.stderr


@pytest.mark.parametrize("props,needle", [("bufsize=5000,path=/tmp/x", "bufsize"),
                                          ("bufsize=4096", "path"),
                                          ("path=/tmp/x,x-lie-action=open", "x-lie-action")])
def test_bad_device_properties(props, needle):
    res = qemu("-machine", "q35", "-accel", "tcg", "-display", "none", "-S", "-nodefaults",
               "-device", f"vmsocket,{props}")
    assert res.returncode != 0 and needle in res.stderr, res.stderr


def _pci_vmsockets(machine: QemuMachine) -> list[dict]:
    found = []
    for bus in machine.qmp("query-pci"):
        for dev in bus["devices"]:
            ident = dev["id"]
            if (ident["vendor"], ident["device"]) == (0x1AF4, 0x10F0):
                found.append(dev)
    return found


def test_option_readconfig_and_qmp_hotplug(tmp_path):
    """Every way in makes the same device: -vmsocket, -readconfig [device],
    and QMP device_add / device_del while the machine runs."""
    conf = tmp_path / "vm.cfg"
    conf.write_text(f'[device "fromconfig"]\n  driver = "vmsocket"\n'
                    f'  path = "{tmp_path}/b.sock"\n')
    argv = [str(real_inputs()[0]), *ROMS, "-machine", "pc", "-accel", "tcg",
            "-display", "none", "-nodefaults", "-S",
            "-vmsocket", f"unix:{tmp_path}/a.sock", "-readconfig", str(conf)]
    with QemuMachine(argv, tmp_path, deadline=120) as machine:
        machine.launch(30)
        assert len(_pci_vmsockets(machine)) == 2
        machine.qmp("device_add", {"driver": "vmsocket", "id": "hot",
                                   "path": f"{tmp_path}/c.sock", "bus": "pci.0",
                                   "addr": "0x10"})
        devices = _pci_vmsockets(machine)
        assert len(devices) == 3
        assert {d["class_info"]["class"] for d in devices} == {0x0780}
        # BAR0 registers, BAR1/BAR2 buffers, BAR3 the stream control page
        assert [sorted((r["bar"], r["size"]) for r in d["regions"]) for d in devices] \
            == [[(0, 256), (1, 1 << 20), (2, 1 << 20), (3, 4096)]] * 3
        qexit = machine.shutdown()
    assert (qexit.returncode, qexit.how) == (0, "quit"), qexit


def test_stream_off_is_the_version_1_device(tmp_path):
    """stream=off has no BAR3 (and revision 1, checked by the qtest), so
    that it migrates to QEMUs whose vmsocket predates stream mode."""
    argv = [str(real_inputs()[0]), *ROMS, "-machine", "pc", "-accel", "tcg",
            "-display", "none", "-nodefaults", "-S",
            "-device", f"vmsocket,id=v2,path={tmp_path}/a.sock,addr=0x4",
            "-device", f"vmsocket,id=v1,path={tmp_path}/b.sock,addr=0x5,stream=off"]
    with QemuMachine(argv, tmp_path, deadline=120) as machine:
        machine.launch(30)
        devices = {d["slot"]: d for d in _pci_vmsockets(machine)}
        assert sorted(r["bar"] for r in devices[4]["regions"]) == [0, 1, 2, 3]
        assert sorted(r["bar"] for r in devices[5]["regions"]) == [0, 1, 2]
        qexit = machine.shutdown()
    assert (qexit.returncode, qexit.how) == (0, "quit"), qexit


@pytest.mark.timeout(1800)
def test_the_series_own_qtest(tmp_path):
    """tests/qtest/vmsocket-test from the series: identity, every error
    code, odd widths, round trips, a READ pending while QMP answers, INTx
    and MSI, 3000 random register accesses, hotplug, and what the host
    controls (qom-set connected false, migration drops a connection, 8-byte
    accesses, relative paths, buffers cleared), and stream mode (ABI v2:
    negotiation, echo through both rings, a full ring and its doorbell,
    interrupt suppression, hostile indices, host drop, migration) and the
    x-lie knob; built with QEMU and run against it."""
    qemu, qtest = device_qtest()
    wrapper = tmp_path / "qemu-system-x86_64"
    wrapper.write_text(f'#!/bin/sh\nexec {qemu} {" ".join(ROMS)} "$@"\n')
    wrapper.chmod(0o755)
    res = subprocess.run([str(qtest), "--tap", "-k"], capture_output=True, text=True,
                         timeout=1500, env={"PATH": "/usr/bin:/bin",
                                            "QTEST_QEMU_BINARY": str(wrapper)})
    print(res.stdout[-4000:], res.stderr[-4000:])
    assert res.returncode == 0
    oks = [line for line in res.stdout.splitlines() if line.startswith("ok ")]
    assert len(oks) >= 26 and "not ok" not in res.stdout
    assert "/vmsocket/stream/hostile" in res.stdout and "/vmsocket/stream/off" in res.stdout
