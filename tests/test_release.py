"""qemupatch release and supported on a synthetic project: a git repo with
qemupatch.toml, a series on v1.0.0 carried to v1.1.0 with one fix-up, and
matrix runs written with matrix.run_to_json."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from qemupatch import config, matrix, records, release, workflow
from qemupatch.build import series_hash
from qemupatch.errors import ReleaseRefused, UserError
from qemupatch.matrix import Attempt, MatrixRun, StageResult, TargetResult
from qemupatch.run import git
from qemupatch.series import read_series
from tests.conftest import REPO_ROOT, V1, Project, commit_change, commit_files, synthetic_project

V11 = {**V1, "offset.c": "".join(f"L0.{i} new upstream line\n" for i in range(5)) + V1["offset.c"]}
RUN_ID = "20261127T010000Z"
IDENTITY = {"GIT_AUTHOR_NAME": "Release Tester", "GIT_AUTHOR_EMAIL": "rt@example.org"}


def project_git(root: Path, *args: str) -> str:
    return git(root, *args, env=IDENTITY).stdout


def config_toml(tarballs: dict[str, Path], kernels=("k1", "k2")) -> str:
    text = '[project]\ndefault_release = "v1.0.0"\nprefer = ["tarball"]\n'
    for name, path in tarballs.items():
        text += f'\n[[release]]\nname = "{name}"\ntarball = "{path}"\n'
    for k in kernels:
        text += (f'\n[[kernel]]\nname = "{k}"\nsuite = "bookworm"\n'
                 f'image_package = "linux-image-{k}"\n')
    rels = ", ".join(f'"{n}"' for n in tarballs)
    ks = ", ".join(f'"{k}"' for k in kernels)
    return text + f"\n[matrix]\nreleases = [{rels}]\nkernels = [{ks}]\n"


def commit_project(root: Path, message: str) -> None:
    project_git(root, "add", "-A")
    project_git(root, "commit", "-q", "-m", message)


@pytest.fixture
def rproj(tmp_path: Path) -> Project:
    """The project as a git repository (with a tagger identity), its
    series carried to v1.1.0 with one fix-up, committed."""
    def commit_series(wt):
        commit_change(wt, "clean.c", "K15", "clean: patch a file upstream left alone")
        commit_change(wt, "offset.c", "L15", "offset: patch a file upstream grew")

    proj = synthetic_project(tmp_path, {"v1.0.0": V1, "v1.1.0": V11}, commit_series)
    (proj.root / "qemupatch.toml").write_text(config_toml(proj.tarballs))
    cfg = proj.cfg
    applied = workflow.apply(cfg, "v1.1.0")
    wt = proj.worktree("v1.1.0")
    assert Path(applied.worktree) == wt.path
    commit_files(wt, {"README": "synthetic upstream, as 1.1 wants it\n"},
                 "readme: v1.1.0 wants its own README", why="a per-release API difference")
    workflow.export(cfg, "v1.1.0")
    assert (proj.patches / "releases" / "v1.1.0" / "series").is_file()
    (proj.root / ".gitignore").write_text("/out/\n/dist/\n")
    project_git(proj.root, "init", "-q", "-b", "main")
    project_git(proj.root, "config", "user.name", "Release Tester")
    project_git(proj.root, "config", "user.email", "rt@example.org")
    commit_project(proj.root, "the vmsocket-like series")
    return proj


def patch_file(proj: Project, index: int) -> Path:
    return proj.patches / read_series(proj.patches).patches[index].name


def stage(name: str, outcome: str = matrix.PASS, reason: str = "", links=None) -> StageResult:
    return StageResult(name, outcome, 1.0, reason,
                       attempts=(Attempt(1, outcome, 1.0, "2026-11-27T01:00:00Z"),),
                       links=links or {})


def green_run(proj: Project, run_id: str = RUN_ID, **overrides) -> MatrixRun:
    """Every target of the project's matrix, every stage passed, for the
    series in patches/ now; each build stage links a build.json."""
    cfg = proj.cfg
    h = series_hash(cfg.patches_dir)
    results = []
    for t in matrix.targets(cfg):
        link = f"{t.name}/build/build.json"
        stages = tuple(stage(s, links={"provenance": link} if s == "build" else None)
                       for s in matrix.STAGES)
        results.append(TargetResult(t, stages, h, "2026-11-27T01:00:00Z",
                                    "2026-11-27T01:10:00Z", {"commit": "c0ffee"}))
    run = MatrixRun(run_id, h, "2026-11-27T01:00:00Z", "2026-11-27T02:00:00Z",
                    tuple(results), project_commit="abc")
    return dataclasses.replace(run, **overrides)


def write_run(proj: Project, run: MatrixRun) -> Path:
    run_dir = proj.root / "out" / "nightly" / run.run_id
    for t in run.targets:
        records.write_json(run_dir / t.target.name / "build" / "build.json", {
            "kind": "qemu", "status": "ok",
            "facts": {"release": t.target.release, "series_hash": t.series_hash},
            "image": {"id": f"sha256:image-{t.target.kernel}", "tag": "qemupatch-build:x"},
            "sha256": {"qemu-system-x86_64": "ab" * 32}})
    records.write_json(run_dir / matrix.RESULT_NAME, matrix.run_to_json(run))
    latest = run_dir.parent / release.LATEST
    latest.unlink(missing_ok=True)
    latest.symlink_to(run.run_id)
    return run_dir


def with_stage(run: MatrixRun, target: str, name: str, outcome: str, reason: str) -> MatrixRun:
    targets = []
    for t in run.targets:
        if t.target.name == target:
            t = dataclasses.replace(t, stages=tuple(
                stage(name, outcome, reason) if s.stage == name else s for s in t.stages))
        targets.append(t)
    return dataclasses.replace(run, targets=tuple(targets))


def refusal(proj: Project, version: str = "1.0.0", **kwargs) -> str:
    with pytest.raises(ReleaseRefused) as info:
        release.check_release(proj.cfg, version, **kwargs)
    assert info.value.exit_code == 1
    return str(info.value)


# -- refusals ------------------------------------------------------------------------


def test_green_run_on_clean_tree_passes_the_gate(rproj):
    write_run(rproj, green_run(rproj))
    plan = release.check_release(rproj.cfg, "1.0.0")
    assert plan.tag == "v1.0.0" and plan.previous_tag is None
    assert plan.run.run_id == RUN_ID
    assert plan.releases == {"v1.0.0": ["k1", "k2"], "v1.1.0": ["k1", "k2"]}


def test_a_fresh_cache_gets_the_base_release_for_the_check(rproj, tmp_path):
    """A release job on a fresh CI machine: no mirror yet."""
    write_run(rproj, green_run(rproj))
    cfg = config.load(rproj.root, tmp_path / "fresh-cache")
    plan = release.check_release(cfg, "1.0.0")
    assert plan.tag == "v1.0.0"
    assert workflow.mirror(cfg).find("v1.0.0") is not None


def test_dirty_tree_is_refused_untracked_files_too(rproj):
    write_run(rproj, green_run(rproj))
    (rproj.root / "notes.txt").write_text("not committed\n")
    assert "work tree is not clean" in refusal(rproj) and "notes.txt" in refusal(rproj)
    (rproj.root / "notes.txt").unlink()
    (rproj.root / "out" / "ignored.log").write_text("ignored files do not count\n")
    release.check_release(rproj.cfg, "1.0.0")


def test_red_cell_is_named_with_its_stage_and_reason(rproj):
    write_run(rproj, with_stage(green_run(rproj), "v1.1.0-linux-k2", "boot-test",
                                matrix.FAIL, "guest test vmsocket-echo failed"))
    msg = refusal(rproj)
    assert "red cell v1.1.0-linux-k2: boot-test failed: guest test vmsocket-echo failed" in msg


def test_infra_cell_is_named_and_the_stages_skipped_after_it_are_not(rproj):
    run = with_stage(green_run(rproj), "v1.0.0-linux-k1", "fetch", matrix.INFRA,
                     "download failed")
    for later in matrix.STAGES[1:]:
        run = with_stage(run, "v1.0.0-linux-k1", later, matrix.SKIP, "after fetch failed")
    write_run(rproj, run)
    msg = refusal(rproj)
    assert "infra cell v1.0.0-linux-k1: fetch hit an infrastructure failure: download" in msg
    assert "after fetch failed" not in msg


def test_a_skipped_stage_is_not_a_pass(rproj):
    write_run(rproj, with_stage(green_run(rproj), "v1.1.0-linux-k1", "patch-builds",
                                matrix.SKIP, "not asked for (--stages)"))
    msg = refusal(rproj)
    assert "cell v1.1.0-linux-k1: patch-builds was skip, not pass: not asked for" in msg


def test_matrix_may_be_given_as_its_nightly_json(rproj):
    run_dir = write_run(rproj, green_run(rproj))
    plan = release.check_release(rproj.cfg, "1.0.0", run_dir / matrix.RESULT_NAME)
    assert plan.run_dir == run_dir
    assert len(release.build_records(plan.run, plan.run_dir)) == 4


def test_missing_cell_and_missing_stage_are_named(rproj):
    run = green_run(rproj)
    run = dataclasses.replace(run, targets=tuple(
        t for t in run.targets if t.target.name != "v1.1.0-linux-k1"))
    first = run.targets[0]
    short = dataclasses.replace(first, stages=first.stages[:-1])
    run = dataclasses.replace(run, targets=(short, *run.targets[1:]))
    write_run(rproj, run)
    msg = refusal(rproj)
    assert "missing cell v1.1.0-linux-k1" in msg
    assert f"missing stage {first.target.name} {first.stages[-1].stage}" in msg


def test_unrequired_target_does_not_gate(rproj):
    toml = rproj.root / "qemupatch.toml"
    toml.write_text(toml.read_text() + '\n[[matrix.include]]\nrelease = "v1.1.0"\n'
                    'kernel = "k1"\nrequired = false\n')
    # the same name twice would be refused by matrix.targets: use another kernel
    toml.write_text(toml.read_text().replace('kernels = ["k1", "k2"]', 'kernels = ["k2"]'))
    commit_project(rproj.root, "watch v1.1.0 on k1 only")
    run = green_run(rproj)
    write_run(rproj, with_stage(run, "v1.1.0-linux-k1", "build", matrix.FAIL, "boom"))
    plan = release.check_release(rproj.cfg, "1.0.0")
    assert plan.releases == {"v1.0.0": ["k2"], "v1.1.0": ["k2"]}


def test_stale_run_is_refused_after_a_patch_changes(rproj):
    write_run(rproj, green_run(rproj))
    patch = patch_file(rproj, 0)
    patch.write_text(patch.read_text().replace("Why: exercise", "Why: really exercise"))
    commit_project(rproj.root, "series: say why better")
    msg = refusal(rproj)
    assert f"matrix run {RUN_ID}" in msg and "is stale" in msg
    assert series_hash(rproj.patches)[:12] in msg


def test_no_matrix_run_is_refused(rproj):
    msg = refusal(rproj)
    assert "no matrix run to release from" in msg and "out/nightly/latest" in msg


@pytest.mark.parametrize("version", ["1.2", "v1.2.3.4", "one", "1.2.3-rc1"])
def test_bad_version_is_refused(rproj, version):
    write_run(rproj, green_run(rproj))
    assert "is not MAJOR.MINOR.PATCH" in refusal(rproj, version)


def test_old_or_existing_version_is_refused(rproj):
    write_run(rproj, green_run(rproj))
    release.make_release(rproj.cfg, "1.1.0")
    assert "tag v1.1.0 already exists" in refusal(rproj, "1.1.0")
    assert "not greater than the last tag v1.1.0" in refusal(rproj, "1.0.9")
    # one refusal lists every reason at once
    (rproj.root / "stray").write_text("x")
    msg = refusal(rproj, "1.0.9")
    assert "not greater" in msg and "not clean" in msg


def test_dropping_a_release_needs_a_major_adding_one_a_minor(rproj):
    write_run(rproj, green_run(rproj))
    release.make_release(rproj.cfg, "1.0.0")
    toml = rproj.root / "qemupatch.toml"
    toml.write_text(toml.read_text().replace('releases = ["v1.0.0", "v1.1.0"]',
                                             'releases = ["v1.0.0"]'))
    commit_project(rproj.root, "drop v1.1.0")
    write_run(rproj, green_run(rproj, run_id="20261127T020000Z"))
    assert "v1.1.0 supported by v1.0.0 are dropped: that needs a new MAJOR version (2.0.0)" \
        in refusal(rproj, "1.1.0")
    second = release.make_release(rproj.cfg, "2.0.0")
    assert second.plan.releases == {"v1.0.0": ["k1", "k2"]}
    toml.write_text(toml.read_text().replace('releases = ["v1.0.0"]',
                                             'releases = ["v1.0.0", "v1.1.0"]'))
    commit_project(rproj.root, "v1.1.0 again")
    write_run(rproj, green_run(rproj, run_id="20261127T030000Z"))
    assert "needs at least a new MINOR version (2.1.0)" in refusal(rproj, "2.0.1")
    release.make_release(rproj.cfg, "2.1.0")


def test_failing_check_is_a_reason(rproj):
    patch = patch_file(rproj, 1)
    patch.write_text(patch.read_text().replace(
        "Signed-off-by: Test Maintainer <maintainer@example.org>\n", ""))
    commit_project(rproj.root, "a patch without sign-off")
    write_run(rproj, green_run(rproj))
    msg = refusal(rproj)
    assert "qemupatch check fails" in msg and "signed-off-by" in msg


# -- success -------------------------------------------------------------------------


def test_release_tags_and_writes_dist(rproj):
    run_dir = write_run(rproj, green_run(rproj))
    head = project_git(rproj.root, "rev-parse", "HEAD").strip()
    rel = release.make_release(rproj.cfg, "v1.0.0")
    root = rproj.root
    # the tag: annotated, on HEAD, its message records series, run and releases
    assert project_git(root, "cat-file", "-t", "v1.0.0").strip() == "tag"
    assert project_git(root, "rev-parse", "v1.0.0^{commit}").strip() == head
    message = project_git(root, "for-each-ref", "--format=%(contents)", "refs/tags/v1.0.0")
    h = series_hash(rproj.patches)
    for line in (f"Series-Hash: {h}", f"Matrix-Run: {RUN_ID}", "Matrix-Outcome: pass",
                 "Supported-Release: v1.0.0 linux k1 k2",
                 "Supported-Release: v1.1.0 linux k1 k2", f"Project-Commit: {head}"):
        assert line in message.splitlines()
    # dist/: every file, checksums that sha256sum verifies
    dist = root / "dist" / "v1.0.0"
    assert rel.dist_dir == dist
    names = sorted(str(p.relative_to(dist)) for p in dist.rglob("*") if p.is_file())
    assert names == sorted(["SHA256SUMS", "CHANGELOG.md", "provenance.json",
                            "patches-1.0.0.tar.gz", "series-1.0.0.mbox",
                            "releases/v1.1.0/series-1.0.0-v1.1.0.mbox"])
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=dist, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 5
    # the tarball: patches/ with series, releases/
    with tarfile.open(dist / "patches-1.0.0.tar.gz") as tar:
        members = tar.getnames()
    assert "patches/series" in members and "patches/releases/v1.1.0/series" in members
    assert len([m for m in members if m.endswith(".patch")]) == 3
    # the mboxes: the base series, and v1.1.0's stack (carried + its fix-up)
    base_mbox = (dist / "series-1.0.0.mbox").read_text()
    assert base_mbox.count("\nFrom 0000000000000000000000000000000000000000") + \
        base_mbox.startswith("From ") == 2
    assert "Subject: [PATCH] clean: patch" in base_mbox
    carried = (dist / rel.release_mboxes["v1.1.0"]).read_text()
    assert carried.count("Subject: [PATCH]") == 3
    assert "readme: v1.1.0 wants its own README" in carried
    # provenance
    prov = json.loads((dist / "provenance.json").read_text())
    assert prov["version"] == "1.0.0" and prov["tag"] == "v1.0.0"
    assert prov["series_hash"] == h and prov["project_commit"] == head
    assert prov["matrix_run"]["run_id"] == RUN_ID and prov["matrix_run"]["outcome"] == "pass"
    assert prov["supported"] == [{"release": "v1.0.0", "kernels": ["k1", "k2"]},
                                 {"release": "v1.1.0", "kernels": ["k1", "k2"]}]
    for name, tarball in rproj.tarballs.items():
        up = prov["upstream"][name]
        assert up["kind"] == "tarball" and up["origin"] == str(tarball)
        assert up["sha256"] == subprocess.run(["sha256sum", tarball], capture_output=True,
                                              text=True, timeout=60).stdout.split()[0]
    assert len(prov["builds"]) == 4
    assert {b["image"]["id"] for b in prov["builds"]} == {"sha256:image-k1", "sha256:image-k2"}
    assert all(b["sha256"]["qemu-system-x86_64"] == "ab" * 32 for b in prov["builds"])
    assert {b["release"] for b in prov["builds"]} == {"v1.0.0", "v1.1.0"}
    assert {b["series_hash"] for b in prov["builds"]} == {h}
    assert (run_dir / prov["builds"][0]["record"]).is_file()
    # the work tree is still clean (dist/ is ignored): a next release is possible
    assert release.dirty_files(root) == []


def test_changelog_lists_the_commits_since_the_previous_tag(rproj):
    write_run(rproj, green_run(rproj))
    first = release.make_release(rproj.cfg, "1.0.0")
    log1 = (first.dist_dir / "CHANGELOG.md").read_text()
    assert "the vmsocket-like series" in log1 and "from the start" in log1
    # a README-only commit is no series change; a patch change is
    (rproj.root / "README.md").write_text("docs\n")
    commit_project(rproj.root, "docs: a README")
    patch = patch_file(rproj, 0)
    patch.write_text(patch.read_text().replace("Why: exercise", "Why: truly exercise"))
    commit_project(rproj.root, "series: a better reason in patch 1")
    write_run(rproj, green_run(rproj, run_id="20261127T020000Z"))
    second = release.make_release(rproj.cfg, "1.0.1")
    log2 = (second.dist_dir / "CHANGELOG.md").read_text()
    assert "since v1.0.0" in log2
    assert "series: a better reason in patch 1" in log2
    assert f"M `patches/{patch.name}`" in log2
    assert "the vmsocket-like series" not in log2 and "docs: a README" not in log2
    assert second.plan.previous_tag == "v1.0.0"
    assert "Previous-Tag: v1.0.0" in project_git(
        rproj.root, "for-each-ref", "--format=%(contents)", "refs/tags/v1.0.1")


def test_nothing_half_written_when_tagging_fails(rproj, monkeypatch):
    write_run(rproj, green_run(rproj))

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(release, "_create_tag", broken)
    with pytest.raises(OSError):
        release.make_release(rproj.cfg, "1.0.0")
    assert project_git(rproj.root, "tag", "--list").strip() == ""
    assert not (rproj.root / "dist").exists() or not any((rproj.root / "dist").iterdir())


def test_nothing_half_written_when_the_rename_fails(rproj, monkeypatch):
    write_run(rproj, green_run(rproj))

    real = release.os.rename

    def broken(src, dst):
        if Path(dst).name == "v1.0.0":
            raise OSError("cross-device link")
        real(src, dst)

    monkeypatch.setattr(release.os, "rename", broken)
    with pytest.raises(OSError):
        release.make_release(rproj.cfg, "1.0.0")
    assert project_git(rproj.root, "tag", "--list").strip() == ""
    assert not any((rproj.root / "dist").iterdir())


def test_cli_release_refuses_then_tags(rproj):
    res = rproj.cli("release", "1.0.0", check_code=1)
    assert "release 1.0.0 refused" in res.stderr and "no matrix run" in res.stderr
    write_run(rproj, green_run(rproj))
    res = rproj.cli("release", "1.0.0", "--check")
    assert "v1.0.0 may be tagged" in res.stdout
    assert project_git(rproj.root, "tag", "--list").strip() == ""
    res = rproj.cli("release", "1.0.0")
    assert "tagged v1.0.0" in res.stdout and "SHA256SUMS" in res.stdout
    assert project_git(rproj.root, "tag", "--list").strip() == "v1.0.0"


def test_project_outside_git_is_refused(tmp_path):
    root = tmp_path / "bare"
    root.mkdir()
    (root / "qemupatch.toml").write_text('[project]\ndefault_release = "v1.0.0"\n')
    with pytest.raises(ReleaseRefused, match="not in a git work tree"):
        release.check_release(config.load(root, tmp_path / "cache"), "1.0.0")


# -- supported -----------------------------------------------------------------------


def test_supported_table_marks_each_cell(rproj):
    run = with_stage(green_run(rproj), "v1.1.0-linux-k2", "qtest", matrix.FAIL, "x")
    table = release.supported_table(run)
    assert "| QEMU release | Linux k1 guest | Linux k2 guest |" in table
    assert "| v1.0.0 | ✓ pass | ✓ pass |" in table
    assert "| v1.1.0 | ✓ pass | ✗ fail |" in table
    assert RUN_ID in table and "2026-11-27T02:00:00Z" in table


def test_supported_picks_the_newest_green_run(rproj):
    write_run(rproj, green_run(rproj))
    write_run(rproj, with_stage(green_run(rproj, run_id="20261127T050000Z"),
                                "v1.0.0-linux-k1", "build", matrix.FAIL, "red"))
    run, path = release.last_green_run(rproj.cfg)
    assert run.run_id == RUN_ID and path.name == RUN_ID
    res = rproj.cli("supported")
    assert RUN_ID in res.stdout and "✓ pass" in res.stdout


def test_supported_write_readme_rewrites_only_the_block(rproj):
    write_run(rproj, green_run(rproj))
    readme = rproj.root / "README.md"
    readme.write_text(f"# top\n\n## Supported releases\n\n{release.README_BEGIN}\nold\n"
                      f"{release.README_END}\n\n## after\ntext\n")
    rproj.cli("supported", "--write-readme")
    text = readme.read_text()
    assert text.startswith("# top\n\n## Supported releases\n\n")
    assert text.endswith(f"{release.README_END}\n\n## after\ntext\n")
    assert "old" not in text and "| v1.1.0 | ✓ pass | ✓ pass |" in text
    record = rproj.root / release.SUPPORTED_RECORD
    assert matrix.load_run(record).run_id == RUN_ID
    assert release.readme_block(matrix.load_run(record)) in text


def test_write_readme_refuses_a_red_run_and_a_readme_without_markers(rproj):
    run = with_stage(green_run(rproj), "v1.0.0-linux-k1", "build", matrix.FAIL, "red")
    run_dir = write_run(rproj, run)
    res = rproj.cli("supported", "--matrix", str(run_dir), "--write-readme", check_code=1)
    assert "not green" in res.stderr
    (rproj.root / "README.md").write_text("no markers\n")
    green_dir = write_run(rproj, green_run(rproj, run_id="20261127T060000Z"))
    with pytest.raises(UserError, match="no <!-- supported-releases:begin -->"):
        release.write_readme(rproj.cfg, matrix.load_run(green_dir), green_dir)


def test_readme_block_is_generated_from_the_recorded_green_run():
    """The project's README shows exactly what the run it names proved."""
    run = matrix.load_run(REPO_ROOT / release.SUPPORTED_RECORD)
    assert run.outcome == matrix.PASS
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(release.README_BEGIN)
    end = text.index(release.README_END) + len(release.README_END)
    assert text[start:end] == release.readme_block(run)
    assert text[:start].rstrip().endswith("## Supported releases")
    for t in run.targets:
        assert f"| {t.target.release} |" in text[start:end]
