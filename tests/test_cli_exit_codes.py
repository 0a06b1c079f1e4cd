"""Every exit code in the README's table, provoked through the real command
line, as a user (or CI) would meet it.

The build codes use a tiny QEMU-like upstream (tests/fakeqemusrc as a
release tarball, a one-patch series on it) so that each failure is reached
in seconds; the boot-test codes use tests/fakeqemu, which speaks QMP and
plays a console scenario, with the real 6.1 guest kernel.
"""

from __future__ import annotations

import bz2
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from qemupatch import config, workflow
from qemupatch.build import edk2_standins
from tests.conftest import REPO_ROOT, Project, commit_files

FAKE_SRC = Path(__file__).parent / "fakeqemusrc"
FAKE_QEMU = Path(__file__).parent / "fakeqemu" / "qemu-system-x86_64"


# -- a project whose upstream is the fake QEMU tree ------------------------------


def _fake_project(tmp_path: Path, *, patch_files: dict[str, str],
                  dockerfile: str | None = None) -> Project:
    """Release v0.1 = tests/fakeqemusrc; the series is one patch writing
    ``patch_files`` (e.g. a SLOW marker, or a broken hello.c)."""
    tarball = tmp_path / "fakeqemu-0.1.tar.gz"
    tree = tmp_path / "fakeqemu-0.1"
    shutil.copytree(FAKE_SRC, tree)
    for name in edk2_standins(tree):        # an unrepacked release carries its firmware
        (tree / "pc-bios" / name).write_bytes(bz2.compress(b""))
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tree, arcname=tree.name)
    root = tmp_path / "proj"
    root.mkdir()
    (root / "qemupatch.toml").write_text(
        '[project]\ndefault_release = "v0.1"\nprefer = ["tarball"]\n'
        f'\n[[release]]\nname = "v0.1"\ntarball = "{tarball}"\n')
    if dockerfile is not None:
        (root / "Dockerfile").write_text(dockerfile)
    proj = Project(root, tmp_path / "cache", {"v0.1": tarball})
    cfg = proj.cfg
    m = workflow.mirror(cfg)
    m.import_tarball("v0.1", tarball)
    wt = proj.worktree("v0.1")
    wt.reset_to(m.get("v0.1").commit)
    commit_files(wt, patch_files, "fake: change the tree for one test",
                 why="provoke one exit code")
    workflow.export(cfg, "v0.1")
    return proj


def _cli(proj: Project, *args: str, env: dict | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qemupatch", "-C", str(proj.root), "--cache", str(proj.cache),
         *args], capture_output=True, text=True, timeout=timeout, cwd=proj.root,
        env={**os.environ, **(env or {})})


def _descendants_of(marker: str) -> list[str]:
    """Processes whose command line mentions ``marker`` (a test's tmp path)."""
    out = subprocess.run(["ps", "-eo", "pid,args", "-ww"], capture_output=True, text=True,
                         timeout=30).stdout
    return [line for line in out.splitlines()
            if marker in line and "ps -eo" not in line and "-m pytest" not in line]


# -- 0, 1, 2, 3 ---------------------------------------------------------------------


def test_exit_0_ok(project):
    res = project.cli("upstream", "list")
    assert "v1.0.0" in res.stdout and "v1.1.0" in res.stdout


def test_exit_1_rebase_conflict(project):
    res = project.cli("rebase", "--onto", "v1.1.0", check_code=1)
    assert "conflict" in res.stdout + res.stderr


def test_exit_2_bad_input_names_the_thing(project):
    res = project.cli("apply", "--base", "v9.9.9", check_code=2)
    assert "v9.9.9" in res.stderr


def test_exit_3_infrastructure_download(project):
    port = _free_port()
    res = project.cli("upstream", "add", "v3.0.0", "--tarball",
                      f"http://127.0.0.1:{port}/qemu-3.0.0.tar.xz", check_code=3)
    assert "cannot download" in res.stderr and str(port) in res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 30-34: builds ----------------------------------------------------------------------


def test_exit_30_no_container_engine(tmp_path):
    proj = _fake_project(tmp_path, patch_files={"NOTE": "x\n"})
    res = _cli(proj, "build", "--engine", "docker", "--out", str(tmp_path / "out"),
               env={"DOCKER_HOST": f"unix://{tmp_path}/no-such-docker.sock"})
    assert res.returncode == 30, res.stderr
    assert "no-such-docker.sock" in res.stderr


