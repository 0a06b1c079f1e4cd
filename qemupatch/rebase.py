"""Stage 3: replay the series onto another upstream release, patch by patch,
and say what happened to each.

The rebase is a small state machine whose state is a JSON file written
atomically before and after every step, so that a rebase interrupted at any
point (even by ``kill -9``) can be resumed or aborted with nothing lost:

* before a patch is tried, the state records it as *in progress* with the
  HEAD it starts from; a resume rolls the work tree back to that HEAD and
  tries the patch again;
* a conflict records the patch as *stopped*: the work tree keeps the
  conflict markers and git's am session for the maintainer to resolve;
* the branch tip before the rebase is saved under refs/qemupatch/backup/,
  and ``--abort`` puts the branch back exactly there.

The series is copied into the state folder when the rebase starts, so
editing ``patches/`` meanwhile changes nothing.

Before replaying, the series is applied onto the old base in a private
index, so the mirror holds every file version a patch was made on: ``git
am --3way`` needs them to fall back on a merge.

Conflicts that are not hand work are resolved on the way, file by file,
and reported as replayed: a region a maintainer resolved before (kept in
``patches/resolutions/``, one plain-text file per conflict, written when a
rebase stopped there is continued), else the patch's pure insertions into
a list upstream also edited (:mod:`qemupatch.listmerge`).  Only when every
unmerged file is resolved does the patch go on; else it is a conflict as
before.
"""

from __future__ import annotations

import difflib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from unidiff import PatchSet

from qemupatch import listmerge
from qemupatch import report as rpt
from qemupatch.errors import DirtyWorkTree, RebaseStateError, SeriesError
from qemupatch.listmerge import Recorded
from qemupatch.records import atomic_write, utc_now
from qemupatch.report import BaseRef, PatchOutcome, RebaseReport, Resolution
from qemupatch.series import Patch, Series, read_series, write_series
from qemupatch.upstream import Mirror
from qemupatch.worktree import WorkTree

STATE_SCHEMA = 1
RESOLUTIONS = "resolutions"  # in patches/: recorded conflict resolutions
LIST_INSERT = "list-insert"

Progress = Callable[[str], None]


@dataclass
class RebaseState:
    """What a rebase has done so far; saved after every step."""

    old_base: dict
    new_base: dict
    worktree: str
    branch: str
    branch_before: str | None  # None: the branch did not exist
    backup_ref: str | None
    keep_going: bool
    skip_names: list[str]
    next_index: int = 0  # 0-based index of the next patch to try
    in_progress: dict | None = None  # {"index": i, "head": sha}
    stopped: dict | None = None  # {"index": i, "head": sha, ...conflict info}
    outcomes: list[dict] = field(default_factory=list)
    started: str = ""
    schema: int = STATE_SCHEMA


