"""Each patch of the series builds on its own (``qemupatch check --builds``,
the nightly's patch-builds stage).

    build_each_patch(cfg, release, out_dir, runner=..., say=...) -> PatchBuilds

A bisectable series builds after every patch, not only at its tip.  On
``release`` the series is applied step by step (see *steps*); each step's
tree is checked out into one private build tree and QEMU is built there
incrementally, in one build folder (``<cache>/patchbuilds/<release>/qemu``):
ninja recompiles what the step changed, ccache serves what any earlier
build compiled.  The build runs through build.build_qemu on the caller's
runner (a container, like every build).  The series' own qtests
(``tests/qtest/*-test.c`` that the series adds, e.g.
``tests/qtest/vmsocket-test``) are ninja targets from the step that adds
them on, so the patch that adds the test must also build it.

Steps
  On the series' own base, step k is the tree after patches 1..k.

  On a carried release (the base series carried there plus the release's
  fix-ups, carry.py) the shipped stack puts every fix-up after the whole
  base series, so its first commits would not build there by design: not
  a useful finding.  What a maintainer wants to know is whether each base
  patch, *with the fix-ups that belong to it*, builds on that release.  So
  step k is base patch k (as carried) followed by the fix-ups that belong
  to it: each fix-up goes in right after the first base patch after which
  it applies as is (``git apply --check``), in their order, a fix-up that
  does not apply yet waiting without holding up the ones after it.  A
  fix-up of the device goes with the patch that adds the device, a fix-up
  of the qtest with the patch that adds the qtest.  A base patch
  that builds only once a fix-up made against a *later* patch is in is a
  FAIL at its step: a real finding (split that fix-up, or make it against
  the earlier patch).  Each step lists its fix-ups.  The last step's tree
  must be the shipped stack's tree; when it is not, or a base patch does
  not go onto an earlier patch's fix-ups, the steps fall back to the
  shipped stack commit by commit (``mode == "stack"``, ``note`` says why).

Results (``out_dir``)
  patch-builds.json        every step: ok, seconds, excerpt, tree, fix-ups,
                           reused; rewritten after each step (a run stopped
                           half-way is readable)
  patch-builds.junit.xml   one testcase per patch
  patch-NN.log             that step's build log; patch-NN.build.json its
                           build record (build.py's provenance)
A compile failure (configure, compile, a missing artifact: CompileFailed)
is recorded with the compiler's first errors and later patches are still
built; anything else (image, engine, deadline, SIGTERM) raises as usual,
after the records are written.

Unchanged inputs are not rebuilt: a step whose key (build.inputs_key over
its git tree id, the build script and options, the image or the host's
compiler) built OK before is reused, with no checkout-and-ninja run, from
``<cache>/patchbuilds/built/<key>.json`` (and its log).
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from qemupatch import build, carry, workflow
from qemupatch import report as rpt
from qemupatch.config import Config
from qemupatch.errors import CompileFailed, UserError
from qemupatch.progress import LineProgress
from qemupatch.records import FAIL, PASS, Case, utc_now, write_json, write_junit
from qemupatch.run import git
from qemupatch.runner import Runner
from qemupatch.series import Series, read_series
from qemupatch.upstream import Release, add_release
from qemupatch.worktree import WorkTree

Say = Callable[[str], None]
SCHEMA = 1
EACH, STACK = "each-patch", "stack"     # PatchBuilds.mode
RECORD, JUNIT = "patch-builds.json", "patch-builds.junit.xml"
QTEST_GLOB = "tests/qtest/*-test.c"
STRICT_ERROR_RE = re.compile(r"(error:|ERROR:|FAILED:|fatal error|undefined reference)")


@dataclass(frozen=True)
class PatchBuild:
    """One step: ``index`` counts from 1; ``log`` is in out_dir."""

    index: int
    subject: str
    ok: bool
    seconds: float
    excerpt: str            # the compiler's first errors ("" when ok)
    log: Path
    name: str = ""          # the patch file
    tree: str = ""          # git tree id of the step
    fixups: tuple[str, ...] = ()    # the release's fix-ups built with this patch
    reused: bool = False    # built OK before with the same key: not rebuilt
    targets: tuple[str, ...] = ()   # ninja targets besides qemu-system-x86_64


@dataclass(frozen=True)
class PatchBuilds:
    release: str
    builds: tuple[PatchBuild, ...]
    mode: str = EACH
    note: str = ""

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.builds)


@dataclass(frozen=True)
class Step:
    """What one patch build checks out."""

    index: int
    name: str
    subject: str
    commit: str
    fixups: tuple[str, ...] = ()


class _NoSplit(Exception):
    """The fix-ups cannot be split by base patch (why in the message)."""


# -- the steps ----------------------------------------------------------------------


def plan_steps(cfg: Config, series: Series, rel: Release) -> tuple[list[Step], str, str]:
    """The commits to build on ``rel``, the mode and a note (see the module
    docstring); made in private work trees under ``<cache>/patchbuilds``."""
    m = workflow.mirror(cfg)
    work = cfg.cache_dir / "patchbuilds" / rel.name
    base_commit = None
    carried = carry.is_carried(series, rel.name)
    if carried:
        assert series.base is not None
        base_commit = (m.find(series.base) or add_release(cfg, m, series.base)).commit
    stack_wt = WorkTree(cfg.mirror_dir, work / "apply", f"qemupatch-patchbuilds-apply/{rel.name}")
    _checkout(stack_wt, rel.commit)
    stack = carry.apply_stack(stack_wt, series, cfg.patches_dir, rel.name, base_commit)
    # The commit after each base patch (a patch upstream already has adds none).
    after, commits, last = [], iter(stack.base_commits), rel.commit
    for i in range(len(series.patches)):
        if not (carried and stack.carried[i].outcome == rpt.DROPPED):
            last = next(commits)
        after.append(last)
    if not stack.fixup_commits:
        return [Step(i + 1, p.name, p.subject, c)
                for i, (p, c) in enumerate(zip(series.patches, after))], EACH, ""
    try:
        return _split(cfg, rel, series, stack, stack_wt, after, work), EACH, ""
    except _NoSplit as exc:
        steps = [Step(i + 1, p.name, p.subject, c)
                 for i, (p, c) in enumerate(zip(series.patches, after))]
        steps += [Step(len(steps) + j + 1, f.name, f"{rel.name} fix-up: {f.subject}", c)
                  for j, (f, c) in enumerate(zip(stack.fixups.patches, stack.fixup_commits))]
        return steps, STACK, f"{exc}; built the shipped stack commit by commit instead"


def _split(cfg: Config, rel: Release, series: Series, stack: carry.Stack,
           stack_wt: WorkTree, after: list[str], work: Path) -> list[Step]:
    """Each carried base patch, then the fix-ups that apply right after it."""
    wt = WorkTree(cfg.mirror_dir, work / "split", f"qemupatch-patchbuilds-split/{rel.name}")
    _checkout(wt, rel.commit)
    folder = carry.fixups_dir(cfg.patches_dir, rel.name)
    pending = list(stack.fixups.patches)
    steps: list[Step] = []
    previous = rel.commit
    for i, (patch, commit) in enumerate(zip(series.patches, after)):
        if commit != previous:
            res = git(wt.path, "cherry-pick", "--keep-redundant-commits", commit, check=False)
            if res.returncode != 0:
                git(wt.path, "cherry-pick", "--abort", check=False)
                raise _NoSplit(f"patch {i + 1} ({patch.name}) does not go onto the fix-ups "
                               f"of the patches before it on {rel.name}")
        previous = commit
        placed = []
        for fix in list(pending):
            if wt.applies((folder / fix.name).read_text()):
                if not wt.am(folder / fix.name, three_way=False).applied:
                    wt.am_abort()
                    continue
                pending.remove(fix)
                placed.append(fix.name)
        steps.append(Step(i + 1, patch.name, patch.subject, wt.head(), tuple(placed)))
    for fix in pending:     # made on the whole series: with the last patch
        if not wt.am(folder / fix.name, three_way=False).applied:
            wt.am_abort()
            raise _NoSplit(f"fix-up {fix.name} does not apply after the base series with the "
                           "fix-ups before it split by patch")
    if pending:
        last = steps[-1]
        steps[-1] = replace(last, commit=wt.head(),
                            fixups=last.fixups + tuple(f.name for f in pending))
    if _tree(wt.path, wt.head()) != _tree(stack_wt.path, stack_wt.head()):
        raise _NoSplit("the fix-ups split by patch give another tree than the shipped stack")
    return steps


def _checkout(wt: WorkTree, commit: str) -> None:
    """Put a private tree at ``commit`` (git rewrites only the files that
    differ, so the build stays incremental); no backup refs."""
    if not wt.exists():
        wt.reset_to(commit, allow_dirty=True)
        return
    if wt.am_in_progress():
        wt.am_abort()
    git(wt.path, "checkout", "--quiet", "--force", "-B", wt.branch, commit, timeout=900)


def _tree(repo: Path, commit: str) -> str:
    return git(repo, "rev-parse", f"{commit}^{{tree}}").stdout.strip()


def qtest_targets(repo: Path, base: str, commit: str) -> tuple[str, ...]:
    """The ninja targets of the qtests the series added by ``commit``."""
    out = git(repo, "diff", "--name-only", "--diff-filter=A", base, commit, "--",
              QTEST_GLOB).stdout
    return tuple(sorted(p.removesuffix(".c") for p in out.split() if p.count("/") == 2))


# -- the builds ---------------------------------------------------------------------


def build_each_patch(cfg: Config, release: str, out_dir: Path, *, runner: Runner,
                     say: Say = print,
                     options: build.QemuBuildOptions | None = None) -> PatchBuilds:
    """Build QEMU after each patch of the series on ``release``; see the
    module docstring.  ``options``: the build's (the default: what the
    pipeline uses, with a host ccache folder in the cache)."""
    series = read_series(cfg.patches_dir)
    if not series.patches:
        raise UserError(f"{cfg.patches_dir} has no patches to build")
    m = workflow.mirror(cfg)
    rel = m.find(release) or add_release(cfg, m, release)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = cfg.cache_dir / "patchbuilds" / rel.name
    built = cfg.cache_dir / "patchbuilds" / "built"
    base_options = options or build.QemuBuildOptions(ccache_dir=cfg.cache_dir / "ccache-host")
    say(f"patch-builds {rel.name}: applying the series step by step")
    steps, mode, note = plan_steps(cfg, series, rel)
    if note:
        say(f"patch-builds {rel.name}: {note}")
    src = WorkTree(cfg.mirror_dir, work / "src", f"qemupatch-patchbuilds/{rel.name}")
    qemu_out = (work / "qemu").resolve()
    results: list[PatchBuild] = []
    started, status = utc_now(), "running"
    try:
        last_build: float | None = None
        for step in steps:
            if runner.kind == "host" and last_build is not None:
                _next_second(last_build)
            result = _build_step(cfg, rel, step, len(steps), src, qemu_out, built,
                                 out_dir, base_options, runner, say)
            if not result.reused:
                last_build = time.time()
            results.append(result)
            _write(out_dir, rel.name, mode, note, results, steps, started, status)
        status = "complete"
    except BaseException as exc:
        status = f"stopped: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        raise
    finally:
        _write(out_dir, rel.name, mode, note, results, steps, started, status)
    return PatchBuilds(rel.name, tuple(results), mode, note)


def _next_second(after: float) -> None:
    """Wait for the wall clock's next whole second after ``after``.  The
    host runner copies the source with tar, which keeps mtimes to the
    second: a file checked out in the same second as the last build ended
    would look older than its object, and ninja would skip it.  (Containers
    see the tree's own mtimes through the overlay.)"""
    time.sleep(max(0.0, math.floor(after) + 1.01 - time.time()))


def _build_step(cfg: Config, rel: Release, step: Step, total: int, src: WorkTree,
                qemu_out: Path, built: Path, out_dir: Path,
                base_options: build.QemuBuildOptions, runner: Runner, say: Say) -> PatchBuild:
    prefix = f"patch-builds {rel.name}: {step.index}/{total}"
    tree = _tree(cfg.mirror_dir, step.commit)
    targets = qtest_targets(cfg.mirror_dir, rel.commit, step.commit)
    options = replace(base_options, extra_targets=tuple(
        dict.fromkeys((*base_options.extra_targets, *targets))))
    _checkout(src, step.commit)
    key = _key(cfg, rel, src.path, qemu_out, tree, options, runner)
    log = out_dir / f"patch-{step.index:02d}.log"
    common = {"index": step.index, "subject": step.subject, "log": log, "name": step.name,
              "tree": tree, "fixups": step.fixups, "targets": targets}
    with_fixups = f" (+{len(step.fixups)} fix-ups)" if step.fixups else ""
    if (record := built / f"{key}.json").is_file() and (built / f"{key}.log").is_file():
        shutil.copyfile(built / f"{key}.log", log)
        say(f"{prefix} {step.subject}{with_fixups}: ok (built before, tree {tree[:12]})")
        return PatchBuild(ok=True, seconds=0.0, excerpt="", reused=True, **common)
    say(f"{prefix} {step.subject}{with_fixups}: building")
    clock = time.monotonic()
    excerpt = ""
    try:
        build.build_qemu(src.path, qemu_out, release=rel.name,
                         repacked=rel.provenance.repacked, runner=runner,
                         project_root=cfg.root, options=options, patches=cfg.patches_dir,
                         progress=LineProgress(say, prefix), source_id=tree)
    except CompileFailed as exc:
        excerpt = _first_errors(str(exc))
    seconds = round(time.monotonic() - clock, 1)
    compile_log = qemu_out / "logs" / "compile.log"
    if compile_log.is_file():
        shutil.copyfile(compile_log, log)
        if excerpt:
            excerpt = _errors_in(log.read_text(errors="replace")) or excerpt
    else:
        log.write_text("(no build log: the build stopped before it ran)\n")
    if (qemu_out / "build.json").is_file():
        shutil.copyfile(qemu_out / "build.json", out_dir / f"patch-{step.index:02d}.build.json")
    ok = not excerpt
    if ok:
        built.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, built / f"{key}.log")
        write_json(record, {"schema": SCHEMA, "release": rel.name, "tree": tree,
                            "subject": step.subject, "seconds": seconds, "built": utc_now()})
    say(f"{prefix} {step.subject}{with_fixups}: {'ok' if ok else 'FAIL'} in {seconds:.0f} s"
        + ("" if ok else "\n    " + excerpt.replace("\n", "\n    ")))
    return PatchBuild(ok=ok, seconds=seconds, excerpt=excerpt, **common)


