"""Stage 1: the upstream mirror, on small synthetic releases."""


import pytest

from qemupatch import workflow
from qemupatch.errors import ChecksumMismatch, UnknownRelease, UserError
from qemupatch.run import git
from qemupatch.upstream import Mirror, release_name_from_debian, sha256_file
from tests.conftest import V1, make_tarball


def test_import_records_provenance_and_is_deterministic(tmp_path, project):
    rel = workflow.mirror(project.cfg).get("v1.0.0")
    assert rel.provenance.kind == "tarball"
    assert rel.provenance.sha256 == sha256_file(project.tarballs["v1.0.0"])
    assert rel.provenance.imported_at
    # The same tarball gives the same commit in another mirror: fixed dates.
    other = Mirror(tmp_path / "other.git")
    assert other.import_tarball("v1.0.0", project.tarballs["v1.0.0"]).commit == rel.commit
    # The tree is the tarball's content, top folder stripped.
    files = git(other.path, "ls-tree", "--name-only", rel.commit).stdout.split()
    assert sorted(files) == sorted(V1)


def test_reimport_same_release_is_a_noop(project):
    m = workflow.mirror(project.cfg)
    before = m.get("v1.0.0")
    again = m.import_tarball("v1.0.0", project.tarballs["v1.0.0"])
    assert again == before
    assert [r.name for r in m.releases()] == ["v1.0.0", "v1.1.0"]


def test_same_name_different_tarball_is_an_error(project):
    res = project.cli("upstream", "add", "v1.0.0", "--tarball",
                      str(project.tarballs["v1.1.0"]), check_code=2)
    assert "already imported" in res.stderr and "v1.0.0" in res.stderr


def test_expected_sha256_mismatch_names_the_tarball(project, tmp_path):
    tar = make_tarball(tmp_path / "x.tar.gz", "x", {"f": "1\n"})
    res = project.cli("upstream", "add", "v9.9.9", "--tarball", str(tar),
                      "--sha256", "0" * 64, check_code=2)
    assert "x.tar.gz" in res.stderr and "expected " + "0" * 64 in res.stderr
    with pytest.raises(ChecksumMismatch):
        workflow.mirror(project.cfg).import_tarball("v9.9.9", tar, sha256="1" * 64)


def test_unknown_release_is_a_clear_error(project):
    res = project.cli("apply", "--base", "v8.0.0", check_code=2)
    assert "unknown upstream release 'v8.0.0'" in res.stderr
    assert "v1.0.0, v1.1.0" in res.stderr
    with pytest.raises(UnknownRelease):
        workflow.mirror(project.cfg).get("v8.0.0")


def test_list_and_remove(project):
    out = project.cli("upstream", "list").stdout
    assert "v1.0.0" in out and "v1.1.0" in out and "tarball" in out
    project.cli("upstream", "remove", "v1.1.0")
    assert "v1.1.0" not in project.cli("upstream", "list").stdout


def test_add_from_config_uses_the_configured_tarball(project):
    project.cli("upstream", "remove", "v1.1.0")
    out = project.cli("upstream", "add", "v1.1.0").stdout
    assert "v1.1.0 is" in out
    assert workflow.mirror(project.cfg).get("v1.1.0").provenance.origin == str(
        project.tarballs["v1.1.0"])


def test_git_import_from_a_local_repository(tmp_path, project):
    src = tmp_path / "upstream-src"
    src.mkdir()
    git(src, "init", "-q")
    (src / "f.c").write_text("int x;\n")
    git(src, "add", "f.c")
    git(src, "commit", "-qm", "release")
    git(src, "tag", "v2.0.0")
    m = workflow.mirror(project.cfg)
    rel = m.import_git("v2.0.0", f"file://{src}", "v2.0.0")
    assert rel.provenance.kind == "git" and rel.provenance.ref == "v2.0.0"
    assert m.import_git("v2.0.0", f"file://{src}", "v2.0.0") == rel
    (src / "f.c").write_text("int y;\n")
    git(src, "commit", "-qam", "moved")
    with pytest.raises(ChecksumMismatch):
        m.import_git("v2.0.0", f"file://{src}", "HEAD")


def test_not_a_tarball_is_bad_input(project, tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    res = project.cli("upstream", "add", "v3.0.0", "--tarball", str(junk), check_code=2)
    assert "junk.tar.gz" in res.stderr


@pytest.mark.parametrize("version,name", [
    ("1:10.2.2+ds-1", "v10.2.2"),
    ("1:10.0.2+ds-2+deb13u1~bpo12+1", "v10.0.2"),
    ("1:7.2+dfsg-7+deb12u18", "v7.2.0"),
])
def test_release_name_from_debian(version, name):
    assert release_name_from_debian(version) == name


def test_release_name_from_bad_debian_version():
    with pytest.raises(UserError):
        release_name_from_debian("banana")