class Rebase:
    """One rebase of the series in ``patches_dir`` onto a new release."""

    def __init__(self, mirror: Mirror, cache_dir: Path, patches_dir: Path,
                 progress: Progress | None = None):
        self.mirror = mirror
        self.cache_dir = cache_dir
        self.patches_dir = patches_dir
        self.state_dir = cache_dir / "rebase"
        self.resolutions_dir = patches_dir / RESOLUTIONS
        self.progress = progress or (lambda msg: None)

    # -- state file ----------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def snapshot_dir(self) -> Path:
        return self.state_dir / "series"

    def in_progress(self) -> bool:
        return self.state_file.exists()

    def load(self) -> RebaseState:
        if not self.state_file.exists():
            raise RebaseStateError("no rebase in progress (start one with "
                                   "qemupatch rebase --onto RELEASE)")
        try:
            data = json.loads(self.state_file.read_text())
            if data.get("schema") != STATE_SCHEMA:
                raise ValueError(f"schema {data.get('schema')}, expected {STATE_SCHEMA}")
            return RebaseState(**data)
        except (ValueError, TypeError) as exc:
            raise RebaseStateError(f"{self.state_file}: unreadable rebase state: {exc}; "
                                   "remove the folder to forget that rebase") from exc

    def save(self, state: RebaseState) -> None:
        atomic_write(self.state_file, json.dumps(asdict(state), indent=1), sync=True)

    def _worktree(self, state: RebaseState) -> WorkTree:
        return WorkTree(self.mirror.path, Path(state.worktree), state.branch)

    # -- commands --------------------------------------------------------------

    def start(self, onto: str, *, keep_going: bool = False, skip: tuple[str, ...] = (),
              worktree: Path | None = None) -> RebaseReport:
        if self.in_progress():
            state = self.load()
            raise RebaseStateError(
                f"a rebase onto {state.new_base['name']} is already in progress "
                f"({self.state_file}); use --continue, --skip or --abort")
        series = read_series(self.patches_dir)
        if series.base is None:
            raise SeriesError(f"{self.patches_dir}/series has no '# base: RELEASE' line: "
                              "cannot tell which release the series is based on")
        old = self.mirror.get(series.base)
        new = self.mirror.get(onto)
        unknown = [s for s in skip if s not in series.names()]
        if unknown:
            raise SeriesError(f"--skip-patch names {', '.join(unknown)}, not in the series "
                              f"({', '.join(series.names())})")
        wt = WorkTree.for_release(self.mirror.path, self.cache_dir, onto, worktree)
        if dirty := wt.dirty_files():
            raise DirtyWorkTree(wt.path, dirty)
        # Snapshot the series, then record the state, then touch git.
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        self.snapshot_dir.mkdir(parents=True)
        write_series(self.snapshot_dir, series)
        before = wt.branch_tip()
        state = RebaseState(
            old_base={"name": old.name, "commit": old.commit},
            new_base={"name": new.name, "commit": new.commit},
            worktree=str(wt.path), branch=wt.branch, branch_before=before,
            backup_ref=None, keep_going=keep_going, skip_names=list(skip),
            started=utc_now(),
        )
        self.save(state)
        state.backup_ref = wt.reset_to(new.commit)
        wt.forget_carried()  # the branch is the whole series now, no release fix-ups
        self.save(state)
        self.progress(f"rebasing {len(series.patches)} patches from {old.name} onto {new.name}")
        return self._run(state)

    def resume(self) -> RebaseReport:
        """``--continue``: finish the stopped patch, or redo an interrupted one."""
        state = self.load()
        wt = self._worktree(state)
        if state.stopped is not None:
            stop = state.stopped
            if unmerged := wt.unmerged_files():
                raise RebaseStateError(
                    f"patch {stop['name']} still has unresolved conflicts in "
                    f"{', '.join(unmerged)}; resolve them, git add, then --continue")
            start = time.monotonic()
            if wt.am_in_progress():
                res = wt.am_continue()
                if not res.applied and not res.empty:
                    raise RebaseStateError(
                        f"git am --continue failed for {stop['name']} in {wt.path}:\n"
                        f"{res.output.strip()}\n(git add the resolved files, then --continue)")
                if res.empty:
                    wt.am_abort()
            resolved = wt.head() != stop["head"]
            outcome = dict(stop["outcome"])
            outcome.update(resolved=resolved, commit=wt.head() if resolved else None,
                           seconds=outcome["seconds"] + time.monotonic() - start)
            if not resolved:
                outcome.update(outcome=rpt.DROPPED,
                               detail="conflict resolved to no change: dropped")
            if kept := self._record(wt, stop, state):
                outcome["detail"] += f"; resolution recorded in {', '.join(kept)}"
            state.outcomes.append(outcome)
            state.stopped = None
            state.next_index = stop["index"] + 1
            self.save(state)
        return self._run(state)

    def skip_current(self) -> RebaseReport:
        """``--skip``: leave the stopped patch out and go on."""
        state = self.load()
        if state.stopped is None:
            raise RebaseStateError("the rebase is not stopped at a patch; nothing to skip")
        wt = self._worktree(state)
        wt.am_abort()
        wt.reset_to(state.stopped["head"], allow_dirty=True)
        outcome = dict(state.stopped["outcome"])
        outcome.update(outcome=rpt.SKIPPED,
                       detail="skipped by the maintainer after a conflict: " + outcome["detail"])
        state.outcomes.append(outcome)
        state.next_index = state.stopped["index"] + 1
        state.stopped = None
        self.save(state)
        return self._run(state)

    def abort(self) -> RebaseReport:
        """``--abort``: put the branch and work tree back as they were."""
        state = self.load()
        wt = self._worktree(state)
        wt.restore(state.branch_before)
        report = self._report(state, "aborted", self._series())
        shutil.rmtree(self.state_dir)
        self.progress(f"rebase aborted; {state.branch} is back at "
                      f"{(state.branch_before or 'nothing (removed)')[:12]}")
        return report

    # -- the loop --------------------------------------------------------------

    def _series(self) -> Series:
        return read_series(self.snapshot_dir)

    def _run(self, state: RebaseState) -> RebaseReport:
        series = self._series()
        wt = self._worktree(state)
        if state.in_progress is not None:
            # Interrupted mid-step: roll back and try that patch again.
            self.progress(f"resuming: retrying patch {state.in_progress['index'] + 1}")
            wt.am_abort()
            wt.reset_to(state.in_progress["head"], allow_dirty=True)
            state.in_progress = None
            self.save(state)
        patches = series.patches
        wt.store_preimages([p.text for p in patches], state.old_base["commit"])
        while state.next_index < len(patches):
            i = state.next_index
            patch = patches[i]
            state.in_progress = {"index": i, "head": wt.head()}
            self.save(state)
            outcome, stopped = self._apply_one(state, wt, i, patch, len(patches))
            if stopped:
                state.in_progress = None
                state.stopped = {"index": i, "name": patch.name,
                                 "head": outcome.pop("_head"),
                                 "stages": outcome.pop("_stages"), "outcome": outcome}
                self.save(state)
                rep = self._report(state, "stopped", series)
                self._tell_stop(rep, wt, patch)
                return rep
            state.outcomes.append(outcome)
            state.in_progress = None
            state.next_index = i + 1
            self.save(state)
        rep = self._report(state, "complete", series)
        shutil.rmtree(self.state_dir)
        return rep

    def _apply_one(self, state: RebaseState, wt: WorkTree, i: int, patch: Patch,
                   total: int) -> tuple[dict, bool]:
        start = time.monotonic()
        head = wt.head()
        base = {"index": i + 1, "name": patch.name, "subject": patch.subject,
                "files": list(patch.files)}

        def done(outcome: str, detail: str, **extra) -> dict:
            return {**base, "outcome": outcome, "detail": detail,
                    "seconds": round(time.monotonic() - start, 3), **extra}

        self.progress(f"[{i + 1}/{total}] {patch.subject}")
        if patch.name in state.skip_names:
            return done(rpt.SKIPPED, "skipped by request (--skip-patch)"), False
        step = apply_resolving(wt, self.snapshot_dir / patch.name, patch,
                               self.resolutions_dir, self.progress)
        if step.outcome != rpt.CONFLICT:
            extra: dict = {}
            if step.new_text is not None:
                extra = {"commit": wt.head(), "range_diff": range_diff(patch, step.new_text)}
            if step.resolutions:
                extra["resolutions"] = list(step.resolutions)
            return done(step.outcome, step.detail, **extra), False
        failed = failing_hunks(wt, patch, list(step.conflict_files), head)
        info = done(rpt.CONFLICT, step.detail, conflict_files=list(step.conflict_files),
                    failed_hunks=failed, unresolved=list(step.unresolved))
        if state.keep_going:
            wt.am_abort()
            wt.reset_to(head, allow_dirty=True)
            info["detail"] += " (skipped: --keep-going)"
            return info, False
        info["_head"] = head
        info["_stages"] = step.stages
        return info, True

    # -- recording a maintainer's resolutions ------------------------------------

    def _record(self, wt: WorkTree, stop: dict, state: RebaseState) -> list[str]:
        """Keep what the maintainer made of each conflict region of the
        stopped patch, so that the next rebase replays it."""
        kept = []
        patch = next((p for p in self._series().patches if p.name == stop["name"]), None)
        for path, ids in stop.get("stages", {}).items():
            texts, _ = _texts(wt, ids)
            resolved_id = wt.blob_id("HEAD", path)
            if ids[1] is None and ids[0] and ids[2] and patch is not None:
                # Upstream has no such file: keep what the maintainer made
                # of it (usually: left out, the release's own fix-up adapts).
                kept_text = (wt.blob(resolved_id).decode("utf-8", "replace")
                             if resolved_id else "")
                regions = [(ABSENT, _file_changes(patch, path),
                            tuple(kept_text.splitlines(keepends=True)))]
            elif texts is None or resolved_id is None:
                continue
            else:
                regions = listmerge.recordable(*texts,
                                               wt.blob(resolved_id).decode("utf-8", "replace"))
            if regions is None:
                self.progress(f"  {path}: the resolution changes lines outside the conflicts: "
                              "not recorded")
                continue
            for upstream, patch_side, resolution in regions:
                header = {"file": path, "patch": stop["name"], "onto": state.new_base["name"],
                          "recorded": utc_now()}
                saved = write_recorded(self.resolutions_dir, header, upstream, patch_side,
                                       resolution)
                kept.append(f"{RESOLUTIONS}/{saved.name}")
        return kept

    # -- reporting ---------------------------------------------------------------

    def _report(self, state: RebaseState, status: str, series: Series) -> RebaseReport:
        outcomes = [_outcome(o) for o in state.outcomes]
        if state.stopped is not None:
            outcomes.append(_outcome(state.stopped["outcome"]))
        outcomes = _mark_at_risk(outcomes)
        return RebaseReport(
            old_base=BaseRef(**state.old_base), new_base=BaseRef(**state.new_base),
            outcomes=tuple(outcomes), status=status, branch=state.branch,
            worktree=state.worktree, backup_ref=state.backup_ref, started=state.started,
            finished=utc_now(), total=len(series.patches),
        )

    def _tell_stop(self, rep: RebaseReport, wt: WorkTree, patch: Patch) -> None:
        o = rep.outcomes[-1]
        self.progress(
            f"CONFLICT in patch {o.index} ({patch.name}): {o.subject}\n"
            f"  work tree: {wt.path}\n"
            + "".join(f"  conflicting file: {f}\n" for f in o.conflict_files)
            + "".join(f"  hunk that does not apply: {h}\n" for h in o.failed_hunks)
            + "  resolve the files, `git add` them, then: qemupatch rebase --continue\n"
            "  or leave the patch out: qemupatch rebase --skip\n"
            "  or undo everything: qemupatch rebase --abort")


