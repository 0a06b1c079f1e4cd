"""The series stages on real QEMU: Debian's 10.2.2 and 10.0.2 sources and the
shipped vmsocket series in patches/."""

import json
from pathlib import Path

import pytest

from qemupatch import report, workflow
from qemupatch.rebase import Rebase
from qemupatch.series import read_series
from qemupatch.upstream import add_release, sha256_file
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
    before = {p.name: p.read_bytes() for p in cfg.patches_dir.iterdir()}
    applied = workflow.apply(cfg)
    assert len(applied.commits) == len(shipped.patches)
    assert (applied.worktree / "hw/misc/vmsocket.c").exists()
    workflow.export(cfg)
    assert {p.name: p.read_bytes() for p in cfg.patches_dir.iterdir()} == before

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
