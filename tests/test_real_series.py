"""The series stages on real QEMU: Debian's sources of every release in
qemupatch.toml and the shipped vmsocket series in patches/ (the base series,
recorded resolutions and per-release fix-ups)."""

import json
from pathlib import Path

import pytest

from qemupatch import carry, config, report, workflow
from qemupatch.rebase import Rebase
from qemupatch.run import git
from qemupatch.series import read_series
from qemupatch.upstream import add_release, sha256_file
from tests.conftest import REPO_ROOT
from tests.realqemu import real_project

pytestmark = pytest.mark.real


def test_import_apply_roundtrip_check_and_rebase(tmp_path):
    cfg = real_project(tmp_path)
    shipped = read_series(cfg.patches_dir)
    assert shipped.base == "v10.2.2" and shipped.patches, "patches/ must hold the series"
    mirror = workflow.mirror(cfg)

    rel = add_release(cfg, mirror, "v10.2.2")
    assert rel.provenance.kind == "debian" and rel.provenance.repacked
    orig = cfg.cache_dir / "downloads" / "debian" / "qemu_10.2.2+ds.orig.tar.xz"
    assert rel.provenance.sha256 == sha256_file(orig)
    assert add_release(cfg, mirror, "v10.2.2") == rel  # re-import is a no-op

    # Apply, then export: byte-identical to what is shipped.
    def files():
        return {str(p.relative_to(cfg.patches_dir)): p.read_bytes()
                for p in cfg.patches_dir.rglob("*") if p.is_file()}

    before = files()
    applied = workflow.apply(cfg)
    assert len(applied.commits) == len(shipped.patches)
    assert (applied.worktree / "hw/misc/vmsocket.c").exists()
    workflow.export(cfg)
    assert files() == before  # resolutions/ and releases/ included

    # Every check, QEMU's own checkpatch.pl included.
    results = workflow.check(cfg, checkpatch=True)
    assert {r.check for r in results} >= {"applies", "round-trip", "normalized", "checkpatch"}
    assert all(r.ok for r in results)

    # Rebase onto 10.0.2 and report each patch: the toctree entry upstream's
    # different list would stop on is carried as a list insertion.
    add_release(cfg, mirror, "v10.0.2")
    rebase = Rebase(mirror, cfg.cache_dir, cfg.patches_dir)
    rep = rebase.start("v10.0.2", keep_going=True)
    assert rep.status == "complete"
    assert rep.unresolved_conflicts == []
    docs = next(o for o in rep.outcomes if o.name == "docs-document-the-vmsocket-device.patch")
    assert docs.outcome == report.MERGED
    assert [(r.file, r.how, r.lines) for r in docs.resolutions] == [
        ("docs/system/device-emulation.rst", "list-insert", ("   devices/vmsocket.rst",))]
    assert "resolved automatically: list insertion in docs/system/device-emulation.rst" \
        in docs.detail
    assert "## Resolutions replayed" in report.rebase_markdown(rep)
    tree = Path(rep.worktree)
    toc = (tree / "docs/system/device-emulation.rst").read_text()
    assert toc.endswith("   devices/igb.rst\n   devices/vmsocket.rst\n")
    section = (tree / "MAINTAINERS").read_text().split("\nvmsocket\n")[1].split("\n\n")[0]
    assert section.splitlines()[-2:] == ["F: docs/system/devices/vmsocket.rst",
                                         "F: tests/qtest/vmsocket-test.c"]
    assert [o.name for o in rep.outcomes] == shipped.names()
    assert all(o.outcome in report.OUTCOMES for o in rep.outcomes)
    assert rep.old_base.commit == rel.commit
    assert rep.new_base.name == "v10.0.2"
    paths = report.write_rebase_report(rep, tmp_path / "report")
    data = json.loads(paths["json"].read_text())
    assert len(data["outcomes"]) == len(shipped.patches)
    print(report.rebase_markdown(rep))

    # Without the docs patch, the qtest patch's MAINTAINERS line loses the
    # line it followed: carried into the sorted F: list of the section.
    rep = rebase.start("v10.0.2", skip=("docs-document-the-vmsocket-device.patch",))
    assert rep.status == "complete" and rep.unresolved_conflicts == []
    qtest = rep.outcomes[-1]
    assert qtest.outcome == report.MERGED
    assert [(r.file, r.how, r.rule, r.lines) for r in qtest.resolutions] == [
        ("MAINTAINERS", "list-insert", "sorted", ("F: tests/qtest/vmsocket-test.c",))]
    print(report.rebase_markdown(rep))


