"""Build images, their content-hash cache and base images (qemupatch/images.py).

Fast tests: Dockerfile parsing, context files, a failing image build, a
build past its deadline (after which the engine still answers), the cache
hit, image facts.  The podman ones start a private service and need a local
debian:bookworm image (debootstrapped when missing).  Tests marked ``real``
build the project's real images.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from qemupatch import images
from qemupatch.config import Settings
from qemupatch.engine import Engine
from qemupatch.errors import ImageBuildFailed
from qemupatch.images import _arg_defaults, _from_image, dockerfile_context_files
from tests.conftest import requires

REPO = Path(__file__).resolve().parent.parent
needs_podman = requires(lambda: shutil.which("podman") and shutil.which("buildah"),
                        "podman or buildah is not installed")


@pytest.fixture(scope="module")
def podman():
    assert shutil.which("podman"), "podman is not installed: run ci/setup-debian.sh"
    with Engine.get("podman", settings=Settings(no_pull=True)) as engine:
        yield engine


@pytest.fixture(scope="module")
def bookworm(podman: Engine) -> str:
    images.ensure_base_image(podman, "debian:bookworm")  # debootstrap when missing
    return "debian:bookworm"


# -- Dockerfiles and their context ------------------------------------------------


def test_dockerfile_parsing() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert _from_image(text) == "debian:bookworm"
    assert _arg_defaults(text)["KERNEL_HEADERS"] == "linux-headers-6.1.0-56-amd64"
    trixie = (REPO / "ci/Dockerfile.trixie").read_text()
    assert _from_image(trixie) == "debian:trixie"


def test_no_mirror_host_is_written_in_the_repo() -> None:
    for path in (REPO / "Dockerfile", REPO / "ci/Dockerfile.trixie",
                 *sorted((REPO / "qemupatch").glob("*.py"))):
        assert "deb.debian.org" not in path.read_text(), path


def test_context_files_give_the_ca_bundle_only_to_dockerfiles_that_use_it(
        tmp_path: Path) -> None:
    bundle = tmp_path / "ca.crt"
    bundle.write_text("bundle\n")
    plain = tmp_path / "Dockerfile.plain"
    plain.write_text("FROM debian:bookworm\n")
    uses = tmp_path / "Dockerfile"
    uses.write_text("FROM debian:bookworm\nCOPY host-ca.crt /etc/ssl/host-ca.crt\n")
    assert dockerfile_context_files(plain, bundle) == {}
    assert dockerfile_context_files(uses, bundle) == {"host-ca.crt": bundle}
    with pytest.raises(ImageBuildFailed, match="QEMUPATCH_CA_BUNDLE") as info:
        dockerfile_context_files(uses, tmp_path / "missing.crt")
    assert str(tmp_path / "missing.crt") in str(info.value)
    assert info.value.exit_code == 31


@needs_podman
def test_only_debian_base_images_can_be_made(podman: Engine) -> None:
    with pytest.raises(ImageBuildFailed, match="only debian:<suite>"):
        images.ensure_base_image(podman, "example.invalid/qemupatch-none:1")


# -- building -----------------------------------------------------------------------


@needs_podman
def test_failing_run_step_is_an_image_build_failure(podman: Engine, tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM scratch\nRUN false\n")
    log = tmp_path / "image.log"
    with pytest.raises(ImageBuildFailed) as info:
        images.ensure_image(podman, dockerfile, repository="qemupatch-test-fail",
                            timeout=120, log_path=log)
    assert info.value.exit_code == 31
    assert str(log) in str(info.value)
    assert "RUN false" in log.read_text()


def _remove_build_leftovers(image_name: str, wait: float) -> None:
    """Podman keeps the working container of an abandoned build: remove the
    ones named after the base ``image_name`` once their RUN step is over."""
    deadline = time.monotonic() + wait
    while True:
        listed = subprocess.run(["buildah", "containers", "--json"], capture_output=True,
                                text=True, timeout=60).stdout
        ours = [c["id"] for c in json.loads(listed or "null") or []
                if c.get("containername", "").startswith(image_name)]
        if not ours:
            return
        done = subprocess.run(["buildah", "rm", *ours], capture_output=True, timeout=60)
        if done.returncode == 0 or time.monotonic() > deadline:
            return
        time.sleep(1)


@needs_podman
def test_engine_still_answers_after_an_image_build_past_its_deadline(
        podman: Engine, bookworm: str, tmp_path: Path) -> None:
    base = "localhost/qemupatch-test-abandoned-base:1"   # names the leftover
    podman.client.api.tag(podman.image_id(bookworm), base.rpartition(":")[0], "1")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(f"FROM {base}\nRUN sleep 6\n")
    start = time.monotonic()
    try:
        with pytest.raises(ImageBuildFailed, match="deadline limit .* abandoned") as info:
            images.ensure_image(podman, dockerfile, repository="qemupatch-test-slow",
                                timeout=2)
        assert info.value.exit_code == 31
        assert time.monotonic() - start < 30
        assert not podman.closed
        assert podman.image_id(bookworm)
        assert podman.run(bookworm, ["echo", "still here"], timeout=60).output == "still here"
    finally:
        _remove_build_leftovers("qemupatch-test-abandoned-base", wait=30)
        podman.remove_image(base)


@needs_podman
def test_same_content_same_image(podman: Engine, bookworm: str, tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(f"FROM {bookworm}\nARG WHAT=one\nLABEL org.qemupatch.test=$WHAT\n")
    first = images.ensure_image(podman, dockerfile, repository="qemupatch-test-cache",
                                timeout=120)
    try:
        again = images.ensure_image(podman, dockerfile, repository="qemupatch-test-cache",
                                    timeout=120)
        assert first.built and not again.built
        assert (again.id, again.tag) == (first.id, first.tag)
        assert first.tag.startswith(f"qemupatch-test-cache:bookworm-{first.content_hash[:16]}")
        assert first.dockerfile == str(dockerfile)
        assert first.dockerfile_sha256 == hashlib.sha256(dockerfile.read_bytes()).hexdigest()
        assert first.base.startswith(f"{bookworm} (")
        other = images.ensure_image(podman, dockerfile, buildargs={"WHAT": "two"},
                                    repository="qemupatch-test-cache", timeout=120)
        assert other.tag != first.tag, "a build arg is content"
        podman.remove_image(other.tag)
        facts = images.image_facts(podman, first, timeout=60)
        assert any(p.startswith("bash=") for p in facts.packages)
        assert isinstance(facts.tools, tuple)
    finally:
        podman.remove_image(first.tag)


# -- real: the project's images -----------------------------------------------------


@pytest.mark.real
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "ci/Dockerfile.trixie"])
def test_real_build_image(dockerfile: str, tmp_path: Path) -> None:
    path = REPO / dockerfile
    with Engine.get("auto") as engine:
        before = set(engine.leftover_containers())
        image = images.ensure_image(engine, path, timeout=3600,
                                    log_path=tmp_path / "image.log")
        again = images.ensure_image(engine, path, timeout=600)
        assert again.id == image.id and not again.built, "same content, same image"
        base = _from_image(path.read_text())
        assert engine.image_id(base)
        result = engine.run(image.tag, ["sh", "-c", "gcc --version; ls /usr/src"],
                            timeout=120)
        assert result.exit_code == 0
        assert "linux-headers-" in result.output
        facts = images.image_facts(engine, image, timeout=120)
        assert facts.compiler.startswith("gcc")
        if dockerfile == "Dockerfile":
            meson = engine.run(image.tag, ["meson", "--version"], timeout=120)
            assert meson.output.strip() == "1.9.0"
        print(f"\n{dockerfile}: image {image.tag} "
              f"{'built in %.0f s' % image.seconds if image.built else 'reused'}; "
              f"base {image.base}")
        assert set(engine.leftover_containers()) <= before
