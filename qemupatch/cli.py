"""The command line: parse, call the library, print.

Each subcommand is a function registered with ``@command``; its name and help
come from the function and its docstring.  Exit codes come from the error
classes in errors.py (0 ok, 1 failed/conflict, 2 bad input, 3 infrastructure,
20-24 boot-test stages, 30-34 builds, 130/143 stopped by SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from qemupatch import carry, config, lifecycle, report, workflow
from qemupatch.errors import CheckFailed, QemupatchError, Terminated, UserError
from qemupatch.rebase import Rebase
from qemupatch.series import read_series
from qemupatch.upstream import add_release

Handler = Callable[[argparse.Namespace, config.Config], int]
COMMANDS: dict[str, tuple[Handler, list[tuple[tuple, dict]]]] = {}


def arg(*names, **kwargs):
    return (names, kwargs)


def command(*args: tuple[tuple, dict]):
    """Register a subcommand: name from the function, help from its docstring."""

    def register(fn: Handler) -> Handler:
        COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = (fn, list(args))
        return fn

    return register


def say(text: str) -> None:
    print(text, flush=True)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- upstream ------------------------------------------------------------------


@command(
    arg("action", choices=["list", "add", "remove"]),
    arg("name", nargs="?", help="release name, e.g. v10.2.2"),
    arg("--from", dest="kind", choices=["debian", "tarball", "git"],
        help="which configured source to use (default: [project] prefer)"),
    arg("--debian", help="import this Debian source version of qemu, e.g. 1:10.2.2+ds-1"),
    arg("--tarball", help="import this tarball (path or URL)"),
    arg("--sha256", help="expected sha256 of --tarball"),
    arg("--git", dest="git_url", help="fetch from this git URL"),
    arg("--ref", dest="git_ref", help="git ref to fetch with --git (default: the name)"),
)
def cmd_upstream(ns: argparse.Namespace, cfg: config.Config) -> int:
    """List, add or remove upstream QEMU releases in the local mirror."""
    mirror = workflow.mirror(cfg)
    if ns.action == "list":
        for rel in mirror.releases():
            p = rel.provenance
            say(f"{rel.name}\t{rel.commit[:12]}\t{p.kind}\t{p.origin}"
                f"{'  (repacked)' if p.repacked else ''}\tsha256={p.sha256 or '-'}"
                f"\timported {p.imported_at}")
        return 0
    if not ns.name:
        raise UserError(f"upstream {ns.action} needs a release name")
    if ns.action == "remove":
        rel = mirror.remove(ns.name)
        say(f"removed {rel.name} ({rel.commit[:12]})")
        return 0
    progress(f"importing {ns.name} ...")
    rel = add_release(cfg, mirror, ns.name, kind=ns.kind, tarball=ns.tarball, sha256=ns.sha256,
                      git_url=ns.git_url, git_ref=ns.git_ref, debian=ns.debian)
    say(f"{rel.name} is {rel.commit} ({rel.provenance.kind}: {rel.provenance.origin})")
    return 0


# -- series --------------------------------------------------------------------


@command(
    arg("--base", help="upstream release (default: the series' base)"),
    arg("--worktree", type=Path, help="where to check out (default: <cache>/work/<base>)"),
)
def cmd_apply(ns: argparse.Namespace, cfg: config.Config) -> int:
    """Apply the series onto a release in a work tree, ready to edit and commit."""
    done = workflow.apply(cfg, ns.base, ns.worktree)
    say(f"applied {len(done.commits)} patches on {done.release.name}")
    for how in done.resolved:
        say(f"  resolved automatically: {how}")
    if done.fixups:
        say(f"  of which {len(done.fixups)} are {done.release.name}'s fix-ups "
            f"({carry.fixups_dir(cfg.patches_dir, done.release.name)})")
    say(f"work tree: {done.worktree} (branch {done.branch})")
    if done.backup_ref:
        say(f"previous branch saved as {done.backup_ref}")
    return 0


@command(
    arg("--base", help="release whose work branch to export (default: the series' base)"),
    arg("--worktree", type=Path, help="the work tree (default: <cache>/work/<base>)"),
)
def cmd_export(ns: argparse.Namespace, cfg: config.Config) -> int:
    """Regenerate patches/ from the work branch, normalized, atomically."""
    series = workflow.export(cfg, ns.base, ns.worktree)
    where = (cfg.patches_dir if series.base == read_series(cfg.patches_dir).base
             else carry.fixups_dir(cfg.patches_dir, series.base))
    say(f"wrote {len(series.patches)} patches based on {series.base} to {where}")
    return 0


@command(
    arg("--base", help="upstream release (default: the series' base)"),
    arg("--checkpatch", action="store_true", help="also run QEMU's scripts/checkpatch.pl"),
    arg("--report-dir", type=Path, help="write check.json and check.junit.xml here"),
    arg("--builds", action="store_true",
        help="then build QEMU after each patch (in a container; docs/patch-builds.md); "
        "results in <report-dir>/patch-builds or out/patch-builds/<base>"),
    arg("--engine", choices=["auto", "docker", "podman", "host"], default="auto",
        help="--builds: where QEMU is built"),
)
def cmd_check(ns: argparse.Namespace, cfg: config.Config) -> int:
    """Check the series: applies, round-trips, metadata, whitespace, style."""
    try:
        results = workflow.check(cfg, ns.base, ns.checkpatch)
    except CheckFailed as exc:
        results = exc.results
        _print_checks(results, ns.report_dir)
        raise
    _print_checks(results, ns.report_dir)
    if ns.builds:
        _check_builds(ns, cfg)
    return 0


def _check_builds(ns: argparse.Namespace, cfg: config.Config) -> None:
    from qemupatch import patchbuilds
    from qemupatch.runner import Runner

    name = workflow.series_base(cfg, read_series(cfg.patches_dir), ns.base)
    out = ns.report_dir / "patch-builds" if ns.report_dir \
        else cfg.root / "out" / "patch-builds" / name
    with Runner.get(ns.engine, cfg.settings) as runner:
        res = patchbuilds.build_each_patch(cfg, name, out, runner=runner, say=progress)
    for line in patchbuilds.summary_lines(res):
        say(line)
    say(f"patch builds: {out}")
    bad = [b for b in res.builds if not b.ok]
    if bad:
        raise CheckFailed(f"{len(bad)} of {len(res.builds)} patches do not build on their "
                          f"own on {name}: " + ", ".join(f"{b.index} ({b.subject})" for b in bad))


def _print_checks(results: list, report_dir: Path | None) -> None:
    for r in results:
        say(f"{'ok  ' if r.ok else 'FAIL'} {r.check:<14} {r.patch or '(series)'}")
        if not r.ok and r.message:
            say("     " + r.message.replace("\n", "\n     "))
    if report_dir:
        report.write_check_report(results, report_dir, "qemupatch check")


# -- rebase --------------------------------------------------------------------


@command(
    arg("--onto", help="the upstream release to rebase onto"),
    arg("--keep-going", action="store_true",
        help="CI mode: never stop; skip and report conflicting patches"),
    arg("--skip-patch", action="append", default=[], metavar="NAME",
        help="leave this patch out (repeatable)"),
    arg("--continue", dest="resume", action="store_true",
        help="go on after resolving a conflict (or after an interruption)"),
    arg("--skip", action="store_true", help="leave the conflicting patch out and go on"),
    arg("--abort", action="store_true", help="undo the rebase; everything as it was"),
    arg("--worktree", type=Path, help="work tree (default: <cache>/work/<onto>)"),
    arg("--report-dir", type=Path, default=Path("qemupatch-report"),
        help="where rebase.md/.json/.junit.xml go (default: ./qemupatch-report)"),
)
def cmd_rebase(ns: argparse.Namespace, cfg: config.Config) -> int:
    """Replay the series onto another release and report each patch's fate."""
    modes = [m for m in ("onto", "resume", "skip", "abort") if getattr(ns, m)]
    if len(modes) != 1:
        raise UserError("rebase takes exactly one of --onto, --continue, --skip, --abort")
    rb = Rebase(workflow.mirror(cfg), cfg.cache_dir, cfg.patches_dir, progress)
    if ns.onto:
        rep = rb.start(ns.onto, keep_going=ns.keep_going, skip=tuple(ns.skip_patch),
                       worktree=ns.worktree)
    elif ns.resume:
        rep = rb.resume()
    elif ns.skip:
        rep = rb.skip_current()
    else:
        rep = rb.abort()
    paths = report.write_rebase_report(rep, ns.report_dir)
    say(report.rebase_markdown(rep))
    say(f"reports: {paths['markdown']}, {paths['json']}, {paths['junit']}")
    if rep.status == "complete":
        say(f"next: review {rep.worktree}, then qemupatch export --base {rep.new_base.name}")
    if rep.status == "aborted":
        return 0
    return 1 if rep.unresolved_conflicts else 0