RELEASES = [r.name for r in config.load(REPO_ROOT).releases]


@pytest.mark.parametrize("release", RELEASES)
def test_every_release_gets_the_series_and_its_fixups(tmp_path, release):
    """Every release in qemupatch.toml: the series carries there (recorded
    resolutions, list insertions), the release's fix-ups apply with plain
    git am and are checkpatch.pl clean, and the build source is all of it
    (no QEMU build: that is by hand, see README)."""
    cfg = real_project(tmp_path)
    mirror = workflow.mirror(cfg)
    series = read_series(cfg.patches_dir)
    add_release(cfg, mirror, series.base)
    add_release(cfg, mirror, release)
    results = workflow.check(cfg, release, checkpatch=True)
    assert all(r.ok for r in results)
    fixups = carry.read_fixups(cfg.patches_dir, release)
    if release == series.base:
        assert fixups.patches == ()
    else:
        assert [r.check for r in results if r.check == "carries"] == ["carries"]
        assert {r.patch for r in results if r.check == "checkpatch"} == set(fixups.names())
    rel, wt, commits = workflow.build_source(cfg, release)
    assert len(commits) == len(series.patches) + len(fixups.patches)
    subjects = git(wt.path, "log", "--reverse", "--format=%s",
                   f"{rel.commit}..HEAD").stdout.splitlines()
    assert subjects == [p.subject for p in series.patches + fixups.patches]
    for path in ("hw/misc/vmsocket.c", "tests/qtest/vmsocket-test.c",
                 "docs/system/devices/vmsocket.rst"):
        assert (wt.path / path).exists()
    meson = (wt.path / "hw/misc/meson.build").read_text()
    assert "CONFIG_VMSOCKET" in meson and "<<<<<<<" not in meson
    if release == "v7.2.0":
        assert "softmmu_ss.add(when: 'CONFIG_VMSOCKET'" in meson
        assert not (wt.path / "docs/specs/pci-ids.rst").exists()
        assert "1af4:10f0  vmsocket" in (wt.path / "docs/specs/pci-ids.txt").read_text()


# A QEMU 10.x release that qemupatch.toml, the resolutions and the fix-ups
# do not name: Debian trixie's stable update.
UNNAMED_RELEASE = ("v10.0.13", "1:10.0.13+ds-0+deb13u1")


def test_rebase_onto_a_release_no_one_named_needs_no_hand_work(tmp_path):
    """The issue's goal: a rebase onto a 10.x release that no test, table or
    recorded resolution names completes with --keep-going and no conflict,
    and the report says which resolutions were made and that no patch
    changed its meaning."""
    cfg = real_project(tmp_path)
    name, debian = UNNAMED_RELEASE
    assert cfg.release(name) is None
    assert not (cfg.patches_dir / "releases" / name).exists()
    mirror = workflow.mirror(cfg)
    add_release(cfg, mirror, read_series(cfg.patches_dir).base)
    add_release(cfg, mirror, name, debian=debian)
    rep = Rebase(mirror, cfg.cache_dir, cfg.patches_dir).start(name, keep_going=True)
    assert rep.status == "complete"
    assert rep.unresolved_conflicts == []
    assert rep.count(report.SKIPPED) == 0
    replayed = [r for o in rep.outcomes for r in o.resolutions]
    assert replayed, "upstream's toctree differs: a list insertion must be reported"
    md = report.rebase_markdown(rep)
    assert "Resolutions replayed" in md
    assert "No patch changed its meaning" in md
