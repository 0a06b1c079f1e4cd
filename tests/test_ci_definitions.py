"""The CI definitions (.github/workflows/, ci/gitlab-ci.yml): valid against
the public schemas, and right about qemupatch.

Schemas: ``check-jsonschema --builtin-schema vendor.github-workflows`` and
``vendor.gitlab-ci`` (vendored in the package: no network).  Then what a
schema cannot see: every ``qemupatch`` command line in a ``run:`` or
``script:`` parses with the real argument parser; the fan-out takes its
matrix from the targets job (GitHub) or equals ``qemupatch nightly
--list-targets --format gitlab`` (GitLab's static ``parallel:matrix``);
what a cell writes is what it uploads, and what the report merges and the
release reads is what was uploaded; the nightly is scheduled; the release
runs on tags only.  actionlint runs too when an ``actionlint`` binary is
on PATH (docs/ci.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from qemupatch import config, matrix, nightly
from qemupatch.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
GITLAB = REPO / "ci" / "gitlab-ci.yml"
GITLAB_ROOT = REPO / ".gitlab-ci.yml"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
# The run folder's files (the layout contract, docs/ci.md).
JUNIT, SUMMARY = "nightly.junit.xml", "summary.txt"
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "<<", ")", "&", "2>"}


def load_yaml(path: Path) -> dict:
    return YAML(typ="safe").load(path.read_text())


@pytest.fixture(scope="module")
def cfg() -> config.Config:
    return config.load(REPO, REPO / "out" / "unused-cache", env={})


def nightly_wf() -> dict:
    return load_yaml(REPO / ".github" / "workflows" / "nightly.yml")


def release_wf() -> dict:
    return load_yaml(REPO / ".github" / "workflows" / "release.yml")


def gitlab() -> dict:
    return load_yaml(GITLAB)


# -- command lines ------------------------------------------------------------------


def expand(text: str, env: dict[str, str]) -> str:
    """``$VAR`` / ``${VAR}`` replaced by ``env[VAR]`` where known."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), text)


def qemupatch_commands(script: str) -> list[list[str]]:
    """The argument lists of every ``qemupatch`` command in a shell script:
    continuation lines joined, comments dropped, expressions and variables
    made plain words, the command cut at the first shell operator."""
    text = script.replace("\\\n", " ")
    text = re.sub(r"\$\{\{.*?\}\}", "X", text)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "X", text)
    found = []
    for line in text.splitlines():
        if line.strip().startswith("#") or not re.search(r"(^|[\s(/])qemupatch\s", line):
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens = list(lex)
        for i, token in enumerate(tokens):
            if token == "qemupatch" or token.endswith("/qemupatch"):
                args = []
                for word in tokens[i + 1:]:
                    if word in SHELL_OPERATORS or set(word) <= set("|&;<>()"):
                        break
                    args.append(word)
                found.append(args)
    return found


def scripts_of(path: Path) -> list[tuple[str, str]]:
    """(where, shell text) of every run:/script: in a CI file."""
    data = load_yaml(path)
    found: list[tuple[str, str]] = []
    if path.parent.name == "workflows":
        for job_name, job in data["jobs"].items():
            for n, step in enumerate(job.get("steps", ())):
                if "run" in step:
                    found.append((f"{path.name}:{job_name}:step {n}", step["run"]))
        return found
    for job_name, job in data.items():
        if not isinstance(job, dict):
            continue
        for key in ("before_script", "script", "after_script"):
            lines = job.get(key, ())
            for line in [lines] if isinstance(lines, str) else lines:
                found.append((f"{path.name}:{job_name}:{key}", line))
    return found


