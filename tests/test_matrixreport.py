"""The nightly's reports and report merge, on small synthetic matrix runs.

The same runs are rendered in a real browser by test_html_report.py; here
each view is read back the way its reader reads it: the table as text, the
JUnit file with xml.etree, nightly.json against docs/nightly.schema.json,
index.html with html.parser.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest

from qemupatch import matrix as mx
from qemupatch import matrixreport as mr
from qemupatch.errors import UserError
from qemupatch.matrix import (
    FAIL,
    INFRA,
    PASS,
    SKIP,
    STAGES,
    Attempt,
    MatrixRun,
    StageResult,
    Target,
    TargetResult,
)
from qemupatch.records import atomic_write
from tests.conftest import Project

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "nightly.schema.json").read_text())
SERIES = "5e41e5deadbeef0123456789"
COMPILE_ERROR = ("../hw/misc/vmsocket.c:212:5: error: implicit declaration of function "
                 "'qdev_prop_set_<chr>' & friends\n  212 |     qdev_prop_set_chr(dev, \"chardev\", chr);\n"
                 "      |     ^~~~~~~~~~~~~~~~~")
ANSI_RE = re.compile(r"\033\[[0-9;]*m")


# -- synthetic runs -----------------------------------------------------------------------


def stage(target: Target, name: str, outcome: str, seconds: float = 10.0, reason: str = "",
          excerpt: str = "", tries: int = 1) -> StageResult:
    """A stage as the nightly records it, with a log link in its own folder."""
    attempts = tuple(Attempt(n, INFRA if n < tries else outcome, seconds / tries,
                             "2026-11-27T07:20:00Z", "download timed out" if n < tries else "")
                     for n in range(1, tries + 1))
    links = {} if outcome == SKIP else {"log": f"{target.name}/{name}/{name}.log"}
    return StageResult(name, outcome, seconds, reason, excerpt, attempts, {}, links)


def target_result(release: str, kernel: str, outcomes: dict[str, str] | None = None, *,
                  required: bool = True, reasons: dict[str, str] | None = None,
                  series: str = SERIES) -> TargetResult:
    """All stages pass unless ``outcomes`` says otherwise; the stages after
    a fail or infra are skipped, as the nightly does."""
    t = Target(release, kernel, required)
    outcomes, reasons = outcomes or {}, reasons or {}
    stages, stopped = [], ""
    for name in STAGES:
        if stopped:
            stages.append(stage(t, name, SKIP, 0, f"after {stopped} failed"))
            continue
        outcome = outcomes.get(name, PASS)
        excerpt = COMPILE_ERROR if outcome == FAIL else ("curl: (28) timeout" if outcome == INFRA
                                                         else "")
        stages.append(stage(t, name, outcome, 10.0 + len(stages), reasons.get(name, ""),
                            excerpt, tries=2 if outcome == INFRA else 1))
        if outcome in (FAIL, INFRA):
            stopped = name
    return TargetResult(t, tuple(stages), series, "2026-11-27T07:15:00Z",
                        "2026-11-27T07:40:00Z", {"commit": "0" * 40})


def run_of(run_id: str, *targets: TargetResult, series: str = SERIES) -> MatrixRun:
    return MatrixRun(run_id, series, "2026-11-27T07:15:00Z", "2026-11-27T08:01:05Z",
                     tuple(targets), project_commit="c0ffee" * 6 + "abcd",
                     host={"hostname": "ci-1", "cpus": 2})


def tonight() -> MatrixRun:
    """Green, red (a compile error, turned red), infra (turned infra), a
    watched target that stayed red, and one that turned green."""
    return run_of(
        "20261127T071500Z",
        target_result("v10.2.2", "6.1"),
        target_result("v7.2.0", "6.1", {"build": FAIL},
                      reasons={"build": "QEMU did not compile: <vmsocket.c:212> error"}),
        target_result("v10.0.2", "6.12", {"fetch": INFRA},
                      reasons={"fetch": "download of qemu-10.0.2.tar.xz failed"}),
        target_result("master", "6.12", {"rebase": FAIL}, required=False,
                      reasons={"rebase": "conflict in hw/misc/meson.build"}),
        target_result("v10.2.2", "6.12"))


def last_night() -> MatrixRun:
    return run_of(
        "20261126T071500Z",
        target_result("v10.2.2", "6.1"),
        target_result("v7.2.0", "6.1"),
        target_result("v10.0.2", "6.12"),
        target_result("master", "6.12", {"rebase": FAIL}, required=False),
        target_result("v10.2.2", "6.12", {"qtest": FAIL}),
        target_result("v6.2.0", "6.1", {"build": FAIL}))   # gone tonight: no news


def write_target_folders(run: MatrixRun, run_dir: Path) -> None:
    """What the nightly leaves beside the reports: target.json and each
    stage's linked files."""
    for t in run.targets:
        atomic_write(run_dir / t.target.name / mx.TARGET_RESULT_NAME,
                     json.dumps(mx.target_to_json(t)))
        for s in t.stages:
            for path in s.links.values():
                atomic_write(run_dir / path, f"{t.target.name} {s.stage} log\n")


