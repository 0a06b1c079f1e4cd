"""What a maintainer does with the series, as library calls.

Each function takes the loaded Config and plain arguments, returns plain
data and raises qemupatch errors; the CLI only parses and prints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qemupatch import carry
from qemupatch import report as rpt
from qemupatch.config import Config
from qemupatch.errors import CheckFailed, Conflict, UserError
from qemupatch.rebase import range_diff
from qemupatch.records import utc_now
from qemupatch.report import CheckResult
from qemupatch.run import git, run
from qemupatch.series import (
    Patch,
    Series,
    apply_series,
    export_series,
    read_series,
    write_series,
)
from qemupatch.upstream import Mirror, Release, add_release
from qemupatch.worktree import WorkTree

SIGNED_OFF = re.compile(r"^Signed-off-by: .+ <[^>]+>$", re.MULTILINE)


@dataclass(frozen=True)
class Applied:
    release: Release
    worktree: Path
    branch: str
    commits: tuple[str, ...]  # the base series' commits, then the fix-ups'
    backup_ref: str | None
    fixups: tuple[str, ...] = ()  # the release's fix-up commits (after the base ones)
    resolved: tuple[str, ...] = ()  # how each automatically resolved patch went on


def mirror(cfg: Config) -> Mirror:
    return Mirror(cfg.mirror_dir)


def series_base(cfg: Config, series: Series, base: str | None) -> str:
    return base or series.base or cfg.default_release


def apply(cfg: Config, base: str | None = None, worktree: Path | None = None) -> Applied:
    """A work tree on branch qemupatch/<base> with the series applied; on a
    release other than the series' base, the series carried there and the
    release's fix-ups on top (the commit between them is remembered, for
    export)."""
    series = read_series(cfg.patches_dir)
    m = mirror(cfg)
    rel = m.get(series_base(cfg, series, base))
    wt = WorkTree.for_release(cfg.mirror_dir, cfg.cache_dir, rel.name, worktree)
    backup = wt.reset_to(rel.commit)
    carry.clear_carried(wt)
    base_commit = m.get(series.base).commit if carry.is_carried(series, rel.name) else None
    stack = carry.apply_stack(wt, series, cfg.patches_dir, rel.name, base_commit,
                              on_carried=lambda tip: carry.mark_carried(wt, tip))
    return Applied(rel, wt.path, wt.branch, stack.commits, backup, stack.fixup_commits,
                   tuple(f"{p.name}: {s.detail}" for p, s in zip(series.patches, stack.carried)
                         if s.resolutions))


def build_source(cfg: Config, base: str | None = None) -> tuple[Release, WorkTree, list[str]]:
    """The series applied on ``base`` in a private work tree that builds use
    (``<cache>/pipeline/<base>/src``), never the maintainer's; imports the
    release first if needed.  On a release other than the series' base:
    the series carried there (automatic resolutions) and the release's
    fix-ups from ``patches/releases/<base>/`` (see carry.py).

    The series is applied in a second private tree (``.../apply``) and the
    build tree then checks out the result: git rewrites only the files
    whose content differs, so a one-line change to the device leaves every
    other file's mtime alone and an incremental build recompiles one file
    (resetting the build tree to the base and re-applying would touch every
    file the series touches, meson.build among them: a reconfigure).
    """
    series = read_series(cfg.patches_dir)
    src = carry_source(cfg, series_base(cfg, series, base))
    return src.release, src.worktree, list(src.stack.commits)


@dataclass(frozen=True)
class Source:
    """The series on one release, ready to build, and how it got there."""

    release: Release
    worktree: WorkTree
    stack: carry.Stack
    report: rpt.RebaseReport     # per patch: outcome, resolutions replayed, range-diff
    tree_id: str                 # git tree of the build tree: the source's identity


def carry_source(cfg: Config, name: str, owner: str = "pipeline") -> Source:
    """:func:`build_source` (the same checks; with the default
    ``owner`` the same private trees) that also keeps what carrying the
    series did to each patch, as a rebase report: the nightly's rebase
    stage shows which recorded resolutions and list insertions were
    replayed.  ``owner``: whose trees (``<cache>/<owner>/<name>/apply``
    and ``src``, their own branches), so that a nightly and a pipeline
    never reset each other's build tree.  Imports the release (and the
    series' base) first if needed."""
    series = read_series(cfg.patches_dir)
    m = mirror(cfg)
    rel = m.find(name) or add_release(cfg, m, name)
    base_commit = None
    if carry.is_carried(series, name):
        assert series.base is not None
        base_commit = (m.find(series.base) or add_release(cfg, m, series.base)).commit
    started = utc_now()
    staging = WorkTree(cfg.mirror_dir, cfg.cache_dir / owner / name / "apply",
                       f"qemupatch-{owner}-apply/{name}")
    staging.reset_to(rel.commit, allow_dirty=True)
    stack = carry.apply_stack(staging, series, cfg.patches_dir, name, base_commit)
    if not carry.is_carried(series, name):
        again = export_series(staging, name, rel.commit, series)
        if [p.text for p in again.patches] != [p.text for p in series.patches]:
            raise CheckFailed("apply -> export is not byte-identical to patches/ "
                              "(run qemupatch export, or qemupatch check for details)")
    wt = WorkTree(cfg.mirror_dir, cfg.cache_dir / owner / name / "src",
                  f"qemupatch-{owner}/{name}")
    wt.reset_to(staging.head(), allow_dirty=True)
    tree_id = git(wt.path, "rev-parse", "HEAD^{tree}").stdout.strip()
    old = rpt.BaseRef(series.base or name, base_commit or rel.commit)
    outcomes = []
    for i, patch in enumerate(series.patches):
        step = stack.carried[i] if stack.carried else None
        outcomes.append(rpt.PatchOutcome(
            index=i + 1, name=patch.name, subject=patch.subject,
            outcome=step.outcome if step else rpt.CLEAN, files=tuple(patch.files),
            detail=step.detail if step else "applied as is (the series' own base)",
            range_diff=range_diff(patch, step.new_text) if step and step.new_text else "",
            resolutions=tuple(rpt.Resolution(**{**r, "lines": tuple(r["lines"])})
                              for r in (step.resolutions if step else ()))))
    for j, fix in enumerate(stack.fixups.patches):
        outcomes.append(rpt.PatchOutcome(
            index=len(series.patches) + j + 1, name=fix.name, subject=fix.subject,
            outcome=rpt.CLEAN, files=tuple(fix.files),
            detail=f"{name}'s fix-up ({carry.fixups_dir(cfg.patches_dir, name).relative_to(cfg.root)})"))
    report = rpt.RebaseReport(old_base=old, new_base=rpt.BaseRef(rel.name, rel.commit),
                              outcomes=tuple(outcomes), status="complete", branch=wt.branch,
                              worktree=str(wt.path), started=started, finished=utc_now(),
                              total=len(outcomes))
    return Source(rel, wt, stack, report, tree_id)

