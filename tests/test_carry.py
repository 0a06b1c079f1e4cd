"""The series on releases other than its base: carried with the rebase's
automatic resolutions, plus per-release fix-ups (patches/releases/<release>/),
on a synthetic pair of releases."""

from pathlib import Path

import pytest

from qemupatch import carry, workflow
from qemupatch import series as series_mod
from qemupatch.errors import Conflict, UserError
from qemupatch.run import git
from qemupatch.series import read_series
from tests.conftest import Project, commit_files, make_tarball, meson_list, write_config

# v3.0.0 is the series' base; v2.9.0 an older release whose device list
# differs (a list insertion), that has no ids.rst (the patch's change to it
# is kept out by a recorded resolution) and whose API is api_old().
NEW = {
    "meson.build": "# devices\n" + meson_list("ALPHA", "GAMMA", "ZETA"),
    "ids.rst": "IDs\n===\n\n10f0 free\n",
    "api.h": "int api_new(int x);\n",
}
OLD = {
    "meson.build": "# devices\n" + meson_list("ALPHA", "GAMMA", "RHO", "ZETA"),
    "api.h": "int api_old(int x);\n",
}
DEVICE = ("/* dev: a device */\n#include \"api.h\"\n\n"
          + "".join(f"int dev{i}(void);\n" for i in range(10))
          + "\nint dev(void)\n{\n    return api_new(1);\n}\n")
FIXUP_SUBJECT = "dev: release 2.9 has api_old, not api_new"


def old_api(text: str) -> str:
    return text.replace("api_new", "api_old")


@pytest.fixture
def rel_project(tmp_path: Path) -> Project:
    """A two-patch series on v3.0.0, both releases imported."""
    root = tmp_path / "proj"
    root.mkdir()
    tarballs = {"v3.0.0": make_tarball(tmp_path / "up-3.0.0.tar.gz", "up-3.0.0", NEW),
                "v2.9.0": make_tarball(tmp_path / "up-2.9.0.tar.gz", "up-2.9.0", OLD)}
    write_config(root, tarballs)
    (root / "qemupatch.toml").write_text(
        (root / "qemupatch.toml").read_text().replace('"v1.0.0"', '"v3.0.0"'))
    proj = Project(root, tmp_path / "cache", tarballs)
    m = workflow.mirror(proj.cfg)
    for name, path in tarballs.items():
        m.import_tarball(name, path)
    wt = proj.worktree("v3.0.0")
    wt.reset_to(m.get("v3.0.0").commit)
    commit_files(wt, {"meson.build": "# devices\n" + meson_list("ALPHA", "GAMMA", "SOCKET",
                                                                 "ZETA"),
                      "dev.c": DEVICE}, "dev: add the device")
    commit_files(wt, {"ids.rst": NEW["ids.rst"] + "10f0 the device\n"},
                 "docs: record the device's ID")
    workflow.export(proj.cfg, "v3.0.0")
    return proj


def record_kept_out(proj: Project) -> None:
    """What a maintainer does once: rebase onto 2.9, leave ids.rst out, go
    on (the resolution is recorded)."""
    res = proj.cli("rebase", "--onto", "v2.9.0", check_code=1)
    assert "ids.rst" in res.stderr
    wt = proj.worktree("v2.9.0")
    git(wt.path, "rm", "-q", "ids.rst")
    proj.cli("rebase", "--continue")


def add_fixup(proj: Project) -> None:
    """apply --base v2.9.0, commit the fix-up, export: only it is written."""
    proj.cli("apply", "--base", "v2.9.0")
    wt = proj.worktree("v2.9.0")
    commit_files(wt, {"dev.c": old_api(DEVICE)}, FIXUP_SUBJECT)
    proj.cli("export", "--base", "v2.9.0")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_file_the_release_lacks_is_a_conflict_until_a_resolution_is_recorded(rel_project):
    with pytest.raises(Conflict) as info:
        workflow.apply(rel_project.cfg, "v2.9.0")
    msg = str(info.value)
    assert "docs-record-the-device-s-ID.patch" in msg and "does not carry onto v2.9.0" in msg
    assert "ids.rst: not in the new release" in msg and "qemupatch rebase --onto v2.9.0" in msg
    record_kept_out(rel_project)
    kept = list((rel_project.patches / "resolutions").glob("*.txt"))
    assert len(kept) == 1
    text = kept[0].read_text()
    assert "file: ids.rst\n" in text and " (no such file in this release)\n" in text
    assert "--- patch\n +10f0 the device\n--- resolution\n" in text
    done = workflow.apply(rel_project.cfg, "v2.9.0")
    # ids.rst was all the docs patch changed: nothing of it is left on 2.9.
    assert len(done.commits) == 1 and done.fixups == ()
    assert not (done.worktree / "ids.rst").exists()
    # The device list went in as a list insertion, sorted.
    assert (done.worktree / "meson.build").read_text() == "# devices\n" + meson_list(
        "ALPHA", "GAMMA", "RHO", "SOCKET", "ZETA")
    assert any("list insertion in meson.build" in r for r in done.resolved)
    assert any("recorded resolution in ids.rst" in r for r in done.resolved)