# -- the table ------------------------------------------------------------------------------


def test_table_has_a_row_per_target_and_a_column_per_stage():
    run = tonight()
    text = mr.table(run)
    lines = text.splitlines()
    assert lines[0].split() == ["target", *STAGES, "outcome"]
    rows = {line.split()[0]: line for line in lines[1:1 + len(run.targets)]}
    assert set(rows) == {t.target.name for t in run.targets}
    red = rows["v7.2.0-linux-6.1"].split()
    assert red[1:5] == ["pass", "10s", "pass", "11s"]
    assert "fail 13s" in rows["v7.2.0-linux-6.1"] and red[-1] == "FAIL"
    assert "infra 10s x2" in rows["v10.0.2-linux-6.12"]
    assert rows["v10.0.2-linux-6.12"].split()[-1] == "INFRA"
    assert "(watched)" in rows["master-linux-6.12"]
    assert "\033[" not in text


def test_table_footer_counts_time_and_trend():
    text = mr.table(tonight(), previous=last_night())
    footer = text.splitlines()[1 + len(tonight().targets):]
    assert footer[0].startswith("run 20261127T071500Z: FAIL: 5 targets (2 pass, 2 fail, 1 infra)")
    assert "46m05s wall" in footer[0]
    joined = "\n".join(footer)
    assert "turned red: v7.2.0-linux-6.1 (build)" in joined
    assert "turned infra: v10.0.2-linux-6.12 (fetch)" in joined
    assert "still red: master-linux-6.12 (rebase)" in joined
    assert "turned green: v10.2.2-linux-6.12 (qtest)" in joined
    assert "v6.2.0" not in joined
    # a partial record (the nightly rewrites it after every target)
    partial = replace(tonight(), finished="")
    assert "still running, 25m00s so far" in mr.table(partial)
    assert "not yet: the run is still going" in mr.html_report(partial)
    # no previous given: the table does not pretend there was none
    assert "trend" not in mr.table(tonight())


def test_table_in_colour_is_the_plain_table_painted():
    plain, painted = mr.table(tonight()), mr.table(tonight(), color=True)
    assert [ln.rstrip() for ln in ANSI_RE.sub("", painted).splitlines()] == \
        [ln.rstrip() for ln in plain.splitlines()]
    row = next(ln for ln in painted.splitlines() if ln.startswith("v7.2.0-linux-6.1"))
    assert "\033[1;31mfail 13s" in row and "\033[32mpass 10s" in row
    assert "\033[90mskip" in row
    infra = next(ln for ln in painted.splitlines() if ln.startswith("v10.0.2"))
    assert "\033[33minfra" in infra


# -- trend ------------------------------------------------------------------------------------


def test_trend_kinds():
    changes = {c.target: c for c in mr.trend(tonight(), last_night())}
    assert changes["v7.2.0-linux-6.1"] == mr.Change("v7.2.0-linux-6.1", mr.TURNED_RED,
                                                     PASS, FAIL, "build")
    assert changes["v10.0.2-linux-6.12"].kind == mr.TURNED_INFRA
    assert changes["master-linux-6.12"].kind == mr.STILL_RED
    assert changes["v10.2.2-linux-6.12"] == mr.Change("v10.2.2-linux-6.12", mr.TURNED_GREEN,
                                                       FAIL, PASS, "qtest")
    assert "v10.2.2-linux-6.1" not in changes      # green both times
    assert "v6.2.0-linux-6.1" not in changes       # not run tonight
    assert [c.kind for c in mr.trend(tonight(), last_night())] == [
        mr.TURNED_RED, mr.TURNED_INFRA, mr.STILL_RED, mr.TURNED_GREEN]
    assert mr.trend(tonight(), None) == []


