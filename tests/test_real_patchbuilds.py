"""Each patch of the real series builds on its own, on real QEMU releases.

On v10.2.2 (the series' base) each of the four patches is built in the
container, incrementally in one build folder; the patch that adds
tests/qtest/vmsocket-test builds it.  A second run finds every step's
tree built OK before and rebuilds nothing.  Per-patch seconds of both runs
are printed (run with -s).  On the carried releases, the fix-ups are split
by the base patch they belong to (no build; the last step is the shipped
stack).
"""

from __future__ import annotations

import dataclasses

import pytest

from qemupatch import carry, patchbuilds, workflow
from qemupatch.qtest import QTEST_TARGET
from qemupatch.run import git
from qemupatch.runner import Runner
from qemupatch.series import read_series
from qemupatch.upstream import add_release
from tests.conftest import REPO_ROOT
from tests.realqemu import real_project

pytestmark = pytest.mark.real


def _table(title: str, res: patchbuilds.PatchBuilds) -> str:
    return "\n".join([f"\n{title} ({res.release}, total {sum(b.seconds for b in res.builds):.0f} s):",
                      *patchbuilds.summary_lines(res)])


@pytest.mark.timeout(5400)
def test_real_each_patch_builds_on_its_base(tmp_path):
    # The project's own Dockerfile (the build image) with a private cache.
    cfg = dataclasses.replace(real_project(tmp_path), root=REPO_ROOT)
    series = read_series(cfg.patches_dir)
    with Runner.get("auto", cfg.settings) as runner:
        assert runner.kind == "container"
        first = patchbuilds.build_each_patch(cfg, "v10.2.2", tmp_path / "run1", runner=runner,
                                             say=print)
        print(_table("cold-ish (new build folder, shared ccache)", first))
        second = patchbuilds.build_each_patch(cfg, "v10.2.2", tmp_path / "run2", runner=runner,
                                              say=print)
        print(_table("warm (second run)", second))
    assert len(first.builds) == len(series.patches) == 4
    assert first.ok, "\n".join(f"{b.index}: {b.excerpt}" for b in first.builds if not b.ok)
    assert [b.subject for b in first.builds] == [p.subject for p in series.patches]
    assert all(not b.reused and b.seconds > 0 for b in first.builds)
    # The qtest is built from the patch that adds it, not before.
    adds = next(i for i, p in enumerate(series.patches)
                if "tests/qtest/vmsocket-test.c" in p.files)
    assert [QTEST_TARGET in b.targets for b in first.builds] == [
        i >= adds for i in range(len(series.patches))]
    qemu_out = cfg.cache_dir / "patchbuilds" / "v10.2.2" / "qemu"
    assert (qemu_out / "vmsocket-test").is_file()
    # The last step is what every other stage builds: the series on its base.
    _, src, _ = workflow.build_source(cfg, "v10.2.2")
    assert first.builds[-1].tree == git(src.path, "rev-parse", "HEAD^{tree}").stdout.strip()
    # Nothing changed: nothing rebuilt.
    assert second.ok and all(b.reused and b.seconds == 0 for b in second.builds)
    assert [b.tree for b in second.builds] == [b.tree for b in first.builds]
    assert (tmp_path / "run2" / patchbuilds.JUNIT).is_file()


@pytest.mark.parametrize("release", ["v10.0.2", "v7.2.0"])
def test_real_fixups_split_by_the_patch_they_belong_to(tmp_path, release):
    cfg = real_project(tmp_path)
    series = read_series(cfg.patches_dir)
    m = workflow.mirror(cfg)
    rel = m.find(release) or add_release(cfg, m, release)
    steps, mode, note = patchbuilds.plan_steps(cfg, series, rel)
    print(f"\n{release}: mode {mode} {note}")
    for s in steps:
        print(f"  {s.index} {s.subject}: fix-ups {', '.join(s.fixups) or '-'}")
    assert mode == patchbuilds.EACH, note
    assert [s.subject for s in steps] == [p.subject for p in series.patches]
    fixups = [f for s in steps for f in s.fixups]
    assert sorted(fixups) == sorted(p.name for p in carry.read_fixups(cfg.patches_dir, release).patches)
    # The device's fix-ups (its meson line on 7.2 too) go with the patch
    # that adds the device, the qtest's with the patch that adds the qtest:
    # so each patch builds on its own there.
    qtest = next(i for i, p in enumerate(series.patches)
                 if "tests/qtest/vmsocket-test.c" in p.files)
    for f in fixups:
        if f.startswith(("vmsocket-", "meson-")):
            assert f in steps[0].fixups
        if f.startswith("tests-qtest-"):
            assert f in steps[qtest].fixups
    _, src, _ = workflow.build_source(cfg, release)
    assert git(cfg.mirror_dir, "rev-parse", f"{steps[-1].commit}^{{tree}}").stdout.strip() == \
        git(src.path, "rev-parse", "HEAD^{tree}").stdout.strip()
