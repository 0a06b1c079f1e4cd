"""The README's main job, for real: import, apply, container build, guest
build, boot with -vmsocket unix:, guest and host checks."""

import json
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.real

STAGES = ["upstream+series", "build-qemu", "build-guest", "guest-image", "boot-test"]


@pytest.mark.timeout(3600)
def test_pipeline_main_job(tmp_path):
    out = tmp_path / "pipeline"
    res = subprocess.run([sys.executable, "-m", "qemupatch", "pipeline", "--out", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=3500)
    print(res.stdout[-3000:], res.stderr[-6000:])
    assert res.returncode == 0
    data = json.loads((out / "pipeline.json").read_text())
    assert data["schema"] == 1 and data["status"] == "pass"
    assert [s["name"] for s in data["stages"]] == STAGES
    assert all(s["ok"] for s in data["stages"])
    boot = data["stages"][-1]["figures"]
    assert boot["tests"] > 0 and boot["tests_passed"] == boot["tests"]
    assert data["stages"][1]["figures"]["engine"] in ("podman", "docker")
    suite = ET.parse(out / "pipeline.junit.xml").getroot()
    assert suite.get("failures") == "0" and len(suite.findall("testcase")) == len(STAGES)
    boot_json = json.loads((out / "boot-test" / "boot-test.json").read_text())
    assert boot_json["ok"] is True
    assert "PASS" in res.stdout


def _podman_services() -> set[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args", "-ww"], capture_output=True, text=True,
                        timeout=30).stdout
    return {line.strip() for line in ps.splitlines()
            if "podman system service" in line and "qemupatch-podman-" in line}


def _our_containers(marker: str, running_only: bool = False) -> list[str]:
    """qemupatch's containers that mount something under ``marker`` (so a
    build elsewhere on the machine is not taken for ours)."""
    listed = subprocess.run(
        ["podman", "--runtime", "runc", "ps", *([] if running_only else ["-a"]),
         "--filter", "label=org.qemupatch.build", "--format", "{{.ID}}"],
        capture_output=True, text=True, timeout=120).stdout.split()
    ours = []
    for cid in listed:
        info = subprocess.run(["podman", "--runtime", "runc", "inspect", cid],
                              capture_output=True, text=True, timeout=60).stdout
        if marker in info:
            ours.append(cid)
    return ours


def _leftovers(marker: str, services_before: set[str]) -> list[str]:
    """Containers, podman services, overlay mounts and QEMUs this run left."""
    found = [f"podman service: {s}" for s in _podman_services() - services_before]
    ps = subprocess.run(["ps", "-eo", "pid,args", "-ww"], capture_output=True, text=True,
                        timeout=30).stdout
    found += [f"QEMU: {line.strip()}" for line in ps.splitlines()
              if "qemu-system" in line and marker in line]
    found += [f"container: {c}" for c in _our_containers(marker)]
    mounts = subprocess.run(["findmnt", "-rn", "-t", "overlay", "-o", "TARGET"],
                            capture_output=True, text=True, timeout=30).stdout
    found += [f"mount: {m}" for m in mounts.splitlines() if "qemupatch-overlay" in m]
    return found


def _stop_pipeline_when(out, reached, what: str, timeout: float = 900) -> dict:
    """Start the pipeline, SIGTERM it once ``reached()`` holds, return pipeline.json."""
    proc = subprocess.Popen([sys.executable, "-m", "qemupatch", "pipeline", "--out", str(out)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    record = out / "pipeline.json"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the pipeline ended before {what}: {proc.communicate()}")
            data = json.loads(record.read_text()) if record.exists() else {}
            if reached(data):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the pipeline never reached {what}")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM" in err
    return json.loads(record.read_text())


def _qemu_running(marker: str) -> bool:
    ps = subprocess.run(["ps", "-eo", "args", "-ww"], capture_output=True, text=True,
                        timeout=30).stdout
    return any("qemu-system" in line and marker in line for line in ps.splitlines())


@pytest.mark.timeout(3600)
def test_sigterm_during_build_and_boot_leaves_nothing_behind(tmp_path):
    """kill -TERM (what CI sends on cancel) during the QEMU build and during
    the boot: exit 143, no container, podman service, overlay mount or QEMU
    left, and pipeline.json says where it stopped."""
    out = tmp_path / "pipeline"
    services = _podman_services()
    build_json = out / "work" / "qemu" / "build.json"

    def compiling(data: dict) -> bool:
        return (data.get("running_stage") == "build-qemu" and build_json.exists()
                and json.loads(build_json.read_text()).get("stage") == "compile"
                and bool(_our_containers(str(out), running_only=True)))

    # A fresh out dir is a fresh build dir: the compile runs long enough to be caught.
    data = _stop_pipeline_when(out, compiling, "a running build container")
    assert data["status"] == "terminated" and data["stopped_at"] == "build-qemu"
    assert data["error"] == "Terminated"
    assert [s["name"] for s in data["stages"]] == STAGES[:2] and not data["stages"][-1]["ok"]
    assert json.loads(build_json.read_text())["status"] == "terminated"
    assert not _leftovers(str(out), services), _leftovers(str(out), services)

    data = _stop_pipeline_when(
        out, lambda d: d.get("running_stage") == "boot-test" and _qemu_running(str(out)),
        "a running QEMU")
    assert data["status"] == "terminated" and data["stopped_at"] == "boot-test"
    boot_json = json.loads((out / "boot-test" / "boot-test.json").read_text())
    assert boot_json["ok"] is False and boot_json["status"] != "running"
    assert not _leftovers(str(out), services), _leftovers(str(out), services)