def test_a_new_red_target_turned_red():
    new = run_of("b", target_result("v11.0.0", "6.1", {"rebase": FAIL}))
    (change,) = mr.trend(new, run_of("a", target_result("v10.2.2", "6.1")))
    assert (change.kind, change.before, change.stage) == (mr.TURNED_RED, "", "rebase")


# -- JUnit ------------------------------------------------------------------------------------


def test_junit_one_case_per_target_and_stage():
    run = tonight()
    suite = ET.fromstring(mr.junit(run))
    cases = suite.findall("testcase")
    assert len(cases) == len(run.targets) * len(STAGES)
    assert [(c.get("classname"), c.get("name")) for c in cases[:len(STAGES)]] == [
        ("v10.2.2-linux-6.1", s) for s in STAGES]
    by = {(c.get("classname"), c.get("name")): c for c in cases}
    failure = by["v7.2.0-linux-6.1", "build"].find("failure")
    assert failure.get("message") == "QEMU did not compile: <vmsocket.c:212> error"
    assert "implicit declaration of function 'qdev_prop_set_<chr>' & friends" in failure.text
    infra = by["v10.0.2-linux-6.12", "fetch"].find("failure")
    assert infra.get("message").startswith("infrastructure: download of qemu-10.0.2")
    assert "attempt 1: infra" in by["v10.0.2-linux-6.12", "fetch"].find("system-out").text
    skipped = by["v7.2.0-linux-6.1", "boot-test"].find("skipped")
    assert skipped.get("message") == "after build failed"
    assert by["v10.2.2-linux-6.1", "qtest"].find("failure") is None
    assert suite.get("tests") == str(len(cases))
    assert suite.get("failures") == "3" and suite.get("skipped") == str(
        sum(s.outcome == SKIP for t in run.targets for s in t.stages))


def test_junit_counts_a_stage_the_target_lacks_as_skipped():
    t = target_result("v10.2.2", "6.1")
    partial = replace(t, stages=t.stages[:2])
    suite = ET.fromstring(mr.junit(run_of("x", partial)))
    assert len(suite.findall("testcase")) == len(STAGES)
    assert suite.findall("testcase")[2].find("skipped").get("message") == "not recorded"


# -- JSON and its schema ----------------------------------------------------------------


def validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(SCHEMA)
    cls.check_schema(SCHEMA)
    return cls(SCHEMA)


def test_nightly_json_matches_the_schema_and_round_trips(tmp_path):
    run, prev = tonight(), last_night()
    files = mr.write_reports(run, tmp_path, prev)
    assert set(files) == {"json", "junit", "html", "summary"}
    assert all(p.parent == tmp_path and p.is_file() for p in files.values())
    data = json.loads(files["json"].read_text())
    validator().validate(data)
    assert data["schema"] == mx.SCHEMA == SCHEMA["properties"]["schema"]["const"]
    assert data["previous_run"] == prev.run_id
    assert {c["target"]: c["kind"] for c in data["trend"]}["v7.2.0-linux-6.1"] == "turned red"
    assert mx.load_run(tmp_path) == run
    # without a previous run, no trend, still valid
    mr.write_reports(run, tmp_path)
    data = json.loads(files["json"].read_text())
    assert "trend" not in data
    validator().validate(data)


def test_schema_lists_every_stage_and_outcome():
    assert tuple(SCHEMA["$defs"]["stage"]["enum"]) == STAGES
    assert tuple(SCHEMA["$defs"]["outcome"]["enum"]) == mx.OUTCOMES
    assert tuple(SCHEMA["$defs"]["change"]["properties"]["kind"]["enum"]) == mr.KINDS


def broken(data: dict, how: str) -> dict:
    data = json.loads(json.dumps(data))
    s = data["targets"][1]["stages"][3]
    if how == "outcome":
        s["outcome"] = "red"
    elif how == "missing key":
        del data["targets"][0]["series_hash"]
    elif how == "absolute link":
        s["links"]["log"] = "/tmp/build.log"
    elif how == "link out of the run":
        s["links"]["log"] = "../other/build.log"
    elif how == "schema 2":
        data["schema"] = 2
    elif how == "seconds":
        s["seconds"] = "13"
    elif how == "unknown stage":
        s["stage"] = "deploy"
    elif how == "extra field":
        data["targets"][0]["colour"] = "green"
    elif how == "trend kind":
        data["trend"][0]["kind"] = "went bad"
    elif how == "time":
        data["started"] = "yesterday"
    return data


