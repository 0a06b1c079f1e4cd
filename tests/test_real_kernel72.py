"""The third guest kernel, for real: Debian sid's Linux 7.2.13 (split into
linux-binary / linux-base / linux-modules packages), its kvm_vmsocket built
with sid's gcc 16 in the sid container, booted by the patched QEMU through
the main job (``qemupatch pipeline --kernel 7.2``)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qemupatch import config
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.real

KERNEL = "7.2"
STAGES = ["upstream+series", "build-qemu", "build-guest", "guest-image", "boot-test"]
GUEST_TESTS = ("short", "large", "many-small", "reconnect", "connect-refused",
               "signal-interrupts-read")


@pytest.mark.timeout(3600)
def test_pipeline_boots_the_sid_72_guest(tmp_path):
    cfg = config.load(REPO_ROOT)
    kernel = cfg.kernel(KERNEL)
    assert kernel.suite == "sid"
    release = kernel.image_package.removeprefix("linux-image-")
    out = tmp_path / "pipeline"
    res = subprocess.run([sys.executable, "-m", "qemupatch", "pipeline", "--kernel", KERNEL,
                          "--out", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=3500)
    print(res.stdout[-4000:], res.stderr[-6000:])
    assert res.returncode == 0

    data = json.loads((out / "pipeline.json").read_text())
    assert data["status"] == "pass"
    assert [s["name"] for s in data["stages"]] == STAGES
    assert all(s["ok"] for s in data["stages"]), data["stages"]

    boot = json.loads((out / "boot-test" / "boot-test.json").read_text())
    assert boot["ok"] is True and boot["guest_rc"] == 0
    assert boot["image"]["kernel_version"] == release
    # virtio is built into 7.2: no virtio module goes into the initramfs
    assert boot["image"]["modules"] == [] and boot["image"]["vmsocket_module"] is True
    statuses = {t["name"]: t["status"] for t in boot["tests"]}
    assert statuses and all(s == "pass" for s in statuses.values()), statuses
    for name in GUEST_TESTS:
        assert statuses.get(name) == "pass", (name, statuses)
    assert all(c["status"] == "pass" for c in boot["checks"]), boot["checks"]

    # the kernel came from the split packages, not the (empty) metapackage
    image_dir = Path(boot["image"]["kernel"]).parent
    image = json.loads((image_dir / "image.json").read_text())
    assert image["kernel_deb"].startswith(f"linux-binary-{release}_")
    assert not [d for d in image["kernel_debs"] if d.startswith("linux-modules-")]

    # the module: built in the sid image with sid's compiler, for this kernel
    record = json.loads((out / "work" / "module" / f"build-module-{KERNEL}.json").read_text())
    assert record["image"]["tag"].startswith("qemupatch-build:sid-")
    assert record["image"]["dockerfile"].endswith("ci/Dockerfile.sid")
    ko = out / "work" / "module" / "kvm_vmsocket.ko"
    vermagic = subprocess.run(["modinfo", "-F", "vermagic", ko], capture_output=True,
                              text=True, timeout=60, check=True).stdout
    assert vermagic.split()[0] == release
    comment = subprocess.run(["readelf", "-p", ".comment", ko], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    assert "GCC: (Debian 16." in comment, comment