def test_exit_31_image_build_fails(tmp_path):
    proj = _fake_project(tmp_path, patch_files={"NOTE": "x\n"},
                         dockerfile="FROM debian:bookworm\nRUN echo broken-step && exit 3\n")
    res = _cli(proj, "build", "--engine", "podman", "--out", str(tmp_path / "out"),
               timeout=900)
    assert res.returncode == 31, res.stderr
    assert "broken-step" in res.stderr or "image" in res.stderr


def test_exit_32_compile_fails(tmp_path):
    proj = _fake_project(tmp_path, patch_files={"hello.c": "int main( {\n"})
    res = _cli(proj, "build", "--engine", "host", "--out", str(tmp_path / "out"))
    assert res.returncode == 32, res.stderr
    assert "hello.c" in res.stderr and "compile.log" in res.stderr


def test_exit_33_build_past_its_deadline(tmp_path):
    proj = _fake_project(tmp_path, patch_files={"SLOW": "\n"})
    start = time.monotonic()
    res = _cli(proj, "build", "--engine", "host", "--timeout", "5",
               "--out", str(tmp_path / "out"))
    assert res.returncode == 33, res.stderr
    assert time.monotonic() - start < 50
    assert not _descendants_of(str(tmp_path)), "the killed build left processes"


class _BrokenEngine(BaseHTTPRequestHandler):
    """A Docker API that answers ping and version, then fails every call."""

    def _reply(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.endswith("/_ping"):
            data = b"OK"
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(data)
        elif self.path.endswith("/version"):
            self._reply(200, {"Version": "0.0-fake", "ApiVersion": "1.41",
                              "MinAPIVersion": "1.24", "Components": [{"Name": "fake"}]})
        else:
            self._reply(500, {"message": "fake engine: internal failure"})

    do_POST = do_DELETE = do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


class _UnixHTTPServer(HTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        self.socket.bind(self.server_address)

    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("local", 0)


def test_exit_34_engine_api_failure_is_not_called_killed(tmp_path):
    proj = _fake_project(tmp_path, patch_files={"NOTE": "x\n"},
                         dockerfile="FROM debian:bookworm\n")
    sock = tmp_path / "docker.sock"
    server = _UnixHTTPServer(str(sock), _BrokenEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        res = _cli(proj, "build", "--engine", "docker", "--out", str(tmp_path / "out"),
                   env={"DOCKER_HOST": f"unix://{sock}"}, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert res.returncode == 34, res.stderr
    assert "fake engine: internal failure" in res.stderr
    assert "killed" not in res.stderr


# -- 130, 143: stopped on request ----------------------------------------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_a_build_cleanly(tmp_path, sig, code):
    proj = _fake_project(tmp_path, patch_files={"SLOW": "\n"})
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qemupatch", "-C", str(proj.root), "--cache", str(proj.cache),
         "build", "--engine", "host", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = out / "qemu" / "build.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if record.exists() and json.loads(record.read_text()).get("stage") == "compile" \
                and _descendants_of(str(tmp_path / "out")):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the build never reached its compile stage")
    time.sleep(1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert signal.Signals(sig).name in err
    data = json.loads(record.read_text())
    assert data["status"] == "terminated" and data["stage"] == "compile"
    assert not _descendants_of(str(tmp_path / "out")), "the stopped build left processes"


# -- 20-24: the boot test -----------------------------------------------------------------


def _boot_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cfg = config.load(REPO_ROOT)
    proj = Project(REPO_ROOT, cfg.cache_dir, {})
    return _cli(proj, "boot-test", "--out", str(tmp_path / "boot"), *args, timeout=300)


@pytest.mark.real
def test_exit_20_guest_image_cannot_be_made(tmp_path):
    junk = tmp_path / "kvm_vmsocket.ko"
    junk.write_bytes(b"not an ELF module")
    res = _boot_cli(tmp_path, "--qemu", str(FAKE_QEMU), "--module", str(junk))
    assert res.returncode == 20, res.stderr
    assert "kvm_vmsocket.ko" in res.stderr


@pytest.mark.real
@pytest.mark.parametrize("scenario, code, words", [
    ("badstart", 21, "invalid option"),
    ("panic", 22, "panic"),
    ("testfail", 23, "guest tests failed"),
    ("silent-hang", 24, "no console output"),
])
def test_exit_21_to_24_boot_test_stages(tmp_path, scenario, code, words):
    res = _boot_cli(tmp_path, "--qemu", str(FAKE_QEMU), "--accel", "tcg", "--idle", "5",
                    "--qemu-arg=-fake-scenario", f"--qemu-arg={scenario}")
    assert res.returncode == code, res.stderr
    assert words in res.stderr.lower() or words in res.stdout.lower(), res.stderr
    data = json.loads((tmp_path / "boot" / "boot-test.json").read_text())
    assert data["exit_code"] == code and data["ok"] is False
