"""The README's main job, for real: import, apply, container build, guest
build, boot with -vmsocket unix:, guest and host checks."""

import json
import subprocess
import sys
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