# -- build, boot, the whole pipeline ------------------------------------------------


@command(
    arg("--base", help="upstream release (default: the series' base)"),
    arg("--engine", choices=["auto", "docker", "podman", "host"], default="auto",
        help="where to compile: a container engine (auto: Docker if running, else a "
             "private podman service) or the host"),
    arg("--kernel", help="also build the guest module for this [[kernel]] name"),
    arg("--timeout", type=float, default=3600, help="deadline of each build, seconds"),
    arg("--out", type=Path, default=Path("out/build"), help="artifacts folder"),
)
def cmd_build(ns: argparse.Namespace, cfg: config.Config) -> int:
    """Build QEMU with the series (and the guest module) inside a container."""
    from qemupatch import build
    from qemupatch.runner import Runner

    rel, wt, _ = workflow.build_source(cfg, ns.base)
    with Runner.get(ns.engine, cfg.settings) as runner:
        res = build.build_qemu(
            wt.path, ns.out / "qemu", release=rel.name, repacked=rel.provenance.repacked,
            runner=runner, project_root=cfg.root, patches=cfg.patches_dir,
            options=build.QemuBuildOptions(ccache_dir=cfg.cache_dir / "ccache-host",
                                           timeout=ns.timeout))
        say(f"qemu: {res.binary} ({res.runner}, {res.seconds:.0f} s, "
            f"provenance {res.build_json})")
        if ns.kernel:
            ko = build.build_module(cfg.root / "guest" / "kvm_vmsocket", cfg.kernel(ns.kernel),
                                    ns.out / f"module-{ns.kernel}", runner=runner,
                                    project_root=cfg.root, patches=cfg.patches_dir)
            say(f"module: {ko.binary}")
    return 0


