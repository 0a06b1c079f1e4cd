"""Each patch builds on its own (patchbuilds.py), fast: synthetic releases
whose tree is a tiny fake QEMU (a configure that writes a build.ninja
compiling the sources meson.build lists, and each qtest
tests/qtest/meson.build lists, re-run by ninja when a list changes, as
meson is), built on the host runner like test_build.py's fake tree."""

from __future__ import annotations

import json
import shutil
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qemupatch import patchbuilds, workflow
from qemupatch.build import QemuBuildOptions
from qemupatch.config import Settings
from qemupatch.run import git
from qemupatch.runner import HostRunner
from qemupatch.series import read_series
from tests.conftest import Project, commit_files, requires, write_config

needs_ninja = requires(lambda: shutil.which("ninja") and shutil.which("gcc"),
                       "ninja and gcc are needed on the host")

CONFIGURE = r"""#!/bin/sh
# A fake QEMU configure: build.ninja compiles the sources meson.build lists
# into qemu-system-x86_64 and each qtest tests/qtest/meson.build lists into
# tests/qtest/<name>; ninja re-runs it when either list changes.
set -eu
src=$(cd "$(dirname "$0")" && pwd)
cc=cc
for arg; do case $arg in --cc=*) cc=${arg#--cc=} ;; esac; done
echo "fake configure: $*"
srcs=$(sed -n "s|^source: |$src/|p" "$src/meson.build" | tr '\n' ' ')
{
  echo "rule cc"
  echo "  command = $cc -O2 -I$src -o \$out \$in"
  echo "  description = CC \$out"
  echo "rule configure"
  echo "  command = $src/configure $*"
  echo "  generator = 1"
  echo "build build.ninja: configure | $src/meson.build $src/tests/qtest/meson.build"
  echo "build qemu-system-x86_64: cc $srcs"
  for t in $(sed -n 's/^qtest: //p' "$src/tests/qtest/meson.build"); do
    echo "build tests/qtest/$t: cc $src/tests/qtest/$t.c"
  done
} > build.ninja
"""

HELLO = '#include <stdio.h>\nint main(void) { puts("QEMU emulator version 1.0.0"); return 0; }\n'
RELEASE = {
    "configure": CONFIGURE,
    "VERSION": "1.0.0\n",
    "hello.c": HELLO,
    "meson.build": "source: hello.c\n",
    "tests/qtest/meson.build": "# qtests\n",
    "api.h": "#define API_NEW 1\n",
}
OLD_RELEASE = {**RELEASE, "VERSION": "0.9.0\n", "api.h": "#define API_OLD 1\n"}
DEV = '#include "api.h"\nint dev(void);\n\nint dev(void)\n{\n    return API_NEW;\n}\n'
QTEST = "int main(void) { return 0; }\n"
SERIES_MESON = "source: hello.c\nsource: dev.c\n"
QTEST_MESON = "# qtests\nqtest: dev-test\n"


def _tarball(path: Path, top: str, files: dict[str, str]) -> Path:
    src = path.parent / f"{path.name}.src" / top
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    (src / "configure").chmod(0o755)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=top)
    return path


def _project(tmp_path: Path, releases: dict[str, dict[str, str]], patches) -> Project:
    """Releases (the first the series' base), imported; ``patches`` a list
    of (subject, files) committed on the base and exported."""
    root = tmp_path / "proj"
    root.mkdir()
    tarballs = {n: _tarball(tmp_path / f"fq-{n[1:]}.tar.gz", f"fq-{n[1:]}", files)
                for n, files in releases.items()}
    base = next(iter(releases))
    write_config(root, tarballs, default=base)
    proj = Project(root, tmp_path / "cache", tarballs)
    m = workflow.mirror(proj.cfg)
    for name, path in tarballs.items():
        m.import_tarball(name, path)
    wt = proj.worktree(base)
    wt.reset_to(m.get(base).commit)
    for subject, files in patches:
        commit_files(wt, files, subject, why="exercise the patch builds")
    workflow.export(proj.cfg, base)
    return proj


BROKEN = [
    ("dev: add the device", {"dev.c": DEV, "meson.build": SERIES_MESON}),
    ("dev: add a helper, with a typo", {"dev.c": DEV + "int helper(void) { return 1 }\n"}),
    ("dev: fix the helper's typo", {"dev.c": DEV + "int helper(void) { return 1; }\n"}),
    ("tests/qtest: add a dev test", {"tests/qtest/dev-test.c": QTEST,
                                     "tests/qtest/meson.build": QTEST_MESON}),
]