def export(cfg: Config, base: str | None = None, worktree: Path | None = None) -> Series:
    """Write patches/ from branch qemupatch/<base>, atomically.

    A branch that ``apply --base`` carried the series onto (a release
    other than the series' base) gives back only its fix-ups, into
    ``patches/releases/<base>/``; any other branch (the base's, or one a
    rebase made) is the whole series, which then has <base> as its base."""
    previous = read_series(cfg.patches_dir) if (cfg.patches_dir / "series").exists() else None
    name = base or (previous.base if previous else None) or cfg.default_release
    rel = mirror(cfg).get(name)
    wt = WorkTree.for_release(cfg.mirror_dir, cfg.cache_dir, rel.name, worktree)
    if not wt.exists():
        raise UserError(f"no work tree for {rel.name} at {wt.path}; "
                        f"run qemupatch apply --base {rel.name} (or rebase) first")
    if previous is not None and carry.is_carried(previous, rel.name) \
            and carry.carried_tip(wt) is not None:
        start = carry.fixups_start(wt, rel.name)
        fixups = export_series(wt, rel.name, start, carry.read_fixups(cfg.patches_dir, rel.name))
        carry.write_fixups(cfg.patches_dir, fixups)
        return fixups
    series = export_series(wt, rel.name, rel.commit, previous)
    if not series.patches:
        raise UserError(f"branch {wt.branch} has no commits on top of {rel.name}: "
                        "refusing to write an empty series")
    write_series(cfg.patches_dir, series)
    return series