def test_apply_base_then_fixups_and_export_writes_only_the_fixups(rel_project):
    record_kept_out(rel_project)
    base_before = {k: v for k, v in snapshot(rel_project.patches).items()
                   if not k.startswith("releases/")}
    add_fixup(rel_project)
    after = snapshot(rel_project.patches)
    # The base series and the resolutions are byte for byte as they were.
    assert {k: v for k, v in after.items() if not k.startswith("releases/")} == base_before
    fixups = read_series(rel_project.patches / "releases" / "v2.9.0")
    assert fixups.base == "v2.9.0"
    assert fixups.names() == ["dev-release-2.9-has-api_old-not-api_new.patch"]
    text = fixups.patches[0].text
    assert text.startswith("From 0000000000000000000000000000000000000000 ")
    assert "-    return api_new(1);\n+    return api_old(1);\n" in text
    assert read_series(rel_project.patches).names() == [
        "dev-add-the-device.patch", "docs-record-the-device-s-ID.patch"]

    # apply: the base commits, then the fix-ups; apply -> export is a no-op.
    done = workflow.apply(rel_project.cfg, "v2.9.0")
    wt = rel_project.worktree("v2.9.0")
    subjects = git(wt.path, "log", "--reverse", "--format=%s",
                   "upstream/v2.9.0..HEAD").stdout.splitlines()
    assert subjects == ["dev: add the device", FIXUP_SUBJECT]
    assert done.commits[-1:] == done.fixups and len(done.fixups) == 1
    assert (done.worktree / "dev.c").read_text() == old_api(DEVICE)
    before = snapshot(rel_project.patches)
    rel_project.cli("export", "--base", "v2.9.0")
    assert snapshot(rel_project.patches) == before
    # The base's own export keeps the releases/ folder.
    rel_project.cli("apply")
    rel_project.cli("export")
    assert snapshot(rel_project.patches) == before


def test_a_device_change_made_once_reaches_every_release(rel_project):
    record_kept_out(rel_project)
    add_fixup(rel_project)
    cfg = rel_project.cfg
    workflow.apply(cfg)
    wt = rel_project.worktree("v3.0.0")
    changed = DEVICE.replace("/* dev: a device */", "/* dev: a device, changed once */")
    commit_files(wt, {"dev.c": changed}, "dev: say what it is")
    workflow.export(cfg)
    assert len(read_series(cfg.patches_dir).patches) == 3
    for release, expected in (("v3.0.0", changed), ("v2.9.0", old_api(changed))):
        _, src, commits = workflow.build_source(cfg, release)
        assert (src.path / "dev.c").read_text() == expected
        assert len(commits) == 3
    # The fix-up's index lines are stale now, its meaning is not: the
    # release's check passes without a new export.
    results = workflow.check(cfg, "v2.9.0")
    assert all(r.ok for r in results)


def test_build_source_is_base_plus_resolutions_plus_fixups(rel_project):
    record_kept_out(rel_project)
    add_fixup(rel_project)
    rel, wt, commits = workflow.build_source(rel_project.cfg, "v2.9.0")
    assert rel.name == "v2.9.0" and len(commits) == 2
    assert (wt.path / "dev.c").read_text() == old_api(DEVICE)
    assert "SOCKET" in (wt.path / "meson.build").read_text()
    assert not (wt.path / "ids.rst").exists()
    # The base release's source has no fix-up.
    rel, wt, commits = workflow.build_source(rel_project.cfg, "v3.0.0")
    assert len(commits) == 2 and (wt.path / "dev.c").read_text() == DEVICE


