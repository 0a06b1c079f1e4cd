"""What CI runners share: ccache's remote storage and a registry of build images.

QEMUPATCH_CCACHE_REMOTE reaches QEMU builds as CCACHE_REMOTE_STORAGE (a
``file:`` folder mounted into the container); QEMUPATCH_IMAGE_REGISTRY
makes ``images.ensure_image`` pull before building and push after (tested
against a registry served here, tests/ociregistry.py), and a registry that
fails is only a warning.  The ccache tests compile real C
through ccache (the machine's, and the build image's) in two fresh build
folders that share nothing but the remote folder.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from qemupatch import images
from qemupatch.build import (
    BuildSpec,
    Call,
    QemuBuildOptions,
    build_qemu,
    with_ccache_remote,
)
from qemupatch.config import Settings, load
from qemupatch.engine import Engine
from qemupatch.errors import UserError
from qemupatch.progress import NullProgress
from qemupatch.runner import HostRunner, Mount, Runner
from tests import ociregistry
from tests.conftest import requires

REPO = Path(__file__).resolve().parent.parent
needs_ccache = requires(lambda: shutil.which("ccache") and shutil.which("ninja")
                        and shutil.which("gcc"), "ccache, ninja and gcc are needed")
needs_podman = requires(lambda: shutil.which("podman"), "podman is not installed")

# A QEMU-like tree whose build compiles several files with -c (what ccache
# caches; a one-step compile-and-link is not cacheable) and links them.
CONFIGURE = """\
#!/bin/sh
set -eu
src=$(cd "$(dirname "$0")" && pwd)
cc=cc
for arg; do case $arg in --cc=*) cc=${arg#--cc=} ;; esac; done
{
  echo "rule cc"
  echo "  command = $cc -O2 -MD -MQ \\$out -MF \\$out.d -c \\$in -o \\$out"
  echo "  depfile = \\$out.d"
  echo "rule link"
  echo "  command = $cc -o \\$out \\$in"
  objs=""
  for c in "$src"/*.c; do
    o=$(basename "$c" .c).o; objs="$objs $o"
    echo "build $o: cc $c"
  done
  echo "build qemu-system-x86_64: link$objs"
} > build.ninja
"""
FILES = 4


def _tree(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "VERSION").write_text("10.2.99\n")
    (root / "configure").write_text(CONFIGURE)
    (root / "configure").chmod(0o755)
    for i in range(1, FILES):
        (root / f"part{i}.c").write_text(f"int part{i}(int x) {{ return x * {i} + {i}; }}\n")
    calls = " + ".join(f"part{i}(argc)" for i in range(1, FILES))
    decls = "".join(f"int part{i}(int);\n" for i in range(1, FILES))
    (root / "main.c").write_text(f"{decls}int main(int argc, char **argv) "
                                 f"{{ (void)argv; return ({calls}) == 0; }}\n")
    return root


def _remote_stats(log: Path) -> dict[str, int]:
    """ccache's remote_storage_* counters from the build's log."""
    return {k: int(v) for k, v in re.findall(r"^(remote_storage_\w+)\t(\d+)$",
                                             log.read_text(), re.M)}


def _build_twice(runner: Runner, src: Path, tmp_path: Path, **options) -> tuple:
    """The same tree built in two fresh folders with two empty local caches:
    only the remote can give the second one hits."""
    results = []
    for n in (1, 2):
        results.append(build_qemu(
            src, tmp_path / f"out{n}", release="x", repacked=False, runner=runner,
            project_root=REPO, progress=NullProgress(),
            options=QemuBuildOptions(timeout=900, ccache_dir=tmp_path / f"local{n}",
                                     **options)))
    return tuple(results)


# -- the settings -----------------------------------------------------------------


@pytest.mark.parametrize("value, folder", [
    ("file:/mnt/shared/ccache", Path("/mnt/shared/ccache")),
    ("file:///mnt/shared/ccache|umask=002", Path("/mnt/shared/ccache")),
    ("redis://cache.internal:6379", None),
    ("http://cache.internal/ccache|layout=bazel", None),
])
def test_ccache_remote_setting(value: str, folder: Path | None) -> None:
    settings = Settings.from_environ({"QEMUPATCH_CCACHE_REMOTE": value})
    assert settings.ccache_remote == value
    assert settings.ccache_remote_dir == folder


@pytest.mark.parametrize("value, says", [
    ("https://cache/ccache", "not a ccache remote storage URL"),
    ("file:relative/dir", "absolute folder"),
    ("redis://secret@cache", "credentials"),
    ("http://user:pw@cache/c", "credentials"),
    ("redis://", "needs a host"),
    ("file:/a file:/b", "one remote storage URL"),
])
def test_bad_ccache_remote_is_a_user_error_naming_the_variable(value: str, says: str,
                                                               tmp_path: Path) -> None:
    (tmp_path / "qemupatch.toml").write_text('[project]\ndefault_release = "v1"\n')
    with pytest.raises(UserError, match=says) as info:
        load(tmp_path, tmp_path / "cache", env={"QEMUPATCH_CCACHE_REMOTE": value})
    assert "QEMUPATCH_CCACHE_REMOTE" in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("value, ok", [
    ("ghcr.io/org/qemupatch", True), ("registry.example:5000/ci", True),
    ("https://ghcr.io/org", False), ("ghcr.io/org/qemupatch:1", False),
    ("ghcr.io/org/", False),
])
def test_image_registry_setting(value: str, ok: bool) -> None:
    env = {"QEMUPATCH_IMAGE_REGISTRY": value}
    if ok:
        assert Settings.from_environ(env).image_registry == value
    else:
        with pytest.raises(UserError, match="QEMUPATCH_IMAGE_REGISTRY"):
            Settings.from_environ(env)


def test_unset_means_nothing_shared() -> None:
    settings = Settings.from_environ({"QEMUPATCH_CCACHE_REMOTE": " ",
                                      "QEMUPATCH_IMAGE_REGISTRY": ""})
    assert settings.ccache_remote is None and settings.image_registry is None


# -- the spec ---------------------------------------------------------------------


def _spec() -> BuildSpec:
    return BuildSpec(kind="qemu", name="qemu", script="set -eu\ntrue", call=Call("f", ()),
                     env={"CCACHE_DEPEND": "1"})


def test_server_remote_is_passed_as_is() -> None:
    spec = with_ccache_remote(_spec(), "redis://cache.internal")
    assert spec.env == {"CCACHE_DEPEND": "1", "CCACHE_REMOTE_STORAGE": "redis://cache.internal"}
    assert spec.mounts == () and spec.script == _spec().script
    assert spec.facts["ccache_remote"] == "redis://cache.internal"
    assert with_ccache_remote(_spec(), None) == _spec()


def test_file_remote_is_mounted_and_named_by_its_mount() -> None:
    spec = with_ccache_remote(_spec(), "file:/mnt/cc|umask=002", Path("/mnt/cc"))
    assert spec.mounts == (Mount("CCACHE_REMOTE", Path("/mnt/cc"), "/ccache-remote", "rw"),)
    assert "CCACHE_REMOTE_STORAGE" not in spec.env
    first = spec.script.splitlines()[0]
    assert first == "export CCACHE_REMOTE_STORAGE=\"file:$CCACHE_REMOTE\"'|umask=002'"


# -- real ccache ------------------------------------------------------------------


@needs_ccache
def test_two_fresh_build_folders_share_compiles_through_a_file_remote(
        tmp_path: Path) -> None:
    remote = tmp_path / "shared-ccache"
    src = _tree(tmp_path / "src")
    runner = HostRunner(Settings(ccache_remote=f"file:{remote}"))
    first, second = _build_twice(runner, src, tmp_path)
    assert any(remote.rglob("*")), "the first build wrote nothing to the remote"
    one, two = _remote_stats(first.log_path), _remote_stats(second.log_path)
    assert one.get("remote_storage_hit", 0) == 0 and one["remote_storage_write"] >= FILES
    assert first.ccache.misses == FILES
    assert two["remote_storage_hit"] == FILES, two
    assert second.ccache.hits == FILES and second.ccache.misses == 0
    assert subprocess.run([second.binary], timeout=30).returncode == 0
    assert json.loads(second.build_json.read_text())["facts"]["ccache_remote"] == \
        f"file:{remote}"


@needs_ccache
def test_without_a_remote_a_fresh_cache_has_no_hits(tmp_path: Path) -> None:
    """The control: the hits above come from the remote, not from anywhere else."""
    src = _tree(tmp_path / "src")
    first, second = _build_twice(HostRunner(Settings()), src, tmp_path)
    assert second.ccache.hits == 0 and second.ccache.misses == FILES
    assert _remote_stats(second.log_path).get("remote_storage_hit", 0) == 0


@pytest.mark.real
@needs_podman
def test_file_remote_is_mounted_into_container_builds(tmp_path: Path) -> None:
    """In the project's build image: the remote folder on the host is the
    only thing two container builds (two ccache volumes) share."""
    remote = tmp_path / "shared-ccache"
    src = _tree(tmp_path / "src")
    settings = Settings(ccache_remote=f"file:{remote}")
    with Runner.get("podman", settings) as runner:
        try:
            first, second = (
                build_qemu(src, tmp_path / f"out{n}", release="x", repacked=False,
                           runner=runner, project_root=REPO, progress=NullProgress(),
                           options=QemuBuildOptions(timeout=1800,
                                                    ccache_volume=f"qemupatch-ccache-ci-{n}"))
                for n in (1, 2))
        finally:
            for n in (1, 2):
                runner.engine.remove_volume(f"qemupatch-ccache-ci-{n}")
    assert first.runner == "podman" and first.image_tag
    assert any(remote.rglob("*")), "the container wrote nothing to the host folder"
    assert _remote_stats(second.log_path)["remote_storage_hit"] == FILES
    assert second.ccache.hits == FILES and second.ccache.misses == 0


# -- the image registry -----------------------------------------------------------


@needs_podman
def test_unreachable_registry_only_warns_and_the_image_is_built(tmp_path: Path) -> None:
    """Port 9 on this machine answers nothing: the pull and the push fail
    at once, and the image step still succeeds with a local build."""
    registry = "127.0.0.1:9/qemupatch-ci-test"
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM debian:bookworm\n"
                          f"LABEL org.qemupatch.test=registry-{time.time_ns()}\n")
    log = tmp_path / "image.log"
    lines: list[str] = []
    with Engine.get("podman", settings=Settings(no_pull=True,
                                                image_registry=registry)) as engine:
        images.ensure_base_image(engine, "debian:bookworm")
        image = images.ensure_image(engine, dockerfile, repository="qemupatch-test-registry",
                                    timeout=600, log_path=log, on_line=lines.append)
        try:
            assert image.built and engine.image_id(image.tag) == image.id
            assert image.pulled_from == "" and image.pushed_to == ""
            names = [t for i in engine.client.images.list() for t in i.tags]
            assert not any(registry in t for t in names), "the registry tag was left behind"
            again = images.ensure_image(engine, dockerfile,
                                        repository="qemupatch-test-registry", timeout=600)
            assert not again.built and again.id == image.id, "a local hit asks no registry"
        finally:
            engine.remove_image(image.tag)
    text = log.read_text()
    shared = f"{registry}/{image.tag}"
    assert f"warning: cannot use {shared} from the registry, building locally" in text
    assert f"warning: cannot push {shared}" in text
    assert "connection refused" in text
    assert text.index("cannot use") < text.index("building image") < text.index("cannot push")
    assert any("warning: cannot push" in line for line in lines)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A registry on this machine (tests/ociregistry.py), plain HTTP: the
    podman service qemupatch starts inherits a registries.conf that
    allows that."""
    server, store = ociregistry.serve()
    host = f"127.0.0.1:{server.server_address[1]}"
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    yield f"{host}/qemupatch-ci", store
    server.shutdown()


@needs_podman
def test_an_image_one_runner_pushed_is_pulled_by_the_next(registry, tmp_path: Path) -> None:
    """Runner one builds and pushes; runner two (no local image) pulls it
    instead of building; an image under that name whose content-hash label
    differs is not used."""
    prefix, store = registry
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM debian:bookworm\n"
                          f"LABEL org.qemupatch.test=shared-{time.time_ns()}\n")
    log = tmp_path / "image.log"
    settings = Settings(no_pull=True, image_registry=prefix)
    with Engine.get("podman", settings=settings) as engine:
        images.ensure_base_image(engine, "debian:bookworm")

        def ensure():
            return images.ensure_image(engine, dockerfile, repository="qemupatch-test-shared",
                                       timeout=600, registry_timeout=300, log_path=log)

        first = ensure()
        shared = f"{prefix}/{first.tag}"
        assert first.built and first.pushed_to == shared and not first.pulled_from
        repo, _, tag = shared.partition("/")[2].rpartition(":")
        assert (repo, tag) in store.manifests
        engine.remove_image(first.tag)              # runner two: nothing local
        second = ensure()
        try:
            assert not second.built and second.pulled_from == shared
            assert second.id == first.id and second.tag == first.tag
            assert engine.image_id(first.tag) == first.id
            names = [t for i in engine.client.images.list() for t in i.tags]
            assert not any(prefix in t for t in names), "the registry name was left behind"
            assert not any(line.startswith("PUT") for line in store.log[
                len(store.log) - 3:]), "a pulled image is not pushed again"
        finally:
            engine.remove_image(second.tag)
        # Something else under that name (a wrong label): built locally.
        impostor_dir = tmp_path / "impostor"
        impostor_dir.mkdir()
        (impostor_dir / "Dockerfile").write_text("FROM debian:bookworm\n"
                                                 "LABEL org.qemupatch.image=other\n")
        impostor = engine.build(impostor_dir, tag="qemupatch-test-impostor:1", timeout=300)
        try:
            engine.client.api.tag(impostor, shared.rpartition(":")[0], tag)
            for _ in engine.client.api.push(shared.rpartition(":")[0], tag=tag, stream=True,
                                            decode=True):
                pass
            engine.client.images.remove(shared, noprune=True)
            third = ensure()
            try:
                assert third.built and third.id != impostor
                assert engine.image_id("qemupatch-test-impostor:1") == impostor
            finally:
                engine.remove_image(third.tag)
        finally:
            engine.remove_image("qemupatch-test-impostor:1")
    text = log.read_text()
    assert f"pushed {shared}" in text
    assert f"pulled {shared} ({first.id[:19]}) instead of building it" in text
    assert "label is 'other', not this content hash; not used" in text
