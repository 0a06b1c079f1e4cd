"""What a maintainer does with the series, as library calls.

Each function takes the loaded Config and plain arguments, returns plain
data and raises qemupatch errors; the CLI only parses and prints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qemupatch.config import Config
from qemupatch.errors import CheckFailed, Conflict, UserError
from qemupatch.report import CheckResult
from qemupatch.run import git, run
from qemupatch.series import (
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
    commits: tuple[str, ...]
    backup_ref: str | None


def mirror(cfg: Config) -> Mirror:
    return Mirror(cfg.mirror_dir)


def series_base(cfg: Config, series: Series, base: str | None) -> str:
    return base or series.base or cfg.default_release


def apply(cfg: Config, base: str | None = None, worktree: Path | None = None) -> Applied:
    """A work tree on branch qemupatch/<base> with the series applied."""
    series = read_series(cfg.patches_dir)
    rel = mirror(cfg).get(series_base(cfg, series, base))
    wt = WorkTree.for_release(cfg.mirror_dir, cfg.cache_dir, rel.name, worktree)
    backup = wt.reset_to(rel.commit)
    commits = apply_series(wt, series, cfg.patches_dir)
    return Applied(rel, wt.path, wt.branch, tuple(commits), backup)


def build_source(cfg: Config, base: str | None = None) -> tuple[Release, WorkTree, list[str]]:
    """The series applied on ``base`` in a private work tree that builds use
    (``<cache>/pipeline/<base>/src``), never the maintainer's; imports the
    release first if needed.

    The series is applied in a second private tree (``.../apply``) and the
    build tree then checks out the result: git rewrites only the files
    whose content differs, so a one-line change to the device leaves every
    other file's mtime alone and an incremental build recompiles one file
    (resetting the build tree to the base and re-applying would touch every
    file the series touches, meson.build among them: a reconfigure).
    """
    series = read_series(cfg.patches_dir)
    name = series_base(cfg, series, base)
    m = mirror(cfg)
    rel = m.find(name) or add_release(cfg, m, name)
    staging = WorkTree(cfg.mirror_dir, cfg.cache_dir / "pipeline" / name / "apply",
                       f"qemupatch-pipeline-apply/{name}")
    staging.reset_to(rel.commit, allow_dirty=True)
    commits = apply_series(staging, series, cfg.patches_dir)
    if name == series.base:
        again = export_series(staging, name, rel.commit, series)
        if [p.text for p in again.patches] != [p.text for p in series.patches]:
            raise CheckFailed("apply -> export is not byte-identical to patches/ "
                              "(run qemupatch export, or qemupatch check for details)")
    wt = WorkTree(cfg.mirror_dir, cfg.cache_dir / "pipeline" / name / "src",
                  f"qemupatch-pipeline/{name}")
    wt.reset_to(staging.head(), allow_dirty=True)
    return rel, wt, commits


def export(cfg: Config, base: str | None = None, worktree: Path | None = None) -> Series:
    """Write patches/ from branch qemupatch/<base>, atomically."""
    previous = read_series(cfg.patches_dir) if (cfg.patches_dir / "series").exists() else None
    name = base or (previous.base if previous else None) or cfg.default_release
    rel = mirror(cfg).get(name)
    wt = WorkTree.for_release(cfg.mirror_dir, cfg.cache_dir, rel.name, worktree)
    if not wt.exists():
        raise UserError(f"no work tree for {rel.name} at {wt.path}; "
                        f"run qemupatch apply --base {rel.name} (or rebase) first")
    series = export_series(wt, rel.name, rel.commit, previous)
    if not series.patches:
        raise UserError(f"branch {wt.branch} has no commits on top of {rel.name}: "
                        "refusing to write an empty series")
    write_series(cfg.patches_dir, series)
    return series


def check(cfg: Config, base: str | None = None, checkpatch: bool = False) -> list[CheckResult]:
    """Every check of the series; raises CheckFailed listing what failed."""
    series = read_series(cfg.patches_dir)
    rel = mirror(cfg).get(series_base(cfg, series, base))
    results: list[CheckResult] = []
    for p in series.patches:
        has_body = bool(SIGNED_OFF.sub("", p.body).strip())
        results.append(CheckResult("subject", p.name, bool(p.subject), "no subject"))
        results.append(CheckResult("body", p.name, has_body,
                                   "the commit message has no body saying why"))
        results.append(CheckResult("signed-off-by", p.name, bool(SIGNED_OFF.search(p.body)),
                                   "no Signed-off-by: line"))
    # 1. applies cleanly (no fuzz, no merge) on its base, in a private work tree.
    wt = WorkTree(cfg.mirror_dir, cfg.cache_dir / "check" / rel.name,
                  f"qemupatch-check/{rel.name}")
    wt.reset_to(rel.commit, allow_dirty=True)
    try:
        apply_series(wt, series, cfg.patches_dir, three_way=False)
        results.append(CheckResult("applies", None, True))
    except Conflict as exc:
        results.append(CheckResult("applies", None, False, str(exc)))
        _raise_if_failed(results)
    # 2. whitespace errors, commit by commit.
    commits = wt.commits_since(rel.commit)
    for p, commit in zip(series.patches, commits):
        ws = git(wt.path, "diff", "--check", f"{commit}^", commit, check=False)
        results.append(CheckResult("whitespace", p.name, ws.returncode == 0, ws.output.strip()))
    # 3. the exported series is what is in patches/, and survives a round trip.
    first = export_series(wt, rel.name, rel.commit, series)
    results.append(CheckResult(
        "normalized", None, len(first.patches) == len(series.patches),
        f"{len(series.patches)} patches applied as {len(first.patches)} commits "
        "(an empty patch?)"))
    for old, new in zip(series.patches, first.patches):
        results.append(CheckResult(
            "normalized", old.name, old.text == new.text and old.name == new.name,
            "export would change this file; run qemupatch export"))
    again = WorkTree(cfg.mirror_dir, cfg.cache_dir / "check" / f"{rel.name}-roundtrip",
                     f"qemupatch-check/{rel.name}-roundtrip")
    again.reset_to(rel.commit, allow_dirty=True)
    tmp = cfg.cache_dir / "check" / "roundtrip-patches"
    write_series(tmp, first)
    apply_series(again, first, tmp, three_way=False)
    second = export_series(again, rel.name, rel.commit, first)
    same = [a.text for a in first.patches] == [b.text for b in second.patches]
    results.append(CheckResult("round-trip", None, same,
                               "export -> apply -> export is not byte-identical"))
    # 4. QEMU's own checkpatch, from the base tree.
    if checkpatch:
        script = wt.path / "scripts" / "checkpatch.pl"
        if not script.exists():
            raise UserError(f"{rel.name} has no scripts/checkpatch.pl")
        for p in series.patches:
            res = run(["perl", script, "--no-color", cfg.patches_dir / p.name],
                      cwd=wt.path, timeout=300, check=False)
            results.append(CheckResult("checkpatch", p.name, res.returncode == 0,
                                       res.output.strip()))
    _raise_if_failed(results)
    return results


def _raise_if_failed(results: list[CheckResult]) -> None:
    failed = [r for r in results if not r.ok]
    if failed:
        raise CheckFailed("\n".join(
            f"{r.check}: {r.patch or 'series'}: {r.message.splitlines()[0] if r.message else ''}"
            for r in failed), results)
