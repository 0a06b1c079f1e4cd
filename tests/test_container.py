"""The container engine interface.

Fast tests: engine selection and its errors, mirror discovery, a failing
image build, a container past its deadline, cleanup (no service, no
container left).  The podman ones start a private service (about 2 s) and
fail when podman is missing; the deadline test needs a local debian:bookworm
image (made by the real tests, or by ``ensure_base_image``).
Tests marked ``real`` debootstrap base images and build the real images.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from qemupatch.container import (
    ULIMITS,
    Engine,
    Mount,
    PodmanEngine,
    _arg_defaults,
    _from_image,
)
from qemupatch.errors import ContainerKilled, ImageBuildFailed, NoContainerEngine
from tests.conftest import requires

REPO = Path(__file__).resolve().parent.parent
needs_podman = requires(lambda: shutil.which("podman"), "podman is not installed")


@pytest.fixture(scope="module")
def podman():
    assert shutil.which("podman"), "podman is not installed: run ci/setup-debian.sh"
    with Engine.get("podman") as engine:
        yield engine
    assert engine.proc is None


@pytest.fixture(scope="module")
def bookworm(podman: Engine) -> str:
    podman.ensure_base_image("debian:bookworm")  # debootstrap when missing
    return "debian:bookworm"


# -- selection and its errors ---------------------------------------------------


def test_no_engine_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))          # no podman here
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(NoContainerEngine) as info:
        Engine.get("auto")
    assert info.value.exit_code == 30
    assert "apt-get install podman runc" in str(info.value)
    assert "podman: not installed" in str(info.value)


def test_unreachable_docker_host(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    with pytest.raises(NoContainerEngine, match="no daemon socket"):
        Engine.get("docker")


def test_docker_host_that_does_not_answer(tmp_path: Path, monkeypatch) -> None:
    import socket

    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    start = time.monotonic()
    try:
        with pytest.raises(NoContainerEngine, match="does not answer"):
            Engine.get("docker", api_timeout=2)
    finally:
        server.close()
    assert time.monotonic() - start < 30


def test_unknown_engine_name() -> None:
    with pytest.raises(NoContainerEngine, match="choose one of auto, docker, podman"):
        Engine.get("lxc")


def test_dockerfile_parsing() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert _from_image(text) == "debian:bookworm"
    assert _arg_defaults(text)["KERNEL_HEADERS"] == "linux-headers-6.1.0-56-amd64"
    trixie = (REPO / "ci/Dockerfile.trixie").read_text()
    assert _from_image(trixie) == "debian:trixie"


def test_no_mirror_host_is_written_in_the_repo() -> None:
    for path in (REPO / "Dockerfile", REPO / "ci/Dockerfile.trixie",
                 REPO / "qemupatch/container.py", REPO / "qemupatch/build.py"):
        assert "deb.debian.org" not in path.read_text(), path


# -- podman: lifecycle, failures, deadlines ------------------------------------


@needs_podman
def test_private_podman_service_is_stopped_on_close() -> None:
    engine = Engine.get("podman")
    assert isinstance(engine, PodmanEngine)
    conf = (engine.state_dir / "containers.conf").read_text()
    assert "nofile=1024:1024" in conf and "nproc=1000:1000" in conf
    proc = engine.proc
    sock = Path(engine.base_url.removeprefix("unix://"))
    assert engine.describe()["engine"] == "podman"
    engine.close()
    assert proc.poll() is not None
    assert not sock.exists()
    engine.close()  # twice is harmless


@needs_podman
def test_failing_run_step_is_an_image_build_failure(podman: Engine, tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM scratch\nRUN false\n")
    log = tmp_path / "image.log"
    with pytest.raises(ImageBuildFailed) as info:
        podman.ensure_image(dockerfile, repository="qemupatch-test-fail", timeout=120,
                            log_path=log)
    assert info.value.exit_code == 31
    assert str(log) in str(info.value)
    assert log.is_file()


@needs_podman
def test_container_past_its_deadline_is_killed_and_removed(podman: Engine, bookworm: str,
                                                           tmp_path: Path) -> None:
    before = set(podman.leftover_containers())   # other builds may be running
    start = time.monotonic()
    with pytest.raises(ContainerKilled, match="deadline") as info:
        podman.run(bookworm, ["sleep", "120"], timeout=3, log_path=tmp_path / "run.log")
    assert info.value.exit_code == 33
    assert time.monotonic() - start < 60
    assert set(podman.leftover_containers()) <= before


@needs_podman
def test_silent_container_trips_the_idle_watchdog(podman: Engine, bookworm: str) -> None:
    before = set(podman.leftover_containers())
    with pytest.raises(ContainerKilled, match="idle"):
        podman.run(bookworm, ["sh", "-c", "echo start; sleep 120"], timeout=60,
                   idle_timeout=3)
    assert set(podman.leftover_containers()) <= before


@needs_podman
@pytest.mark.parametrize("host_overlay", ["1", "0"], ids=["host-overlay", "copy"])
def test_run_streams_output_mounts_and_returns_exit_code(podman: Engine, bookworm: str,
                                                          tmp_path: Path, monkeypatch,
                                                          host_overlay: str) -> None:
    monkeypatch.setenv("QEMUPATCH_NO_HOST_OVERLAY", "0" if host_overlay == "1" else "1")
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_text("original\n")
    seen: list[str] = []
    before = set(podman.leftover_containers())
    result = podman.run(
        bookworm,
        ["sh", "-c", "cat /src/file; echo changed > /src/file; ulimit -n; exit 3"],
        mounts=[Mount(str(src), "/src", "overlay")], timeout=120, on_line=seen.append,
        log_path=tmp_path / "run.log")
    assert result.exit_code == 3
    assert seen[0] == "original"
    assert seen[-1] == str(ULIMITS[0][1])
    assert (src / "file").read_text() == "original\n", "overlay must not write through"
    assert "original" in (tmp_path / "run.log").read_text()
    assert set(podman.leftover_containers()) <= before
    assert f"lowerdir={src}," not in Path("/proc/mounts").read_text()


@needs_podman
def test_no_network_inside_the_compile_container(podman: Engine, bookworm: str) -> None:
    result = podman.run(bookworm, ["sh", "-c", "cat /proc/net/dev | tail -n +3 | cut -d: -f1"],
                        network="none", timeout=60)
    assert [line.strip() for line in result.output.split()] == ["lo"]


# -- real: base images and build images -----------------------------------------


@pytest.mark.real
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "ci/Dockerfile.trixie"])
def test_real_build_image(dockerfile: str, tmp_path: Path) -> None:
    from qemupatch.build import _context_files

    path = REPO / dockerfile
    with Engine.get("auto") as engine:
        before = set(engine.leftover_containers())
        image = engine.ensure_image(path, context_files=_context_files(path),
                                    timeout=3600, log_path=tmp_path / "image.log")
        again = engine.ensure_image(path, context_files=_context_files(path), timeout=600)
        assert again.id == image.id and not again.built, "same content, same image"
        base = _from_image(path.read_text())
        assert engine.image_id(base)
        result = engine.run(image.tag, ["sh", "-c", "gcc --version; ls /usr/src"],
                            timeout=120)
        assert result.exit_code == 0
        assert "linux-headers-" in result.output
        if dockerfile == "Dockerfile":
            meson = engine.run(image.tag, ["meson", "--version"], timeout=120)
            assert meson.output.strip() == "1.9.0"
        print(f"\n{dockerfile}: image {image.tag} "
              f"{'built in %.0f s' % image.seconds if image.built else 'reused'}; "
              f"base {image.base}")
        assert set(engine.leftover_containers()) <= before


def test_engine_env_is_not_leaked(monkeypatch) -> None:
    """CONTAINERS_CONF is given to our own service only, never set globally."""
    assert "CONTAINERS_CONF" not in os.environ or os.environ["CONTAINERS_CONF"]


@needs_podman
def test_service_dies_with_a_killed_qemupatch(tmp_path: Path) -> None:
    """kill -9 of the process that started the service stops the service."""
    import signal
    import subprocess
    import sys

    script = ("import sys, time; from qemupatch.container import Engine\n"
              "e = Engine.get('podman'); print(e.proc.pid, e.state_dir, flush=True)\n"
              "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        pid, state = child.stdout.readline().split()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and \
            "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
        time.sleep(0.2)
    alive = Path(f"/proc/{pid}").exists() and \
        "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert not alive, "the podman service outlived its parent"
    shutil.rmtree(state, ignore_errors=True)
