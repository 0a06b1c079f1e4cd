"""``qemupatch nightly``: every target of the matrix, stage by stage.

For each target (an upstream release × a guest kernel), the stages of
:data:`qemupatch.matrix.STAGES`, in order::

    fetch         the release (and the series' base) in the mirror
    rebase        the series carried onto it (automatic resolutions) and
                  its fix-ups; rebase/rebase.md says what was replayed
    patch-builds  each patch of the series builds on its own
    build         QEMU (with the series' qtest), the guest module for the
                  target's kernel, the guest test program
    boot-test     a guest boots and -vmsocket unix: works end to end
    qtest         tests/qtest/vmsocket-test against that QEMU

Each stage ends as one :class:`~qemupatch.matrix.StageResult`: pass, fail
(the series' fault), infra (the machine's: a download, the engine, the
disk; :func:`qemupatch.matrix.classify`) or skip (after a stage that did
not pass, or not asked for).  An infra outcome is tried again, ``retries``
times, after ``backoff`` seconds doubling each time; every attempt is kept.

Nothing unchanged is done twice.  Targets of one release share its fetch,
rebase, patch-builds, QEMU build and qtest (each target still reports
them, with the same figures and its own copy of the files).  Across runs
the QEMU build lives in ``<cache>/nightly/<release>/qemu`` and is reused,
with no ninja run, while its inputs key (the source's git tree id, the
build options, the image) is unchanged; the guest module and program are
reused by their inputs key too, and guest images by their content hash.

The run folder (see docs/nightly.md) gets ``nightly.json`` (and the other
reports) after every target, so a partial run is readable; a SIGTERM still
leaves a record saying which stage it stopped and goes on as Terminated.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

from qemupatch import boottest, build, guest, pipeline, workflow
from qemupatch import matrix as mx
from qemupatch import fuzz as fz
from qemupatch import qtest as qt
from qemupatch import report as rpt
from qemupatch.config import Config
from qemupatch.errors import BootTestError, Failed, Terminated, UserError
from qemupatch.matrix import (
    FAIL,
    INFRA,
    PASS,
    SKIP,
    STAGES,
    MatrixRun,
    StageResult,
    Target,
)
from qemupatch.progress import LineProgress, NullProgress
from qemupatch.records import atomic_write, utc_now, write_json
from qemupatch.run import git
from qemupatch.runner import Runner
from qemupatch.upstream import add_release

Say = Callable[[str], None]
# Stages whose work and result belong to the release, not the target.
SHARED = ("fetch", "rebase", "patch-builds", "qtest", "fuzz")
FORMATS = ("github", "gitlab", "json")
EXCERPT_LINES = 40
FUZZ_SEEDS, FUZZ_OPERATIONS = 2, 3000
LATEST = "latest"


def run_id_now() -> str:
    """``20261127T071500Z``: the default name of a run's folder."""
    return utc_now().replace("-", "").replace(":", "")


# -- what one stage sees -----------------------------------------------------------


@dataclass
class StageContext:
    """Handed to a stage function: its folder, and what it found so far.
    Figures, links and the excerpt set before an exception are kept."""

    target: Target
    stage: str
    run_dir: Path
    say: Say
    reason: str = ""
    excerpt: str = ""
    figures: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        path = self.run_dir / self.target.name / self.stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def link(self, label: str, path: Path) -> None:
        """Link ``path`` from the stage's cell; a file outside the run
        folder is copied into the stage's folder first (the run folder
        must stand alone: CI publishes it, ``report merge`` copies it)."""
        path = Path(path)
        if not path.is_file():
            return
        run_dir = self.run_dir.resolve()
        if not path.resolve().is_relative_to(run_dir):
            copy = self.dir / path.name
            shutil.copyfile(path, copy)
            path = copy
        self.links[label] = str(path.resolve().relative_to(run_dir))


StageFn = Callable[[StageContext], None]


class StageUnavailable(Exception):
    """Raised by a stage that cannot run in this qemupatch (a module not
    there yet): the stage is skipped, with the message as its reason."""


