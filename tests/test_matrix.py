"""The matrix as data: targets from qemupatch.toml, failures classified,
and which releases a change touches (what CI's own run builds beyond the
default release)."""

import errno
from pathlib import Path

import pytest

from qemupatch import config, matrix
from qemupatch.errors import CommandFailed, CompileFailed, DownloadError, EngineError, UserError
from qemupatch.run import git

TOML = """
[project]
default_release = "v2.0.0"
[[release]]
name = "v2.0.0"
tarball = "a.tar.gz"
[[release]]
name = "v1.0.0"
tarball = "b.tar.gz"
[[kernel]]
name = "6.1"
suite = "bookworm"
image_package = "linux-image-x"
[[kernel]]
name = "6.12"
suite = "trixie"
image_package = "linux-image-y"
[matrix]
releases = ["v1.0.0", "v2.0.0"]
kernels = ["6.1", "6.12"]
"""


def _project(tmp_path: Path, extra: str = "") -> config.Config:
    root = tmp_path / "proj"
    (root / "patches" / "releases" / "v1.0.0").mkdir(parents=True)
    (root / "qemupatch.toml").write_text(TOML + extra)
    (root / "patches" / "series").write_text("# base: v2.0.0\na.patch\n")
    (root / "patches" / "a.patch").write_text("base patch\n")
    (root / "patches" / "releases" / "v1.0.0" / "fix.patch").write_text("fix-up\n")
    git(root, "init", "-q")
    _commit(root, "start")
    return config.load(root, tmp_path / "cache", env={})


def _commit(root: Path, message: str) -> str:
    git(root, "add", "-A")
    git(root, "-c", "user.name=T", "-c", "user.email=t@example.org", "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD").stdout.strip()


def test_targets_are_releases_times_kernels_plus_included_cells(tmp_path):
    cfg = _project(tmp_path, '[[matrix.include]]\nrelease = "v2.0.0"\nkernel = "7.2"\n'
                             'required = false\n[[kernel]]\nname = "7.2"\nsuite = "sid"\n'
                             'image_package = "linux-image-z"\n')
    names = [(t.name, t.required) for t in matrix.targets(cfg)]
    assert names == [("v1.0.0-linux-6.1", True), ("v1.0.0-linux-6.12", True),
                     ("v2.0.0-linux-6.1", True), ("v2.0.0-linux-6.12", True),
                     ("v2.0.0-linux-7.2", False)]
    assert matrix.find_target(cfg, "v2.0.0-linux-7.2").kernel == "7.2"
    with pytest.raises(UserError, match="no matrix target 'v3-linux-6.1'; known: v1.0.0"):
        matrix.find_target(cfg, "v3-linux-6.1")


def test_a_matrix_naming_an_unknown_release_or_a_cell_twice_is_refused(tmp_path):
    cfg = _project(tmp_path, '[[matrix.include]]\nrelease = "v9"\nkernel = "6.1"\n')
    with pytest.raises(UserError, match="release 'v9', which has no"):
        matrix.targets(cfg)
    cfg = _project(tmp_path / "b", '[[matrix.include]]\nrelease = "v1.0.0"\nkernel = "6.1"\n')
    with pytest.raises(UserError, match="same target twice: v1.0.0-linux-6.1"):
        matrix.targets(cfg)


def test_infrastructure_failures_are_told_apart_from_the_series_failing():
    assert matrix.classify(CompileFailed("error: x")) == matrix.FAIL
    assert matrix.classify(AssertionError()) == matrix.FAIL
    assert matrix.classify(UserError("conflict")) == matrix.FAIL
    for exc in (DownloadError("404"), EngineError("api"), CommandFailed(["git"], 128, "x"),
                OSError(errno.ENOSPC, "No space left on device")):
        assert matrix.classify(exc) == matrix.INFRA, exc


def test_touched_releases_follow_what_changed(tmp_path):
    cfg = _project(tmp_path)
    root = cfg.root
    start = git(root, "rev-parse", "HEAD").stdout.strip()
    assert matrix.touched_releases(cfg, start) == ()
    assert matrix.touched_releases(cfg, None) == ("v1.0.0", "v2.0.0")
    assert matrix.touched_releases(cfg, "0" * 40) == ("v1.0.0", "v2.0.0")
    (root / "README").write_text("docs only\n")
    _commit(root, "docs")
    assert matrix.touched_releases(cfg, start) == ()
    (root / "patches" / "releases" / "v1.0.0" / "fix.patch").write_text("fix-up 2\n")
    _commit(root, "fix-up")
    assert matrix.touched_releases(cfg, start) == ("v1.0.0",)
    (root / "patches" / "a.patch").write_text("base patch 2\n")
    _commit(root, "device")
    assert matrix.touched_releases(cfg, start) == ("v1.0.0", "v2.0.0")
