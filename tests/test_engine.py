"""The container engine client (qemupatch/engine.py) and host overlays.

Fast tests: engine selection and its errors, the runstate guard, API
failures that are EngineError (34) and not ContainerKilled (33), a
container past its deadline or idle limit, mounts, cleanup (no service, no
container, no overlay left).  The podman ones start a private service
(about 1 s) and fail when podman is missing; the ones that run containers
need a local debian:bookworm image (made by ``images.ensure_base_image``
when missing).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qemupatch import images
from qemupatch.config import Settings
from qemupatch.engine import CONTAINER_LABEL, ULIMITS, Engine, Mount, PodmanEngine
from qemupatch.errors import ContainerKilled, EngineError, NoContainerEngine
from qemupatch.overlay import PREFIX, host_overlay
from tests.conftest import requires

REPO = Path(__file__).resolve().parent.parent
needs_podman = requires(lambda: shutil.which("podman"), "podman is not installed")
needs_root = requires(lambda: os.geteuid() == 0, "host overlays need root")


@pytest.fixture(scope="module")
def podman():
    assert shutil.which("podman"), "podman is not installed: run ci/setup-debian.sh"
    with Engine.get("podman") as engine:
        yield engine
    assert engine.service is None


@pytest.fixture(scope="module")
def bookworm(podman: Engine) -> str:
    images.ensure_base_image(podman, "debian:bookworm")  # debootstrap when missing
    return "debian:bookworm"


def _ours(engine: Engine, marker: str) -> list[str]:
    """Containers left by the run whose environment holds ``marker`` (other
    builds on this machine may be running containers at the same time)."""
    found = engine.client.containers.list(all=True, filters={"label": CONTAINER_LABEL})
    return [c.id for c in found if f"QEMUPATCH_TEST={marker}" in c.attrs["Config"]["Env"]]


def _overlays_mounted() -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if PREFIX in line]


# -- selection and its errors ---------------------------------------------------


def test_no_engine_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))          # no podman here
    settings = Settings(docker_host=f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(NoContainerEngine) as info:
        Engine.get("auto", settings=settings)
    assert info.value.exit_code == 30
    assert "apt-get install podman runc" in str(info.value)
    assert "podman: not installed" in str(info.value)


def test_unreachable_docker_host(tmp_path: Path) -> None:
    with pytest.raises(NoContainerEngine, match="no daemon socket"):
        Engine.get("docker", settings=Settings(docker_host=f"unix://{tmp_path}/docker.sock"))


def test_docker_host_that_does_not_answer(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    start = time.monotonic()
    try:
        with pytest.raises(NoContainerEngine, match="does not answer"):
            Engine.get("docker", settings=Settings(docker_host=f"unix://{path}"),
                       api_timeout=2)
    finally:
        server.close()
    assert time.monotonic() - start < 30


def test_unknown_engine_name() -> None:
    with pytest.raises(NoContainerEngine, match="choose one of auto, docker, podman"):
        Engine.get("lxc")


# -- podman: lifecycle, runstate, API failures ----------------------------------


@needs_podman
def test_private_podman_service_is_stopped_on_close() -> None:
    environ_before = dict(os.environ)
    settings = Settings(no_pull=True)
    engine = Engine.get("podman", settings=settings)
    assert isinstance(engine, PodmanEngine)
    assert engine.settings is settings
    assert dict(os.environ) == environ_before, "CONTAINERS_CONF goes to the service only"
    conf = (engine.state_dir / "containers.conf").read_text()
    assert "nofile=1024:1024" in conf and "nproc=1000:1000" in conf
    service = engine.service
    sock = Path(engine.base_url.removeprefix("unix://"))
    assert engine.describe()["engine"] == "podman"
    engine.close()
    assert service.poll() is not None
    assert not sock.exists()
    engine.close()  # twice is harmless


@needs_podman
def test_a_closed_engine_says_so() -> None:
    with Engine.get("podman") as engine:
        pass
    for call in (lambda: engine.image_id("debian:bookworm"),
                 lambda: engine.run("debian:bookworm", ["true"], timeout=30),
                 engine.describe, engine.leftover_containers):
        with pytest.raises(EngineError, match="the podman engine is closed") as info:
            call()
        assert info.value.exit_code == 34


@needs_podman
def test_missing_image_is_an_engine_error_not_a_killed_container(podman: Engine) -> None:
    with pytest.raises(EngineError, match="qemupatch-no-such-image") as info:
        podman.run("qemupatch-no-such-image:1", ["true"], timeout=30,
                   env={"QEMUPATCH_TEST": "missing"})
    assert not isinstance(info.value, ContainerKilled)
    assert info.value.exit_code == 34
    assert not _ours(podman, "missing")
    assert podman.image_id("qemupatch-no-such-image:1") is None, "still usable"


@needs_podman
def test_a_dead_service_is_an_engine_error_that_says_so() -> None:
    with Engine.get("podman", api_timeout=10) as engine:
        os.kill(engine.service.pid, signal.SIGKILL)
        engine.service.wait(10)
        with pytest.raises(EngineError, match="the podman service .* exited") as info:
            engine.image_id("debian:bookworm")
        assert info.value.exit_code == 34


@needs_podman
def test_service_dies_with_a_killed_qemupatch(tmp_path: Path) -> None:
    """kill -9 of the process that started the service stops the service."""
    script = ("import sys, time; from qemupatch.engine import Engine\n"
              "e = Engine.get('podman'); print(e.service.pid, e.state_dir, flush=True)\n"
              "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        pid, state = child.stdout.readline().split()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)

    def alive() -> bool:
        try:
            return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and alive():
        time.sleep(0.2)
    assert not alive(), "the podman service outlived its parent"
    shutil.rmtree(state, ignore_errors=True)


# -- podman: containers -----------------------------------------------------------


@needs_podman
def test_container_past_its_deadline_is_killed_and_removed(podman: Engine, bookworm: str,
                                                           tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ContainerKilled, match="deadline") as info:
        podman.run(bookworm, ["sleep", "120"], timeout=3, log_path=tmp_path / "run.log",
                   env={"QEMUPATCH_TEST": "deadline"})
    assert info.value.exit_code == 33
    assert time.monotonic() - start < 60
    assert not _ours(podman, "deadline")


@needs_podman
def test_silent_container_trips_the_idle_watchdog(podman: Engine, bookworm: str) -> None:
    with pytest.raises(ContainerKilled, match="idle"):
        podman.run(bookworm, ["sh", "-c", "echo start; sleep 120"], timeout=60,
                   idle_timeout=3, env={"QEMUPATCH_TEST": "idle"})
    assert not _ours(podman, "idle")


@needs_podman
@pytest.mark.parametrize("host_overlay_on", [True, False], ids=["host-overlay", "copy"])
def test_run_streams_output_mounts_and_returns_exit_code(podman: Engine, bookworm: str,
                                                          tmp_path: Path, monkeypatch,
                                                          host_overlay_on: bool) -> None:
    monkeypatch.setattr(podman, "settings", Settings(host_overlay=host_overlay_on))
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_text("original\n")
    seen: list[str] = []
    result = podman.run(
        bookworm,
        ["sh", "-c", "cat /src/file; echo changed > /src/file; "
         "grep -c ' /src ' /proc/self/mountinfo; ulimit -n; exit 3"],
        mounts=[Mount(str(src), "/src", "overlay")], timeout=120, on_line=seen.append,
        log_path=tmp_path / "run.log", env={"QEMUPATCH_TEST": "mounts"})
    assert result.exit_code == 3
    assert seen[0] == "original"
    assert seen[1] == ("1" if host_overlay_on else "0"), "mounted on the host, or copied"
    assert seen[-1] == str(ULIMITS[0][1])
    assert (src / "file").read_text() == "original\n", "overlay must not write through"
    assert "original" in (tmp_path / "run.log").read_text()
    assert not _ours(podman, "mounts")
    assert isinstance(podman.leftover_containers(), list)
    assert f"lowerdir={src}," not in Path("/proc/mounts").read_text()


@needs_podman
def test_no_network_inside_the_compile_container(podman: Engine, bookworm: str) -> None:
    result = podman.run(bookworm, ["sh", "-c", "cat /proc/net/dev | tail -n +3 | cut -d: -f1"],
                        network="none", timeout=60)
    assert [line.strip() for line in result.output.split()] == ["lo"]


# -- host overlays ----------------------------------------------------------------


@needs_root
def test_host_overlay_is_writable_discarded_and_unmounted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_text("original\n")
    with host_overlay(src, enabled=True) as merged:
        assert merged is not None
        (merged / "file").write_text("changed\n")
        (merged / "new").write_text("new\n")
        assert (merged / "file").read_text() == "changed\n"
    assert (src / "file").read_text() == "original\n" and not (src / "new").exists()
    assert not merged.parent.exists()
    assert not [m for m in _overlays_mounted() if str(merged) in m]


def test_no_host_overlay_when_disabled_or_unmountable(tmp_path: Path) -> None:
    odd = tmp_path / "a,b"
    odd.mkdir()
    with host_overlay(tmp_path, enabled=False) as merged:
        assert merged is None
    with host_overlay(odd, enabled=True) as merged:
        assert merged is None
    with host_overlay(tmp_path / "missing", enabled=True) as merged:
        assert merged is None                      # the mount fails: copy instead
