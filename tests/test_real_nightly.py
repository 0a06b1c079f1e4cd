"""qemupatch nightly on the real thing: one target (QEMU 10.2.2, guest
kernel 6.1) through every stage, then the same target again, where nothing
that did not change is rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemupatch import config, matrix, matrixreport, nightly
from qemupatch.matrix import PASS, STAGES

pytestmark = pytest.mark.real
REPO = Path(__file__).resolve().parents[1]
TARGET = "v10.2.2-linux-6.1"


@pytest.mark.timeout(5400)
def test_one_target_end_to_end_then_warm(tmp_path):
    cfg = config.load(REPO)
    target = matrix.find_target(cfg, TARGET)
    lines: list[str] = []
    run = nightly.run_nightly(cfg, tmp_path / "run1", targets=[target], say=lines.append)
    t = run.target(TARGET)
    assert {s.stage: s.outcome for s in t.stages} == {s: PASS for s in STAGES}, \
        "\n".join(f"{s.stage}: {s.outcome}: {s.reason}\n{s.excerpt}" for s in t.stages)
    assert nightly.exit_code(run) == 0
    # live progress: one line per stage with its outcome and seconds
    for stage in STAGES:
        assert any(line.startswith(f"{TARGET:<24} {stage:<13} pass") for line in lines), stage
    run_dir = tmp_path / "run1"
    # the files each stage links to are in the run folder
    for s in t.stages:
        for label, rel in s.links.items():
            assert (run_dir / rel).is_file(), (s.stage, label, rel)
    rebase = t.stage("rebase")
    assert "Rebase onto v10.2.2: complete" in (run_dir / rebase.links["rebase report"]).read_text()
    prov = json.loads((run_dir / t.stage("build").links["provenance"]).read_text())
    assert prov["kind"] == "qemu" and prov["status"] == "ok"
    assert "tests/qtest/vmsocket-test" in prov["facts"]["targets"]
    assert "vmsocket" in (run_dir / t.stage("boot-test").links["console"]).read_text()
    q = t.stage("qtest")
    assert q.figures["passed"] >= 9 and q.figures["failed"] == 0
    assert "not ok" not in (run_dir / q.links["tap"]).read_text()
    assert t.stage("boot-test").figures["tests_passed"] == t.stage("boot-test").figures["tests"]
    # the reports and the latest link
    assert matrix.load_run(run_dir).outcome == PASS
    for name in (matrixreport.JUNIT_NAME, matrixreport.HTML_NAME, matrixreport.SUMMARY_NAME):
        assert (run_dir / name).is_file(), name
    assert (tmp_path / "latest").resolve() == run_dir.resolve()

    # Again, nothing changed: QEMU is not rebuilt (no ninja), the guest builds are reused.
    warm = nightly.run_nightly(cfg, tmp_path / "run2", targets=[target], say=lines.append,
                               previous=run)
    w = warm.target(TARGET)
    assert w.outcome == PASS
    b = w.stage("build")
    assert b.figures["qemu_reused"] == "last run" and b.figures["qemu_s"] == 0.0
    assert b.figures["module_reused"] is True
    assert b.figures["qemu_sha256"] == t.stage("build").figures["qemu_sha256"]
    assert "reused: inputs unchanged, nothing compiled" in \
        (tmp_path / "run2" / b.links["log"]).read_text()
    assert (tmp_path / "latest").resolve() == (tmp_path / "run2").resolve()
