"""The main job: every stage, in order, on one upstream release.

    upstream -> series -> build QEMU -> build guest module and program
             -> guest image -> boot test

It uses its own work tree (``<cache>/pipeline/<release>/src``) so a
maintainer's work tree is never touched, opens one build runner (one
container engine, one podman service) for all its builds, and records
``pipeline.json`` and ``pipeline.junit.xml`` when each stage starts and
ends, and once more in a ``finally``: a run that fails, crashes or is
stopped by SIGTERM still says which stage it reached and why it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qemupatch import boottest, build, guest, workflow
from qemupatch.config import Config
from qemupatch.errors import QemupatchError, Terminated
from qemupatch.records import FAIL, PASS, Case, utc_now, write_json, write_junit
from qemupatch.runner import Runner
from qemupatch.series import read_series

SCHEMA = 1
STAGES = ("upstream+series", "build-qemu", "build-guest", "guest-image", "boot-test")


@dataclass(frozen=True)
class StageResult:
    name: str
    ok: bool
    seconds: float
    figures: dict = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class PipelineResult:
    release: str
    kernel: str
    ok: bool
    stages: tuple[StageResult, ...]
    out_dir: Path
    exit_code: int = 0
    schema: int = SCHEMA


class _Recorder:
    """Runs stages, timing each, and keeps pipeline.json up to date."""

    def __init__(self, release: str, kernel: str, out_dir: Path,
                 say: Callable[[str], None]):
        self.release, self.kernel, self.out_dir, self.say = release, kernel, out_dir, say
        self.stages: list[StageResult] = []
        self.started = utc_now()
        self.current: str | None = None

    def stage(self, name: str, fn: Callable[[], tuple[object, dict]]) -> object:
        self.say(f"== {name}")
        self.current = name
        self.write("running", 0)
        start = time.monotonic()
        try:
            value, figures = fn()
        except BaseException as exc:
            self.stages.append(StageResult(name, False, round(time.monotonic() - start, 2),
                                           error=str(exc) or type(exc).__name__))
            raise
        seconds = round(time.monotonic() - start, 2)
        self.stages.append(StageResult(name, True, seconds, figures))
        self.current = None
        shown = ", ".join(f"{k}={v}" for k, v in figures.items())
        self.say(f"   {name}: ok in {seconds:.1f} s{': ' + shown if shown else ''}")
        self.write("running", 0)
        return value

    @contextmanager
    def recording(self) -> Iterator[None]:
        """The final record, whatever ends the run."""
        try:
            yield
        except Terminated as exc:
            self.write("terminated", exc.exit_code, exc)
            raise
        except QemupatchError as exc:
            self.write("fail", exc.exit_code, exc)
            raise
        except BaseException as exc:
            self.write("error", 1, exc)
            raise
        else:
            self.write("pass", 0)

    def result(self, ok: bool, code: int) -> PipelineResult:
        return PipelineResult(self.release, self.kernel, ok, tuple(self.stages),
                              self.out_dir, code)

    def write(self, status: str, code: int, exc: BaseException | None = None) -> None:
        data = asdict(self.result(status == "pass", code))
        data.update(out_dir=str(self.out_dir), started=self.started, status=status,
                    updated=utc_now(), running_stage=self.current if status == "running"
                    else None)
        if exc is not None:
            data.update(stopped_at=self.current, reason=str(exc) or type(exc).__name__,
                        error=type(exc).__name__)
        write_json(self.out_dir / "pipeline.json", data)
        cases = [Case("pipeline", s.name, PASS if s.ok else FAIL, s.seconds, s.error,
                      json.dumps(s.figures)) for s in self.stages]
        write_junit(self.out_dir / "pipeline.junit.xml", f"pipeline {self.release}", cases,
                    error=str(exc) if exc is not None else None)




def run_pipeline(cfg: Config, out_dir: Path, *, release: str | None = None,
                 kernel: str | None = None, engine: str = "auto", bench: bool = False,
                 qemu_options: build.QemuBuildOptions | None = None,
                 say: Callable[[str], None] = print) -> PipelineResult:
    """Import, apply, build, boot and test; raises the failing stage's error.

    ``qemu_options``: how QEMU is built (default: ccache in depend mode, the
    shared ccache volume, the host ccache under the cache folder)."""
    qemu_options = qemu_options or build.QemuBuildOptions(
        ccache_dir=cfg.cache_dir / "ccache-host")
    series = read_series(cfg.patches_dir)
    rel_name = release or series.base or cfg.default_release
    kern = cfg.kernel(kernel) if kernel else cfg.default_kernel
    rec = _Recorder(rel_name, kern.name, out_dir, say)
    work = out_dir / "work"
    with rec.recording():

        def source():
            src = workflow.carry_source(cfg, rel_name)
            rel, wt = src.release, src.worktree
            return (rel, wt), {"commit": rel.commit[:12], "source": rel.provenance.origin,
                               "patches": len(src.stack.commits),
                               "round_trip": ("byte-identical" if rel_name == series.base
                                              else "carried + fix-ups")}

        rel, wt = rec.stage("upstream+series", source)
        with Runner.get(engine, cfg.settings) as runner:

            def build_qemu():
                res = build.build_qemu(
                    wt.path, work / "qemu", release=rel_name,
                    repacked=rel.provenance.repacked, runner=runner,
                    project_root=cfg.root, patches=cfg.patches_dir, options=qemu_options)
                figures = {"engine": res.runner, "compile_s": round(res.seconds, 1),
                           "image_s": round(res.image_seconds, 1), "version": res.version,
                           "sha256": res.sha256.get(build.QEMU_BINARY, "")[:16]}
                if res.ccache and res.ccache.hit_rate is not None:
                    figures["ccache_hit_rate"] = round(res.ccache.hit_rate, 3)
                return res, figures

            qemu = rec.stage("build-qemu", build_qemu)

            def build_guest():
                ko = build.build_module(cfg.root / "guest" / "kvm_vmsocket", kern,
                                        work / "module", runner=runner,
                                        project_root=cfg.root, patches=cfg.patches_dir)
                prog = build.build_guest_program(cfg.root / "guest" / "vmsocket-test.c",
                                                 work / "guest-program", runner=runner,
                                                 project_root=cfg.root)
                return (ko, prog), {"module": ko.binary.name, "kernel": kern.image_package,
                                    "program": prog.binary.name,
                                    "seconds": round(ko.seconds + prog.seconds, 1)}

            ko, prog = rec.stage("build-guest", build_guest)

        def image():
            img = guest.make_guest_image(cfg, kern.name, vmsocket_module=ko.binary,
                                         test_program=prog.binary)
            return img, {"kernel": img.kernel_version, "digest": img.digest[:12],
                         "initramfs_kib": img.initramfs.stat().st_size // 1024}

        img = rec.stage("guest-image", image)

        def boot():
            res = boottest.run_boot_test(qemu.binary, img, out_dir / "boot-test",
                                         bench=bench, progress=say)
            figures = {"accel": res.accel,
                       "tests_passed": sum(1 for t in res.tests if t.status == "pass"),
                       "tests": len(res.tests), "seconds": round(res.seconds, 1)}
            figures.update({s.name + "_s": round(s.seconds, 1) for s in res.stages})
            return res, figures

        rec.stage("boot-test", boot)
    return rec.result(True, 0)


def summary(result: PipelineResult) -> str:
    lines = [f"pipeline on {result.release} (guest kernel {result.kernel}): "
             f"{'PASS' if result.ok else 'FAIL'}",
             f"{'stage':<17}{'result':<8}{'seconds':>9}  figures"]
    for s in result.stages:
        figures = ", ".join(f"{k}={v}" for k, v in s.figures.items())
        lines.append(f"{s.name:<17}{'ok' if s.ok else 'FAIL':<8}{s.seconds:9.1f}  {figures}")
    lines.append(f"total {sum(s.seconds for s in result.stages):.1f} s; results: "
                 f"{result.out_dir / 'pipeline.json'}, {result.out_dir / 'pipeline.junit.xml'}")
    return "\n".join(lines)