def _outcome(o: dict) -> PatchOutcome:
    """An outcome as saved in the state file, back as a record."""
    return PatchOutcome(**{
        **o, "files": tuple(o.get("files", ())),
        "conflict_files": tuple(o.get("conflict_files", ())),
        "failed_hunks": tuple(o.get("failed_hunks", ())),
        "unresolved": tuple(o.get("unresolved", ())),
        "resolutions": tuple(Resolution(**{**r, "lines": tuple(r["lines"])})
                             for r in o.get("resolutions", ())),
    })


_LIST_RULES = (listmerge.SORTED, listmerge.AFTER_ANCHOR, listmerge.BEFORE_ANCHOR)

# -- one patch, with the conflicts that are not hand work resolved ------------------


@dataclass(frozen=True)
class Step:
    """What applying one patch with automatic resolution came to."""

    outcome: str  # CLEAN, OFFSET, MERGED, DROPPED or CONFLICT
    detail: str
    new_text: str | None = None  # the new commit as format-patch text
    resolutions: tuple[dict, ...] = ()
    # At a CONFLICT (git's am session is left as is for the caller):
    conflict_files: tuple[str, ...] = ()
    unresolved: tuple[str, ...] = ()
    stages: dict = field(default_factory=dict)


def apply_resolving(wt: WorkTree, patch_file: Path, patch: Patch, resolutions_dir: Path,
                    progress: Progress | None = None) -> Step:
    """Apply one patch on the work tree's HEAD: as is, else with ``git am
    --3way``, else with every conflicting file resolved automatically
    (recorded resolutions from ``resolutions_dir``, then list insertions)
    and ``git am --continue``.

    Used by the rebase (one patch at a time, with a report) and by the carry
    of the series onto another release (:mod:`qemupatch.carry`).  A CONFLICT
    leaves git's am session and the conflict markers for the caller to
    abort or hand to a maintainer."""
    progress = progress or (lambda msg: None)
    head = wt.head()
    if wt.applies(patch.text, reverse=True):
        return Step(rpt.DROPPED, "already upstream: the patch reverse-applies")
    res = wt.am(patch_file, three_way=False)
    if res.applied:
        new_text = wt.format_patches(head)[0]
        moved = _moved_hunks(patch.text, new_text)
        return Step(rpt.OFFSET if moved else rpt.CLEAN,
                    f"{moved} hunk(s) moved" if moved else "applied as is", new_text)
    wt.am_abort()
    res = wt.am(patch_file, three_way=True)
    if res.applied:
        return Step(rpt.MERGED, "applied with a three-way merge", wt.format_patches(head)[0])
    if res.empty:
        wt.am_abort()
        return Step(rpt.DROPPED, "already upstream: nothing left after merge")
    stages = wt.unmerged_stages()
    resolutions, left = (resolve_conflicts(wt, stages, patch, load_recorded(resolutions_dir),
                                           progress)
                         if stages else (None, []))
    if resolutions is not None:
        res = wt.am_continue()
        if res.applied:
            return Step(rpt.MERGED, "resolved automatically: " + _describe(resolutions),
                        wt.format_patches(head)[0], tuple(resolutions))
        if res.empty:
            wt.am_abort()
            return Step(rpt.DROPPED, "already upstream: nothing left after resolving "
                        "the conflicts (" + _describe(resolutions) + ")",
                        resolutions=tuple(resolutions))
        left = [f"resolved, but git am --continue failed: {res.output.strip()}"]
    files = wt.unmerged_files() or list(stages) or _rejected_files(res.output, patch)
    return Step(rpt.CONFLICT, f"conflict in {', '.join(files) or 'the patch'}",
                conflict_files=tuple(files), unresolved=tuple(left), stages=stages)