@pytest.mark.parametrize("how", ["outcome", "missing key", "absolute link",
                                 "link out of the run", "schema 2", "seconds", "unknown stage",
                                 "extra field", "trend kind", "time"])
def test_schema_rejects_a_broken_record(how):
    data = json.loads(json.dumps(mr.to_json(tonight(), last_night())))   # as written
    validator().validate(data)
    with pytest.raises(jsonschema.ValidationError):
        validator().validate(broken(data, how))


# -- HTML --------------------------------------------------------------------------------------


class Cells(HTMLParser):
    """The matrix's rows and cells, every href, and all text."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[dict]] = []
        self.hrefs: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag in ("td", "th") and self._in_body and self.rows:
            self.rows[-1].append(a)
        elif tag == "a":
            self.hrefs.append(a["href"])

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> Cells:
    p = Cells()
    p.feed(text)
    return p


def test_html_matrix_cells_outcomes_and_links(tmp_path):
    run = tonight()
    write_target_folders(run, tmp_path)
    page = mr.write_reports(run, tmp_path, last_night())["html"].read_text()
    doc = parse(page)
    assert len(doc.rows) == len(run.targets)
    assert all(len(row) == 1 + len(STAGES) + 1 for row in doc.rows)
    for t, row in zip(run.targets, doc.rows):
        assert [c["data-outcome"] for c in row[1:-1]] == [s.outcome for s in t.stages]
        assert all(s.outcome in c["class"].split() for c, s in zip(row[1:-1], t.stages))
        assert row[-1]["data-outcome"] == t.outcome
    assert doc.rows[0][0]["title"] == "commit " + "0" * 40     # the upstream it tested
    red = doc.rows[1][1 + STAGES.index("build")]
    assert red["title"] == "QEMU did not compile: <vmsocket.c:212> error"
    files = [h for h in doc.hrefs if not h.startswith("#")]
    assert f"{run.targets[0].target.name}/target.json" in files
    assert "v7.2.0-linux-6.1/build/build.log" in files
    for href in files:
        assert not href.startswith("/") and "://" not in href
        assert (tmp_path / href).is_file(), href
    anchors = [h[1:] for h in doc.hrefs if h.startswith("#")]
    assert anchors and all(f'id="{a}"' in page for a in anchors)
    text = "".join(doc.text)
    for needle in (run.run_id, run.series_hash, run.project_commit, run.started, run.finished,
                   "turned red: v7.2.0-linux-6.1", "turned green: v10.2.2-linux-6.12",
                   "still red: master-linux-6.12", "download of qemu-10.0.2.tar.xz failed"):
        assert needle in text, needle


def test_html_escapes_everything_from_the_data(tmp_path):
    evil = "<script>alert('x')</script>"
    t = target_result("v10.2.2", "6.1", {"boot-test": FAIL},
                      reasons={"boot-test": f"guest said {evil} & left"})
    bad = replace(t.stages[4], excerpt=f"</pre><img src=x onerror=alert(1)> {evil}",
                  links={'log"><b>x': 'v10.2.2-linux-6.1/boot-test/a "b" <c>.log'})
    t = replace(t, stages=t.stages[:4] + (bad,) + t.stages[5:])
    run = replace(run_of("<b>run</b>", t), project_commit="<i>c</i>", host={"h": evil})
    page = mr.html_report(run, run_of("<prev>", target_result("v10.2.2", "6.1")))
    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert "<i>" not in page and "<prev>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;/pre&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert 'href="v10.2.2-linux-6.1/boot-test/a%20%22b%22%20%3Cc%3E.log"' in page
    doc = parse(page)
    assert doc.tags.count("pre") == 2            # the summary and the one excerpt
    assert f"guest said {evil} & left" in "".join(doc.text)


def test_summary_says_when_there_was_no_previous_run(tmp_path):
    mr.write_reports(tonight(), tmp_path)
    text = (tmp_path / mr.SUMMARY_NAME).read_text()
    assert text.startswith("target ") and "\033[" not in text
    assert "trend: no previous run to compare with" in text


# -- merge ---------------------------------------------------------------------------------


def cell_dir(root: Path, run: MatrixRun) -> Path:
    """A run folder as ``qemupatch nightly --target NAME`` leaves it."""
    d = root / run.run_id
    write_target_folders(run, d)
    mr.write_reports(run, d)
    return d


def cells_of(run: MatrixRun, root: Path) -> list[Path]:
    """The same targets, each run alone (a CI job each)."""
    return [cell_dir(root, replace(run, run_id=f"2026112{7 + i // 10}T07{i % 10}000Z",
                                   targets=(t,), host={"hostname": f"runner-{i}"}))
            for i, t in enumerate(run.targets)]


def test_merge_of_cells_run_apart_reads_like_one_run(tmp_path):
    whole = tonight()
    mr.write_reports(whole, tmp_path / "whole", last_night())
    cells = cells_of(whole, tmp_path / "cells")
    merged = mr.merge(list(reversed(cells)), tmp_path / "merged", last_night())
    assert {t.target.name: t.outcome for t in merged.targets} == \
        {t.target.name: t.outcome for t in whole.targets}
    assert {t.target.name: t for t in merged.targets} == \
        {t.target.name: t for t in whole.targets}
    assert merged.outcome == whole.outcome and merged.series_hash == whole.series_hash
    assert set(merged.merged_from) == {mx.load_run(c).run_id for c in cells}
    assert merged.run_id == "merged"
    assert merged.project_commit == whole.project_commit
    assert set(merged.host["cells"]) == set(merged.merged_from)
    # the same trend, the same rows in the table
    assert mr.trend(merged, last_night()) == mr.trend(whole, last_night())
    def rows(run: MatrixRun) -> list[str]:
        return sorted(mr.table(run).splitlines()[1:1 + len(run.targets)])

    assert rows(merged) == rows(whole)
    # the reports are there and every link of the merged page resolves
    out = tmp_path / "merged"
    assert mx.load_run(out) == merged
    validator().validate(json.loads((out / mr.JSON_NAME).read_text()))
    assert len(ET.parse(out / mr.JUNIT_NAME).getroot().findall("testcase")) == 5 * len(STAGES)
    doc = parse((out / mr.HTML_NAME).read_text())
    links = [h for h in doc.hrefs if not h.startswith("#")]
    assert len(links) > len(whole.targets)
    assert all((out / h).is_file() for h in links)
    assert (out / "v7.2.0-linux-6.1" / "build" / "build.log").read_text() == \
        "v7.2.0-linux-6.1 build log\n"
    # merging again into the same folder replaces, not nests
    again = mr.merge(cells, out)
    assert again.targets == merged.targets
    assert not (out / "v7.2.0-linux-6.1" / "v7.2.0-linux-6.1").exists()


def test_merge_refuses_the_same_target_twice(tmp_path):
    one = cell_dir(tmp_path, run_of("20261127T071500Z", target_result("v10.2.2", "6.1")))
    two = cell_dir(tmp_path, run_of("20261127T081500Z", target_result("v10.2.2", "6.1"),
                                     target_result("v7.2.0", "6.1")))
    with pytest.raises(UserError) as err:
        mr.merge([one, two], tmp_path / "out")
    assert "v10.2.2-linux-6.1" in str(err.value)
    assert str(one) in str(err.value) and str(two) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_merge_refuses_different_series(tmp_path):
    one = cell_dir(tmp_path, run_of("20261127T071500Z", target_result("v10.2.2", "6.1")))
    other = run_of("20261127T081500Z", target_result("v7.2.0", "6.1", series="0ther5eries"),
                   series="0ther5eries")
    two = cell_dir(tmp_path, other)
    with pytest.raises(UserError, match="different series") as err:
        mr.merge([one, two], tmp_path / "out")
    assert "5e41e5deadbe" in str(err.value) and "0ther5eries" in str(err.value)


def test_merge_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        mr.merge([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no matrix run record"):
        mr.merge([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(UserError, match="at least one"):
        mr.merge([], tmp_path / "out")
    lonely = tmp_path / "lonely"
    mr.write_reports(run_of("20261127T071500Z", target_result("v10.2.2", "6.1")), lonely)
    with pytest.raises(UserError, match="no v10.2.2-linux-6.1/ folder"):
        mr.merge([lonely], tmp_path / "out")
    ok = cell_dir(tmp_path, run_of("20261127T091500Z", target_result("v7.2.0", "6.1")))
    with pytest.raises(UserError, match="cannot also be one of its inputs"):
        mr.merge([ok], ok)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qemupatch", "-C", str(ROOT), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


def test_cli_report_merge(tmp_path):
    cells = cells_of(tonight(), tmp_path / "cells")
    prev = tmp_path / "prev"
    mr.write_reports(last_night(), prev)
    res = cli("report", "merge", *map(str, cells), "--out", str(tmp_path / "m"),
              "--previous", str(prev))
    assert res.returncode == 1, res.stderr          # a required target is red
    assert "turned red: v7.2.0-linux-6.1 (build)" in res.stdout
    assert f"report: {tmp_path / 'm' / 'index.html'}" in res.stdout
    assert mx.load_run(tmp_path / "m").merged_from
    green = cells_of(run_of("20261127T071500Z", target_result("v10.2.2", "6.1")),
                     tmp_path / "green")
    assert cli("report", "merge", *map(str, green), "--out", str(tmp_path / "g")).returncode == 0
    res = cli("report", "merge", str(cells[0]), str(cells[0]), "--out", str(tmp_path / "d"))
    assert res.returncode == 2 and "in two runs to merge" in res.stderr
    res = cli("report", "merge", str(tmp_path / "nope"), "--out", str(tmp_path / "d"))
    assert res.returncode == 2 and "nope" in res.stderr


# -- the real nightly's cells, merged ----------------------------------------------------


MATRIX_TOML = """
[[kernel]]
name = "6.1"
suite = "bookworm"
image_package = "linux-image-6.1.0-56-amd64"

