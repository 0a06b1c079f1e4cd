"""The git edge of the series stages: work trees of the mirror where the
series is applied, edited, exported and rebased.

Each release gets one work tree (``<cache>/work/<release>``) on branch
``qemupatch/<release>``.  Before a branch is rewritten its tip is saved
under ``refs/qemupatch/backup/``, so no commit is ever lost.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import git as gitpython

from qemupatch.errors import DirtyWorkTree
from qemupatch.records import utc_stamp
from qemupatch.run import git

BRANCH_PREFIX = "qemupatch/"
BACKUP_PREFIX = "refs/qemupatch/backup/"
# Where a branch's release fix-ups start (carry.py); a rebase forgets it.
CARRIED_PREFIX = "refs/qemupatch/carried/"
FORMAT_PATCH = (
    "format-patch", "--zero-commit", "--no-signature", "--no-numbered",
    "--full-index", "--no-thread", "--no-cover-letter", "--subject-prefix=PATCH",
    "--no-renames", "--diff-algorithm=myers", "--no-notes",
)


@dataclass(frozen=True)
class AmResult:
    applied: bool
    empty: bool  # the patch changed nothing: already applied upstream
    output: str


class WorkTree:
    def __init__(self, mirror: Path, path: Path, branch: str):
        self.mirror = mirror
        self.path = path
        self.branch = branch

    @classmethod
    def for_release(cls, mirror: Path, cache_dir: Path, release: str,
                    path: Path | None = None) -> "WorkTree":
        return cls(mirror, path or cache_dir / "work" / release, BRANCH_PREFIX + release)

    # -- state ---------------------------------------------------------------

    def exists(self) -> bool:
        return (self.path / ".git").exists()

    def repo(self) -> gitpython.Repo:
        return gitpython.Repo(self.path)

    def head(self) -> str:
        return git(self.path, "rev-parse", "HEAD").stdout.strip()

    def branch_tip(self) -> str | None:
        res = git(self.mirror, "rev-parse", "--verify", "--quiet",
                  f"refs/heads/{self.branch}", check=False)
        return res.stdout.strip() or None

    def dirty_files(self) -> list[str]:
        if not self.exists():
            return []
        repo = self.repo()
        changed = [d.a_path for d in repo.index.diff(None)]
        staged = [d.a_path for d in repo.index.diff("HEAD")]
        return sorted(set(changed + staged + self.unmerged_files()))

    def unmerged_files(self) -> list[str]:
        out = git(self.path, "diff", "--name-only", "--diff-filter=U").stdout
        return [line for line in out.splitlines() if line]

    def unmerged_stages(self) -> dict[str, tuple[str | None, str | None, str | None]]:
        """Each unmerged path's blob ids at index stages 1, 2, 3 (base, ours,
        theirs); None for a side that has no such file."""
        out = git(self.path, "ls-files", "--unmerged", "-z").stdout
        stages: dict[str, list[str | None]] = {}
        for entry in filter(None, out.split("\0")):
            meta, path = entry.split("\t", 1)
            _, blob_id, stage = meta.split()
            stages.setdefault(path, [None, None, None])[int(stage) - 1] = blob_id
        return {path: (ids[0], ids[1], ids[2]) for path, ids in stages.items()}

    def blob(self, blob_id: str) -> bytes:
        """A blob's exact bytes (no newline translation)."""
        return self.repo().git.cat_file("blob", blob_id, stdout_as_string=False,
                                        strip_newline_in_stdout=False)

    def blob_id(self, rev: str, path: str) -> str | None:
        res = git(self.path, "rev-parse", "--verify", "--quiet", f"{rev}:{path}", check=False)
        return res.stdout.strip() or None

    def add(self, paths: list[str]) -> None:
        git(self.path, "add", "--", *paths)

    def remove(self, paths: list[str]) -> None:
        """Resolve these paths as deleted (index and work tree)."""
        git(self.path, "rm", "-q", "--force", "--ignore-unmatch", "--", *paths)

    def am_in_progress(self) -> bool:
        if not self.exists():
            return False
        gitdir = Path(git(self.path, "rev-parse", "--absolute-git-dir").stdout.strip())
        return (gitdir / "rebase-apply").exists()

    # -- rewriting -------------------------------------------------------------

    def forget_carried(self) -> None:
        git(self.mirror, "update-ref", "-d", CARRIED_PREFIX + self.branch, check=False)

    def backup(self) -> str | None:
        """Save the branch tip under refs/qemupatch/backup/ before a rewrite."""
        tip = self.branch_tip()
        if tip is None:
            return None
        stamp = utc_stamp()
        ref = f"{BACKUP_PREFIX}{self.branch}/{stamp}"
        git(self.mirror, "update-ref", ref, tip)
        return ref

    def reset_to(self, commit: str, *, allow_dirty: bool = False) -> str | None:
        """Put the branch and work tree at ``commit``; returns the backup ref."""
        if not allow_dirty and (dirty := self.dirty_files()):
            raise DirtyWorkTree(self.path, dirty)
        backup = self.backup()
        if not self.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            git(self.mirror, "worktree", "prune")
            git(self.mirror, "worktree", "add", "--force", "-B", self.branch,
                self.path, commit, timeout=900)
        else:
            if self.am_in_progress():
                self.am_abort()
            git(self.path, "checkout", "--force", "-B", self.branch, commit, timeout=900)
        return backup

    def restore(self, commit: str | None) -> None:
        """Put the branch back where it was (``None``: it did not exist)."""
        if self.am_in_progress():
            self.am_abort()
        if commit is None:
            if self.exists():
                git(self.mirror, "worktree", "remove", "--force", self.path)
            if self.branch_tip():
                git(self.mirror, "branch", "-D", self.branch)
        else:
            git(self.path, "checkout", "--force", "-B", self.branch, commit, timeout=900)

    # -- patches ---------------------------------------------------------------

    def am(self, patch_file: Path, *, three_way: bool) -> AmResult:
        args = ["am", "--keep-non-patch", "--committer-date-is-author-date"]
        args += ["--3way"] if three_way else []
        res = git(self.path, *args, patch_file, check=False, timeout=600)
        if res.returncode == 0:
            return AmResult(True, False, res.output)
        empty = "No changes" in res.output or "Patch is empty" in res.output
        return AmResult(False, empty, res.output)

    def am_abort(self) -> None:
        git(self.path, "am", "--abort", check=False)

    def am_continue(self) -> AmResult:
        res = git(self.path, "am", "--continue", check=False)
        if res.returncode == 0:
            return AmResult(True, False, res.output)
        return AmResult(False, "No changes" in res.output, res.output)

    def applies(self, patch_text: str, *, reverse: bool = False) -> bool:
        """Would ``patch_text`` apply to the work tree (exact context)?"""
        args = ["apply", "--check"] + (["--reverse"] if reverse else [])
        return git(self.path, *args, "-", input=patch_text, check=False).returncode == 0

    def applies_at(self, patch_texts: list[str], commit: str) -> list[bool]:
        """Would each patch apply to ``commit``'s tree?  Works while the work
        tree itself is mid-conflict: the check uses a private index."""
        with tempfile.TemporaryDirectory(prefix="qemupatch-index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            git(self.path, "read-tree", commit, env=env)
            return [git(self.path, "apply", "--cached", "--check", "-", input=text,
                        env=env, check=False).returncode == 0 for text in patch_texts]

    def store_preimages(self, patch_texts: list[str], commit: str) -> None:
        """Apply the patches in turn onto ``commit`` in a private index, so
        that the object database holds every file version they were made
        on: ``git am --3way`` needs those to fall back on a three-way merge
        (in a mirror where the series was never applied, it cannot)."""
        with tempfile.TemporaryDirectory(prefix="qemupatch-index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            git(self.path, "read-tree", commit, env=env)
            for text in patch_texts:
                git(self.path, "apply", "--cached", "-", input=text, env=env, check=False)

    def format_patches(self, base: str) -> list[str]:
        """The commits since ``base`` as normalized format-patch texts."""
        with tempfile.TemporaryDirectory(prefix="qemupatch-export-") as tmp:
            git(self.path, *FORMAT_PATCH, "-o", tmp, f"{base}..HEAD", timeout=600)
            return [p.read_text() for p in sorted(Path(tmp).glob("*.patch"))]

    def commits_since(self, base: str) -> list[str]:
        out = git(self.path, "rev-list", "--reverse", f"{base}..HEAD").stdout
        return out.split()

    def merge_commits_since(self, base: str) -> list[str]:
        out = git(self.path, "rev-list", "--merges", f"{base}..HEAD").stdout
        return out.split()