def resolve_conflicts(wt: WorkTree, stages: dict, patch: Patch,
                      recorded: dict[str, Recorded],
                      progress: Progress) -> tuple[list[dict] | None, list[str]]:
    """Resolve every unmerged file (recorded resolutions, then list
    insertions) and ``git add`` them.  Returns the resolutions (None,
    touching nothing, if any file needs a maintainer) and why each file
    left needs one."""
    merged, gone, done, left = {}, [], [], []
    for path, ids in stages.items():
        if ids[1] is None and ids[0] is not None and ids[2] is not None:
            # Upstream has no such file (deleted, or not yet made).
            rec = recorded.get(listmerge.conflict_key(ABSENT, _file_changes(patch, path)))
            if rec is None:
                left.append(f"{path}: not in the new release (deleted or renamed upstream)")
                progress(f"  left for a maintainer: {left[-1]}")
            elif rec.resolution:
                merged[path] = "".join(rec.resolution)
                done.append(asdict(Resolution(path, f"recorded:{rec.name}", "",
                                              tuple(x.rstrip("\r\n") for x in rec.resolution))))
            else:
                gone.append(path)
                done.append(asdict(Resolution(path, f"recorded:{rec.name}", "",
                                              ("(kept out: not in this release)",))))
            continue
        texts, why = _texts(wt, ids)
        res = listmerge.merge(*texts, recorded) if texts else None
        if res is None or res.text is None:
            left.append(f"{path}: {why or res.reason}")
            progress(f"  left for a maintainer: {left[-1]}")
        else:
            merged[path] = res.text
            done += [asdict(Resolution(path, LIST_INSERT if p.rule in _LIST_RULES else p.rule,
                                       p.rule if p.rule in _LIST_RULES else "",
                                       tuple(x.rstrip("\r\n") for x in p.lines)))
                     for p in res.placed]
    if left:
        return None, left
    for path, text in merged.items():
        (wt.path / path).write_bytes(text.encode())
    if merged:
        wt.add(list(merged))
    if gone:
        wt.remove(gone)
    return done, []