def parse(args: list[str]):
    """The real parser's namespace, or a failure naming the command line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"'qemupatch {shlex.join(args)}' does not parse:\n{err.getvalue()}")


def all_commands(path: Path) -> list[tuple[str, list[str]]]:
    return [(where, args) for where, text in scripts_of(path)
            for args in qemupatch_commands(text)]


def test_the_command_line_extraction_can_fail() -> None:
    """The helpers find commands in pipes, substitutions and continuations,
    and a wrong option is a failure."""
    script = ('m=$(.venv/bin/qemupatch nightly --list-targets --format github)\n'
              '# qemupatch in a comment\n'
              '.venv/bin/qemupatch report merge a \\\n  b --out "o/$X" | tee log\n')
    assert qemupatch_commands(script) == [
        ["nightly", "--list-targets", "--format", "github"],
        ["report", "merge", "a", "b", "--out", "o/X"]]
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        parse(["nightly", "--taget", "x"])


@pytest.mark.parametrize("path", [*WORKFLOWS, GITLAB], ids=lambda p: p.name)
def test_every_qemupatch_command_line_parses(path: Path) -> None:
    commands = all_commands(path)
    assert commands, f"{path} runs no qemupatch command"
    for where, args in commands:
        ns = parse(args)
        assert ns.command, where


@pytest.mark.parametrize("path", [REPO / ".github/workflows/nightly.yml", GITLAB],
                         ids=lambda p: p.name)
def test_the_fan_out_uses_every_nightly_command(path: Path) -> None:
    fmt = "gitlab" if path == GITLAB else "github"
    commands = [args for _, args in all_commands(path)]
    namespaces = [parse(args) for args in commands]
    assert any(ns.command == "nightly" and ns.list_targets and ns.format == fmt
               for ns in namespaces), f"no 'nightly --list-targets --format {fmt}'"
    cells = [ns for ns in namespaces if ns.command == "nightly" and ns.target]
    assert len(cells) == 1 and len(cells[0].target) == 1 and cells[0].out
    assert any(ns.command == "report" for ns in namespaces), "no 'report merge'"


# -- schemas --------------------------------------------------------------------------


def check_schema(schema: str, *paths: Path) -> subprocess.CompletedProcess:
    assert CHECK_JSONSCHEMA.is_file(), "check-jsonschema is missing: run ci/setup-debian.sh"
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", schema,
                           *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_the_workflows_exist() -> None:
    assert {p.name for p in WORKFLOWS} >= {"nightly.yml", "release.yml"}
    assert load_yaml(GITLAB_ROOT) == {"include": {"local": "ci/gitlab-ci.yml"}}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_github_schema(path: Path) -> None:
    done = check_schema("vendor.github-workflows", path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", [GITLAB, GITLAB_ROOT], ids=lambda p: p.name)
def test_gitlab_file_matches_the_gitlab_schema(path: Path) -> None:
    done = check_schema("vendor.gitlab-ci", path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schemas_reject_a_broken_file(tmp_path: Path) -> None:
    """The validator really checks (and works offline): a misspelt key fails."""
    broken = tmp_path / "nightly.yml"
    broken.write_text((REPO / ".github/workflows/nightly.yml").read_text()
                      .replace("runs-on:", "run-on:", 1))
    done = check_schema("vendor.github-workflows", broken)
    assert done.returncode == 1 and "run-on" in done.stdout
    bad_gitlab = tmp_path / "gitlab-ci.yml"
    bad_gitlab.write_text(GITLAB.read_text().replace("  script:", "  scrip:", 1))
    done = check_schema("vendor.gitlab-ci", bad_gitlab)
    assert done.returncode == 1, done.stdout


if shutil.which("actionlint"):
    @pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
    def test_actionlint(path: Path) -> None:
        done = subprocess.run(["actionlint", str(path)], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert done.returncode == 0, done.stdout + done.stderr


# -- GitHub Actions: the nightly --------------------------------------------------------


def test_nightly_is_scheduled_dispatchable_and_reusable() -> None:
    on = nightly_wf()["on"]
    assert set(on) == {"schedule", "workflow_dispatch", "workflow_call"}
    crons = [s["cron"] for s in on["schedule"]]
    assert crons and all(len(c.split()) == 5 for c in crons)


def test_targets_job_prints_the_matrix_into_its_output() -> None:
    job = nightly_wf()["jobs"]["targets"]
    ref = re.fullmatch(r"\$\{\{ steps\.(\w+)\.outputs\.matrix \}\}", job["outputs"]["matrix"])
    assert ref, job["outputs"]
    step = next(s for s in job["steps"] if s.get("id") == ref.group(1))
    assert [parse(a).format for a in qemupatch_commands(step["run"])] == ["github"]
    assert 'echo "matrix=$matrix" >> "$GITHUB_OUTPUT"' in step["run"]


def test_cell_matrix_comes_from_the_targets_job(cfg: config.Config) -> None:
    job = nightly_wf()["jobs"]["cell"]
    assert job["needs"] in ("targets", ["targets"])
    strategy = job["strategy"]
    assert strategy["fail-fast"] is False
    assert strategy["matrix"] == "${{ fromJSON(needs.targets.outputs.matrix) }}"
    # every matrix.<key> the job uses is a key of the printed matrix
    printed = json.loads(nightly.list_targets(cfg, "github"))
    keys = set(printed["include"][0])
    used = set(re.findall(r"matrix\.(\w+)", json.dumps(job)))
    assert used and used <= keys, used - keys
    assert [t["target"] for t in printed["include"]] == [t.name for t in matrix.targets(cfg)]


def _step(job: dict, uses: str) -> list[dict]:
    return [s for s in job["steps"] if s.get("uses", "").startswith(uses)]


def _cell_out(job: dict) -> str:
    """The cell's --out, its variables spelt as the expressions they hold."""
    step = next(s for s in job["steps"] if "qemupatch nightly --target" in s.get("run", ""))
    args = shlex.split(expand(step["run"], step.get("env", {})))
    return args[args.index("--out") + 1]


