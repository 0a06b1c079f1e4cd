"""qemupatch release for real: in a git clone of this repository with the
matrix narrowed to one release × one kernel, a real ``qemupatch nightly``
(container build, guest boot, qtest) then ``qemupatch release``: the tag is
made and dist/ verifies; then a patch changes and the release is refused as
stale."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qemupatch import config
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.real

RELEASE, KERNEL = "v10.2.2", "6.1"


def sh(*argv, cwd: Path, timeout: float = 600) -> str:
    res = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, (argv, res.stdout, res.stderr)
    return res.stdout


def qemupatch(clone: Path, cache: Path, *args: str, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "qemupatch", "-C", str(clone), "--cache",
                           str(cache), *args], cwd=clone, capture_output=True, text=True,
                          timeout=timeout)


def private_cache(tmp_path: Path) -> Path:
    """Downloads, apt state and unpacked kernels shared with the persistent
    cache (nothing is fetched twice); the mirror a local clone of it; every
    work tree, build and record private to this test."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shared = config.default_cache_dir()
    for sub in ("downloads", "apt", "kernels", "busybox"):
        (shared / sub).mkdir(parents=True, exist_ok=True)
        (cache / sub).symlink_to(shared / sub)
    if (shared / "upstream.git" / "HEAD").is_file():
        sh("git", "clone", "--quiet", "--bare", shared / "upstream.git", cache / "upstream.git",
           cwd=tmp_path)
    return cache


@pytest.mark.timeout(5400)
def test_nightly_then_release_then_refused_as_stale(tmp_path):
    clone = tmp_path / "clone"
    sh("git", "clone", "--quiet", REPO_ROOT, clone, cwd=tmp_path)
    sh("git", "config", "user.name", "Release Tester", cwd=clone)
    sh("git", "config", "user.email", "release@example.org", cwd=clone)
    toml = clone / "qemupatch.toml"
    text, n = re.subn(r"\[matrix\]\nreleases = \[[^\]]*\]\nkernels = \[[^\]]*\]",
                      f'[matrix]\nreleases = ["{RELEASE}"]\nkernels = ["{KERNEL}"]',
                      toml.read_text())
    assert n == 1, "qemupatch.toml has no [matrix] releases/kernels to narrow"
    text = re.sub(r"\n\[\[matrix\.include\]\]\n(?:[a-z][^\n]*\n?)*", "\n", text)   # no extra cells
    assert "matrix.include" not in text
    toml.write_text(text)
    sh("git", "commit", "-q", "-am", "matrix: one release x one kernel", cwd=clone)
    cache = private_cache(tmp_path)

    nightly = qemupatch(clone, cache, "nightly", timeout=5000)
    print(nightly.stdout[-4000:], nightly.stderr[-4000:])
    assert nightly.returncode == 0, "the nightly of one cell is not green"
    latest = clone / "out" / "nightly" / "latest"
    run = json.loads((latest / "nightly.json").read_text())
    assert run["outcome"] == "pass"
    assert [t["target"]["name"] for t in run["targets"]] == [f"{RELEASE}-linux-{KERNEL}"]

    res = qemupatch(clone, cache, "release", "0.1.0", timeout=1800)
    print(res.stdout, res.stderr)
    assert res.returncode == 0
    assert "tagged v0.1.0" in res.stdout
    assert sh("git", "cat-file", "-t", "v0.1.0", cwd=clone).strip() == "tag"
    message = sh("git", "for-each-ref", "--format=%(contents)", "refs/tags/v0.1.0", cwd=clone)
    assert f"Series-Hash: {run['series_hash']}" in message
    assert f"Matrix-Run: {run['run_id']}" in message
    assert f"Supported-Release: {RELEASE} linux {KERNEL}" in message
    dist = clone / "dist" / "v0.1.0"
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=dist, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and check.stdout.count(": OK") >= 4, check.stdout
    prov = json.loads((dist / "provenance.json").read_text())
    assert prov["series_hash"] == run["series_hash"]
    assert prov["matrix_run"]["run_id"] == run["run_id"]
    up = prov["upstream"][RELEASE]
    assert up["kind"] == "debian" and re.fullmatch(r"[0-9a-f]{64}", up["sha256"])
    qemu = next(b for b in prov["builds"] if b["kind"] == "qemu")
    record = json.loads((latest / qemu["record"]).read_text())
    assert qemu["image"]["id"] == record["image"]["id"] and qemu["image"]["id"]
    assert qemu["release"] == RELEASE and qemu["series_hash"] == run["series_hash"]
    assert qemu["sha256"]["qemu-system-x86_64"] == record["sha256"]["qemu-system-x86_64"]
    assert any(b["kind"] == "module" for b in prov["builds"])
    changelog = (dist / "CHANGELOG.md").read_text()
    assert "from the start" in changelog and "patches/series" in changelog

    # a patch changes: the green run no longer speaks for the series
    series = [line for line in (clone / "patches" / "series").read_text().splitlines()
              if line and not line.startswith("#")]
    patch = clone / "patches" / series[0]
    patch.write_text(patch.read_text().replace("\nSigned-off-by:",
                                               "\nA sentence more, for the test.\n\n"
                                               "Signed-off-by:", 1))
    sh("git", "commit", "-q", "-am", "series: a sentence more in patch 1", cwd=clone)
    res = qemupatch(clone, cache, "release", "0.1.1", timeout=1800)
    print(res.stdout, res.stderr)
    assert res.returncode == 1
    assert f"matrix run {run['run_id']}" in res.stderr and "is stale" in res.stderr
    assert sh("git", "tag", "--list", cwd=clone).split() == ["v0.1.0"]
    assert not (clone / "dist" / "v0.1.1").exists()
