"""Boot-test orchestration: failure classification, records, SIGTERM.

The classification tests run the real boot-test code (host servers, QMP
client, console follower, deadlines) against tests/fakeqemu, a small
process that speaks QMP and plays a console scenario.  The ``real`` tests
boot the patched QEMU with the real guest.  Console parsing is in
test_console.py, the machine alone in test_machine.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from qemupatch import bootreport, boottest
from qemupatch.boottest import (BenchRow, Deadlines, bench_table, format_bench_table,
                                parse_console, run_boot_test)
from qemupatch.errors import (BootDeadline, GuestCrash, GuestTestFailed,
                              QemuStartError, Terminated)
from qemupatch.guest import GuestImage
from guestinputs import real_image, real_inputs, stock_qemu
from test_console import CONSOLE

FAKE = Path(__file__).parent / "fakeqemu" / "qemu-system-x86_64"
FAST = Deadlines(qemu_start=10, kernel_boot=10, tests=10, shutdown=5, idle=10)

def image(tmp_path: Path) -> GuestImage:
    return GuestImage(kernel=tmp_path / "vmlinuz", initramfs=tmp_path / "initrd",
                      kernel_version="6.1.0-56-amd64", kernel_name="6.1", digest="0" * 20,
                      modules=(), vmsocket_module=True, test_program=True)


def fake_run(tmp_path: Path, scenario: str, deadlines: Deadlines = FAST, **kw):
    lines: list[str] = []
    out = tmp_path / "out"
    kw.setdefault("vmsocket", True)
    try:
        result = run_boot_test(FAKE, image(tmp_path), out, accel="tcg", deadlines=deadlines,
                               progress=lines.append,
                               extra_args=["-fake-scenario", scenario], **kw)
        error = None
    except boottest.BootTestError as exc:
        error = exc
        result = exc.result
    data = json.loads((out / "boot-test.json").read_text())
    assert data["schema"] == 1
    ET.parse(out / "boot-test.junit.xml")       # well-formed
    return result, error, lines, out


# ------------------------------------------------------------------ reports

def _reps(channel: str, kind: str, values, size: int | None = 65536) -> list[BenchRow]:
    """One BenchRow per repetition (usec for rtt64, MB/s otherwise)."""
    if kind == "rtt64":
        return [BenchRow(channel, kind, count=2000, usec=v, rep=i) for i, v in enumerate(values)]
    return [BenchRow(channel, kind, size=size, mbps=v, rep=i) for i, v in enumerate(values)]


def test_bench_stats_min_median_max():
    assert bootreport.stats([]) is None
    st = bootreport.stats([5.0, 1.0, 3.0, 9.0])
    assert (st["n"], st["min"], st["median"], st["max"]) == (4, 1.0, 4.0, 9.0)  # even: middle two
    assert bootreport.stats([7.0])["median"] == 7.0


def test_bench_table_ratio_of_medians_and_its_direction():
    rows = (_reps("virtio-serial", "g2h", [100, 400, 110, 90, 105])
            + _reps("vmsocket", "g2h", [210, 230, 20, 250, 220])     # one bad outlier
            + _reps("virtio-serial", "rtt64", [200, 220, 180])
            + _reps("vmsocket", "rtt64", [90, 100, 300])
            + _reps("host-unix", "g2h", [3000, 3100, 2900]))
    g2h, rtt = bench_table(rows)
    # Medians (105, 220) resist the outliers a mean would carry.
    assert g2h["channels"]["virtio-serial"]["stats"]["median"] == 105
    assert g2h["channels"]["vmsocket"]["stats"]["min"] == 20
    assert g2h["ratio"] == pytest.approx(220 / 105, abs=1e-3)
    assert g2h["better"] == "higher" and g2h["goal"] == ">=2x" and g2h["met"] is True
    # rtt: usec, lower is better; the ratio is still vmsocket/virtio-serial.
    assert rtt["unit"] == "usec" and rtt["better"] == "lower"
    assert rtt["ratio"] == pytest.approx(100 / 200)
    assert rtt["goal"] == "<=0.5x" and rtt["met"] is True
    assert "below 1 vmsocket is faster" in rtt["ratio_reads"]
    assert g2h["ceiling"]["median"] == 3000 and rtt["ceiling"] is None
    assert list(g2h["channels"]) == ["vmsocket", "virtio-serial", "host-unix"]


def test_bench_table_failed_reps_counted_not_averaged():
    rows = _reps("vmsocket", "h2g", [300, 310]) + [
        BenchRow("vmsocket", "h2g", size=65536, error="EIO", rep=2)]
    rows += _reps("virtio-serial", "h2g", [100, 100, 100])
    (row,) = bench_table(rows)
    vs = row["channels"]["vmsocket"]
    assert vs["stats"]["n"] == 2 and vs["failed"] == 1 and vs["errors"] == ["EIO"]
    assert row["ratio"] == pytest.approx(3.05)
    assert "(1 failed)" in format_bench_table(rows)


def test_bench_table_missing_side_and_console_rows():
    (row,) = bench_table([BenchRow("vmsocket", "h2g", size=1024, mbps=10.0)])
    assert row["channels"]["vmsocket"]["stats"]["median"] == 10.0
    assert "virtio-serial" not in row["channels"] and row["ratio"] is None and row["met"] is None
    table = {(t["test"], t["size"]): t for t in bench_table(parse_console(CONSOLE).bench)}
    assert table[("g2h", 65536)]["ratio"] == pytest.approx(83.9 / 335.5, abs=1e-3)
    assert table[("h2g", 4096)]["channels"]["vmsocket"]["stats"] is None   # its one row failed


def test_format_bench_table_with_v1_and_ceiling():
    rows = (_reps("vmsocket", "h2g", [400, 420, 410]) + _reps("vmsocket-v1", "h2g", [200, 210, 190])
            + _reps("virtio-serial", "h2g", [100, 105, 95]) + _reps("host-unix", "h2g", [3000] * 3)
            + _reps("vmsocket", "rtt64", [50, 60, 55]) + _reps("virtio-serial", "rtt64", [200] * 3))
    text = format_bench_table(rows)
    head = next(line for line in text.splitlines() if line.startswith("cell"))
    assert head.index("vmsocket min/med/max") < head.index("vmsocket-v1 min/med/max") \
        < head.index("virtio-serial min/med/max") < head.index("host-unix min/med/max")
    assert "vmsocket/virtio-serial" in head and "vmsocket-v1/virtio-serial" in head
    h2g = next(line for line in text.splitlines() if line.startswith("h2g 64K"))
    assert "400.0 / 410.0 / 420.0" in h2g and "3000.0 / 3000.0 / 3000.0" in h2g
    assert "4.10x" in h2g and "2.00x" in h2g and ">=2x met" in h2g
    rtt = next(line for line in text.splitlines() if line.startswith("rtt64"))
    assert "0.28x" in rtt and "<=0.5x met" in rtt
    assert "3 repetitions per cell" in text and "lower is better" in text
    assert "host-unix = the ceiling" in text
    alone = format_bench_table(_reps("virtio-serial", "h2g", [1.0]) + _reps("host-unix", "h2g", [9.0]))
    assert "goal" not in alone and "virtio-serial min/med/max" in alone    # stock QEMU: no ratio


def test_bench_junit_one_case_per_channel_and_cell():
    rows = _reps("vmsocket", "g2h", [1, 2]) + [BenchRow("vmsocket", "g2h", size=65536,
                                                        error="EPIPE", rep=2)]
    rows += _reps("virtio-serial", "g2h", [1, 2, 3])
    cases = {c.name: c for c in bootreport.junit_cases([], bench=rows)}
    assert set(cases) == {"vmsocket.g2h.65536", "virtio-serial.g2h.65536"}
    assert cases["vmsocket.g2h.65536"].status == "fail"
    assert cases["vmsocket.g2h.65536"].detail == "EPIPE"
    assert cases["virtio-serial.g2h.65536"].status == "pass"


def test_qemu_argv_both_spellings(tmp_path):
    paths = {n: tmp_path / f"{n}.sock" for n in
             ("echo", "refused", "sink", "source", "vs-echo", "vs-sink", "vs-source")}
    common = dict(accel="tcg", console=tmp_path / "c", paths=paths,
                  vmsocket=True, append="console=ttyS0")
    opt = boottest.qemu_argv(Path("q"), image(tmp_path), spelling="option", **common)
    assert [opt[i + 1] for i, a in enumerate(opt) if a == "-vmsocket"] == [
        f"unix:{paths[n]}" for n in ("echo", "refused", "sink", "source")]
    dev = boottest.qemu_argv(Path("q"), image(tmp_path), spelling="device", **common)
    vms = [dev[i + 1] for i, a in enumerate(dev) if a == "-device" and dev[i + 1].startswith("vmsocket")]
    assert vms[1] == f"vmsocket,id=vmsocket1,path={paths['refused']},addr=0x11"
    assert "-vmsocket" not in dev
    for needed in ("-no-reboot", "-nographic", "-S"):
        assert needed in opt
    assert "-mon" not in opt          # QemuMachine adds QMP on its socketpair
    with pytest.raises(ValueError):
        boottest.qemu_argv(Path("q"), image(tmp_path), spelling="bogus", **common)


def test_qemu_argv_bench_adds_the_v1_devices(tmp_path):
    """A benchmark boot has /dev/vmsocket4..6 (vmsocket-v1) after the four."""
    names = boottest.vmsocket_servers(True)
    assert names[:4] == boottest.VMSOCKET_SERVERS and len(names) == 7
    paths = {n: tmp_path / f"{n}.sock" for n in names + ("vs-echo", "vs-sink", "vs-source")}
    dev = boottest.qemu_argv(Path("q"), image(tmp_path), accel="tcg", console=tmp_path / "c",
                             paths=paths, vmsocket=True, append="", spelling="device",
                             bench=True)
    vms = [dev[i + 1] for i, a in enumerate(dev) if a == "-device" and dev[i + 1].startswith("vmsocket")]
    assert vms[4:] == [f"vmsocket,id=vmsocket{i},path={paths[n]},addr={0x10 + i:#x}"
                       for i, n in enumerate(names) if i >= 4]
    found = [{"slot": 0x10 + i, "qdev_id": f"vmsocket{i}"} for i in range(7)]
    assert boottest._check_pci(found, "device", 7) is None
    assert "expected 4" in boottest._check_pci(found, "option")


# ---------------------------------------------------------- classification

def test_fake_ok_passes_and_keeps_artifacts(tmp_path):
    result, error, lines, out = fake_run(tmp_path, "ok")
    assert error is None and result.ok and result.exit_code == 0
    assert [s.status for s in result.stages] == ["pass"] * 4
    for name in ("console.log", "qemu.log", "qmp.jsonl", "qemu.cmdline", "query-pci.json"):
        assert (out / name).is_file(), name
    transcript = [json.loads(l) for l in (out / "qmp.jsonl").read_text().splitlines()]
    assert [t["msg"]["execute"] for t in transcript if t["kind"] == "command"] == ["query-pci", "cont"]
    data = json.loads((out / "boot-test.json").read_text())
    assert data["status"] == "done" and data["ok"] is True
    assert not list(out.glob(".*.tmp"))           # written atomically
    assert any("kernel-boot: done" in l for l in lines)
    junit = ET.parse(out / "boot-test.junit.xml").getroot()
    assert junit.get("failures") == "0"
    assert {"qmp.query-pci", "guest-pci-matches-qmp"} <= {c.name for c in result.checks}


def test_out_dir_with_a_comma(tmp_path):
    """QEMU options split on commas: the console path must be escaped."""
    odd = tmp_path / "a,b"
    odd.mkdir()
    result, error, _, out = fake_run(odd, "ok")
    assert error is None and (out / "console.log").read_text().startswith("[")


def test_fake_ok_device_spelling(tmp_path):
    result, error, _, _ = fake_run(tmp_path, "ok", spelling="device")
    assert error is None and result.spelling == "device"


def test_panic_with_exit_zero_is_a_crash(tmp_path):
    result, error, _, _ = fake_run(tmp_path, "panic")
    assert isinstance(error, GuestCrash) and error.exit_code == 22
    assert "Kernel panic - not syncing: Attempted to kill init!" in str(error)
    assert not result.ok and result.failure == "GuestCrash"


def test_qemu_signal_is_a_crash(tmp_path):
    _, error, _, _ = fake_run(tmp_path, "segv")
    assert isinstance(error, GuestCrash) and "SIGSEGV" in str(error)


def test_qemu_nonzero_exit_is_a_crash(tmp_path):
    _, error, _, _ = fake_run(tmp_path, "exit3")
    assert isinstance(error, GuestCrash) and "status 3" in str(error)


def test_exit_without_done_marker_is_a_crash(tmp_path):
    result, error, _, _ = fake_run(tmp_path, "nodone")
    assert isinstance(error, GuestCrash) and "done marker" in str(error)
    assert {s.name: s.status for s in result.stages}["guest-tests"] == "fail"


def test_silent_guest_trips_the_watchdog(tmp_path):
    dl = Deadlines(qemu_start=10, kernel_boot=30, tests=30, shutdown=5, idle=1.5)
    result, error, _, _ = fake_run(tmp_path, "silent-hang", dl)
    assert isinstance(error, BootDeadline) and error.exit_code == 24
    assert "no console output for 2 s" in str(error) and "kernel-boot" in str(error)
    assert result.qemu_exit.startswith("killed by qemupatch")


def test_chatty_guest_hits_the_stage_deadline(tmp_path):
    dl = Deadlines(qemu_start=10, kernel_boot=10, tests=2, shutdown=5, idle=1)
    _, error, _, _ = fake_run(tmp_path, "chatty-forever", dl)
    assert isinstance(error, BootDeadline) and "guest-tests ran past its 2 s deadline" in str(error)


def test_no_poweroff_hits_the_shutdown_deadline(tmp_path):
    dl = Deadlines(qemu_start=10, kernel_boot=10, tests=10, shutdown=1, idle=10)
    result, error, _, _ = fake_run(tmp_path, "no-poweroff", dl)
    assert isinstance(error, BootDeadline) and "power off" in str(error)
    assert result.guest_rc == 0


def test_failed_guest_test(tmp_path):
    _, error, _, _ = fake_run(tmp_path, "testfail")
    assert isinstance(error, GuestTestFailed) and error.exit_code == 23
    assert "large" in str(error)


def test_kernel_oops_fails_even_if_tests_pass(tmp_path):
    _, error, _, _ = fake_run(tmp_path, "oops")
    assert isinstance(error, GuestTestFailed) and "NULL pointer" in str(error)


def test_guest_pass_the_host_did_not_see_fails(tmp_path):
    result, error, _, _ = fake_run(tmp_path, "large-unseen")
    assert isinstance(error, GuestTestFailed)
    (check,) = [c for c in result.checks if c.name == "host-echo-large"]
    assert check.status == "fail" and "0123456789abcdef" in check.detail


def test_qemu_that_does_not_start(tmp_path):
    result, error, _, out = fake_run(tmp_path, "badstart")
    assert isinstance(error, QemuStartError) and error.exit_code == 21
    assert "invalid option" in str(error)        # QEMU's own words in the message
    assert [s.status for s in result.stages] == ["fail", "skip", "skip", "skip"]


def test_missing_vmsocket_devices_is_a_start_error(tmp_path):
    _, error, _, _ = fake_run(tmp_path, "nodevices")
    assert isinstance(error, QemuStartError) and "expected 4 vmsocket" in str(error)


@pytest.mark.parametrize("stage", ["qemu-start", "kernel-boot", "guest-tests", "shutdown"])
def test_sigterm_at_any_stage_cleans_up_and_says_where(tmp_path, stage, monkeypatch):
    """A Terminated (the SIGTERM handler raises it in the main thread) goes
    through; QEMU and the servers are gone and boot-test.json says where."""
    server_dirs = []
    real_start = boottest.ServerSet.start

    def start(self):
        real_start(self)
        server_dirs.append(self.dir)

    monkeypatch.setattr(boottest.ServerSet, "start", start)

    def progress(msg: str) -> None:
        if f"] {stage}: " in msg:
            raise Terminated(15)

    out = tmp_path / "out"
    with pytest.raises(Terminated):
        run_boot_test(FAKE, image(tmp_path), out, accel="tcg", deadlines=FAST,
                      progress=progress, extra_args=["-fake-scenario", "no-poweroff"])
    data = json.loads((out / "boot-test.json").read_text())
    assert (data["status"], data["stage"], data["ok"]) == ("terminated", stage, False)
    assert "SIGTERM" in data["message"]
    junit = ET.parse(out / "boot-test.junit.xml").getroot()
    assert "terminated during " + stage in junit.find("system-err").text
    assert server_dirs and not server_dirs[0].exists()
    assert str(out / "console.log") not in _processes()


def _processes() -> str:
    return subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True,
                          timeout=10).stdout


def test_no_qemu_survives_the_run(tmp_path):
    """After a watchdog kill, no fake QEMU of this test is left running."""
    dl = Deadlines(qemu_start=10, kernel_boot=30, tests=30, shutdown=5, idle=1)
    fake_run(tmp_path, "silent-hang", dl)
    assert str(tmp_path / "out" / "console.log") not in _processes()


# -------------------------------------------------------------------- real

@pytest.mark.real
@pytest.mark.timeout(900)
@pytest.mark.parametrize("spelling", ["option", "device"])
def test_real_boot_patched_qemu(tmp_path, spelling):
    qemu, module, prog = real_inputs()
    img = real_image(module, prog)
    lines: list[str] = []
    result = run_boot_test(qemu, img, tmp_path / "out", spelling=spelling,
                           progress=lines.append)
    print("\n".join(lines))
    names = {t.name: t.status for t in result.tests}
    for name in ("short", "large", "many-small", "reconnect", "connect-refused",
                 "signal-interrupts-read", "init.virtio-serial-echo", "init.vmsocket-shell-echo"):
        assert names.get(name) == "pass", (name, names)
    assert {c.name: c.status for c in result.checks}["host-echo-large"] == "pass"


@pytest.mark.real
@pytest.mark.timeout(600)
def test_real_boot_stock_qemu_without_vmsocket(tmp_path):
    qemu = stock_qemu()
    img = real_image(None, None)
    result = run_boot_test(Path(qemu), img, tmp_path / "out", vmsocket=False,
                           progress=None)
    assert result.ok and result.guest_rc == 0
    assert {t.name: t.status for t in result.tests}["init.virtio-serial-echo"] == "pass"
    assert result.servers["vs-echo"]["bytes_in"] > 0


def _boot_in_a_child(tmp_path: Path) -> tuple[subprocess.Popen, Callable[[], list[str]]]:
    """A qemupatch process booting the fake QEMU into a silent guest, as the
    CLI runs it (SIGTERM raises Terminated), once its QEMU is up; and a
    function listing that fake QEMU in ``ps``."""
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from pathlib import Path
from qemupatch.boottest import Deadlines, run_boot_test
from qemupatch.errors import Terminated
from qemupatch.guest import GuestImage
from qemupatch.lifecycle import stop_on_signals
img = GuestImage(Path('k'), Path('i'), 'v', 'n', 'd', (), True, True)
try:
    with stop_on_signals():
        run_boot_test(Path({str(FAKE)!r}), img, Path({str(tmp_path / 'out')!r}), accel='tcg',
                      deadlines=Deadlines(kernel_boot=300, idle=300),
                      extra_args=['-fake-scenario', 'silent-hang'])
except Terminated as exc:
    sys.exit(exc.exit_code)
"""
    # TMPDIR: a killed process cannot remove its server folder; keep it in tmp_path
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    console = tmp_path / "out" / "console.log"

    def fakes() -> list[str]:
        return [line for line in _processes().splitlines() if str(console) in line]

    deadline = time.monotonic() + 30
    while not (console.exists() and console.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert console.exists(), "fake QEMU never started"
    assert fakes()
    return proc, fakes


def _gone(fakes: Callable[[], list[str]]) -> bool:
    deadline = time.monotonic() + 10
    while fakes() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not fakes()


def test_qemu_dies_with_a_killed_qemupatch(tmp_path):
    """kill -9 of the process running the boot test takes its QEMU along."""
    proc, fakes = _boot_in_a_child(tmp_path)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _gone(fakes)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigterm_stops_qemu_removes_the_servers_and_records_where(tmp_path):
    proc, fakes = _boot_in_a_child(tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert _gone(fakes)
        assert not list(tmp_path.glob("qemupatch-srv-*"))
        data = json.loads((tmp_path / "out" / "boot-test.json").read_text())
        assert (data["status"], data["stage"]) == ("terminated", "kernel-boot")
        assert [s["name"] for s in data["stages"]] == ["qemu-start"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.real
@pytest.mark.timeout(1800)
def test_real_boot_trixie_612_guest(tmp_path):
    """The driver on Debian's 6.12 kernel, built with trixie's compiler in
    the trixie container, in a real boot of the patched QEMU."""
    from qemupatch import build, config, guest
    from qemupatch.runner import Runner

    qemu, _, prog = real_inputs()
    cfg = config.load(Path(__file__).parents[1])
    kernel = cfg.kernel("6.12")
    with Runner.get("auto", cfg.settings) as runner:
        module = build.build_module(cfg.root / "guest" / "kvm_vmsocket", kernel,
                                    tmp_path / "module-6.12", runner=runner,
                                    project_root=cfg.root).binary
    img = guest.make_guest_image(cfg, "6.12", vmsocket_module=module, test_program=prog)
    assert img.kernel_version.startswith("6.12")
    result = run_boot_test(qemu, img, tmp_path / "out", progress=None)
    names = {t.name: t.status for t in result.tests}
    for name in ("short", "large", "many-small", "reconnect", "connect-refused",
                 "signal-interrupts-read"):
        assert names.get(name) == "pass", (name, names)
    assert result.ok
