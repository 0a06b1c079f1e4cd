"""The Debian edge: which mirror this machine's apt uses."""

import shutil
from dataclasses import astuple
from pathlib import Path

import pytest

from qemupatch.debian import Mirrors, debootstrap_rootfs, machine_mirrors
from qemupatch.errors import CommandFailed, DownloadError
from tests.conftest import requires


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
