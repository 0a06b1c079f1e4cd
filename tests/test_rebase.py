"""Stage 3: rebase, on a synthetic upstream built to meet every outcome."""

import json
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

from qemupatch import workflow
from qemupatch.errors import RebaseStateError
from qemupatch.rebase import Rebase
from qemupatch.run import git
from qemupatch.series import read_series

EXPECTED = ["clean", "offset", "merged", "conflict", "dropped", "clean"]


def rebase(project):
    cfg = project.cfg
    return Rebase(workflow.mirror(cfg), cfg.cache_dir, cfg.patches_dir)


def test_keep_going_classifies_every_patch(project):
    report_dir = project.root / "rep"
    res = project.cli("rebase", "--onto", "v1.1.0", "--keep-going",
                      "--report-dir", str(report_dir), check_code=1)
    data = json.loads((report_dir / "rebase.json").read_text())
    assert data["schema"] == 1 and data["status"] == "complete"
    assert [o["outcome"] for o in data["outcomes"]] == EXPECTED
    assert data["old_base"]["name"] == "v1.0.0" and data["new_base"]["name"] == "v1.1.0"
    conflict = data["outcomes"][3]
    assert conflict["conflict_files"] == ["conflict.c"]
    assert conflict["failed_hunks"] and conflict["failed_hunks"][0].startswith("conflict.c @@ -12,7")
    # The last patch touches the file of the skipped conflict: at risk.
    assert data["outcomes"][5]["at_risk"] == [conflict["name"]]
    assert data["outcomes"][1]["detail"] == "1 hunk(s) moved"
    # Markdown for people, JUnit for CI: one testcase per patch.
    md = (report_dir / "rebase.md").read_text()
    assert "| 4 | conflict: patch a line upstream changed | conflict |" in md
    assert "AT RISK" in md
    suite = ET.parse(report_dir / "rebase.junit.xml").getroot()
    assert len(suite.findall("testcase")) == 6
    assert len(suite.findall("testcase/failure")) == 1
    assert "conflict" in res.stdout
    # The branch holds the five applied (or dropped) patches, not the conflict.
    wt = project.worktree("v1.1.0")
    subjects = git(wt.path, "log", "--format=%s", "upstream/v1.1.0..HEAD").stdout.splitlines()
    assert len(subjects) == 4 and not any(s.startswith("conflict") for s in subjects)
    assert not rebase(project).in_progress()


def test_range_diff_shows_only_real_changes(project):
    rep = rebase(project).start("v1.1.0", keep_going=True)
    by_subject = {o.subject.split(":")[0]: o for o in rep.outcomes}
    # Offset and merge moved context only: no real change to show.
    assert by_subject["offset"].range_diff == ""
    assert by_subject["merge"].range_diff == ""
    assert by_subject["clean"].range_diff == ""


def test_stop_at_conflict_then_continue(project):
    res = project.cli("rebase", "--onto", "v1.1.0", check_code=1)
    assert "CONFLICT in patch 4" in res.stderr and "conflict.c" in res.stderr
    assert "--continue" in res.stderr and "--abort" in res.stderr
    wt = project.worktree("v1.1.0")
    assert "<<<<<<<" in (wt.path / "conflict.c").read_text()
    # --continue before resolving is refused, nothing changes.
    res = project.cli("rebase", "--continue", check_code=2)
    assert "unresolved conflicts in conflict.c" in res.stderr
    # Resolve: keep both changes.
    text = (wt.path / "conflict.c").read_text()
    resolved = []
    for line in text.splitlines():
        if line.startswith(("<<<<<<<", "=======", ">>>>>>>")) or line == "C15 changed upstream":
            continue
        resolved.append(line)
    (wt.path / "conflict.c").write_text("\n".join(resolved) + "\n")
    git(wt.path, "add", "conflict.c")
    res = project.cli("rebase", "--continue", "--report-dir", str(project.root / "rep"))
    data = json.loads((project.root / "rep" / "rebase.json").read_text())
    assert [o["outcome"] for o in data["outcomes"]] == EXPECTED
    assert data["outcomes"][3]["resolved"] is True
    assert data["status"] == "complete"
    assert data["outcomes"][5]["at_risk"] == []
    # Export the result: the series is now based on v1.1.0.
    project.cli("export", "--base", "v1.1.0")
    s = read_series(project.patches)
    assert s.base == "v1.1.0" and len(s.patches) == 5  # dropped one is gone
    assert "C15 patched" in (project.patches / s.patches[3].name).read_text()


