"""The process edge: run(), spawn(), and SIGTERM/SIGINT as a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qemupatch.errors import CommandFailed, CommandTimeout
from qemupatch.records import Case, atomic_write, junit_xml, utc_now
from qemupatch.run import run, spawn


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_run_timeout_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "grandchild"
    with pytest.raises(CommandTimeout) as info:
        run(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], timeout=1)
    assert "deadline" in str(info.value)
    assert _wait_gone(int(pidfile.read_text()))


def test_run_failure_carries_the_output():
    with pytest.raises(CommandFailed) as info:
        run(["sh", "-c", "echo oops >&2; exit 7"], timeout=10)
    assert info.value.returncode == 7 and "oops" in info.value.output
    assert info.value.exit_code == 3


def test_spawn_stop_ends_the_group_and_reports_status(tmp_path):
    log = tmp_path / "out.log"
    proc = spawn(["sh", "-c", "echo started; trap 'exit 5' TERM; sleep 300 & wait"],
                 deadline=60, stdout=log)
    time.sleep(0.5)
    assert proc.poll() is None
    assert proc.stop(grace=5) == 5
    assert "started" in log.read_text()
    assert not proc.expired


def test_spawn_deadline_stops_the_process():
    proc = spawn(["sleep", "300"], deadline=1)
    assert proc.wait(15) is not None
    assert proc.expired


def test_spawn_stop_escalates_to_sigkill():
    proc = spawn(["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"], deadline=60)
    time.sleep(0.3)
    start = time.monotonic()
    rc = proc.stop(grace=1)
    assert rc == -signal.SIGKILL and time.monotonic() - start < 10


def test_spawned_process_dies_with_a_killed_parent(tmp_path):
    """kill -9 of qemupatch leaves no child behind (PR_SET_PDEATHSIG)."""
    pidfile = tmp_path / "child"
    script = textwrap.dedent(f"""
        import time
        from qemupatch.run import spawn
        p = spawn(["sleep", "300"], deadline=600)
        open({str(pidfile)!r}, "w").write(str(p.pid))
        time.sleep(300)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.1)
        child = int(pidfile.read_text())
        assert _alive(child)
        parent.kill()
        parent.wait(10)
        assert _wait_gone(child), "the spawned child outlived its killed parent"
    finally:
        parent.kill()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_becomes_a_clean_stop(tmp_path, sig, code):
    """SIGTERM/SIGINT raise Terminated in the main thread: finally blocks run
    (the spawned child is stopped) and the exit code says which signal."""
    marker, pidfile = tmp_path / "cleaned", tmp_path / "child"
    script = textwrap.dedent(f"""
        import sys, time
        from qemupatch import lifecycle
        from qemupatch.errors import Terminated
        from qemupatch.run import spawn
        try:
            with lifecycle.stop_on_signals():
                p = spawn(["sleep", "300"], deadline=600)
                open({str(pidfile)!r}, "w").write(str(p.pid))
                try:
                    time.sleep(300)
                finally:
                    p.stop(grace=5)
                    open({str(marker)!r}, "w").write("done")
        except Terminated as exc:
            sys.exit(exc.exit_code)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(sig)
    assert proc.wait(30) == code
    assert marker.read_text() == "done"
    assert _wait_gone(int(pidfile.read_text()))


def test_records_helpers(tmp_path):
    stamp = utc_now()
    assert len(stamp) == 20 and stamp.endswith("Z") and stamp[10] == "T"
    path = atomic_write(tmp_path / "sub" / "x.json", "{}\n")
    assert path.read_text() == "{}\n" and not list(path.parent.glob(".*.tmp"))
    xml = junit_xml("suite", [Case("c", "ok"), Case("c", "bad", "fail", 1.5, "why\nmore"),
                              Case("c", "later", "skip", detail="not now")])
    assert 'tests="3"' in xml and 'failures="1"' in xml and 'skipped="1"' in xml
    assert 'message="why"' in xml and "more" in xml