@command(
    arg("--qemu", type=Path, required=True, help="the patched qemu-system-x86_64"),
    arg("--module", type=Path, help="kvm_vmsocket.ko for the guest kernel "
        "(without it the guest boots and reports the vmsocket tests as skipped)"),
    arg("--program", type=Path, help="the static vmsocket-test binary"),
    arg("--kernel", help="[[kernel]] name from qemupatch.toml (default: the first)"),
    arg("--bench", action="store_true", help="also measure vmsocket against virtio-serial"),
    arg("--bench-reps", type=int, default=5, metavar="N",
        help="the benchmark measures every cell N times (1-20, default 5)"),
    arg("--accel", choices=["auto", "kvm", "tcg"], default="auto",
        help="auto: KVM if a short probe boots, else TCG"),
    arg("--idle", type=float, help="console watchdog: fail after this many silent seconds"),
    arg("--qemu-arg", action="append", default=[], metavar="ARG",
        help="one more QEMU argument (repeatable), e.g. --qemu-arg=-cpu --qemu-arg=max"),
    arg("--out", type=Path, default=Path("out/boot-test"), help="results folder"),
)
def cmd_boot_test(ns: argparse.Namespace, cfg: config.Config) -> int:
    """Boot a guest and prove -vmsocket unix: works end to end."""
    from qemupatch import boottest, guest

    img = guest.make_guest_image(cfg, ns.kernel, vmsocket_module=ns.module,
                                 test_program=ns.program)
    deadlines = boottest.Deadlines()
    if ns.idle is not None:
        deadlines = dataclasses.replace(deadlines, idle=ns.idle)
    if not 1 <= ns.bench_reps <= 20:     # 20 x 3 channels fit the 900 s bench deadline
        raise UserError(f"--bench-reps {ns.bench_reps}: 1 to 20")
    res = boottest.run_boot_test(ns.qemu, img, ns.out, bench=ns.bench, accel=ns.accel,
                                 deadlines=deadlines, extra_args=ns.qemu_arg,
                                 progress=progress, bench_reps=ns.bench_reps)
    say(f"boot test: {'PASS' if res.ok else 'FAIL'} ({res.message}); results in {ns.out}")
    return res.exit_code


