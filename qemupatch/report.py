"""Reports in three forms: Markdown for people, versioned JSON and JUnit XML
for CI.  Every stage hands its result here as plain data."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qemupatch.records import FAIL, PASS, SKIP, Case, atomic_write, junit_xml

SCHEMA = 1

# Outcome classes of one patch in a rebase, best first.
CLEAN = "clean"  # applied as is
OFFSET = "offset"  # applied, hunks moved
MERGED = "merged"  # needed a three-way merge
CONFLICT = "conflict"  # did not apply; a maintainer must resolve
DROPPED = "dropped"  # already upstream
SKIPPED = "skipped"  # by request
OUTCOMES = (CLEAN, OFFSET, MERGED, CONFLICT, DROPPED, SKIPPED)


@dataclass(frozen=True)
class BaseRef:
    name: str
    commit: str


@dataclass(frozen=True)
class Resolution:
    """A conflict the rebase resolved by itself, in one file."""

    file: str
    how: str  # "list-insert" or "recorded:<file in patches/resolutions/>"
    rule: str  # list-insert: sorted, after-anchor or before-anchor
    lines: tuple[str, ...]  # the lines inserted (or the recorded resolution)

    def label(self) -> str:
        return f"{self.how} ({self.rule})" if self.rule else self.how


@dataclass(frozen=True)
class PatchOutcome:
    index: int  # 1-based position in the old series
    name: str
    subject: str
    outcome: str
    files: tuple[str, ...] = ()
    detail: str = ""
    conflict_files: tuple[str, ...] = ()
    failed_hunks: tuple[str, ...] = ()
    unresolved: tuple[str, ...] = ()  # "file: why it is not a list insertion"
    resolved: bool = False  # a conflict the maintainer resolved
    at_risk: tuple[str, ...] = ()  # skipped patches sharing files with this one
    commit: str | None = None
    range_diff: str = ""  # empty: no real change against the old patch
    seconds: float = 0.0
    resolutions: tuple[Resolution, ...] = ()  # conflicts resolved without a maintainer


@dataclass(frozen=True)
class RebaseReport:
    old_base: BaseRef
    new_base: BaseRef
    outcomes: tuple[PatchOutcome, ...]
    status: str  # "complete" | "stopped" | "aborted"
    branch: str = ""
    worktree: str = ""
    backup_ref: str | None = None
    started: str = ""
    finished: str = ""
    total: int = 0  # patches in the series
    schema: int = field(default=SCHEMA)

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes if o.outcome == outcome)

    @property
    def unresolved_conflicts(self) -> list[PatchOutcome]:
        return [o for o in self.outcomes if o.outcome == CONFLICT and not o.resolved]


def rebase_markdown(rep: RebaseReport) -> str:
    lines = [
        f"# Rebase onto {rep.new_base.name}: {rep.status}",
        "",
        f"- old base: {rep.old_base.name} ({rep.old_base.commit[:12]})",
        f"- new base: {rep.new_base.name} ({rep.new_base.commit[:12]})",
    ]
    if rep.branch:
        lines.append(f"- branch: {rep.branch} in {rep.worktree}")
    if rep.backup_ref:
        lines.append(f"- previous branch saved as {rep.backup_ref}")
    summary = ", ".join(f"{rep.count(k)} {k}" for k in OUTCOMES if rep.count(k))
    lines += [f"- {len(rep.outcomes)} of {rep.total} patches: {summary or 'none'}", "",
              "| # | patch | outcome | detail |", "|---|---|---|---|"]
    for o in rep.outcomes:
        outcome = o.outcome + (" (resolved)" if o.resolved else "")
        detail = o.detail
        if o.at_risk:
            detail += f" AT RISK: shares files with skipped {', '.join(o.at_risk)}"
        lines.append(f"| {o.index} | {o.subject} | {outcome} | {detail.strip()} |")
    for o in rep.outcomes:
        if o.outcome == CONFLICT:
            lines += ["", f"## Conflict in patch {o.index}: {o.subject}", ""]
            lines += [f"- conflicting file: {f}" for f in o.conflict_files]
            lines += [f"- hunk that does not apply: {h}" for h in o.failed_hunks]
            lines += [f"- not resolved automatically: {u}" for u in o.unresolved]
    replayed = [(o, r) for o in rep.outcomes for r in o.resolutions]
    if replayed:
        lines += ["", "## Resolutions replayed", ""]
    for o, r in replayed:
        lines += [f"- patch {o.index} ({o.subject}), `{r.file}`: {r.label()}", "",
                  "  ```diff", *[f"  +{x}" for x in r.lines], "  ```", ""]
    changed = [o for o in rep.outcomes if o.range_diff]
    lines += ["", "## Range-diff (real changes only)", ""]
    if not changed:
        lines.append("No patch changed its meaning: only context and line numbers moved.")
    for o in changed:
        lines += [f"### {o.index}: {o.subject}", "", "```diff", o.range_diff.rstrip(), "```", ""]
    return "\n".join(lines) + "\n"


def rebase_json(rep: RebaseReport) -> str:
    data = asdict(rep)
    data["counts"] = {k: rep.count(k) for k in OUTCOMES}
    return json.dumps(data, indent=2) + "\n"


def rebase_junit(rep: RebaseReport) -> str:
    cases = []
    for o in rep.outcomes:
        status, detail = PASS, ""
        if o.outcome == CONFLICT and not o.resolved:
            status = FAIL
            detail = (f"conflict in {', '.join(o.conflict_files) or 'patch'}\n"
                      + ("\n".join(o.failed_hunks) or o.detail)
                      + "".join(f"\nnot resolved automatically: {u}" for u in o.unresolved))
        elif o.outcome == SKIPPED:
            status, detail = SKIP, o.detail or "skipped by request"
        replayed = "".join(f"resolved {r.file}: {r.label()}\n" + "".join(f"+{x}\n" for x in r.lines)
                           for r in o.resolutions)
        cases.append(Case(f"rebase.{rep.new_base.name}", f"{o.index:03d} {o.subject}",
                          status, o.seconds, detail,
                          f"outcome: {o.outcome}\n{o.detail}\n{replayed}{o.range_diff}"))
    return junit_xml(f"rebase onto {rep.new_base.name}", cases)


def write_rebase_report(rep: RebaseReport, out_dir: Path) -> dict[str, Path]:
    return {
        "markdown": atomic_write(out_dir / "rebase.md", rebase_markdown(rep)),
        "json": atomic_write(out_dir / "rebase.json", rebase_json(rep)),
        "junit": atomic_write(out_dir / "rebase.junit.xml", rebase_junit(rep)),
    }


@dataclass(frozen=True)
class CheckResult:
    """One finding of ``qemupatch check``."""

    check: str
    patch: str | None
    ok: bool
    message: str = ""


def check_junit(results: list[CheckResult], name: str) -> str:
    return junit_xml(name, [Case(f"check.{r.check}", r.patch or r.check,
                                 PASS if r.ok else FAIL, detail=r.message)
                            for r in results])


def write_check_report(results: list[CheckResult], out_dir: Path, name: str) -> dict[str, Path]:
    data = {"schema": SCHEMA, "name": name, "ok": all(r.ok for r in results),
            "results": [asdict(r) for r in results]}
    return {
        "json": atomic_write(out_dir / "check.json", json.dumps(data, indent=2) + "\n"),
        "junit": atomic_write(out_dir / "check.junit.xml", check_junit(results, name)),
    }
