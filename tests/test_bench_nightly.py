"""Nightly benchmark: the required matrix (3 releases × 2 kernels) warm and
cold, per target, beside the single-target pipeline measured in the same
run.  Prints figures; asserts only that the runs are green (a figure of a
red run means nothing).

    pytest -m benchmark -s tests/test_bench_nightly.py

    warm   this project and its cache: what a nightly costs when nothing
           changed since the last one (QEMU builds, patch-builds, guest
           builds and images reused by content key)
    cold   a copy of the project with a private cache seeded only with
           downloads: fresh build folders, no reuse records; the compiler
           cache (ccache volume) and the build images are the machine's,
           as on a CI runner sharing them (docs/ci.md)

The baseline is ``qemupatch pipeline`` on the default release and kernel
in the same state (warm: this cache; cold: the copy's, run first), the
single target a maintainer would run by hand.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from qemupatch import config, matrix, nightly
from qemupatch.pipeline import run_pipeline
from tests.conftest import REPO_ROOT
from tests.test_bench_pipeline import _project_copy

pytestmark = [pytest.mark.benchmark, pytest.mark.real]


@pytest.mark.timeout(4 * 3600)
@pytest.mark.parametrize("state", ["warm", "cold"])
def test_bench_nightly(tmp_path: Path, state: str) -> None:
    if state == "warm":
        cfg = config.load(REPO_ROOT)
    else:
        (tmp_path / "project").mkdir()
        cfg = _project_copy(tmp_path / "project", tmp_path / "cache")
    lines: list[str] = []
    start = time.monotonic()
    single = run_pipeline(cfg, tmp_path / "pipeline", say=lines.append)
    single_s = time.monotonic() - start
    required = [t for t in matrix.targets(cfg) if t.required]
    start = time.monotonic()
    run = nightly.run_nightly(cfg, tmp_path / "nightly" / "run", targets=required,
                              say=lines.append)
    wall = time.monotonic() - start
    print(f"\n\nnightly benchmark, {state}: {len(required)} targets, 2 cores")
    print(nightly.table(run))
    print(f"  {'target':26s} {'stage seconds (shared stages counted where first run)':s}")
    seen: set[tuple[str, str]] = set()
    for t in run.targets:
        own = 0.0
        for s in t.stages:
            key = (t.target.release, s.stage)
            if s.stage in nightly.SHARED and key in seen:
                continue
            seen.add(key)
            own += s.seconds
        print(f"  {t.target.name:26s} {own:8.1f} s  {t.outcome}")
    target = {"warm": 20 * 60, "cold": 45 * 60}[state]
    print(f"  nightly wall {wall:.1f} s (target <= {target} s); single-target pipeline "
          f"{single_s:.1f} s; nightly / pipeline = {wall / single_s:.2f}x; "
          f"per target {wall / len(required):.1f} s")
    assert single.ok
    assert run.outcome == matrix.PASS, nightly.table(run)