def _run(proj: Project, release: str, out: Path, lines: list[str] | None = None):
    cfg = proj.cfg
    return patchbuilds.build_each_patch(
        cfg, release, out, runner=HostRunner(Settings()),
        say=(lines.append if lines is not None else lambda _: None),
        options=QemuBuildOptions(timeout=120, ccache_dir=cfg.cache_dir / "ccache"))


@pytest.fixture
def broken_project(tmp_path: Path) -> Project:
    return _project(tmp_path, {"v1.0.0": RELEASE}, BROKEN)


@needs_ninja
def test_a_patch_that_breaks_the_build_fails_and_the_next_that_fixes_it_is_ok(
        broken_project: Project, tmp_path: Path) -> None:
    out = tmp_path / "out"
    lines: list[str] = []
    res = _run(broken_project, "v1.0.0", out, lines)
    assert [b.ok for b in res.builds] == [True, False, True, True]
    assert not res.ok and res.mode == patchbuilds.EACH and res.release == "v1.0.0"
    assert [b.subject for b in res.builds] == [s for s, _ in BROKEN]
    bad = res.builds[1]
    assert "error:" in bad.excerpt and "dev.c" in bad.excerpt
    assert bad.log == out / "patch-02.log" and "error:" in bad.log.read_text()
    # The qtest is a target from the patch that adds it, and was built.
    assert [b.targets for b in res.builds] == [(), (), (), ("tests/qtest/dev-test",)]
    qemu_out = broken_project.cfg.cache_dir / "patchbuilds" / "v1.0.0" / "qemu"
    assert (qemu_out / "dev-test").is_file()
    # One build folder, incremental: configured once, re-run only when a list changed.
    logs = [(out / f"patch-{i:02d}.log").read_text() for i in range(1, 5)]
    assert "fake configure" in logs[0] and "fake configure" not in logs[2]
    assert "fake configure" in logs[3]       # tests/qtest/meson.build changed
    assert all(b.seconds > 0 and not b.reused for b in res.builds)
    assert len({b.tree for b in res.builds}) == 4
    assert any("2/4 dev: add a helper, with a typo: FAIL" in line for line in lines)
    # The records: JSON and JUnit, one testcase per patch.
    data = json.loads((out / patchbuilds.RECORD).read_text())
    assert data["status"] == "complete" and data["ok"] is False and data["not_built"] == []
    assert [b["ok"] for b in data["builds"]] == [True, False, True, True]
    assert data["builds"][1]["log"] == "patch-02.log"
    suite = ET.parse(out / patchbuilds.JUNIT).getroot()
    cases = suite.findall("testcase")
    assert len(cases) == 4 and suite.get("failures") == "1"
    failure = cases[1].find("failure")
    assert failure is not None and "does not build on v1.0.0" in failure.text
    assert (out / "patch-04.build.json").is_file()
    text = "\n".join(patchbuilds.summary_lines(res))
    assert "FAIL  2 dev: add a helper, with a typo" in text and "log: " in text


@needs_ninja
def test_unchanged_steps_are_not_rebuilt_and_a_changed_patch_is(
        broken_project: Project, tmp_path: Path) -> None:
    cfg = broken_project.cfg
    first = _run(broken_project, "v1.0.0", tmp_path / "run1")
    second = _run(broken_project, "v1.0.0", tmp_path / "run2")
    # The OK ones come from the record; the failed one is tried again.
    assert [b.reused for b in second.builds] == [True, False, True, True]
    assert [b.ok for b in second.builds] == [b.ok for b in first.builds]
    assert all(b.seconds == 0 for b in second.builds if b.reused)
    assert (tmp_path / "run2" / "patch-03.log").read_text() == \
        (tmp_path / "run1" / "patch-03.log").read_text()
    # Change the last patch (maintainer: apply, amend, export): only it builds.
    done = workflow.apply(cfg, "v1.0.0")
    (done.worktree / "tests/qtest/dev-test.c").write_text(QTEST.replace("0;", "0; /* */"))
    git(done.worktree, "commit", "-q", "-a", "--amend", "--no-edit")
    workflow.export(cfg, "v1.0.0")
    third = _run(broken_project, "v1.0.0", tmp_path / "run3")
    assert [b.reused for b in third.builds] == [True, False, True, False]
    assert third.builds[3].ok and third.builds[3].tree != first.builds[3].tree


def test_qtest_targets_are_the_qtests_the_series_added(broken_project: Project) -> None:
    cfg = broken_project.cfg
    rel = workflow.mirror(cfg).get("v1.0.0")
    steps, mode, note = patchbuilds.plan_steps(cfg, read_series(cfg.patches_dir), rel)
    assert mode == patchbuilds.EACH and note == "" and len(steps) == 4
    assert patchbuilds.qtest_targets(cfg.mirror_dir, rel.commit, steps[2].commit) == ()
    assert patchbuilds.qtest_targets(cfg.mirror_dir, rel.commit, steps[3].commit) == (
        "tests/qtest/dev-test",)