def _key(cfg: Config, rel: Release, source: Path, qemu_out: Path, tree: str,
         options: build.QemuBuildOptions, runner: Runner) -> str:
    """build.inputs_key of the spec build_qemu would run for ``tree``: the
    tree, the script and options, the image (or the host's compiler)."""
    build_dir = (options.build_dir or qemu_out / f"build-{runner.kind}").resolve()
    ccache_dir = (options.ccache_dir or qemu_out / "ccache").resolve()
    spec = build.qemu_spec(source, release=rel.name, repacked=rel.provenance.repacked,
                           build_dir=build_dir, ccache_dir=ccache_dir, project_root=cfg.root,
                           options=options, patches=cfg.patches_dir, source_id=tree,
                           call=build.Call("build_qemu", ()))
    spec = build.with_ccache_remote(spec, runner.settings.ccache_remote,
                                    runner.settings.ccache_remote_dir)
    log_dir = qemu_out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = runner.prepare(spec, log_dir=log_dir, timeout=options.timeout)
    return build.inputs_key(spec, env)


def _errors_in(log: str, count: int = 12) -> str:
    """The first error lines of a build log (the compiler's, meson's,
    ninja's), without build.py's broader "not found" lines (meson prints
    "Compiler for language cpp ... not found" on every configure)."""
    return "\n".join([line for line in log.splitlines() if STRICT_ERROR_RE.search(line)][:count])


