"""Stage 2: the patch series in ``patches/``.

``patches/series`` names the ``*.patch`` files (git format-patch output) in
order, quilt style, with one header line recording the upstream release the
series is based on::

    # base: v10.2.2
    hw-misc-add-vmsocket-PCI-device.patch
    ...

A Series is plain data; reading and the atomic write live here, applying and
exporting through git live in worktree.py.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from unidiff import PatchSet
from unidiff.errors import UnidiffParseError

from qemupatch.errors import Conflict, SeriesError
from qemupatch.run import GIT_ENV, run

if TYPE_CHECKING:
    from qemupatch.worktree import WorkTree

SERIES_FILE = "series"
BASE_HEADER = "# base:"
SUBJECT_PREFIX = re.compile(r"^\s*\[[^\]]*PATCH[^\]]*\]\s*")


@dataclass(frozen=True)
class Patch:
    """One git format-patch file."""

    name: str
    text: str
    subject: str = field(compare=False)
    body: str = field(compare=False)
    files: tuple[str, ...] = field(compare=False)

    @classmethod
    def parse(cls, name: str, text: str) -> "Patch":
        head, sep, _ = text.partition("\n---\n")
        msg = email.message_from_string(text, policy=email.policy.compat32)
        raw_subject = msg.get("Subject")
        if not raw_subject:
            raise SeriesError(f"patch {name}: no Subject: header (not a git format-patch file?)")
        subject = str(email.header.make_header(email.header.decode_header(raw_subject)))
        subject = SUBJECT_PREFIX.sub("", " ".join(subject.split()))
        body = ""
        if sep:
            # The message body: after the first blank line of the mail header.
            body = head.split("\n\n", 1)[1] if "\n\n" in head else ""
        try:
            diff = PatchSet(text)
        except UnidiffParseError as exc:
            raise SeriesError(f"patch {name}: corrupt diff: {exc}") from exc
        files = tuple(f.path for f in diff)
        if not files:
            raise SeriesError(f"patch {name}: contains no diff")
        return cls(name=name, text=text, subject=subject, body=body.strip("\n"), files=files)

    def change_lines(self) -> list[str]:
        """The added and removed lines, per file: the patch's meaning
        without its context or line numbers (what a rebase may not change)."""
        lines = []
        for pfile in PatchSet(self.text):
            for hunk in pfile:
                for line in hunk:
                    if line.is_added or line.is_removed:
                        lines.append(f"{pfile.path}: {line.line_type}{line.value.rstrip(chr(10))}")
        return lines


@dataclass(frozen=True)
class Series:
    base: str | None
    patches: tuple[Patch, ...]

    def digest(self) -> str:
        """A hash of the series' content (names, order, text, base)."""
        h = hashlib.sha256(f"base {self.base}\n".encode())
        for p in self.patches:
            h.update(f"{p.name}\n".encode())
            h.update(p.text.encode())
        return h.hexdigest()

    def names(self) -> list[str]:
        return [p.name for p in self.patches]


def read_series(patches_dir: Path) -> Series:
    series_file = patches_dir / SERIES_FILE
    if not series_file.is_file():
        raise SeriesError(f"{series_file} does not exist")
    base = None
    names: list[str] = []
    for number, line in enumerate(series_file.read_text().splitlines(), 1):
        line = line.strip()
        if line.startswith(BASE_HEADER):
            base = line[len(BASE_HEADER):].strip() or None
        elif not line or line.startswith("#"):
            continue
        elif "/" in line or line.startswith("."):
            raise SeriesError(f"{series_file}:{number}: '{line}' is not a file name in {patches_dir}")
        else:
            names.append(line.split()[0])
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SeriesError(f"{series_file}: names {', '.join(dup)} more than once")
    patches = []
    for name in names:
        path = patches_dir / name
        if not path.is_file():
            raise SeriesError(f"{series_file} names {name}, but {path} does not exist")
        try:
            text = path.read_text()
        except UnicodeDecodeError as exc:
            raise SeriesError(f"patch {name}: not UTF-8 text: {exc}") from exc
        patches.append(Patch.parse(name, text))
        _git_can_read(name, text)
    return Series(base=base, patches=tuple(patches))


def _git_can_read(name: str, text: str) -> None:
    """git's own parser is stricter than unidiff's: ask it too."""
    res = run(["git", "apply", "--numstat", "-"], input=text, timeout=60, check=False,
              env=GIT_ENV)
    if res.returncode != 0:
        raise SeriesError(f"patch {name}: corrupt diff: {res.output.strip()}")


