"""qemupatch nightly, fast: stage order, skip after a failure, infra retries
with backoff, per-release sharing, SIGTERM, the real fetch and rebase stages
on synthetic releases, the QEMU build reused by its inputs key (the fake
QEMU tree on the host), the qtest runner on a fake qtest, and the CI
fan-out formats (checked against GitLab's and GitHub's public schemas)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LISTS_PATCHES, LISTS_V1, LISTS_V2, commit_files, synthetic_project

from qemupatch import build, lifecycle, matrix, nightly, qtest
from qemupatch.config import Settings
from qemupatch.errors import CompileFailed, DownloadError, Failed, Terminated, UserError
from qemupatch.matrix import FAIL, INFRA, PASS, SKIP, STAGES, Target
from qemupatch.progress import NullProgress
from qemupatch.runner import HostRunner

FAKE_SRC = Path(__file__).parent / "fakeqemusrc"
T1, T2 = Target("v2.1.0", "6.1"), Target("v2.1.0", "6.12")


@pytest.fixture
def carry_project(tmp_path):
    """Releases v2.0.0 (the series' base) and v2.1.0; the series' two
    patches meet list conflicts on v2.1.0 that are resolved automatically."""
    def commit_series(wt):
        for subject, files in LISTS_PATCHES[:2]:
            commit_files(wt, files, subject)

    return synthetic_project(tmp_path, {"v2.0.0": LISTS_V1, "v2.1.0": LISTS_V2},
                             commit_series)


class Calls:
    """Stage functions that record their calls and do what a test says."""

    def __init__(self, plan=None):
        self.calls: list[tuple[str, str]] = []
        self.plan = plan or {}

    def fns(self):
        def make(stage):
            def fn(ctx):
                self.calls.append((ctx.target.name, stage))
                (ctx.dir / f"{stage}.txt").write_text(f"{stage} of {ctx.target.name}\n")
                ctx.link("log", ctx.dir / f"{stage}.txt")
                ctx.figures["n"] = len(self.calls)
                action = self.plan.get((ctx.target.name, stage))
                if isinstance(action, list):
                    action = action.pop(0) if action else None
                if action is not None:
                    raise action
                ctx.reason = f"{stage} done"
            return fn
        return {s: make(s) for s in STAGES}


def run(cfg, tmp_path, calls, **kwargs):
    kwargs.setdefault("targets", [T1, T2])
    return nightly.run_nightly(cfg, tmp_path / "out" / "run1", stage_fns=calls.fns(),
                               say=lambda m: None, **kwargs)


def test_every_stage_in_order_and_shared_stages_once_per_release(carry_project, tmp_path):
    calls = Calls()
    res = run(carry_project.cfg, tmp_path, calls)
    assert [s for t, s in calls.calls if t == T1.name] == list(STAGES)
    # fetch, rebase, patch-builds and qtest belong to the release: done once.
    assert [s for t, s in calls.calls if t == T2.name] == ["build", "boot-test"]
    assert res.outcome == PASS and nightly.exit_code(res) == 0
    t2 = res.target(T2.name)
    assert [s.stage for s in t2.stages] == list(STAGES)
    q1, q2 = res.target(T1.name).stage("qtest"), t2.stage("qtest")
    assert q2.figures == q1.figures and q2.outcome == PASS
    assert q2.links == {"log": f"{T2.name}/qtest/qtest.txt"}
    run_dir = tmp_path / "out" / "run1"
    assert (run_dir / q2.links["log"]).read_text() == f"qtest of {T1.name}\n"
    # The records: nightly.json round-trips, target.json per target, latest moved.
    again = matrix.load_run(run_dir)
    assert again.target(T2.name).stage("build").reason == "build done"
    assert json.loads((run_dir / T1.name / "target.json").read_text())["outcome"] == PASS
    assert os.readlink(tmp_path / "out" / "latest") == "run1"
    assert again.series_hash == build.series_hash(carry_project.patches)


def test_stages_after_a_failure_are_skipped(carry_project, tmp_path):
    calls = Calls({(T1.name, "build"): CompileFailed("qemu build failed at compile\n"
                                                     "hw/misc/vmsocket.c:1: error: x")})
    res = run(carry_project.cfg, tmp_path, calls, targets=[T1])
    t = res.target(T1.name)
    build_stage = t.stage("build")
    assert build_stage.outcome == FAIL and len(build_stage.attempts) == 1
    assert build_stage.reason == "qemu build failed at compile"
    assert "error: x" in build_stage.excerpt
    assert build_stage.links == {"log": f"{T1.name}/build/build.txt"}
    for name in ("boot-test", "qtest"):
        assert (t.stage(name).outcome, t.stage(name).reason) == (SKIP, "after build failed")
    assert t.stage("fuzz").outcome == PASS     # it builds a QEMU of its own
    assert ("v2.1.0-linux-6.1", "boot-test") not in calls.calls
    assert t.outcome == FAIL and nightly.exit_code(res) == 1


def test_infra_failures_are_retried_with_backoff_and_every_attempt_kept(carry_project,
                                                                        tmp_path):
    calls = Calls({(T1.name, "fetch"): [DownloadError("mirror timed out"),
                                        DownloadError("mirror timed out again")]})
    res = run(carry_project.cfg, tmp_path, calls, targets=[T1], retries=2, backoff=0.01)
    fetch = res.target(T1.name).stage("fetch")
    assert [a.outcome for a in fetch.attempts] == [INFRA, INFRA, PASS]
    assert [a.number for a in fetch.attempts] == [1, 2, 3]
    assert fetch.attempts[0].error == "mirror timed out"
    assert fetch.outcome == PASS and res.outcome == PASS


def test_infra_that_persists_is_infra_and_exit_3(carry_project, tmp_path):
    calls = Calls({(T1.name, "boot-test"): [DownloadError("no kernel")] * 3})
    res = run(carry_project.cfg, tmp_path, calls, targets=[T1], retries=1, backoff=0.01)
    boot = res.target(T1.name).stage("boot-test")
    assert boot.outcome == INFRA and len(boot.attempts) == 2
    # the qtest needs the build, not the boot: it still runs
    assert res.target(T1.name).stage("qtest").outcome == PASS
    assert res.outcome == INFRA and nightly.exit_code(res) == 3


def test_a_failure_skips_only_the_stages_that_need_it(carry_project, tmp_path):
    """A patch that does not build on its own still lets the series be
    built, booted, qtested and fuzzed; a failed rebase stops everything."""
    calls = Calls({(T1.name, "patch-builds"): Failed("patch 2 does not build alone")})
    res = run(carry_project.cfg, tmp_path, calls, targets=[T1])
    t = res.target(T1.name)
    assert t.stage("patch-builds").outcome == FAIL
    assert {s: t.stage(s).outcome for s in ("build", "boot-test", "qtest", "fuzz")} == \
        dict.fromkeys(("build", "boot-test", "qtest", "fuzz"), PASS)
    assert t.outcome == FAIL
    calls = Calls({(T1.name, "rebase"): Failed("conflict in hw/misc/meson.build")})
    res = run(carry_project.cfg, tmp_path / "again", calls, targets=[T1])
    t = res.target(T1.name)
    assert [(s.stage, s.reason) for s in t.stages if s.outcome == SKIP] == [
        (s, "after rebase failed") for s in ("patch-builds", "build", "boot-test", "qtest",
                                             "fuzz")]


def test_backoff_doubles():
    slept = []
    tries = iter([DownloadError("a"), DownloadError("b"), DownloadError("c"), None])

    def fn(ctx):
        if (exc := next(tries)) is not None:
            raise exc

    ctx = lambda: nightly.StageContext(T1, "fetch", Path("/nonexistent"), lambda m: None)  # noqa: E731
    res = nightly.run_stage("fetch", fn, ctx, retries=3, backoff=0.5, say=lambda m: None,
                            sleep=slept.append)
    assert slept == [0.5, 1.0, 2.0]
    assert res.outcome == PASS and len(res.attempts) == 4
    assert res.reason == "passed at attempt 4"


def test_stages_not_asked_for_are_skipped(carry_project, tmp_path):
    calls = Calls()
    res = run(carry_project.cfg, tmp_path, calls, targets=[T1], stages=("fetch", "rebase"))
    assert calls.calls == [(T1.name, "fetch"), (T1.name, "rebase")]
    assert res.target(T1.name).stage("build").reason == "not asked for (--stages)"
    assert res.outcome == PASS
    with pytest.raises(UserError, match="unknown stage"):
        run(carry_project.cfg, tmp_path, calls, stages=("fetch", "bake"))


def test_sigterm_leaves_a_readable_record_and_goes_through(carry_project, tmp_path):
    """A real SIGTERM during the build: Terminated goes on, nightly.json
    says which stage it stopped in, latest is not moved."""
    def build_stage(ctx):
        os.kill(os.getpid(), signal.SIGTERM)

    fns = {**Calls().fns(), "build": build_stage}
    run_dir = tmp_path / "out" / "run1"
    with pytest.raises(Terminated), lifecycle.stop_on_signals():
        nightly.run_nightly(carry_project.cfg, run_dir, targets=[T1, T2], stage_fns=fns,
                            say=lambda m: None)
    rec = matrix.load_run(run_dir)
    t1 = rec.target(T1.name)
    assert t1.stage("rebase").outcome == PASS
    assert t1.stage("build").outcome == INFRA
    assert "SIGTERM" in t1.stage("build").reason
    assert t1.stage("qtest").outcome == SKIP
    assert rec.target(T2.name).outcome == SKIP and rec.outcome == INFRA
    assert rec.finished
    assert not (tmp_path / "out" / "latest").exists()


# -- the real fetch and rebase stages on synthetic releases ------------------------------


def test_real_fetch_and_rebase_say_which_resolutions_were_replayed(carry_project, tmp_path):
    res = nightly.run_nightly(carry_project.cfg, tmp_path / "run", targets=[T1],
                              stages=("fetch", "rebase"), say=lambda m: None)
    t = res.target(T1.name)
    fetch, rebase = t.stage("fetch"), t.stage("rebase")
    assert fetch.outcome == PASS and fetch.figures["kind"] == "tarball"
    assert t.upstream["commit"].startswith(fetch.figures["commit"])
    assert rebase.outcome == PASS, rebase.reason
    assert rebase.figures["resolutions_replayed"] >= 2 and rebase.figures["merged"] == 2
    assert "resolution(s) replayed" in rebase.reason
    md = (tmp_path / "run" / rebase.links["rebase report"]).read_text()
    assert "## Resolutions replayed" in md and "list-insert" in md
    assert "`meson.build`" in md and "`MAINTAINERS`" in md


def test_a_conflict_nothing_resolves_fails_the_rebase(lists_project, tmp_path):
    res = nightly.run_nightly(lists_project.cfg, tmp_path / "run", targets=[T1],
                              stages=("fetch", "rebase", "build"), say=lambda m: None)
    t = res.target(T1.name)
    assert t.stage("rebase").outcome == FAIL
    assert "real.c" in t.stage("rebase").reason + t.stage("rebase").excerpt
    assert t.stage("build").reason == "after rebase failed"


# -- the QEMU build reused across runs ---------------------------------------------------


def test_qemu_build_reused_while_source_id_and_options_are_unchanged(tmp_path):
    host = HostRunner(Settings())
    opts = build.QemuBuildOptions(ccache="off")

    def qemu(source_id):
        return build.build_qemu(FAKE_SRC, tmp_path / "qemu", release="v10.2.2",
                                repacked=True, runner=host, project_root=tmp_path,
                                options=opts, progress=NullProgress(), source_id=source_id)

    first = qemu("tree-a")
    rec = json.loads(first.build_json.read_text())
    assert rec["reused"] is False and rec["inputs_key"] and first.seconds > 0
    second = qemu("tree-a")
    rec = json.loads(second.build_json.read_text())
    assert rec["reused"] is True and second.seconds == 0.0
    assert rec["facts"]["source_id"] == "tree-a"
    assert second.sha256 == first.sha256
    third = qemu("tree-b")
    assert json.loads(third.build_json.read_text())["reused"] is False
    # No source id: never reused (ninja is then the incremental build).
    assert json.loads(qemu(None).build_json.read_text())["inputs_key"] is None


# -- qtest --------------------------------------------------------------------------------


FAKE_QTEST = """#!/bin/sh
# a fake libqtest binary: asks QEMU (the wrapper) for its arguments, prints TAP
"$QTEST_QEMU_BINARY" -qtest x >args.txt
echo "TAP version 13"
echo "# random seed: R02S"
echo "ok 1 /x86_64/vmsocket/identity"
echo "ok 2 /x86_64/vmsocket/msi # SKIP no MSI here"
[ -e FAIL ] && echo "not ok 3 /x86_64/vmsocket/roundtrip" && echo "qtest: boom" >&2 && exit 1
[ -e HANG ] && sleep 30
echo "ok 3 /x86_64/vmsocket/roundtrip"
echo "1..3"
"""


@pytest.fixture
def fake_qtest(tmp_path):
    qtest_bin = tmp_path / "vmsocket-test"
    qtest_bin.write_text(FAKE_QTEST)
    qtest_bin.chmod(0o755)
    qemu = tmp_path / "qemu-system-x86_64.real"
    qemu.write_text('#!/bin/sh\necho "$@"\n')
    qemu.chmod(0o755)
    return qtest_bin, qemu


def test_qtest_counts_tap_and_gives_qemu_the_roms(fake_qtest, tmp_path):
    out = tmp_path / "qtest"
    res = qtest.run_qtest(*fake_qtest, out)
    assert (res.passed, res.failed, res.skipped) == (2, 0, 1) and res.ok
    assert (out / "qtest.tap").read_text().startswith("TAP version 13")
    assert (out / "args.txt").read_text().split() == [
        "-L", "/usr/share/qemu", "-L", "/usr/share/seabios", "-qtest", "x"]
    assert "exit code 0" in (out / "qtest.log").read_text()


def test_qtest_failure_names_the_failing_tests(fake_qtest, tmp_path):
    out = tmp_path / "qtest"
    out.mkdir()
    (out / "FAIL").touch()
    with pytest.raises(Failed, match="1 of 3 tests failed") as err:
        qtest.run_qtest(*fake_qtest, out)
    assert "not ok 3 /x86_64/vmsocket/roundtrip" in str(err.value)
    assert "qtest: boom" in str(err.value)
    assert err.value.result.failures == ("not ok 3 /x86_64/vmsocket/roundtrip",)
    assert matrix.classify(err.value) == FAIL


def test_qtest_past_its_deadline_fails_with_what_it_printed(fake_qtest, tmp_path):
    out = tmp_path / "qtest"
    out.mkdir()
    (out / "HANG").touch()
    with pytest.raises(Failed, match="deadline"):
        qtest.run_qtest(*fake_qtest, out, timeout=3)
    assert "ok 1 /x86_64/vmsocket/identity" in (out / "qtest.tap").read_text()


def test_qtest_without_the_binary_says_how_it_is_built(tmp_path):
    with pytest.raises(UserError, match="extra_targets"):
        qtest.run_qtest(tmp_path / "nope", tmp_path / "qemu", tmp_path / "out")


# -- the matrix for CI ----------------------------------------------------------------


def repo_cfg():
    from qemupatch import config
    return config.load(Path(__file__).resolve().parents[1])


def test_list_targets_github_is_a_strategy_matrix(tmp_path):
    cfg = repo_cfg()
    data = json.loads(nightly.list_targets(cfg, "github"))
    names = [t.name for t in matrix.targets(cfg)]
    assert [c["target"] for c in data["include"]] == names
    assert {c["release"] for c in data["include"]} == set(cfg.matrix.releases)
    assert "\n" not in nightly.list_targets(cfg, "github")   # one line, for $GITHUB_OUTPUT
    # The same object, literally in a workflow, passes GitHub's public schema.
    wf = {"on": {"schedule": [{"cron": "0 2 * * *"}]}, "jobs": {"cell": {
        "runs-on": "ubuntu-latest", "strategy": {"fail-fast": False, "matrix": data},
        "steps": [{"run": "qemupatch nightly --target ${{ matrix.target }}"}]}}}
    _schema_ok(tmp_path / "wf.json", wf, "vendor.github-workflows")


def test_list_targets_gitlab_is_a_parallel_matrix(tmp_path):
    cfg = repo_cfg()
    data = json.loads(nightly.list_targets(cfg, "gitlab"))
    assert data["parallel"]["matrix"] == [{"TARGET": [t.name for t in matrix.targets(cfg)]}]
    ci = {"cell": {"script": ["qemupatch nightly --target $TARGET"], **data}}
    _schema_ok(tmp_path / "gitlab-ci.json", ci, "vendor.gitlab-ci")


def test_list_targets_json_and_a_bad_format():
    cfg = repo_cfg()
    data = json.loads(nightly.list_targets(cfg, "json"))
    assert data[0] == {"target": "v7.2.0-linux-6.1", "release": "v7.2.0", "kernel": "6.1",
                       "required": True}
    with pytest.raises(UserError, match="format"):
        nightly.list_targets(cfg, "travis")


def _schema_ok(path: Path, doc: dict, schema: str) -> None:
    path.write_text(json.dumps(doc))
    tool = Path(sys.executable).with_name("check-jsonschema")
    assert tool.exists(), "check-jsonschema is not installed: run ci/setup-debian.sh"
    res = subprocess.run([str(tool), "--builtin-schema", schema, str(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cli_lists_targets_and_refuses_unknown_ones(carry_project):
    proj = with_matrix(carry_project)
    res = proj.cli("nightly", "--list-targets", "--format", "github")
    assert json.loads(res.stdout)["include"][0]["target"] == "v2.1.0-linux-6.1"
    res = proj.cli("nightly", "--target", "v9.9.9-linux-6.1", check_code=2)
    assert "no matrix target 'v9.9.9-linux-6.1'" in res.stderr
    res = proj.cli("nightly", "--stages", "fetch,bake", check_code=2)
    assert "unknown stage(s) bake" in res.stderr


def test_a_link_to_a_file_outside_the_run_folder_is_a_copy_inside(tmp_path):
    outside = tmp_path / "cache" / "compile.log"
    outside.parent.mkdir()
    outside.write_text("ninja: build stopped\n")
    ctx = nightly.StageContext(T1, "build", tmp_path / "run", lambda m: None)
    ctx.link("log", outside)
    ctx.link("missing", tmp_path / "nope.log")
    assert ctx.links == {"log": f"{T1.name}/build/compile.log"}
    assert (tmp_path / "run" / ctx.links["log"]).read_text() == "ninja: build stopped\n"


MATRIX_TOML = ('\n[[kernel]]\nname = "6.1"\nsuite = "bookworm"\n'
               'image_package = "linux-image-6.1.0-56-amd64"\n'
               '\n[matrix]\nreleases = ["v2.1.0"]\nkernels = ["6.1"]\n')


def with_matrix(proj):
    with open(proj.root / "qemupatch.toml", "a") as f:
        f.write(MATRIX_TOML)
    return proj


def test_cli_green_cell_exits_0_with_progress_and_table(carry_project, tmp_path):
    out = tmp_path / "nightly"
    res = with_matrix(carry_project).cli("nightly", "--stages", "fetch,rebase",
                                         "--out", str(out / "a"))
    assert "v2.1.0-linux-6.1" in res.stdout and "pass" in res.stdout
    assert "v2.1.0-linux-6.1         rebase        pass" in res.stderr
    assert os.readlink(out / "latest") == "a"


def test_cli_red_cell_exits_1(lists_project, tmp_path):
    out = tmp_path / "nightly"
    with_matrix(lists_project).cli("nightly", "--stages", "fetch,rebase",
                                   "--out", str(out / "b"), check_code=1)
    assert matrix.load_run(out / "b").target("v2.1.0-linux-6.1").stage("rebase").outcome == FAIL