def test_skip_the_conflicting_patch(project):
    project.cli("rebase", "--onto", "v1.1.0", check_code=1)
    res = project.cli("rebase", "--skip", "--report-dir", str(project.root / "rep"))
    data = json.loads((project.root / "rep" / "rebase.json").read_text())
    assert data["outcomes"][3]["outcome"] == "skipped"
    assert data["outcomes"][5]["at_risk"] == [data["outcomes"][3]["name"]]
    assert "skipped" in res.stdout


def test_abort_restores_everything(project):
    # An existing v1.1.0 branch with a maintainer's commit must survive.
    cfg = project.cfg
    wt = project.worktree("v1.1.0")
    wt.reset_to(workflow.mirror(cfg).get("v1.1.0").commit)
    (wt.path / "README").write_text("maintainer work\n")
    git(wt.path, "commit", "-qam", "maintainer work")
    tip = wt.head()
    before = {p.name: p.read_bytes() for p in project.patches.iterdir()}
    project.cli("rebase", "--onto", "v1.1.0", check_code=1)
    assert wt.head() != tip
    project.cli("rebase", "--abort")
    assert wt.head() == tip and wt.dirty_files() == []
    assert (wt.path / "README").read_text() == "maintainer work\n"
    assert {p.name: p.read_bytes() for p in project.patches.iterdir()} == before
    assert not rebase(project).in_progress()
    # The pre-rebase tip is also kept as a backup ref.
    refs = git(wt.mirror, "for-each-ref", "--format=%(objectname)",
               "refs/qemupatch/backup/").stdout.split()
    assert tip in refs


def test_abort_removes_a_branch_the_rebase_created(project):
    project.cli("rebase", "--onto", "v1.1.0", check_code=1)
    project.cli("rebase", "--abort")
    wt = project.worktree("v1.1.0")
    assert wt.branch_tip() is None and not wt.exists()


def test_skip_patch_by_request(project):
    name = read_series(project.patches).patches[3].name
    rep = rebase(project).start("v1.1.0", skip=(name,))
    assert [o.outcome for o in rep.outcomes] == ["clean", "offset", "merged", "skipped",
                                                   "dropped", "clean"]
    assert rep.outcomes[5].at_risk == (name,)


def test_bad_rebase_requests(project):
    assert "no rebase in progress" in project.cli("rebase", "--continue", check_code=2).stderr
    assert "exactly one of" in project.cli("rebase", check_code=2).stderr
    assert "unknown upstream release" in project.cli(
        "rebase", "--onto", "v7.7.7", check_code=2).stderr
    assert "not in the series" in project.cli(
        "rebase", "--onto", "v1.1.0", "--skip-patch", "nope.patch", check_code=2).stderr
    project.cli("rebase", "--onto", "v1.1.0", check_code=1)
    assert "already in progress" in project.cli(
        "rebase", "--onto", "v1.1.0", check_code=2).stderr
    with pytest.raises(RebaseStateError):
        rebase(project).start("v1.1.0")