def _first_errors(message: str) -> str:
    """The compiler's first errors from a CompileFailed message."""
    _, found, rest = message.partition("first errors:\n")
    return (rest.partition("\nfull log:")[0] if found else message).strip()


# -- records ------------------------------------------------------------------------


def _write(out_dir: Path, release: str, mode: str, note: str, results: list[PatchBuild],
           steps: list[Step], started: str, status: str) -> None:
    done = {b.index for b in results}
    write_json(out_dir / RECORD, {
        "schema": SCHEMA, "release": release, "mode": mode, "note": note,
        "status": status, "ok": all(b.ok for b in results) and len(results) == len(steps),
        "started": started, "finished": utc_now() if status != "running" else None,
        "builds": [{**asdict(b), "log": b.log.name} for b in results],
        "not_built": [{"index": s.index, "subject": s.subject} for s in steps
                      if s.index not in done],
    })
    cases = [Case(classname=f"patch-builds.{release}", name=f"{b.index:02d} {b.subject}",
                  status=PASS if b.ok else FAIL, seconds=b.seconds,
                  detail="" if b.ok else f"{b.subject} does not build on {release}:\n"
                  f"{b.excerpt}\nlog: {b.log}",
                  output=("fix-ups: " + ", ".join(b.fixups)) if b.fixups else None)
             for b in results]
    write_junit(out_dir / JUNIT, f"patch-builds {release}", cases,
                seconds=sum(b.seconds for b in results),
                error=None if status in ("running", "complete") else status)


def summary_lines(res: PatchBuilds) -> list[str]:
    """One line per patch: index, subject, ok/FAIL, seconds; for the CLI."""
    lines = []
    for b in res.builds:
        how = "reused" if b.reused else f"{b.seconds:6.0f} s"
        extra = f"  (+ fix-ups: {', '.join(b.fixups)})" if b.fixups else ""
        lines.append(f"{'ok  ' if b.ok else 'FAIL'} {b.index:2d} {b.subject:<60} {how}{extra}")
        if not b.ok:
            lines.append("     " + b.excerpt.replace("\n", "\n     "))
            lines.append(f"     log: {b.log}")
    if res.note:
        lines.append(f"note: {res.note}")
    return lines
