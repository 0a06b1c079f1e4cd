"""CI's own run beyond the default release: every release a change since
the last green matrix (docs/supported-matrix.json) touches is built in the
container, booted and qtested here, through the nightly's own stages.  The
default release goes through every stage in test_real_nightly.py; every
release is applied and carried in test_real_series.py; the full matrix
(both kernels, per-patch builds, sanitizer fuzz on every release) is the
nightly's."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemupatch import config, matrix, nightly, release
from qemupatch.matrix import PASS

pytestmark = pytest.mark.real
REPO = Path(__file__).resolve().parents[1]
STAGES = ("fetch", "rebase", "build", "boot-test", "qtest")


def _since(cfg: config.Config) -> str | None:
    record = cfg.root / release.SUPPORTED_RECORD
    return matrix.load_run(record).project_commit or None if record.exists() else None


@pytest.mark.timeout(5400)
def test_releases_a_change_touched_build_boot_and_pass_their_qtest(tmp_path):
    cfg = config.load(REPO)
    since = _since(cfg)
    touched = [r for r in matrix.touched_releases(cfg, since) if r != cfg.default_release]
    print(f"touched since {since or 'no green run on record'}: {touched or 'none'}")
    targets = [matrix.find_target(cfg, f"{r}-linux-{cfg.default_kernel.name}")
               for r in touched]
    if not targets:
        # Nothing to build: the answer must agree with git.
        assert since is not None
        return
    run = nightly.run_nightly(cfg, tmp_path / "run", targets=targets, stages=STAGES,
                              retries=1, backoff=10)
    for t in run.targets:
        got = {s.stage: s.outcome for s in t.stages if s.stage in STAGES}
        assert got == dict.fromkeys(STAGES, PASS), (
            t.target.name, [(s.stage, s.reason, s.excerpt[-800:]) for s in t.stages])
