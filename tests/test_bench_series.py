"""Benchmark (prints figures, asserts nothing about speed): importing a QEMU
release, applying the series, rebasing it onto another release.

Run: python3 -m pytest -m benchmark -s tests/test_bench_series.py
Each figure is printed beside a baseline measured in the same run: the
import against a plain ``tar -x`` of the same tarball, apply and rebase
against checking out the bare release.
"""

import time

import pytest

from qemupatch import workflow
from qemupatch.rebase import Rebase
from qemupatch.run import run
from qemupatch.series import read_series
from qemupatch.upstream import add_release, fetch_debian_orig
from qemupatch.worktree import WorkTree
from tests.realqemu import real_project

pytestmark = [pytest.mark.benchmark, pytest.mark.real]


def timed(fn):
    start = time.monotonic()
    value = fn()
    return value, time.monotonic() - start


def test_bench_import_apply_rebase(tmp_path):
    cfg = real_project(tmp_path)
    mirror = workflow.mirror(cfg)
    release = cfg.release("v10.2.2")
    orig = fetch_debian_orig(release.debian, cfg.cache_dir)  # download not timed
    untar = tmp_path / "untar"
    untar.mkdir()
    _, t_tar = timed(lambda: run(["tar", "-C", untar, "-xf", orig], timeout=900))
    rel, t_import = timed(lambda: add_release(cfg, mirror, "v10.2.2"))
    wt = WorkTree(cfg.mirror_dir, tmp_path / "bare-checkout", "bench/bare")
    _, t_checkout = timed(lambda: wt.reset_to(rel.commit))
    _, t_apply = timed(lambda: workflow.apply(cfg))
    add_release(cfg, mirror, "v10.0.2")
    rep, t_rebase = timed(
        lambda: Rebase(mirror, cfg.cache_dir, cfg.patches_dir).start("v10.0.2", keep_going=True))
    n = len(read_series(cfg.patches_dir).patches)
    print()
    print(f"{'step':<34}{'seconds':>9}{'baseline':>10}{'ratio':>8}")
    print(f"{'import v10.2.2 (tar.xz -> mirror)':<34}{t_import:9.2f}{t_tar:10.2f}{t_import / t_tar:8.2f}"
          "  baseline: tar -x")
    print(f"{f'apply {n} patches on v10.2.2':<34}{t_apply:9.2f}{t_checkout:10.2f}"
          f"{t_apply / t_checkout:8.2f}  baseline: check out the release")
    print(f"{f'rebase {n} patches onto v10.0.2':<34}{t_rebase:9.2f}{t_checkout:10.2f}"
          f"{t_rebase / t_checkout:8.2f}  baseline: check out the release")
    print("outcomes:", ", ".join(f"{o.name}={o.outcome}" for o in rep.outcomes))
    assert rep.status == "complete"