def test_cell_sets_up_debian_runs_one_target_and_uploads_its_folder() -> None:
    job = nightly_wf()["jobs"]["cell"]
    runs = [s.get("run", "") for s in job["steps"]]
    setup = next(i for i, r in enumerate(runs) if "bash ci/setup-debian.sh" in r)
    cell = next(i for i, r in enumerate(runs) if "qemupatch nightly --target" in r)
    assert setup < cell
    assert job["container"]["image"] == "debian:bookworm"
    out = _cell_out(job)
    assert out == "out/cells/${{ matrix.target }}"
    (upload,) = _step(job, "actions/upload-artifact@")
    assert upload["if"] == "always()"
    assert upload["with"]["path"] == out
    assert upload["with"]["name"] == "cell-${{ matrix.target }}"


def test_report_merges_every_downloaded_cell_and_uploads_the_report() -> None:
    wf = nightly_wf()
    job = wf["jobs"]["report"]
    assert job["needs"] in ("cell", ["cell"]) and job["if"] == "always()"
    (download,) = _step(job, "actions/download-artifact@")
    cell_name = wf["jobs"]["cell"]["steps"][-1]["with"]["name"]
    assert download["with"]["pattern"] == cell_name.split("$")[0] + "*"
    merge = next(s["run"] for s in job["steps"] if "report merge" in s.get("run", ""))
    (args,) = qemupatch_commands(merge)
    ns = parse(args)
    # download-artifact puts each artifact in <path>/<artifact name>/
    assert ns.dirs == [Path(download["with"]["path"], cell_name.split("$")[0] + "*")]
    (upload,) = _step(job, "actions/upload-artifact@")
    assert upload["if"] == "always()" and upload["with"]["path"] == str(ns.out)
    summary = next(s["run"] for s in job["steps"] if "GITHUB_STEP_SUMMARY" in s.get("run", ""))
    assert f"{ns.out}/{SUMMARY}" in summary


# -- GitHub Actions: the release --------------------------------------------------------


def test_release_runs_on_version_tags_only() -> None:
    wf = release_wf()
    assert set(wf["on"]) == {"push"}
    assert set(wf["on"]["push"]) == {"tags"}
    assert wf["on"]["push"]["tags"] and all(t.startswith("v") for t in wf["on"]["push"]["tags"])
    assert wf["jobs"]["release"]["if"] == "startsWith(github.ref, 'refs/tags/v')"


def test_release_reuses_the_nightly_and_releases_from_its_report() -> None:
    wf = release_wf()
    assert wf["jobs"]["matrix"]["uses"] == "./.github/workflows/nightly.yml"
    assert "workflow_call" in nightly_wf()["on"]
    job = wf["jobs"]["release"]
    assert job["needs"] in ("matrix", ["matrix"])
    report_upload = _step(nightly_wf()["jobs"]["report"], "actions/upload-artifact@")[0]
    (download,) = _step(job, "actions/download-artifact@")
    assert download["with"]["name"] == report_upload["with"]["name"]
    run = next(s["run"] for s in job["steps"] if "qemupatch release" in s.get("run", ""))
    releases = [parse(a) for a in qemupatch_commands(run)]
    assert [ns.check for ns in releases] == [True, False], "check first, then release"
    assert {str(ns.matrix) for ns in releases} == {download["with"]["path"]}
    assert run.index('git tag -d "$TAG"') < run.index("qemupatch release")
    (publish,) = _step(job, "softprops/action-gh-release@")
    # qemupatch release writes dist/v<VERSION>/ (release.default_dist_dir)
    assert publish["with"]["files"] == "dist/${{ github.ref_name }}/*"


