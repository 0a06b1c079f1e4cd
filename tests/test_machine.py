"""QemuMachine against tests/fakeqemu: QMP over a socketpair, shutdown,
the Runstate guard; and the accel probe's cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemupatch import machine
from qemupatch.errors import QemuStartError
from qemupatch.machine import MachineStateError, QemuMachine, Runstate, probe_accel

FAKE = Path(__file__).parent / "fakeqemu" / "qemu-system-x86_64"


def fake_argv(tmp_path: Path, scenario: str) -> list[str]:
    return [str(FAKE), "-chardev", f"file,id=console0,path={tmp_path / 'console.log'}",
            "-vmsocket", "unix:/x", "-fake-scenario", scenario]


def test_launch_qmp_and_quit(tmp_path):
    with QemuMachine(fake_argv(tmp_path, "no-poweroff"), tmp_path, deadline=60) as m:
        m.launch(10)
        assert m.state is Runstate.RUNNING
        pci = m.qmp("query-pci")
        assert [d["id"]["device"] for d in pci[0]["devices"]] == [0x1237, 0x10F0]
        m.qmp("cont")
        qexit = m.shutdown()
    assert m.state is Runstate.SHUTDOWN
    assert (qexit.returncode, qexit.killed_by_us, qexit.how) == (0, True, "quit")
    assert "fd=" in (tmp_path / "qemu.cmdline").read_text()
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "qmp.jsonl").read_text().splitlines()]
    assert kinds[0] == "greeting" and kinds.count("command") == 3       # query-pci, cont, quit


def test_qemu_that_exits_by_itself_is_not_killed_by_us(tmp_path):
    with QemuMachine(fake_argv(tmp_path, "nodone"), tmp_path, deadline=60) as m:
        m.launch(10)
        m.qmp("cont")
        assert m.wait(10) == 0
    assert m.exit.describe() == "QEMU exited with status 0"


def test_the_runstate_guard(tmp_path):
    m = QemuMachine(fake_argv(tmp_path, "ok"), tmp_path, deadline=60)
    with pytest.raises(MachineStateError, match="qmp.*idle"):
        m.qmp("query-pci")
    m.launch(10)
    with pytest.raises(MachineStateError, match="launch.*running"):
        m.launch(10)
    m.shutdown()
    with pytest.raises(MachineStateError, match=r"qmp\('query-pci'\).*shutdown"):
        m.qmp("query-pci")
    assert m.shutdown() is m.exit                     # a second shutdown does nothing


def test_start_failure_carries_qemus_words(tmp_path):
    with QemuMachine(fake_argv(tmp_path, "badstart"), tmp_path, deadline=60) as m:
        with pytest.raises(QemuStartError) as info:
            m.launch(10)
    assert "status 1 during start-up" in str(info.value)
    assert "invalid option" in str(info.value) and m.state is Runstate.SHUTDOWN


def test_silent_qmp_is_a_start_error_and_qemu_is_stopped(tmp_path):
    with QemuMachine(fake_argv(tmp_path, "qmp-silent"), tmp_path, deadline=60) as m:
        with pytest.raises(QemuStartError, match="QMP did not answer within 1 s"):
            m.launch(1)
    assert m.exit.killed_by_us and m.exit.how == "killed" and m.poll() is not None


def test_deadline_stops_qemu(tmp_path):
    with QemuMachine(fake_argv(tmp_path, "no-poweroff"), tmp_path, deadline=1) as m:
        m.launch(10)
        m.qmp("cont")
        assert m.wait(15) is not None
    assert m.exit.killed_by_us and m.exit.how == "deadline"


def test_never_launched(tmp_path):
    with QemuMachine(["/nonexistent/qemu"], tmp_path, deadline=60) as m:
        with pytest.raises(QemuStartError, match="could not run"):
            m.launch(5)
    assert m.exit.describe() == "QEMU never started"


def test_accel_probe_is_paid_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(machine.os, "access", lambda *_: True)
    monkeypatch.setattr(machine, "_probe", lambda *a: calls.append(a) or "tcg")
    machine._probe_cached.cache_clear()
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    cache = tmp_path / "cache"
    assert probe_accel(FAKE, kernel, cache_dir=cache) == "tcg"
    assert probe_accel(FAKE, kernel, cache_dir=cache) == "tcg"
    machine._probe_cached.cache_clear()                # a later process
    assert probe_accel(FAKE, kernel, cache_dir=cache) == "tcg"
    assert len(calls) == 1
    kernel.write_bytes(b"another kernel")
    probe_accel(FAKE, kernel, cache_dir=cache)
    assert len(calls) == 2
