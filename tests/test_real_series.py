"""The series stages on real QEMU: Debian's 10.2.2 and 10.0.2 sources and the
shipped vmsocket series in patches/."""

import json

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

    # Rebase onto 10.0.2 and report each patch.
    add_release(cfg, mirror, "v10.0.2")
    rep = Rebase(mirror, cfg.cache_dir, cfg.patches_dir).start("v10.0.2", keep_going=True)
    assert rep.status == "complete"
    assert [o.name for o in rep.outcomes] == shipped.names()
    assert all(o.outcome in report.OUTCOMES for o in rep.outcomes)
    assert rep.old_base.commit == rel.commit
    assert rep.new_base.name == "v10.0.2"
    paths = report.write_rebase_report(rep, tmp_path / "report")
    data = json.loads(paths["json"].read_text())
    assert len(data["outcomes"]) == len(shipped.patches)
    print(report.rebase_markdown(rep))