def test_rebase_refuses_a_dirty_work_tree(project):
    wt = project.worktree("v1.1.0")
    wt.reset_to(workflow.mirror(project.cfg).get("v1.1.0").commit)
    (wt.path / "clean.c").write_text("uncommitted\n")
    res = project.cli("rebase", "--onto", "v1.1.0", check_code=2)
    assert "uncommitted changes" in res.stderr
    assert (wt.path / "clean.c").read_text() == "uncommitted\n"
    assert not rebase(project).in_progress()


KILLER = textwrap.dedent("""
    import os, signal, sys
    from qemupatch import cli
    from qemupatch.worktree import WorkTree
    real_am = WorkTree.am
    count = [0]
    def am(self, patch_file, *, three_way):
        res = real_am(self, patch_file, three_way=three_way)
        count[0] += 1
        if count[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)  # after git am, before the state is saved
        return res
    WorkTree.am = am
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("kill_at", [1, 2, 4])
def test_kill_9_mid_rebase_then_continue(project, kill_at):
    args = [sys.executable, "-c", KILLER, "-C", str(project.root), "--cache", str(project.cache),
            "rebase", "--onto", "v1.1.0", "--keep-going"]
    res = subprocess.run(args, env={**__import__("os").environ, "KILL_AT": str(kill_at)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -9
    state = json.loads((project.cache / "rebase" / "state.json").read_text())
    assert state["in_progress"] is not None
    project.cli("rebase", "--continue", "--report-dir", str(project.root / "rep"), check_code=1)
    data = json.loads((project.root / "rep" / "rebase.json").read_text())
    assert [o["outcome"] for o in data["outcomes"]] == EXPECTED
    wt = project.worktree("v1.1.0")
    assert len(git(wt.path, "rev-list", "upstream/v1.1.0..HEAD").stdout.split()) == 4


def test_kill_9_then_abort(project):
    args = [sys.executable, "-c", KILLER, "-C", str(project.root), "--cache", str(project.cache),
            "rebase", "--onto", "v1.1.0"]
    res = subprocess.run(args, env={**__import__("os").environ, "KILL_AT": "2"},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -9
    project.cli("rebase", "--abort")
    wt = project.worktree("v1.1.0")
    assert not wt.exists() and wt.branch_tip() is None


# -- conflicts that are not hand work (the lists_project fixture) ---------------


def test_list_insertions_are_resolved_and_reported(lists_project):
    from tests.conftest import maintainers, meson_list, toctree
    report_dir = lists_project.root / "rep"
    lists_project.cli("rebase", "--onto", "v2.1.0", "--keep-going",
                      "--report-dir", str(report_dir), check_code=1)
    data = json.loads((report_dir / "rebase.json").read_text())
    assert [o["outcome"] for o in data["outcomes"]] == ["merged", "merged", "conflict",
                                                         "clean", "merged"]
    lists, section, real = data["outcomes"][:3]
    assert lists["detail"] == "resolved automatically: list insertion in index.rst, meson.build"
    assert sorted((r["file"], r["how"], r["rule"], tuple(r["lines"]))
                  for r in lists["resolutions"]) == [
        ("index.rst", "list-insert", "sorted", ("   devices/socket.rst",)),
        ("meson.build", "list-insert", "sorted",
         ("system_ss.add(when: 'CONFIG_SOCKET', if_true: files('socket.c'))",))]
    assert [(r["file"], r["rule"]) for r in section["resolutions"]] == [
        ("MAINTAINERS", "after-anchor")]
    # A real conflict is still a conflict, with nothing resolved.
    assert real["conflict_files"] == ["real.c"] and real["resolutions"] == []
    assert real["unresolved"] == ["real.c: the patch changes or removes base line 5 "
                                  "('R5 original line') where upstream changed lines too"]
    wt = lists_project.worktree("v2.1.0")
    assert (wt.path / "meson.build").read_text() == "# devices\n" + meson_list(
        "ALPHA", "GAMMA", "RHO", "SOCKET", "ZETA")
    assert (wt.path / "index.rst").read_text() == toctree("alpha", "beta", "gamma", "omega",
                                                          "socket")
    assert (wt.path / "MAINTAINERS").read_text() == maintainers(
        "Alpha", "Gamma", "Socket", "Zeta and friends")
    assert wt.dirty_files() == []
    md = (report_dir / "rebase.md").read_text()
    assert "## Resolutions replayed" in md
    assert "- patch 1 (lists: add the socket device to the build and the docs), `meson.build`: " \
           "list-insert (sorted)" in md
    assert "+   devices/socket.rst" in md
    suite = ET.parse(report_dir / "rebase.junit.xml").getroot()
    out = suite.find("testcase/system-out").text
    assert "resolved meson.build: list-insert (sorted)" in out


def test_a_real_conflict_still_stops_then_its_resolution_is_recorded_and_replayed(
        lists_project):
    res = lists_project.cli("rebase", "--onto", "v2.1.0", check_code=1)
    assert "CONFLICT in patch 3" in res.stderr and "real.c" in res.stderr
    wt = lists_project.worktree("v2.1.0")
    assert "<<<<<<<" in (wt.path / "real.c").read_text()
    # The maintainer keeps both changes.
    (wt.path / "real.c").write_text(
        lines_with("R5 changed upstream, patched"))
    git(wt.path, "add", "real.c")
    res = lists_project.cli("rebase", "--continue")
    kept = sorted((lists_project.patches / "resolutions").glob("*.txt"))
    assert len(kept) == 1
    text = kept[0].read_text()
    assert "file: real.c\n" in text and "--- upstream\n R5 changed upstream\n" in text
    assert "--- patch\n R5 patched\n--- resolution\n R5 changed upstream, patched\n" in text
    assert f"resolution recorded in resolutions/{kept[0].name}" in res.stdout
    # Rebasing again replays it: no stop, nothing left for a maintainer.
    rep = rebase(lists_project).start("v2.1.0")
    assert rep.status == "complete" and not rep.unresolved_conflicts
    real = rep.outcomes[2]
    assert real.outcome == "merged"
    assert real.detail == "resolved automatically: recorded resolution in real.c"
    assert [(r.file, r.how) for r in real.resolutions] == [
        ("real.c", f"recorded:resolutions/{kept[0].name}")]
    assert (wt.path / "real.c").read_text() == lines_with("R5 changed upstream, patched")


def test_a_mirror_that_never_applied_the_series_still_merges_three_way(lists_project):
    # Forget every commit of the series: only the releases are left.
    wt = lists_project.worktree("v2.0.0")
    git(wt.mirror, "worktree", "remove", "--force", wt.path)
    git(wt.mirror, "branch", "-D", wt.branch)
    git(wt.mirror, "reflog", "expire", "--expire=now", "--all")
    git(wt.mirror, "gc", "-q", "--prune=now")
    last = read_series(lists_project.patches).patches[4]
    preimage = re.search(r"^index ([0-9a-f]{40})\.\.", last.text, re.M).group(1)
    assert git(wt.mirror, "cat-file", "-e", preimage, check=False).returncode != 0
    rep = rebase(lists_project).start("v2.1.0", keep_going=True)
    assert [o.outcome for o in rep.outcomes] == ["merged", "merged", "conflict", "clean",
                                                 "merged"]


def test_a_tampered_recorded_resolution_is_refused(lists_project):
    from qemupatch.errors import SeriesError
    from qemupatch.rebase import load_recorded, write_recorded
    folder = lists_project.patches / "resolutions"
    path = write_recorded(folder, {"file": "real.c"}, ("up\n",), ("patch\n",), ("both\n",))
    assert list(load_recorded(folder)) == [path.stem]
    path.write_text(path.read_text().replace(" patch\n", " other\n"))
    with pytest.raises(SeriesError, match="do not match its name"):
        load_recorded(folder)


def lines_with(r5: str) -> str:
    from tests.conftest import lines
    return lines("R", R5=r5)
