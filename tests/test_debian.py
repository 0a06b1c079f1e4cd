"""The Debian edge: which mirror this machine's apt uses."""

import shutil
import subprocess
from dataclasses import astuple
from pathlib import Path

import pytest

from qemupatch import config, debian
from qemupatch.debian import Mirrors, debootstrap_rootfs, machine_mirrors
from qemupatch.errors import CommandFailed, DownloadError
from tests.conftest import REPO_ROOT, requires


def test_mirror_from_deb822_sources(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("QEMUPATCH_DEBIAN_MIRROR", raising=False)
    d = tmp_path / "etc/apt/sources.list.d"
    d.mkdir(parents=True)
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    assert astuple(machine_mirrors(tmp_path)) == ("http://mirror.example/debian",
                                       "http://mirror.example/debian-security")


def test_mirror_from_one_line_sources(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("QEMUPATCH_DEBIAN_MIRROR", raising=False)
    apt = tmp_path / "etc/apt"
    apt.mkdir(parents=True)
    (apt / "sources.list").write_text(
        "# comment\ndeb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64] http://one.example/debian/ bookworm main\n")
    assert astuple(machine_mirrors(tmp_path)) == ("http://one.example/debian", None)


def test_no_mirror_is_explained(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("QEMUPATCH_DEBIAN_MIRROR", raising=False)
    with pytest.raises(DownloadError, match="QEMUPATCH_DEBIAN_MIRROR"):
        astuple(machine_mirrors(tmp_path))


@requires(lambda: shutil.which("debootstrap"), "debootstrap is not installed")
def test_debootstrap_failure_is_a_failed_command_and_leaves_nothing(tmp_path: Path) -> None:
    """An unreachable mirror fails fast, and the temporary rootfs goes."""
    dest = tmp_path / "rootfs.tar"
    with pytest.raises(CommandFailed, match="debootstrap"):
        debootstrap_rootfs("bookworm", dest, Mirrors("http://127.0.0.1:9/debian"), timeout=120)
    assert list(tmp_path.iterdir()) == []


def test_sid_rootfs_names_no_updates_or_security_suite() -> None:
    """sid has neither: apt-get update in a sid image would fail on them."""
    m = Mirrors("http://m.example/debian", "http://m.example/debian-security")
    assert debian.apt_sources("sid", m) == ["deb http://m.example/debian sid main"]
    assert debian.apt_sources("trixie", m) == [
        "deb http://m.example/debian trixie main",
        "deb http://m.example/debian trixie-updates main",
        "deb http://m.example/debian-security trixie-security main"]
    assert debian.apt_sources("bookworm", Mirrors("http://m.example/debian"))[-1] == \
        "deb http://m.example/debian-security bookworm-security main"


def test_date_policy_from_apt_config_dump() -> None:
    dump = ('APT "";\nAPT::Architecture "amd64";\nAcquire::Check-Valid-Until "false";\n'
            'Acquire::check-date "0";\nAcquire::http::Proxy "http://p:3128";\n')
    assert debian.parse_date_policy(dump) == {"Acquire::Check-Valid-Until": "false",
                                              "Acquire::Check-Date": "0"}
    assert debian.parse_date_policy('APT::Architecture "amd64";\n') == {}


@pytest.mark.real
@pytest.mark.timeout(900)
@requires(lambda: shutil.which("debootstrap"), "debootstrap is not installed")
def test_real_sid_rootfs_runs_apt_get_update(tmp_path: Path) -> None:
    """A sid rootfs from this machine's mirror: only sid in its sources, the
    machine's date policy with it, and its own apt-get update succeeds
    (this mirror serves sid's Release file past its Valid-Until)."""
    mirrors = debian.mirrors(config.load(REPO_ROOT).settings)
    tar = debootstrap_rootfs("sid", tmp_path / "sid.tar", mirrors, timeout=800)
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", root, "-xf", tar], check=True, timeout=300)
    assert (root / "etc/apt/sources.list").read_text() == f"deb {mirrors.main} sid main\n"
    policy = debian.machine_date_policy()
    conf = root / "etc/apt/apt.conf.d/99qemupatch-mirror"
    assert conf.is_file() == bool(policy)
    done = subprocess.run(["chroot", root, "apt-get", "-q", "update"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "expired" not in done.stderr
