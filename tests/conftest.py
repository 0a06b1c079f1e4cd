"""Shared fixtures: small synthetic upstream releases and a project using them.

The synthetic upstream is built so that one rebase from v1.0.0 to v1.1.0
meets every outcome class: each file of the tree is aimed at one class.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qemupatch import config, workflow
from qemupatch.run import git
from qemupatch.worktree import WorkTree

REPO_ROOT = Path(__file__).resolve().parent.parent


def requires(present: Callable[[], object], message: str):
    """Mark a test as needing something ci/setup-debian.sh installs: its
    absence fails the test with ``message`` (it is a broken machine, not a
    reason to skip)."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            assert present(), f"{message}: run ci/setup-debian.sh"
            return fn(*args, **kwargs)
        return wrapped
    return decorate


def lines(prefix: str, n: int = 30, **changed: str) -> str:
    out = []
    for i in range(1, n + 1):
        out.append(changed.get(f"{prefix}{i}", f"{prefix}{i} original line"))
    return "\n".join(out) + "\n"


V1 = {
    "clean.c": lines("K"),
    "offset.c": lines("L"),
    "merge.c": lines("M"),
    "conflict.c": lines("C"),
    "dropped.c": lines("D"),
    "README": "synthetic upstream\n",
}

V2 = {
    **V1,
    # Five new lines above the patched one: the hunk moves.
    "offset.c": "".join(f"L0.{i} new upstream line\n" for i in range(5)) + lines("L"),
    # A change inside the patch's context: needs a three-way merge.
    "merge.c": lines("M", M13="M13 changed upstream"),
    # The very line the patch changes: conflict.
    "conflict.c": lines("C", C15="C15 changed upstream"),
    # Upstream took the patch: dropped.
    "dropped.c": lines("D", D15="D15 patched"),
}

# (file, line key, subject) of each patch in the synthetic series, in order.
PATCHES = [
    ("clean.c", "K15", "clean: patch a file upstream left alone"),
    ("offset.c", "L15", "offset: patch a file upstream grew"),
    ("merge.c", "M15", "merge: patch next to an upstream change"),
    ("conflict.c", "C15", "conflict: patch a line upstream changed"),
    ("dropped.c", "D15", "dropped: patch upstream took"),
    ("conflict.c", "C28", "risk: patch the conflicting file elsewhere"),
]


def make_tarball(path: Path, top: str, files: dict[str, str]) -> Path:
    src = path.parent / f"{path.name}.src" / top
    src.mkdir(parents=True)
    for name, text in files.items():
        (src / name).write_text(text)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=top)
    return path


@dataclass
class Project:
    root: Path
    cache: Path
    tarballs: dict[str, Path]

    @property
    def cfg(self) -> config.Config:
        return config.load(self.root, self.cache)

    @property
    def patches(self) -> Path:
        return self.root / "patches"

    def cli(self, *args: str, check_code: int | None = 0) -> subprocess.CompletedProcess:
        """Run the real command line in a subprocess, as a user would."""
        res = subprocess.run(
            [sys.executable, "-m", "qemupatch", "-C", str(self.root), "--cache", str(self.cache),
             *args],
            capture_output=True, text=True, timeout=300, cwd=self.root,
        )
        if check_code is not None:
            assert res.returncode == check_code, (res.returncode, res.stdout, res.stderr)
        return res

    def worktree(self, release: str) -> WorkTree:
        cfg = self.cfg
        return WorkTree.for_release(cfg.mirror_dir, cfg.cache_dir, release)


def write_config(root: Path, tarballs: dict[str, Path], default: str = "v1.0.0") -> None:
    entries = "".join(
        f'\n[[release]]\nname = "{name}"\ntarball = "{path}"\n' for name, path in tarballs.items())
    (root / "qemupatch.toml").write_text(
        f'[project]\ndefault_release = "{default}"\nprefer = ["tarball"]\n' + entries)


def synthetic_project(tmp_path: Path, releases: dict[str, dict[str, str]],
                      commit_series: Callable[[WorkTree], None]) -> Project:
    """A project whose upstream releases are ``releases`` (name -> files,
    the first one the series' base), all imported, with the series that
    ``commit_series`` commits on the base exported to patches/."""
    root = tmp_path / "proj"
    root.mkdir()
    tarballs = {name: make_tarball(tmp_path / f"up-{name[1:]}.tar.gz", f"up-{name[1:]}", files)
                for name, files in releases.items()}
    base = next(iter(releases))
    write_config(root, tarballs, default=base)
    proj = Project(root, tmp_path / "cache", tarballs)
    cfg = proj.cfg
    m = workflow.mirror(cfg)
    for name, path in tarballs.items():
        m.import_tarball(name, path)
    wt = proj.worktree(base)
    wt.reset_to(m.get(base).commit)
    commit_series(wt)
    workflow.export(cfg, base)
    return proj


