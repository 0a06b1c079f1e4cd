"""The series on releases other than its base: the base series carried
over, then the release's own small fix-ups.

    patches/series                       # base: v10.2.2  -- the device, once
    patches/*.patch
    patches/resolutions/*.txt            # recorded conflict resolutions
    patches/releases/<release>/series    # base: <release> -- fix-ups, on top
    patches/releases/<release>/*.patch   # one per API difference, named by it

A maintainer changes the device once, in the base series; every release
gets the change.  What differs per release is only what is in its folder
under ``releases/``, each fix-up a commit named by what it adapts.

Carrying the base series onto a release is the rebase's step, without a
stop: each patch as is, else ``git am --3way``, else with every conflict
resolved automatically (recorded resolutions, list insertions:
:func:`qemupatch.rebase.apply_resolving`); a conflict left is an error that
says how to record its resolution.  The fix-ups then go on with plain
``git am``: they are made on the carried series and must apply exactly.

In a maintainer's work tree (``qemupatch apply --base <release>``) the
commit where the fix-ups start is kept as ``refs/qemupatch/carried/<branch>``
so that ``qemupatch export --base <release>`` writes back only the
commits after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qemupatch import report as rpt
from qemupatch.errors import Conflict, UserError
from qemupatch.rebase import RESOLUTIONS, Step, apply_resolving
from qemupatch.run import git
from qemupatch.series import (
    SERIES_FILE,
    Series,
    apply_series,
    read_series,
    write_series,
)
from qemupatch.worktree import CARRIED_PREFIX, WorkTree

RELEASES = "releases"  # in patches/: one folder of fix-ups per release

Progress = Callable[[str], None]


def fixups_dir(patches_dir: Path, release: str) -> Path:
    return patches_dir / RELEASES / release


def read_fixups(patches_dir: Path, release: str) -> Series:
    """The release's fix-ups; none (an empty series) when it has no folder."""
    folder = fixups_dir(patches_dir, release)
    if not (folder / SERIES_FILE).exists():
        return Series(base=release, patches=())
    fixups = read_series(folder)
    if fixups.base not in (None, release):
        raise UserError(f"{folder / SERIES_FILE} says '# base: {fixups.base}', "
                        f"but it is the folder of {release}")
    return Series(base=release, patches=fixups.patches)


def releases_with_fixups(patches_dir: Path) -> list[str]:
    folder = patches_dir / RELEASES
    return sorted(p.name for p in folder.iterdir()
                  if (p / SERIES_FILE).exists()) if folder.is_dir() else []


def write_fixups(patches_dir: Path, fixups: Series) -> None:
    """Replace the release's fix-up folder atomically (series.write_series);
    no fix-ups: no folder."""
    assert fixups.base
    folder = fixups_dir(patches_dir, fixups.base)
    if fixups.patches:
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_series(folder, fixups)
    elif folder.exists():
        gone = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.rmdir(gone)
        os.rename(folder, gone)
        shutil.rmtree(gone)
        if not any((patches_dir / RELEASES).iterdir()):
            (patches_dir / RELEASES).rmdir()


@dataclass(frozen=True)
class Stack:
    """What is applied on a release: the base series (carried), then fix-ups."""

    release: str
    base_commits: tuple[str, ...]
    carried: tuple[Step, ...]  # per base patch; empty on the series' own base
    fixups_start: str  # the commit the fix-ups go on
    fixups: Series
    fixup_commits: tuple[str, ...]

    @property
    def commits(self) -> tuple[str, ...]:
        return self.base_commits + self.fixup_commits


def is_carried(series: Series, release: str) -> bool:
    """Does ``release`` get the series carried over (and fix-ups)?"""
    return series.base is not None and release != series.base


def carry_series(wt: WorkTree, series: Series, patches_dir: Path, base_commit: str,
                 release: str, progress: Progress | None = None) -> tuple[list[Step], list[str]]:
    """Apply the base series on the work tree's HEAD (a release other than
    its base) with the rebase's automatic resolutions; returns each patch's
    step and the new commits.  A conflict nothing resolves aborts git's am
    session, leaves the tree at the last patch that went on and raises
    Conflict naming the patch, the files and why."""
    wt.store_preimages([p.text for p in series.patches], base_commit)
    steps, commits = [], []
    for number, patch in enumerate(series.patches, 1):
        step = apply_resolving(wt, patches_dir / patch.name, patch,
                               patches_dir / RESOLUTIONS, progress)
        if step.outcome == rpt.CONFLICT:
            wt.am_abort()
            raise Conflict(
                f"patch {number} ({patch.name}) of the {series.base} series does not carry "
                f"onto {release}: {step.detail}\n"
                + "".join(f"  {why}\n" for why in step.unresolved)
                + f"  record a resolution: qemupatch rebase --onto {release}, resolve, "
                "git add, qemupatch rebase --continue (kept in patches/resolutions/; "
                f"the rebased branch is not exported), then qemupatch apply --base {release}")
        steps.append(step)
        if step.outcome != rpt.DROPPED:
            commits.append(wt.head())
    return steps, commits


def apply_stack(wt: WorkTree, series: Series, patches_dir: Path, release: str,
                base_commit: str | None, progress: Progress | None = None,
                on_carried: Callable[[str], None] | None = None) -> Stack:
    """The series and the release's fix-ups on the work tree's HEAD (the
    release's commit).  On the series' own base: the series with plain
    ``git am`` and no fix-ups.  ``base_commit``: the series' base release
    (needed only to carry); ``on_carried`` is told the commit the fix-ups
    start on before they are applied."""
    if not is_carried(series, release):
        commits = apply_series(wt, series, patches_dir)
        return Stack(release, tuple(commits), (), wt.head(), Series(release, ()), ())
    assert base_commit is not None
    steps, base_commits = carry_series(wt, series, patches_dir, base_commit, release, progress)
    start = wt.head()
    if on_carried is not None:
        on_carried(start)
    fixups = read_fixups(patches_dir, release)
    fixup_commits = apply_series(wt, fixups, fixups_dir(patches_dir, release), three_way=False)
    return Stack(release, tuple(base_commits), tuple(steps), start, fixups,
                 tuple(fixup_commits))


# -- the maintainer's work tree: where the fix-ups start ---------------------------


def carried_ref(wt: WorkTree) -> str:
    return CARRIED_PREFIX + wt.branch


def mark_carried(wt: WorkTree, commit: str) -> None:
    git(wt.mirror, "update-ref", carried_ref(wt), commit)


def clear_carried(wt: WorkTree) -> None:
    wt.forget_carried()


def carried_tip(wt: WorkTree) -> str | None:
    """Where the fix-ups start on the work tree's branch, if ``apply
    --base`` carried the series there."""
    res = git(wt.mirror, "rev-parse", "--verify", "--quiet", carried_ref(wt), check=False)
    return res.stdout.strip() or None


def fixups_start(wt: WorkTree, release: str) -> str:
    """The carried tip, checked to be under the branch's HEAD."""
    tip = carried_tip(wt)
    assert tip is not None
    res = git(wt.path, "merge-base", "--is-ancestor", tip, "HEAD", check=False)
    if res.returncode != 0:
        raise UserError(
            f"the carried series on {wt.branch} was rewritten (its tip {tip[:12]} is no "
            f"longer under HEAD): a change for {release} only goes in a fix-up commit on "
            "top; a change for every release goes in the base series (qemupatch apply, "
            f"edit, qemupatch export), then qemupatch apply --base {release} again")
    return tip