def test_release_dist_folder_is_where_the_workflows_publish_from(cfg: config.Config) -> None:
    from qemupatch import release

    assert release.default_dist_dir(cfg, "1.2.3") == cfg.root / "dist" / "v1.2.3"


# -- GitLab CI ---------------------------------------------------------------------------


def test_gitlab_matrix_is_the_projects_matrix(cfg: config.Config) -> None:
    """The static parallel:matrix is what `qemupatch nightly --list-targets
    --format gitlab` prints for qemupatch.toml: update both together."""
    printed = json.loads(nightly.list_targets(cfg, "gitlab"))
    assert gitlab()["cell"]["parallel"] == printed["parallel"]
    assert printed["parallel"]["matrix"][0]["TARGET"] == [t.name for t in matrix.targets(cfg)]


def test_gitlab_runs_on_schedules_and_tags_only() -> None:
    rules = gitlab()["workflow"]["rules"]
    conditions = [r.get("if", "") for r in rules]
    assert '$CI_PIPELINE_SOURCE == "schedule"' in conditions
    assert any("$CI_COMMIT_TAG" in c for c in conditions)
    assert rules[-1] == {"when": "never"}
    for name in ("release", "publish"):
        job_rules = gitlab()[name]["rules"]
        assert job_rules and all("$CI_COMMIT_TAG =~ /^v" in r["if"] for r in job_rules), name


def test_gitlab_cell_uploads_what_it_writes() -> None:
    job = gitlab()["cell"]
    assert any("bash ci/setup-debian.sh" in line for line in job["before_script"])
    (script,) = job["script"]
    args = shlex.split(script)
    out = args[args.index("--out") + 1]
    assert out == "out/cells/$TARGET"
    assert [p.rstrip("/") for p in job["artifacts"]["paths"]] == [out]
    assert job["artifacts"]["when"] == "always"
    assert job["needs"] == ["targets"]


def test_gitlab_report_merges_the_cells_and_reports_junit() -> None:
    data = gitlab()
    job = data["report"]
    assert job["needs"] == ["cell"] and job["when"] == "always"
    (args,) = qemupatch_commands("\n".join(job["script"]))
    ns = parse(args)
    cells_root = data["cell"]["artifacts"]["paths"][0].split("$")[0]
    assert ns.dirs == [Path(cells_root, "*")]
    assert job["artifacts"]["reports"]["junit"] == f"{ns.out}/{JUNIT}"
    assert [p.rstrip("/") for p in job["artifacts"]["paths"]] == [str(ns.out)]
    assert job["artifacts"]["when"] == "always"


def test_gitlab_release_uses_the_merged_report_and_publishes_dist() -> None:
    data = gitlab()
    job = data["release"]
    assert job["needs"] == ["report"]
    releases = [parse(a) for a in qemupatch_commands("\n".join(job["script"]))]
    assert [ns.check for ns in releases] == [True, False]
    assert {str(ns.matrix) for ns in releases} == {str(parse(qemupatch_commands(
        "\n".join(data["report"]["script"]))[0]).out)}
    assert job["artifacts"]["paths"] == ["dist/$CI_COMMIT_TAG/"]
    assert job["artifacts"]["reports"]["dotenv"] == "release.env"
    publish = data["publish"]
    assert publish["needs"] == ["release"]
    assert publish["release"]["tag_name"] == "$CI_COMMIT_TAG"
    assert "$RELEASE_JOB_ID" in publish["release"]["assets"]["links"][0]["url"]


def test_gitlab_targets_job_check_fails_on_a_drifted_matrix(tmp_path: Path,
                                                            cfg: config.Config) -> None:
    """The targets job's own drift check, run here on a copy with one cell
    left out: it must fail and say what to update."""
    job = gitlab()["targets"]
    check = next(line for line in job["script"] if "PY" in line)
    (tmp_path / "ci").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "targets.json").write_text(nightly.list_targets(cfg, "gitlab"))
    shutil.copy(GITLAB, tmp_path / "ci" / "gitlab-ci.yml")
    run = [shutil.which("bash"), "-c", check.replace(".venv/bin/python", sys.executable)]
    ok = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    text = GITLAB.read_text()
    first = matrix.targets(cfg)[0].name
    (tmp_path / "ci" / "gitlab-ci.yml").write_text(text.replace(f'"{first}", ', "", 1))
    bad = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "update the cell job" in bad.stderr