@command(
    arg("--release", help="upstream release (default: the series' base)"),
    arg("--kernel", help="guest [[kernel]] name (default: the first)"),
    arg("--engine", choices=["auto", "docker", "podman", "host"], default="auto"),
    arg("--bench", action="store_true", help="add the vmsocket/virtio-serial benchmark"),
    arg("--out", type=Path, default=Path("out/pipeline"), help="results folder"),
)
def cmd_pipeline(ns: argparse.Namespace, cfg: config.Config) -> int:
    """The main job: import, apply, build in a container, boot, test."""
    from qemupatch import pipeline

    res = pipeline.run_pipeline(cfg, ns.out, release=ns.release, kernel=ns.kernel,
                                engine=ns.engine, bench=ns.bench, say=progress)
    say(pipeline.summary(res))
    return res.exit_code


@command(
    arg("--out", type=Path, help="run folder (default: out/nightly/<UTC stamp>; "
        "out/nightly/latest is moved to it when the run ends)"),
    arg("--target", action="append", metavar="NAME",
        help="run only this matrix target (repeatable), e.g. v10.2.2-linux-6.1"),
    arg("--list-targets", action="store_true", help="print the matrix for CI fan-out and exit"),
    arg("--format", choices=["github", "gitlab", "json"], default="json",
        help="--list-targets: github (strategy.matrix), gitlab (parallel:matrix) or json"),
    arg("--stages", help="comma-separated stages to run (default: all); the others are "
        "skipped"),
    arg("--engine", choices=["auto", "docker", "podman", "host"], default="auto"),
    arg("--retries", type=int, default=1, help="tries again after an infrastructure failure"),
    arg("--backoff", type=float, default=30.0,
        help="seconds before the first retry (doubling after each)"),
)
def cmd_nightly(ns: argparse.Namespace, cfg: config.Config) -> int:
    """Every release x guest kernel of the matrix: fetch, rebase, build, boot, qtest."""
    from qemupatch import matrix, nightly

    if ns.list_targets:
        say(nightly.list_targets(cfg, ns.format))
        return 0
    targets = [matrix.find_target(cfg, n) for n in ns.target] if ns.target else None
    stages = tuple(s.strip() for s in ns.stages.split(",") if s.strip()) if ns.stages \
        else matrix.STAGES
    run_dir = ns.out or cfg.root / "out" / "nightly" / nightly.run_id_now()
    previous = nightly.previous_run(run_dir.parent)
    run = nightly.run_nightly(cfg, run_dir, targets=targets, stages=stages, engine=ns.engine,
                              retries=ns.retries, backoff=ns.backoff, previous=previous,
                              say=progress)
    say(nightly.table(run, color=sys.stdout.isatty(), previous=previous))
    say(f"results: {run_dir}")
    return nightly.exit_code(run)


@command(
    arg("--qemu", type=Path, help="a patched QEMU built with ASan+UBSan "
        "(default: build one for --release, ccache makes it cheap after the first time)"),
    arg("--release", help="upstream release to build (default: the series' base)"),
    arg("--engine", choices=["auto", "docker", "podman", "host"], default="auto"),
    arg("--seed", type=int, help="first seed (default: a random one, printed)"),
    arg("--seeds", type=int, default=1, help="how many seeds, one QEMU each (default 1)"),
    arg("--ops", type=int, help="operations per seed (default 3000 unless --minutes)"),
    arg("--minutes", type=float, help="run each seed this long instead of --ops"),
    arg("--out", type=Path, default=Path("out/fuzz"), help="results folder"),
)
def cmd_fuzz(ns: argparse.Namespace, cfg: config.Config) -> int:
    """Fuzz the device under ASan/UBSan: hostile registers, buffers, PCI, MSI, resets."""
    from qemupatch import fuzz
    from qemupatch.runner import Runner

    qemu = ns.qemu
    if qemu is None:
        with Runner.get(ns.engine, cfg.settings) as runner:
            qemu = fuzz.build_sanitized_qemu(cfg, ns.release, runner=runner).binary
    results = fuzz.run_seeds(qemu, ns.out, first_seed=ns.seed, seeds=ns.seeds,
                             operations=ns.ops, seconds=ns.minutes and ns.minutes * 60,
                             say=progress)
    for r in results:
        say(f"seed {r.seed}: {r.operations} operations in {r.seconds:.1f} s "
            f"({r.ops_per_second:.0f}/s): {'no finding' if r.ok else 'FINDINGS'}")
        for finding in r.findings:
            say(f"  {finding}\n  reproduce: {r.reproduce(qemu)}")
    return 0 if all(r.ok for r in results) else 1