def run_stage(name: str, fn: StageFn, ctx_for: Callable[[], StageContext], *,
              retries: int, backoff: float, say: Say,
              sleep: Callable[[float], None] = time.sleep) -> StageResult:
    """Run one stage: ``fn`` passes by returning, fails by raising; an
    infra failure is tried again ``retries`` times after ``backoff``
    seconds (doubling).  Terminated goes through."""
    attempts: list[mx.Attempt] = []
    delay = backoff
    while True:
        ctx = ctx_for()
        started, t0 = utc_now(), time.monotonic()
        try:
            fn(ctx)
            outcome, error = PASS, ""
        except StageUnavailable as exc:
            return StageResult(name, SKIP, round(time.monotonic() - t0, 2), str(exc))
        except Exception as exc:   # noqa: BLE001 - every failure is recorded, classified
            outcome, error = mx.classify(exc), str(exc).strip() or type(exc).__name__
            if not ctx.excerpt:
                ctx.excerpt = _excerpt("\n".join(error.splitlines()[1:]) or error)
            ctx.reason = error.splitlines()[0]
        attempts.append(mx.Attempt(len(attempts) + 1, outcome,
                                   round(time.monotonic() - t0, 2), started,
                                   error.splitlines()[0] if error else ""))
        if outcome != INFRA or len(attempts) > retries:
            break
        say(f"  {ctx.target.name} {name}: infrastructure failure ({ctx.reason}); "
            f"attempt {len(attempts) + 1} in {delay:g} s")
        sleep(delay)
        delay *= 2
    if len(attempts) > 1 and outcome == PASS:
        ctx.reason = ctx.reason or f"passed at attempt {len(attempts)}"
    return StageResult(name, outcome, round(sum(a.seconds for a in attempts), 2),
                       ctx.reason, ctx.excerpt, tuple(attempts), dict(ctx.figures),
                       dict(ctx.links))


def _run_qtest(ctx: StageContext, binary: Path, qemu: Path, out_dir: Path, *,
               env: dict[str, str] | None = None) -> qt.QtestResult:
    """:func:`qtest.run_qtest`; when tests fail, their names and the log's
    tail become the stage's excerpt."""
    try:
        return qt.run_qtest(binary, qemu, out_dir, env=env)
    except Failed as exc:
        if (res := getattr(exc, "result", None)) is not None:
            ctx.excerpt = _excerpt("\n".join(res.failures) + "\n" + _tail(res.log_path))
        raise


def _excerpt(text: str, count: int = EXCERPT_LINES) -> str:
    lines = text.strip("\n").splitlines()
    return "\n".join(lines[:count] + ([f"... ({len(lines) - count} more lines)"]
                                      if len(lines) > count else []))