# The upstream side of a conflict on a file the release does not have; the
# patch's side is then the patch's changed lines in that file.
ABSENT = ("(no such file in this release)\n",)


def _file_changes(patch: Patch, path: str) -> tuple[str, ...]:
    """The patch's added and removed lines in one file, as ``+line``/``-line``."""
    return tuple(f"{line.line_type}{line.value}" if line.value.endswith("\n")
                 else f"{line.line_type}{line.value}\n"
                 for pfile in PatchSet(patch.text) if pfile.path == path
                 for hunk in pfile for line in hunk if line.is_added or line.is_removed)



def _texts(wt: WorkTree, ids: tuple) -> tuple[tuple[str, str, str] | None, str]:
    """Base, ours and theirs of an unmerged file, or why there are not three
    texts to merge."""
    base, ours, theirs = ids
    if ours is None:
        return None, "not in the new release (deleted or renamed upstream)"
    if base is None or theirs is None:
        return None, "added on both sides" if base is None else "deleted by the patch"
    try:
        return tuple(wt.blob(i).decode("utf-8") for i in ids), ""
    except UnicodeDecodeError:
        return None, "not UTF-8 text"


def _describe(resolutions: list[dict]) -> str:
    """"list insertion in MAINTAINERS, docs/x.rst; recorded resolution in y"."""
    parts = []
    for kind, label in ((LIST_INSERT, "list insertion"), ("recorded:", "recorded resolution")):
        files = sorted({r["file"] for r in resolutions if r["how"].startswith(kind)})
        if files:
            parts.append(f"{label} in {', '.join(files)}")
    return "; ".join(parts)


# -- recorded resolutions (git's rerere, kept in the repository) -------------------


