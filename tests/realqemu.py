"""Helpers for tests on the real QEMU releases (marked ``real``).

Downloads are shared with the persistent cache (``$QEMUPATCH_CACHE`` or
~/.cache/qemupatch) so a second run fetches nothing; everything a test
writes (mirror, work trees, rebase state) goes into its own temp folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qemupatch import config
from tests.conftest import REPO_ROOT


def real_project(tmp_path: Path) -> config.Config:
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(REPO_ROOT / "qemupatch.toml", root)
    shutil.copytree(REPO_ROOT / "patches", root / "patches")
    cache = tmp_path / "cache"
    cache.mkdir()
    shared = config.default_cache_dir()
    for sub in ("downloads", "apt"):
        (shared / sub).mkdir(parents=True, exist_ok=True)
        (cache / sub).symlink_to(shared / sub)
    return config.load(root, cache)