# -- a carried release: base patches with the fix-ups that belong to them -------------

FIXUP = "dev: release 0.9 has API_OLD, not API_NEW"


def _carried(tmp_path: Path, second_touches_dev: bool) -> Project:
    """Base v1.0.0, carried onto v0.9.0 with one fix-up (API_NEW -> API_OLD)
    made on the whole series; ``second_touches_dev``: patch 2 also changes
    the line above API_NEW, so the fix-up only applies after patch 2."""
    patch2 = {"tests/qtest/dev-test.c": QTEST, "tests/qtest/meson.build": QTEST_MESON}
    if second_touches_dev:
        patch2["dev.c"] = DEV.replace("{\n", "{ /* tested by dev-test */\n")
    proj = _project(tmp_path, {"v1.0.0": RELEASE, "v0.9.0": OLD_RELEASE}, [
        ("dev: add the device", {"dev.c": DEV, "meson.build": SERIES_MESON}),
        ("tests/qtest: add a dev test", patch2)])
    cfg = proj.cfg
    done = workflow.apply(cfg, "v0.9.0")
    wt = proj.worktree("v0.9.0")
    commit_files(wt, {"dev.c": (done.worktree / "dev.c").read_text().replace(
        "API_NEW", "API_OLD")}, FIXUP, why="the release's API")
    workflow.export(cfg, "v0.9.0")
    return proj


@needs_ninja
def test_on_a_carried_release_each_base_patch_builds_with_its_fixups(tmp_path: Path) -> None:
    proj = _carried(tmp_path, second_touches_dev=False)
    res = _run(proj, "v0.9.0", tmp_path / "out")
    assert res.mode == patchbuilds.EACH and res.ok
    assert [b.subject for b in res.builds] == ["dev: add the device",
                                               "tests/qtest: add a dev test"]
    fixup = "dev-release-0.9-has-API_OLD-not-API_NEW.patch"
    assert [b.fixups for b in res.builds] == [(fixup,), ()]
    # The last step is the shipped stack (what the pipeline builds).
    _, src, _ = workflow.build_source(proj.cfg, "v0.9.0")
    assert res.builds[-1].tree == git(src.path, "rev-parse", "HEAD^{tree}").stdout.strip()
    # And on the base, no fix-ups, both build.
    base = _run(proj, "v1.0.0", tmp_path / "out-base")
    assert base.ok and [b.fixups for b in base.builds] == [(), ()]


@needs_ninja
def test_a_base_patch_that_builds_only_after_a_later_fixup_is_a_finding(
        tmp_path: Path) -> None:
    proj = _carried(tmp_path, second_touches_dev=True)
    res = _run(proj, "v0.9.0", tmp_path / "out")
    assert res.mode == patchbuilds.EACH
    assert [b.ok for b in res.builds] == [False, True]
    assert "API_NEW" in res.builds[0].excerpt
    assert res.builds[0].fixups == () and len(res.builds[1].fixups) == 1


@needs_ninja
def test_cli_check_builds_prints_each_patch_and_fails(broken_project: Project) -> None:
    res = broken_project.cli("check", "--builds", "--engine", "host", check_code=1)
    out = res.stdout
    assert "ok    1 dev: add the device" in out
    assert "FAIL  2 dev: add a helper, with a typo" in out
    assert "ok    4 tests/qtest: add a dev test" in out
    assert "1 of 4 patches do not build on their own" in res.stderr
    report = broken_project.root / "out" / "patch-builds" / "v1.0.0" / patchbuilds.RECORD
    assert json.loads(report.read_text())["ok"] is False


def test_a_fixup_that_waits_for_a_later_patch_does_not_hold_up_the_ones_after_it(
        tmp_path: Path) -> None:
    proj = _carried(tmp_path, second_touches_dev=True)
    cfg = proj.cfg
    # A second fix-up, made after the first, that applies after patch 1.
    done = workflow.apply(cfg, "v0.9.0")
    commit_files(proj.worktree("v0.9.0"), {"meson.build": (done.worktree / "meson.build")
                                           .read_text() + "# release 0.9\n"},
                 "meson: note the release", why="a fix-up of patch 1")
    workflow.export(cfg, "v0.9.0")
    rel = workflow.mirror(cfg).get("v0.9.0")
    steps, mode, note = patchbuilds.plan_steps(cfg, read_series(cfg.patches_dir), rel)
    assert mode == patchbuilds.EACH, note
    assert [s.fixups for s in steps] == [("meson-note-the-release.patch",),
                                         ("dev-release-0.9-has-API_OLD-not-API_NEW.patch",)]