def write_recorded(folder: Path, header: dict[str, str], upstream: tuple[str, ...],
                   patch: tuple[str, ...], resolution: tuple[str, ...]) -> Path:
    """One plain-text file per conflict, named by its key: a header, then
    each side and the resolution, every line behind one space."""
    def section(name: str, lines: tuple[str, ...]) -> str:
        return f"--- {name}\n" + "".join(f" {x.rstrip(chr(13) + chr(10))}\n" for x in lines)

    text = ("# A conflict resolution recorded by qemupatch rebase; replayed when the same\n"
            "# conflict (upstream's and the patch's side) comes back.\n"
            + "".join(f"{k}: {v}\n" for k, v in header.items())
            + section("upstream", upstream) + section("patch", patch)
            + section("resolution", resolution))
    return atomic_write(folder / f"{listmerge.conflict_key(upstream, patch)}.txt", text)


def load_recorded(folder: Path) -> dict[str, Recorded]:
    """The recorded resolutions by conflict key."""
    recorded = {}
    for path in sorted(folder.glob("*.txt")):
        sections: dict[str, list[str]] = {}
        current = None
        for line in path.read_text().splitlines():
            if line.startswith("--- "):
                current = sections.setdefault(line[4:], [])
            elif current is not None:
                current.append(line[1:] + "\n")
        rec = Recorded(f"{RESOLUTIONS}/{path.name}", *(tuple(sections.get(k, ()))
                                                       for k in ("upstream", "patch",
                                                                 "resolution")))
        if rec.key != path.stem:
            raise SeriesError(f"{path}: its sides do not match its name (key {rec.key}); "
                              "edit only the resolution part, or remove the file")
        recorded[rec.key] = rec
    return recorded


def _hunk_positions(text: str) -> list[tuple[str, int, int]]:
    return [(f.path, h.source_start, h.target_start) for f in PatchSet(text) for h in f]


def _moved_hunks(old_text: str, new_text: str) -> int:
    old, new = _hunk_positions(old_text), _hunk_positions(new_text)
    if len(old) != len(new):
        return max(len(old), len(new))
    return sum(1 for a, b in zip(old, new) if a != b)


def range_diff(old: Patch, new_text: str) -> str:
    """The difference in meaning between two versions of a patch: a diff of
    their added/removed lines only, so moved context is not noise."""
    new = Patch.parse(old.name, new_text)
    a, b = old.change_lines(), new.change_lines()
    if a == b and old.subject == new.subject and old.body == new.body:
        return ""
    out = []
    if old.subject != new.subject or old.body != new.body:
        out += difflib.unified_diff(
            [old.subject, *old.body.splitlines()], [new.subject, *new.body.splitlines()],
            "old message", "new message", lineterm="", n=1)
    out += difflib.unified_diff(a, b, "old patch", "new patch", lineterm="", n=2)
    return "\n".join(out)


def _rejected_files(output: str, patch: Patch) -> list[str]:
    """Files git names in an apply failure when no merge was possible."""
    named = [f for f in patch.files if f in output]
    return named or list(patch.files)


def failing_hunks(wt: WorkTree, patch: Patch, files: list[str], head: str) -> list[str]:
    """Which hunks of ``patch`` do not apply on ``head`` (tried one by one)."""
    hunks = []
    for pfile in PatchSet(patch.text):
        if files and pfile.path not in files:
            continue
        header = str(pfile).split("\n@@", 1)[0] + "\n"
        for hunk in pfile:
            label = (f"{pfile.path} @@ -{hunk.source_start},{hunk.source_length} "
                     f"+{hunk.target_start},{hunk.target_length} @@"
                     f"{(' ' + hunk.section_header) if hunk.section_header else ''}")
            hunks.append((label, header + str(hunk)))
    results = wt.applies_at([text for _, text in hunks], head)
    return [label for (label, _), ok in zip(hunks, results) if not ok]


def _mark_at_risk(outcomes: list[PatchOutcome]) -> list[PatchOutcome]:
    """Name the patches that touch the same files as a skipped one."""
    left_out = [o for o in outcomes
                if o.outcome == rpt.SKIPPED or (o.outcome == rpt.CONFLICT and not o.resolved)]
    marked = []
    for o in outcomes:
        if o in left_out or o.outcome == rpt.DROPPED:
            marked.append(o)
            continue
        risk = tuple(s.name for s in left_out if set(s.files) & set(o.files))
        marked.append(replace(o, at_risk=risk) if risk else o)
    return marked