@command(
    arg("version", help="MAJOR.MINOR.PATCH (docs/release.md), tagged v<VERSION>"),
    arg("--matrix", type=Path, help="the matrix run folder (default: out/nightly/latest)"),
    arg("--dist", type=Path, help="where the release files go (default: dist/v<VERSION>)"),
    arg("--check", action="store_true", help="only say whether the release would be made"),
)
def cmd_release(ns: argparse.Namespace, cfg: config.Config) -> int:
    """Tag a version and write dist/, only when the matrix is green for this series."""
    from qemupatch import release

    if ns.check:
        plan = release.check_release(cfg, ns.version, ns.matrix, dist_dir=ns.dist)
        say(f"{plan.tag} may be tagged: series {plan.series_hash[:12]}, matrix run "
            f"{plan.run.run_id} ({plan.run.outcome}), {len(plan.cells)} targets green")
        return 0
    rel = release.make_release(cfg, ns.version, ns.matrix, ns.dist)
    plan = rel.plan
    say(f"tagged {rel.tag} on {plan.project_commit[:12]}: series {plan.series_hash[:12]}, "
        f"matrix run {plan.run.run_id} ({plan.run.outcome})")
    for name, kernels in plan.releases.items():
        say(f"  supports {name} with Linux {', '.join(kernels)} guests")
    say(f"{rel.dist_dir}:")
    for name in rel.files:
        say(f"  {name}")
    say(f"publish: git push origin {rel.tag}")
    return 0


@command(
    arg("--matrix", type=Path, help="a matrix run folder or nightly.json "
        "(default: the newest green run under out/nightly/)"),
    arg("--write-readme", action="store_true",
        help="rewrite README.md's supported-releases block and docs/supported-matrix.json"),
)
def cmd_supported(ns: argparse.Namespace, cfg: config.Config) -> int:
    """Print the supported releases x guest kernels, from the last green matrix run."""
    from qemupatch import release

    run, path = release.last_green_run(cfg, ns.matrix)
    say(release.supported_table(run).rstrip())
    if ns.write_readme:
        readme, record = release.write_readme(cfg, run, path)
        say(f"wrote {readme} (block) and {record}")
    return 0


@command(
    arg("action", choices=["merge"], help="merge: combine nightly run folders of cells run "
        "apart (qemupatch nightly --target NAME) into one report"),
    arg("dirs", nargs="+", type=Path, metavar="DIR", help="a cell's nightly run folder"),
    arg("--out", type=Path, required=True, help="the merged run folder"),
    arg("--previous", type=Path, help="a run folder or nightly.json to compare with (trend)"),
)
def cmd_report(ns: argparse.Namespace, cfg: config.Config) -> int:
    """Merge nightly cells into one report; exit 1 if a required target is red, 3 infra."""
    from qemupatch import matrix, matrixreport

    previous = matrix.load_run(ns.previous) if ns.previous else None
    run = matrixreport.merge(ns.dirs, ns.out, previous)
    say(matrixreport.table(run, color=sys.stdout.isatty(), previous=previous))
    say(f"report: {ns.out / matrixreport.HTML_NAME}")
    return matrixreport.exit_code(run)


# -- main ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qemupatch",
        description="Keep the vmsocket device alive on modern QEMU: the patch series, "
                    "rebases, container builds and boot tests.",
        epilog="exit codes: 0 ok, 1 failed or conflict, 2 bad input, 3 infrastructure, "
               "20-24 boot test (image, qemu, guest boot, guest tests, deadline), "
               "30-34 build (no engine, image, compile, killed, engine API), "
               "130/143 stopped by SIGINT/SIGTERM (cleaned up, records written)")
    parser.add_argument("-C", dest="root", type=Path, help="project folder (default: search up)")
    parser.add_argument("--cache", type=Path,
                        help="cache folder (default: $QEMUPATCH_CACHE or ~/.cache/qemupatch)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command run")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, args) in COMMANDS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=doc)
        for names, kwargs in args:
            p.add_argument(*names, **kwargs)
        p.set_defaults(handler=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with lifecycle.stop_on_signals():
            cfg = config.load(ns.root, ns.cache)
            return ns.handler(ns, cfg)
    except (QemupatchError, Terminated) as exc:
        print(f"qemupatch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:           # a SIGINT before the handler was set
        print("qemupatch: interrupted", file=sys.stderr)
        return 130