[[kernel]]
name = "6.12"
suite = "trixie"
image_package = "linux-image-6.12.117+deb13-amd64"

[matrix]
releases = ["v2.0.0", "v2.1.0"]
kernels = ["6.1", "6.12"]
"""


def nightly_cells_and_whole(proj: Project, out: Path) -> tuple[list[Path], Path]:
    """The synthetic project's matrix (v2.0.0 green, v2.1.0 red: a real
    conflict) through the real nightly's fetch and rebase: each target on
    its own with ``qemupatch nightly --target``, as CI runners do, and all
    of them in one run."""
    with open(proj.root / "qemupatch.toml", "a") as f:
        f.write(MATRIX_TOML)
    names = [t.name for t in mx.targets(proj.cfg)]
    cells = []
    for name in names:
        cells.append(out / "cells" / name)
        proj.cli("nightly", "--target", name, "--stages", "fetch,rebase", "--out",
                 str(cells[-1]), check_code=None)
    proj.cli("nightly", "--stages", "fetch,rebase", "--out", str(out / "whole"), check_code=1)
    return cells, out / "whole"


def test_real_nightly_cells_merged_read_like_one_run(lists_project, tmp_path):
    cells, whole_dir = nightly_cells_and_whole(lists_project, tmp_path)
    res = lists_project.cli("report", "merge", *map(str, cells), "--out",
                            str(tmp_path / "merged"), check_code=1)
    merged, whole = mx.load_run(tmp_path / "merged"), mx.load_run(whole_dir)
    assert "FAIL: 4 targets (2 pass, 2 fail)" in res.stdout
    assert len(merged.merged_from) == 4
    def outcomes(run: MatrixRun) -> dict:
        return {(t.target.name, s.stage): (s.outcome, s.reason)
                for t in run.targets for s in t.stages}

    assert outcomes(merged) == outcomes(whole)
    assert merged.run_id == "merged"
    assert set(merged.merged_from) == {c.name for c in cells}
    assert {t.target.name: t.outcome for t in merged.targets} == {
        "v2.0.0-linux-6.1": PASS, "v2.0.0-linux-6.12": PASS,
        "v2.1.0-linux-6.1": FAIL, "v2.1.0-linux-6.12": FAIL}
    assert merged.series_hash == whole.series_hash and merged.outcome == whole.outcome == FAIL
    for t in merged.targets:
        for s in t.stages:
            for path in s.links.values():
                assert (tmp_path / "merged" / path).is_file(), path
    red = merged.target("v2.1.0-linux-6.1").stage("rebase")
    assert "real.c" in red.reason + red.excerpt
    validator().validate(json.loads((tmp_path / "merged" / mr.JSON_NAME).read_text()))
    validator().validate(json.loads((whole_dir / mr.JSON_NAME).read_text()))