def slug(subject: str, limit: int = 64) -> str:
    """A stable file name from a subject, like format-patch's but unnumbered,
    so that inserting a patch renames no other."""
    s = re.sub(r"[^A-Za-z0-9._]+", "-", subject).strip("-.")
    return (s[:limit].rstrip("-.") or "patch") + ".patch"


def unique_names(subjects: list[str]) -> list[str]:
    names: list[str] = []
    for subject in subjects:
        name = slug(subject)
        n = 2
        while name in names:
            name = slug(subject)[: -len(".patch")] + f"-{n}.patch"
            n += 1
        names.append(name)
    return names


def render_series_file(series: Series) -> str:
    header = f"{BASE_HEADER} {series.base}\n" if series.base else ""
    return header + "".join(f"{p.name}\n" for p in series.patches)


def write_series(patches_dir: Path, series: Series) -> None:
    """Replace ``patches_dir`` with ``series``, atomically.

    Everything is written and synced in a sibling folder first; only then
    are the folders swapped.  On any failure before the swap the old
    ``patches/`` is untouched; a crash between the two renames leaves the old
    folder as ``.patches.old-*`` beside it, which ``recover`` puts back.
    """
    parent = patches_dir.parent
    recover(patches_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{patches_dir.name}.new-", dir=parent))
    try:
        for patch in series.patches:
            _write_synced(tmp / patch.name, patch.text)
        _write_synced(tmp / SERIES_FILE, render_series_file(series))
        if patches_dir.exists():
            # Keep what is not a patch: a README, recorded resolutions/.
            for extra in patches_dir.iterdir():
                if extra.name != SERIES_FILE and not extra.name.endswith(".patch"):
                    if extra.is_dir():
                        shutil.copytree(extra, tmp / extra.name)
                    elif extra.is_file():
                        shutil.copy2(extra, tmp / extra.name)
        os.chmod(tmp, 0o755)
        old = None
        if patches_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{patches_dir.name}.old-", dir=parent))
            os.rmdir(old)
            os.rename(patches_dir, old)
        os.rename(tmp, patches_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


def recover(patches_dir: Path) -> None:
    """Undo a swap that a crash interrupted (see write_series)."""
    olds = sorted(patches_dir.parent.glob(f".{patches_dir.name}.old-*"))
    if olds and not patches_dir.exists():
        os.rename(olds[-1], patches_dir)
        olds = olds[:-1]
    for stale in [*olds, *patches_dir.parent.glob(f".{patches_dir.name}.new-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# -- the series against git (through worktree.py) -------------------------------


def apply_series(wt: "WorkTree", series: Series, patches_dir: Path,
                 three_way: bool = True) -> list[str]:
    """Apply every patch with git am on the work tree's HEAD; returns the
    new commits.  A patch that does not apply leaves the tree at the last
    good patch and raises Conflict naming it."""
    commits = []
    for number, patch in enumerate(series.patches, 1):
        res = wt.am(patches_dir / patch.name, three_way=three_way)
        if not res.applied:
            wt.am_abort()
            raise Conflict(f"patch {number} ({patch.name}) does not apply on "
                           f"{series.base or 'the base'}:\n{res.output.strip()}")
        commits.append(wt.head())
    return commits


def export_series(wt: "WorkTree", base_name: str, base_commit: str,
                  previous: Series | None = None) -> Series:
    """The work tree's commits since ``base_commit`` as a normalized series.

    An unchanged commit exports byte-identically: zeroed From line, no
    version signature, no [n/m], full index lines, neutral git config, and a
    file name that is kept from ``previous`` when the subject is the same.
    """
    if merges := wt.merge_commits_since(base_commit):
        raise SeriesError(f"branch {wt.branch} has merge commits ({', '.join(merges)}); "
                          "a series must be linear")
    texts = wt.format_patches(base_commit)
    parsed = [Patch.parse(f"#{n}", t) for n, t in enumerate(texts, 1)]
    old_names = {p.subject: p.name for p in (previous.patches if previous else ())}
    names = unique_names([p.subject for p in parsed])
    used: set[str] = set()
    final = []
    for patch, fresh in zip(parsed, names):
        name = old_names.get(patch.subject, fresh)
        if name in used:
            name = fresh
        used.add(name)
        final.append(Patch.parse(name, patch.text))
    return Series(base=base_name, patches=tuple(final))