def check(cfg: Config, base: str | None = None, checkpatch: bool = False) -> list[CheckResult]:
    """Every check of the series; raises CheckFailed listing what failed.

    On a release other than the series' base the checks are of that
    release's stack: the series carries there (automatic resolutions
    only), then the release's fix-ups are checked like the series is on
    its base (metadata, apply exactly, whitespace, normalized, round trip,
    checkpatch.pl from the release's tree)."""
    series = read_series(cfg.patches_dir)
    m = mirror(cfg)
    rel = m.get(series_base(cfg, series, base))
    carried = carry.is_carried(series, rel.name)
    checked = carry.read_fixups(cfg.patches_dir, rel.name) if carried else series
    folder = carry.fixups_dir(cfg.patches_dir, rel.name) if carried else cfg.patches_dir
    results: list[CheckResult] = []
    for p in checked.patches:
        has_body = bool(SIGNED_OFF.sub("", p.body).strip())
        results.append(CheckResult("subject", p.name, bool(p.subject), "no subject"))
        results.append(CheckResult("body", p.name, has_body,
                                   "the commit message has no body saying why"))
        results.append(CheckResult("signed-off-by", p.name, bool(SIGNED_OFF.search(p.body)),
                                   "no Signed-off-by: line"))
    wt = WorkTree(cfg.mirror_dir, cfg.cache_dir / "check" / rel.name,
                  f"qemupatch-check/{rel.name}")
    wt.reset_to(rel.commit, allow_dirty=True)
    start = rel.commit
    # 0. elsewhere than on its base: the series carries (resolutions only).
    if carried:
        assert series.base is not None
        try:
            steps, _ = carry.carry_series(wt, series, cfg.patches_dir,
                                          m.get(series.base).commit, rel.name)
            results.append(CheckResult("carries", None, True, "\n".join(
                f"{p.name}: {s.outcome}: {s.detail}" for p, s in zip(series.patches, steps))))
        except Conflict as exc:
            results.append(CheckResult("carries", None, False, str(exc)))
            _raise_if_failed(results)
        start = wt.head()
    # 1. applies cleanly (no fuzz, no merge) on its base, in a private work tree.
    try:
        apply_series(wt, checked, folder, three_way=False)
        results.append(CheckResult("applies", None, True))
    except Conflict as exc:
        results.append(CheckResult("applies", None, False, str(exc)))
        _raise_if_failed(results)
    # 2. whitespace errors, commit by commit.
    commits = wt.commits_since(start)
    for p, commit in zip(checked.patches, commits):
        ws = git(wt.path, "diff", "--check", f"{commit}^", commit, check=False)
        results.append(CheckResult("whitespace", p.name, ws.returncode == 0, ws.output.strip()))
    # 3. the exported series is what is in patches/, and survives a round trip.
    first = export_series(wt, rel.name, start, checked)
    results.append(CheckResult(
        "normalized", None, len(first.patches) == len(checked.patches),
        f"{len(checked.patches)} patches applied as {len(first.patches)} commits "
        "(an empty patch?)"))
    for old, new in zip(checked.patches, first.patches):
        # A fix-up whose base series changed since its export differs in
        # index lines and line numbers only: the same change.
        same = old.text == new.text or (carried and _same_change(old, new))
        results.append(CheckResult(
            "normalized", old.name, same and old.name == new.name,
            "export would change this file; run qemupatch export"
            + (f" --base {rel.name}" if carried else "")))
    again = WorkTree(cfg.mirror_dir, cfg.cache_dir / "check" / f"{rel.name}-roundtrip",
                     f"qemupatch-check/{rel.name}-roundtrip")
    again.reset_to(start, allow_dirty=True)
    tmp = cfg.cache_dir / "check" / "roundtrip-patches"
    write_series(tmp, first)
    apply_series(again, first, tmp, three_way=False)
    second = export_series(again, rel.name, start, first)
    same = [a.text for a in first.patches] == [b.text for b in second.patches]
    results.append(CheckResult("round-trip", None, same,
                               "export -> apply -> export is not byte-identical"))
    # 4. QEMU's own checkpatch, from the release's tree.
    if checkpatch:
        script = wt.path / "scripts" / "checkpatch.pl"
        if not script.exists():
            raise UserError(f"{rel.name} has no scripts/checkpatch.pl")
        for p in checked.patches:
            res = run(["perl", script, "--no-color", folder / p.name],
                      cwd=wt.path, timeout=300, check=False)
            results.append(CheckResult("checkpatch", p.name, res.returncode == 0,
                                       res.output.strip()))
    _raise_if_failed(results)
    return results


def _same_change(a: Patch, b: Patch) -> bool:
    return (a.subject, a.body, a.change_lines()) == (b.subject, b.body, b.change_lines())


def _raise_if_failed(results: list[CheckResult]) -> None:
    failed = [r for r in results if not r.ok]
    if failed:
        raise CheckFailed("\n".join(
            f"{r.check}: {r.patch or 'series'}: {r.message.splitlines()[0] if r.message else ''}"
            for r in failed), results)