def test_check_a_release_stack(rel_project):
    record_kept_out(rel_project)
    add_fixup(rel_project)
    out = rel_project.cli("check", "--base", "v2.9.0").stdout
    assert "FAIL" not in out
    for check in ("carries", "applies", "whitespace", "normalized", "round-trip",
                  "signed-off-by"):
        assert check in out
    results = workflow.check(rel_project.cfg, "v2.9.0")
    carried = next(r for r in results if r.check == "carries")
    assert "list insertion in meson.build" in carried.message
    # Only the fix-ups are checked patch by patch (the base on its own base).
    assert {r.patch for r in results if r.patch} == {
        "dev-release-2.9-has-api_old-not-api_new.patch"}
    # A fix-up with trailing whitespace fails the release's check only.
    path = next((rel_project.patches / "releases" / "v2.9.0").glob("*.patch"))
    path.write_text(path.read_text().replace("+    return api_old(1);\n",
                                             "+    return api_old(1);  \n"))
    res = rel_project.cli("check", "--base", "v2.9.0", check_code=1)
    assert "FAIL whitespace" in res.stdout
    rel_project.cli("check")


def test_a_fixup_that_does_not_apply_names_itself(rel_project):
    record_kept_out(rel_project)
    add_fixup(rel_project)
    # The base series changes the very line the fix-up changes.
    cfg = rel_project.cfg
    workflow.apply(cfg)
    wt = rel_project.worktree("v3.0.0")
    git(wt.path, "reset", "-q", "--hard", "HEAD~2")
    commit_files(wt, {"meson.build": "# devices\n" + meson_list("ALPHA", "GAMMA", "SOCKET",
                                                                 "ZETA"),
                      "dev.c": DEVICE.replace("api_new(1)", "api_new(2)")},
                 "dev: add the device")
    commit_files(wt, {"ids.rst": NEW["ids.rst"] + "10f0 the device\n"},
                 "docs: record the device's ID")
    workflow.export(cfg)
    with pytest.raises(Conflict, match="dev-release-2.9-has-api_old-not-api_new.patch"):
        workflow.build_source(cfg, "v2.9.0")
    res = rel_project.cli("check", "--base", "v2.9.0", check_code=1)
    assert "FAIL applies" in res.stdout


def test_export_of_fixups_is_atomic(rel_project, monkeypatch):
    record_kept_out(rel_project)
    add_fixup(rel_project)
    wt = rel_project.worktree("v2.9.0")
    workflow.apply(rel_project.cfg, "v2.9.0")
    (wt.path / "api.h").write_text("int api_old(int x); /* two */\n")
    git(wt.path, "add", "api.h")
    git(wt.path, "commit", "-qm", "api: a second fix-up\n\nWhy.\n\nSigned-off-by: A <a@b>")
    before = snapshot(rel_project.patches)

    def failing_write(path, text):
        if path.name == "series":
            raise OSError("disk full (simulated)")
        real_write(path, text)

    real_write = series_mod._write_synced
    monkeypatch.setattr(series_mod, "_write_synced", failing_write)
    with pytest.raises(OSError):
        workflow.export(rel_project.cfg, "v2.9.0")
    assert snapshot(rel_project.patches) == before
    releases = rel_project.patches / "releases"
    assert sorted(p.name for p in releases.iterdir()) == ["v2.9.0"]
    monkeypatch.undo()
    workflow.export(rel_project.cfg, "v2.9.0")
    assert len(read_series(releases / "v2.9.0").patches) == 2


def test_export_refuses_rewritten_carried_commits_and_removes_an_emptied_folder(rel_project):
    record_kept_out(rel_project)
    add_fixup(rel_project)
    wt = rel_project.worktree("v2.9.0")
    # Dropping the fix-up: the release has none left, its folder goes.
    git(wt.path, "reset", "-q", "--hard", "HEAD~1")
    rel_project.cli("export", "--base", "v2.9.0")
    assert not (rel_project.patches / "releases").exists()
    assert carry.read_fixups(rel_project.patches, "v2.9.0").patches == ()
    # Rewriting the carried base commits for one release is refused.
    git(wt.path, "commit", "-q", "--amend", "-m", "docs: changed here only")
    res = rel_project.cli("export", "--base", "v2.9.0", check_code=2)
    assert "was rewritten" in res.stderr and "fix-up commit on top" in res.stderr
    with pytest.raises(UserError):
        workflow.export(rel_project.cfg, "v2.9.0")


def test_a_rebase_branch_exports_as_the_whole_series(rel_project):
    """After apply --base, a rebase onto that release makes the branch the
    whole series again: its export moves the base."""
    record_kept_out(rel_project)
    add_fixup(rel_project)
    rel_project.cli("rebase", "--onto", "v2.9.0")
    rel_project.cli("export", "--base", "v2.9.0")
    s = read_series(rel_project.patches)
    assert s.base == "v2.9.0" and len(s.patches) == 1  # ids.rst's patch: dropped