def commit_change(wt: WorkTree, file: str, key: str, subject: str) -> None:
    text = (wt.path / file).read_text().replace(f"{key} original line", key + " patched")
    commit_files(wt, {file: text}, subject, why="exercise one outcome class")


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """A project with releases v1.0.0 and v1.1.0 imported and the six-patch
    series exported on v1.0.0."""
    def commit_series(wt: WorkTree) -> None:
        for file, key, subject in PATCHES:
            commit_change(wt, file, key, subject)

    return synthetic_project(tmp_path, {"v1.0.0": V1, "v1.1.0": V2}, commit_series)


# A second synthetic upstream pair, for conflicts that are not hand work:
# the series and upstream both add to the same lists.
def meson_list(*names: str) -> str:
    return "".join(f"system_ss.add(when: 'CONFIG_{n}', if_true: files('{n.lower()}.c'))\n"
                   for n in names)


def toctree(*names: str) -> str:
    return ".. toctree::\n   :maxdepth: 1\n\n" + "".join(f"   devices/{n}.rst\n" for n in names)


def maintainers(*titles: str) -> str:
    return "".join(f"{t}\nM: Someone <someone@example.org>\nS: Maintained\n"
                   f"F: hw/{t.split()[0].lower()}.c\n\n" for t in titles)


LISTS_V1 = {
    "meson.build": "# devices\n" + meson_list("ALPHA", "GAMMA", "ZETA"),
    "index.rst": toctree("alpha", "gamma"),
    "MAINTAINERS": maintainers("Alpha", "Gamma", "Zeta"),
    "real.c": lines("R"),
    "chain.c": lines("H"),
}

LISTS_V2 = {
    # Upstream adds RHO where the series adds SOCKET, and beta to the toctree
    # end, renames the section the series' new one precedes, and changes the
    # line the series changes (a real conflict).
    "meson.build": "# devices\n" + meson_list("ALPHA", "GAMMA", "RHO", "ZETA"),
    "index.rst": toctree("alpha", "beta", "gamma", "omega"),
    "MAINTAINERS": maintainers("Alpha", "Gamma", "Zeta and friends"),
    "real.c": lines("R", R5="R5 changed upstream"),
    "chain.c": lines("H", H18="H18 changed upstream"),
}

# (subject, {file: content after the patch}) of the series on v2.0.0.
LISTS_PATCHES = [
    ("lists: add the socket device to the build and the docs", {
        "meson.build": "# devices\n" + meson_list("ALPHA", "GAMMA", "SOCKET", "ZETA"),
        "index.rst": toctree("alpha", "gamma", "socket"),
    }),
    ("maintainers: add the socket section", {
        "MAINTAINERS": maintainers("Alpha", "Gamma", "Socket", "Zeta"),
    }),
    ("real: change a line upstream changed too", {
        "real.c": lines("R", R5="R5 patched"),
    }),
    # Applies as is, then the next patch (made on the file this one left)
    # needs a three-way merge: next to an upstream change.
    ("chain: patch a file", {"chain.c": lines("H", H5="H5 patched")}),
    ("chain: patch it again", {"chain.c": lines("H", H5="H5 patched", H20="H20 patched")}),
]


def commit_files(wt: WorkTree, files: dict[str, str], subject: str,
                 why: str = "exercise a list conflict") -> None:
    """One commit by the test maintainer, with a body and a sign-off."""
    for name, text in files.items():
        (wt.path / name).write_text(text)
    git(wt.path, "add", *files)
    git(wt.path, "commit", "-q", "-m",
        f"{subject}\n\nWhy: {why}.\n\n"
        "Signed-off-by: Test Maintainer <maintainer@example.org>",
        env={"GIT_AUTHOR_NAME": "Test Maintainer", "GIT_AUTHOR_EMAIL": "maintainer@example.org",
             "GIT_AUTHOR_DATE": "2026-01-02T03:04:05+0100"})


@pytest.fixture
def lists_project(tmp_path: Path) -> Project:
    """A project with releases v2.0.0 and v2.1.0 and a five-patch series on
    v2.0.0: two patches whose conflicts are list insertions, one real
    conflict, and two on one file, the second needing a three-way merge."""
    def commit_series(wt: WorkTree) -> None:
        for subject, files in LISTS_PATCHES:
            commit_files(wt, files, subject)

    return synthetic_project(tmp_path, {"v2.0.0": LISTS_V1, "v2.1.0": LISTS_V2},
                             commit_series)