def _tail(path: Path, count: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").rstrip().splitlines()[-count:])
    except OSError:
        return ""


# -- the real stages ------------------------------------------------------------------


class _Nightly:
    """The work of one run: the stage functions and what they share
    (per release: the source and the QEMU build; one build runner)."""

    def __init__(self, cfg: Config, run_dir: Path, engine: str, exits: ExitStack, say: Say):
        self.cfg, self.run_dir, self.engine, self.exits, self.say = cfg, run_dir, engine, exits, say
        self.cache = cfg.cache_dir / "nightly"
        self._runner: Runner | None = None
        self.sources: dict[str, workflow.Source] = {}
        self.qemus: dict[str, build.BuildResult] = {}
        self.qemu_failed: dict[str, Exception] = {}   # a compile error is not retried per target
        self.guests: dict[str, tuple[build.BuildResult, build.BuildResult]] = {}

    def fns(self) -> dict[str, StageFn]:
        return {"fetch": self.fetch, "rebase": self.rebase, "patch-builds": self.patch_builds,
                "build": self.build, "boot-test": self.boot_test, "qtest": self.qtest,
                "fuzz": self.fuzz}

    def runner(self) -> Runner:
        """One build runner (one container engine) for the whole run,
        opened when a build first needs it."""
        if self._runner is None:
            self._runner = self.exits.enter_context(Runner.get(self.engine, self.cfg.settings))
        return self._runner

    # fetch ------------------------------------------------------------------------

    def fetch(self, ctx: StageContext) -> None:
        m = workflow.mirror(self.cfg)
        name = ctx.target.release
        known = m.find(name)
        rel = known or add_release(self.cfg, m, name)
        series = pipeline.read_series(self.cfg.patches_dir)
        if series.base and series.base != name and m.find(series.base) is None:
            add_release(self.cfg, m, series.base)
        p = rel.provenance
        ctx.figures.update(commit=rel.commit[:12], kind=p.kind, origin=p.origin,
                           sha256=(p.sha256 or "")[:16], repacked=p.repacked,
                           imported="before" if known else "now")
        ctx.reason = f"{name} is {rel.commit[:12]} ({p.kind}{', imported now' if not known else ''})"

    # rebase -----------------------------------------------------------------------

    def source(self, release: str) -> workflow.Source:
        if release not in self.sources:
            self.sources[release] = workflow.carry_source(self.cfg, release, "nightly")
        return self.sources[release]

    def rebase(self, ctx: StageContext) -> None:
        src = self.source(ctx.target.release)
        rep = src.report
        paths = rpt.write_rebase_report(rep, ctx.dir)
        ctx.link("rebase report", paths["markdown"])
        ctx.link("rebase json", paths["json"])
        replayed = sum(len(o.resolutions) for o in rep.outcomes)
        counts = {k: rep.count(k) for k in rpt.OUTCOMES if rep.count(k)}
        fixups = len(src.stack.fixup_commits)
        ctx.figures.update(patches=len(src.stack.base_commits), fixups=fixups,
                           resolutions_replayed=replayed, tree=src.tree_id[:12], **counts)
        carried = ", ".join(f"{n} {k}" for k, n in counts.items())
        ctx.reason = (f"{len(rep.outcomes)} patches on {rep.new_base.name}: {carried}"
                      + (f"; {replayed} resolution(s) replayed" if replayed else "")
                      + (f"; {fixups} of them fix-ups" if fixups else ""))

    # patch-builds -----------------------------------------------------------------

    def patch_builds(self, ctx: StageContext) -> None:
        try:
            from qemupatch import patchbuilds
        except ImportError:
            raise StageUnavailable("qemupatch.patchbuilds is not available yet") from None
        self.source(ctx.target.release)      # the release is carried before its patches build
        res = patchbuilds.build_each_patch(self.cfg, ctx.target.release, ctx.dir,
                                           runner=self.runner(), say=self._quiet(ctx))
        ctx.link("patch builds", ctx.dir / "patch-builds.json")
        for b in res.builds:
            ctx.link(f"patch {b.index} log", b.log)
        ctx.figures.update(patches=len(res.builds), built=sum(1 for b in res.builds if b.ok),
                           reused=sum(1 for b in res.builds if getattr(b, "reused", False)),
                           seconds={str(b.index): round(b.seconds, 1) for b in res.builds})
        bad = [b for b in res.builds if not b.ok]
        if bad:
            ctx.excerpt = _excerpt("\n\n".join(f"patch {b.index} ({b.subject}):\n{b.excerpt}"
                                               for b in bad))
            raise Failed(f"{len(bad)} of {len(res.builds)} patches do not build on their own: "
                         + ", ".join(f"{b.index} ({b.subject})" for b in bad))
        ctx.reason = f"each of {len(res.builds)} patches builds on its own"

    # build ------------------------------------------------------------------------

    def qemu(self, release: str) -> build.BuildResult:
        """QEMU with the series and its qtest, built once per release and
        reused across runs while the source tree and options are the same."""
        if release in self.qemu_failed:
            raise self.qemu_failed[release]
        if release not in self.qemus:
            src = self.source(release)
            try:
                self.qemus[release] = self._build_qemu(release, src)
            except Exception as exc:
                if mx.classify(exc) == FAIL:
                    self.qemu_failed[release] = exc
                raise
        return self.qemus[release]

    def _build_qemu(self, release: str, src: workflow.Source) -> build.BuildResult:
        return build.build_qemu(
            src.worktree.path, self.cache / release / "qemu", release=release,
            repacked=src.release.provenance.repacked, runner=self.runner(),
            project_root=self.cfg.root, patches=self.cfg.patches_dir,
            options=build.QemuBuildOptions(ccache_dir=self.cfg.cache_dir / "ccache-host",
                                           extra_targets=(qt.QTEST_TARGET,)),
            progress=LineProgress(self.say, f"  {release} qemu"), source_id=src.tree_id)

    def guest_builds(self, kernel: str) -> tuple[build.BuildResult, build.BuildResult]:
        if kernel not in self.guests:
            kern = self.cfg.kernel(kernel)
            ko = build.build_module(self.cfg.root / "guest" / "kvm_vmsocket", kern,
                                    self.cache / f"module-{kernel}", runner=self.runner(),
                                    project_root=self.cfg.root, patches=self.cfg.patches_dir,
                                    progress=NullProgress())
            prog = build.build_guest_program(self.cfg.root / "guest" / "vmsocket-test.c",
                                             self.cache / "guest-program", runner=self.runner(),
                                             project_root=self.cfg.root, progress=NullProgress())
            self.guests[kernel] = (ko, prog)
        return self.guests[kernel]

    def build(self, ctx: StageContext) -> None:
        release, kernel = ctx.target.release, ctx.target.kernel
        shared = release in self.qemus
        tried = []
        try:
            tried.append("qemu")
            q = self.qemu(release)
            tried.append("guest")
            ko, prog = self.guest_builds(kernel)
        finally:
            self._keep_build_files(ctx, release, kernel, tried)
        q_record = json.loads(q.build_json.read_text())
        ctx.figures.update(
            engine=q.runner, version=q.version,
            qemu_sha256=q.sha256.get(build.QEMU_BINARY, "")[:16],
            qemu_s=round(q.seconds, 1), image_s=round(q.image_seconds, 1),
            qemu_reused=("this run" if shared else "last run" if q_record.get("reused")
                         else "no"),
            module_s=round(ko.seconds, 1), program_s=round(prog.seconds, 1),
            module_reused=json.loads(ko.build_json.read_text()).get("reused", False))
        if q.ccache and q.ccache.hit_rate is not None:
            ctx.figures["ccache_hit_rate"] = round(q.ccache.hit_rate, 3)
        how = ("shared with this run's other targets" if shared
               else "reused: inputs unchanged" if q_record.get("reused")
               else f"compiled in {q.seconds:.0f} s")
        ctx.reason = f"QEMU {q.version} {how}; module for {kernel} and guest program ready"

    def _keep_build_files(self, ctx: StageContext, release: str, kernel: str,
                          tried: list[str]) -> None:
        """build.json (QEMU's provenance), the guest builds' records and one
        build.log, copied into the stage's folder, for the builds tried
        (a failed one included: its record says where it stopped)."""
        parts = []
        if "qemu" in tried:
            out = self.cache / release / "qemu"
            parts.append(("qemu", out / "build.json", out / "logs" / "compile.log"))
        if "guest" in tried:
            out = self.cache / f"module-{kernel}"
            parts.append((f"module for {kernel}", out / f"build-module-{kernel}.json",
                          out / "logs" / f"module-{kernel}.log"))
            out = self.cache / "guest-program"
            parts.append(("guest program", out / "build-vmsocket-test.json",
                          out / "logs" / "vmsocket-test.log"))
        log = []
        for what, record, logfile in parts:
            if record.is_file():
                dest = ctx.dir / record.name
                shutil.copyfile(record, dest)
                ctx.link("provenance" if what == "qemu" else f"provenance ({what})", dest)
                try:
                    data = json.loads(record.read_text())
                except ValueError:
                    data = {}
                state = ("reused: inputs unchanged, nothing compiled" if data.get("reused")
                         else f"{data.get('status')}, {data.get('seconds')} s")
                log.append(f"===== {what}: {state}")
            if logfile.is_file():
                log.append(logfile.read_text(errors="replace"))
        ctx.link("log", atomic_write(ctx.dir / "build.log", "\n".join(log) + "\n"))

    # boot-test --------------------------------------------------------------------

    def boot_test(self, ctx: StageContext) -> None:
        q = self.qemu(ctx.target.release)
        ko, prog = self.guest_builds(ctx.target.kernel)
        img = guest.make_guest_image(self.cfg, ctx.target.kernel, vmsocket_module=ko.binary,
                                     test_program=prog.binary)
        ctx.figures.update(kernel=img.kernel_version, image=img.digest[:12])
        try:
            res = boottest.run_boot_test(q.binary, img, ctx.dir, progress=None)
        except BootTestError as exc:
            ctx.excerpt = _excerpt(f"{exc}\n--- console tail ---\n"
                                   f"{_tail(ctx.dir / 'console.log')}")
            raise
        finally:
            for label, name in (("console", "console.log"), ("boot record", "boot-test.json"),
                                ("qemu log", "qemu.log")):
                ctx.link(label, ctx.dir / name)
        passed = sum(1 for t in res.tests if t.status == "pass")
        ctx.figures.update(accel=res.accel, tests=len(res.tests), tests_passed=passed,
                           seconds=round(res.seconds, 1),
                           **{f"{s.name}_s": round(s.seconds, 1) for s in res.stages})
        ctx.reason = f"{passed}/{len(res.tests)} guest tests pass ({res.accel})"

    # qtest ------------------------------------------------------------------------

    def qtest(self, ctx: StageContext) -> None:
        q = self.qemu(ctx.target.release)
        binary = q.out_dir / Path(qt.QTEST_TARGET).name
        try:
            res = _run_qtest(ctx, binary, q.binary, ctx.dir)
        finally:
            ctx.link("tap", ctx.dir / qt.TAP_NAME)
            ctx.link("log", ctx.dir / qt.LOG_NAME)
        ctx.figures.update(passed=res.passed, failed=res.failed, skipped=res.skipped,
                           seconds=res.seconds)
        ctx.reason = f"{res.passed} qtests pass" + (f", {res.skipped} skipped"
                                                    if res.skipped else "")

    # fuzz -------------------------------------------------------------------------

    def fuzz(self, ctx: StageContext) -> None:
        """The series' qtest and the seeded fuzzer against an ASan+UBSan
        build of this release (its own build folder; ccache shared)."""
        release = ctx.target.release
        src = self.source(release)
        asan = fz.build_sanitized(
            self.cfg, src, self.cache / release / "qemu-asan", runner=self.runner(),
            progress=LineProgress(self.say, f"  {release} qemu (ASan+UBSan)"))
        ctx.link("provenance", asan.build_json)
        try:
            res = _run_qtest(ctx, asan.out_dir / Path(qt.QTEST_TARGET).name, asan.binary,
                             ctx.dir / "qtest", env=fz.SANITIZER_ENV)
        finally:
            ctx.link("qtest log", ctx.dir / "qtest" / qt.LOG_NAME)
        qtest_log = (ctx.dir / "qtest" / qt.LOG_NAME).read_text(errors="replace")
        if reports := fz.sanitizer_reports(qtest_log):
            ctx.excerpt = _excerpt("\n\n".join(reports))
            raise Failed(f"sanitizer report during the qtest under ASan+UBSan: "
                         f"{reports[0].splitlines()[0][:160]}")
        first = int(ctx.run_dir.name.encode().hex(), 16) % (1 << 31) if ctx.run_dir.name else 1
        results = fz.run_seeds(asan.binary, ctx.dir, first_seed=first, seeds=FUZZ_SEEDS,
                               operations=FUZZ_OPERATIONS, say=self._quiet(ctx))
        for r in results:
            ctx.link(f"fuzz seed {r.seed}", r.out_dir / "fuzz.json")
        ops = sum(r.operations for r in results)
        seconds = sum(r.seconds for r in results)
        ctx.figures.update(qtest_passed=res.passed, seeds=[r.seed for r in results],
                           operations=ops, ops_per_s=round(ops / seconds if seconds else 0, 1),
                           asan_compile_s=round(asan.seconds, 1))
        bad = [r for r in results if not r.ok]
        if bad:
            ctx.excerpt = _excerpt("\n\n".join(
                f"seed {r.seed}:\n" + "\n".join(r.findings) + f"\nreproduce: "
                f"{r.reproduce(asan.binary)}" for r in bad))
            raise Failed(f"fuzz findings under ASan+UBSan with seed(s) "
                         f"{', '.join(str(r.seed) for r in bad)}")
        ctx.reason = (f"{res.passed} qtests and {ops} fuzz operations ({len(results)} seeds "
                      f"from {first}) under ASan+UBSan: no report")

    def _quiet(self, ctx: StageContext) -> Say:
        return lambda msg: self.say(f"  {ctx.target.name} {ctx.stage}: {msg}")


# -- the run ---------------------------------------------------------------------------


def run_nightly(cfg: Config, run_dir: Path, *, targets: Sequence[Target] | None = None,
                stages: Sequence[str] = STAGES, engine: str = "auto", retries: int = 1,
                backoff: float = 30.0, previous: MatrixRun | None = None, say: Say = print,
                stage_fns: dict[str, StageFn] | None = None) -> MatrixRun:
    """Run ``stages`` (a subset of STAGES; the others are skipped) for every
    target (default: the whole matrix) into ``run_dir``; moves
    ``<run_dir>/../latest`` to it when done.  ``stage_fns`` replaces the
    real stage functions (tests).  Raises Terminated after recording."""
    chosen = tuple(targets) if targets is not None else mx.targets(cfg)
    if unknown := [s for s in stages if s not in STAGES]:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    if retries < 0 or backoff < 0:
        raise UserError("--retries and --backoff must not be negative")
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    series_hash = build.series_hash(cfg.patches_dir) or ""
    run = MatrixRun(run_id=run_dir.name, series_hash=series_hash, started=utc_now(),
                    finished="", targets=(), stages=STAGES,
                    project_commit=_project_commit(cfg.root),
                    host={"hostname": platform.node(), "cpus": os.cpu_count(),
                          "engine": engine, "retries": retries, "backoff": backoff})
    done: list[mx.TargetResult] = []
    shared: dict[tuple[str, str], tuple[StageResult, Path]] = {}
    with ExitStack() as exits:
        work = _Nightly(cfg, run_dir, engine, exits, say)
        fns = {**work.fns(), **(stage_fns or {})}
        for target in chosen:
            stage_results: list[StageResult] = []
            started = utc_now()
            try:
                for stage in STAGES:
                    stage_results.append(_one_stage(
                        stage, fns[stage], target, stage_results, stages, shared, run_dir,
                        retries, backoff, say))
            except Terminated as exc:
                if len(stage_results) < len(STAGES):     # stopped in a stage, not after
                    current = STAGES[len(stage_results)]
                    stage_results.append(StageResult(
                        current, INFRA, reason=f"{exc} during {current}",
                        attempts=(mx.Attempt(1, INFRA, 0.0, utc_now(), str(exc)),)))
                    stage_results += [StageResult(s, SKIP, reason=f"after {current} was stopped")
                                      for s in STAGES[len(stage_results):]]
                done.append(_target_result(cfg, target, stage_results, series_hash, started,
                                           run_dir))
                done += [mx.TargetResult(t, tuple(StageResult(s, SKIP, reason=str(exc))
                                                  for s in STAGES), series_hash)
                         for t in chosen[len(done):]]
                _write(replace(run, targets=tuple(done), finished=utc_now()), run_dir, previous)
                say(f"stopped: {exc}; record in {run_dir}")
                raise
            done.append(_target_result(cfg, target, stage_results, series_hash, started,
                                       run_dir))
            _write(replace(run, targets=tuple(done)), run_dir, previous)
    run = replace(run, targets=tuple(done), finished=utc_now())
    _write(run, run_dir, previous)
    move_latest(run_dir)
    return run


def _one_stage(stage: str, fn: StageFn, target: Target, before: list[StageResult],
               chosen: Sequence[str], shared: dict, run_dir: Path, retries: int,
               backoff: float, say: Say) -> StageResult:
    if stage not in chosen:
        return StageResult(stage, SKIP, reason="not asked for (--stages)")
    required = mx.needs(stage)
    failed = next((s for s in before if s.stage in required
                   and (s.outcome in (FAIL, INFRA) or s.reason.startswith("after "))), None)
    if failed is not None:
        cause = failed.reason.split(" failed")[0].removeprefix("after ") \
            if failed.outcome == SKIP else failed.stage
        return StageResult(stage, SKIP, reason=f"after {cause} failed")
    key = (target.release, stage)
    if stage in SHARED and key in shared:
        result, origin = shared[key]
        here = run_dir / target.name / stage
        if (origin / stage).is_dir() and not here.exists():
            shutil.copytree(origin / stage, here)
        result = replace(result, links={k: v.replace(f"{origin.name}/", f"{target.name}/", 1)
                                        for k, v in result.links.items()})
        _say_result(say, target, result, f"(as {origin.name})")
        return result
    say(f"{target.name:<24} {stage:<13} ...")

    def ctx_for() -> StageContext:
        return StageContext(target, stage, run_dir, say)

    result = run_stage(stage, fn, ctx_for, retries=retries, backoff=backoff, say=say)
    if stage in SHARED:
        shared[key] = (result, run_dir / target.name)
    _say_result(say, target, result)
    return result


def _say_result(say: Say, target: Target, result: StageResult, note: str = "") -> None:
    tries = f" [{len(result.attempts)} attempts]" if len(result.attempts) > 1 else ""
    say(f"{target.name:<24} {result.stage:<13} {result.outcome:<5} {result.seconds:8.1f} s  "
        f"{result.reason}{tries}{' ' + note if note else ''}")


def _target_result(cfg: Config, target: Target, stages: list[StageResult], series_hash: str,
                   started: str, run_dir: Path) -> mx.TargetResult:
    m = workflow.mirror(cfg)
    rel = m.find(target.release) if cfg.mirror_dir.exists() else None
    upstream = ({"commit": rel.commit, "sha256": rel.provenance.sha256,
                 "origin": rel.provenance.origin, "kind": rel.provenance.kind}
                if rel is not None else {})
    result = mx.TargetResult(target, tuple(stages), series_hash, started, utc_now(), upstream)
    write_json(run_dir / target.name / mx.TARGET_RESULT_NAME, mx.target_to_json(result))
    return result


def _write(run: MatrixRun, run_dir: Path, previous: MatrixRun | None) -> None:
    """The run's reports; nightly.json alone until the report module exists."""
    try:
        from qemupatch import matrixreport
    except ImportError:
        write_json(run_dir / mx.RESULT_NAME, mx.run_to_json(run))
        return
    matrixreport.write_reports(run, run_dir, previous)


def move_latest(run_dir: Path) -> Path:
    """``<run_dir>/../latest`` -> ``<run_dir>.name``, replaced atomically."""
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    tmp.replace(link)     # a rename: readers see the old run or the new, never none
    return link


def previous_run(out: Path) -> MatrixRun | None:
    """The run ``<out>/latest`` points at, if any (the trend's baseline)."""
    latest = out / LATEST
    if not (latest / mx.RESULT_NAME).is_file():
        return None
    return mx.load_run(latest)


def _project_commit(root: Path) -> str:
    res = git(root, "rev-parse", "HEAD", check=False)
    return res.stdout.strip() if res.returncode == 0 else ""


# -- the matrix for CI fan-out ----------------------------------------------------------


def list_targets(cfg: Config, fmt: str) -> str:
    """The matrix for CI: ``github`` (``strategy.matrix`` via fromJSON),
    ``gitlab`` (``parallel:matrix``, one TARGET variable) or ``json``."""
    cells = mx.targets(cfg)
    if fmt == "github":
        return json.dumps({"include": [
            {"target": t.name, "release": t.release, "kernel": t.kernel,
             "required": t.required} for t in cells]}, separators=(",", ":"))
    if fmt == "gitlab":
        return json.dumps({"parallel": {"matrix": [{"TARGET": [t.name for t in cells]}]}},
                          indent=2)
    if fmt == "json":
        return json.dumps([{"target": t.name, "release": t.release, "kernel": t.kernel,
                            "required": t.required} for t in cells], indent=2)
    raise UserError(f"unknown --format {fmt!r}; one of {', '.join(FORMATS)}")


def exit_code(run: MatrixRun) -> int:
    """0: every required target green; 1: a real failure; 3: only the
    machine let us down."""
    return {FAIL: 1, INFRA: 3}.get(run.outcome, 0)


def table(run: MatrixRun, *, color: bool = False, previous: MatrixRun | None = None) -> str:
    """The terminal table (the report module's, once it exists)."""
    try:
        from qemupatch import matrixreport
    except ImportError:
        pass
    else:
        return matrixreport.table(run, color=color, previous=previous)
    width = max([len(t.target.name) for t in run.targets] + [6])
    lines = [f"{'target':<{width}}  " + "  ".join(f"{s:<12}" for s in run.stages) + "  outcome"]
    for t in run.targets:
        cells = []
        for name in run.stages:
            s = t.stage(name)
            cells.append(f"{s.outcome} {s.seconds:.0f}s" if s and s.outcome != SKIP
                         else (s.outcome if s else "-"))
        lines.append(f"{t.target.name:<{width}}  " + "  ".join(f"{c:<12}" for c in cells)
                     + f"  {t.outcome}")
    lines.append(f"run {run.run_id}: {run.outcome}")
    return "\n".join(lines)
