"""The main job: every stage, in order, on one upstream release.

    upstream -> series -> build QEMU -> build guest module and program
             -> guest image -> boot test

It uses its own work tree (``<cache>/pipeline/<release>/src``) so a
maintainer's work tree is never touched, and writes ``pipeline.json`` and
``pipeline.junit.xml`` after every stage, so even a run that fails (or is
killed) leaves a record of how far it got.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from qemupatch import boottest, build, guest, workflow
from qemupatch.config import Config
from qemupatch.errors import QemupatchError
from qemupatch.series import read_series

SCHEMA = 1


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
    """Runs stages, timing each and writing the results after each one."""

    def __init__(self, release: str, kernel: str, out_dir: Path,
                 say: Callable[[str], None]):
        self.release, self.kernel, self.out_dir, self.say = release, kernel, out_dir, say
        self.stages: list[StageResult] = []
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def stage(self, name: str, fn: Callable[[], tuple[object, dict]]) -> object:
        self.say(f"== {name}")
        start = time.monotonic()
        try:
            value, figures = fn()
        except QemupatchError as exc:
            self.stages.append(StageResult(name, False, round(time.monotonic() - start, 2),
                                           error=str(exc)))
            self.write(False, exc.exit_code)
            raise
        seconds = round(time.monotonic() - start, 2)
        self.stages.append(StageResult(name, True, seconds, figures))
        shown = ", ".join(f"{k}={v}" for k, v in figures.items())
        self.say(f"   {name}: ok in {seconds:.1f} s{': ' + shown if shown else ''}")
        self.write(None, 0)
        return value

    def result(self, ok: bool, code: int) -> PipelineResult:
        return PipelineResult(self.release, self.kernel, ok, tuple(self.stages),
                              self.out_dir, code)

    def write(self, ok: bool | None, code: int) -> None:
        data = asdict(self.result(bool(ok), code))
        data.update(out_dir=str(self.out_dir), started=self.started,
                    status="running" if ok is None else "pass" if ok else "fail")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / ".pipeline.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.out_dir / "pipeline.json")
        suite = ET.Element("testsuite", name=f"pipeline {self.release}",
                           tests=str(len(self.stages)),
                           failures=str(sum(1 for s in self.stages if not s.ok)))
        for s in self.stages:
            case = ET.SubElement(suite, "testcase", classname="pipeline", name=s.name,
                                 time=f"{s.seconds:.2f}")
            if not s.ok:
                ET.SubElement(case, "failure", message=s.error.splitlines()[0][:200]
                              if s.error else "failed").text = s.error
            ET.SubElement(case, "system-out").text = json.dumps(s.figures)
        ET.indent(suite)
        (self.out_dir / "pipeline.junit.xml").write_text(
            ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n")


def run_pipeline(cfg: Config, out_dir: Path, *, release: str | None = None,
                 kernel: str | None = None, engine: str = "auto", bench: bool = False,
                 say: Callable[[str], None] = print) -> PipelineResult:
    """Import, apply, build, boot and test; raises the failing stage's error."""
    series = read_series(cfg.patches_dir)
    rel_name = release or series.base or cfg.default_release
    kern = cfg.kernel(kernel) if kernel else cfg.kernels[0]
    rec = _Recorder(rel_name, kern.name, out_dir, say)

    def source():
        rel, wt, commits = workflow.build_source(cfg, rel_name)
        return (rel, wt), {"commit": rel.commit[:12], "source": rel.provenance.origin,
                           "patches": len(commits), "round_trip": "byte-identical"}

    rel, wt = rec.stage("upstream+series", source)
    work = out_dir / "work"

    def build_qemu():
        res = build.build_qemu(wt.path, work / "qemu", release=rel_name,
                               repacked=rel.provenance.repacked, engine=engine,
                               patches=cfg.patches_dir)
        figures = {"engine": res.engine, "compile_s": round(res.seconds, 1),
                   "image_s": round(res.image_seconds, 1), "version": res.version,
                   "sha256": res.sha256.get("qemu-system-x86_64", "")[:16]}
        if res.ccache and res.ccache.hit_rate is not None:
            figures["ccache_hit_rate"] = round(res.ccache.hit_rate, 3)
        return res, figures

    qemu = rec.stage("build-qemu", build_qemu)

    def build_guest():
        ko = build.build_module(cfg.root / "guest" / "kvm_vmsocket", kern, work / "module",
                                engine=engine, patches=cfg.patches_dir)
        prog = build.build_guest_program(cfg.root / "guest" / "vmsocket-test.c",
                                         work / "guest-program", engine=engine)
        return (ko, prog), {"module": ko.name, "kernel": kern.image_package,
                            "program": prog.name}

    ko, prog = rec.stage("build-guest", build_guest)

    def image():
        img = guest.make_guest_image(cfg, kern.name, vmsocket_module=ko, test_program=prog)
        return img, {"kernel": img.kernel_version, "digest": img.digest[:12],
                     "initramfs_kib": img.initramfs.stat().st_size // 1024}

    img = rec.stage("guest-image", image)

    def boot():
        res = boottest.run_boot_test(qemu.binary, img, out_dir / "boot-test", bench=bench,
                                     progress=say)
        figures = {"accel": res.accel, "tests_passed": sum(1 for t in res.tests if t.status == "pass"),
                   "tests": len(res.tests), "seconds": round(res.seconds, 1)}
        figures.update({s.name + "_s": round(s.seconds, 1) for s in res.stages})
        return res, figures

    rec.stage("boot-test", boot)
    rec.write(True, 0)
    return rec.result(True, 0)


def summary(result: PipelineResult) -> str:
    lines = [f"pipeline on {result.release} (guest kernel {result.kernel}): "
             f"{'PASS' if result.ok else 'FAIL'}",
             f"{'stage':<17}{'result':<8}{'seconds':>9}  figures"]
    for s in result.stages:
        figures = ", ".join(f"{k}={v}" for k, v in s.figures.items())
        lines.append(f"{s.name:<17}{'ok' if s.ok else 'FAIL':<8}{s.seconds:9.1f}  {figures}")
    lines.append(f"results: {result.out_dir / 'pipeline.json'}, "
                 f"{result.out_dir / 'pipeline.junit.xml'}")
    return "\n".join(lines)
