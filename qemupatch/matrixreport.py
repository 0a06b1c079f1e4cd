"""The nightly's reports, from a :class:`~qemupatch.matrix.MatrixRun` alone.

A run folder (docs/nightly.md) gets four views of the same data, so that a
terminal, a CI test tab, a browser and a script each read what suits them::

    summary.txt         table(): target x stage, the outcome and seconds per
                        cell, the run's outcome, counts, time and trend
    nightly.json        matrix.run_to_json() plus the trend (the schema is
                        docs/nightly.schema.json, version matrix.SCHEMA)
    nightly.junit.xml   one testcase per target x stage (records.junit_xml)
    index.html          the matrix at a glance, each cell linking to its
                        stage's files, every red cell's reason and excerpt,
                        the trend against the previous run; static, no
                        script, no external asset (it is a CI artifact)

:func:`merge` combines run folders of single cells (``qemupatch nightly
--target NAME`` on several CI runners) into one run folder with the same
reports, so a matrix fanned out over CI reads like one run on one machine.
"""

from __future__ import annotations

import html
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from qemupatch import matrix as mx
from qemupatch.errors import UserError
from qemupatch.matrix import (
    FAIL,
    INFRA,
    PASS,
    SKIP,
    MatrixRun,
    StageResult,
    TargetResult,
)
from qemupatch.records import Case, atomic_write, junit_xml, write_json

JSON_NAME = mx.RESULT_NAME
JUNIT_NAME = "nightly.junit.xml"
HTML_NAME = "index.html"
SUMMARY_NAME = "summary.txt"

# Trend kinds, in the order a maintainer wants to read them.
TURNED_RED = "turned red"
TURNED_INFRA = "turned infra"
STILL_RED = "still red"
STILL_INFRA = "still infra"
TURNED_GREEN = "turned green"
KINDS = (TURNED_RED, TURNED_INFRA, STILL_RED, STILL_INFRA, TURNED_GREEN)

ANSI = {PASS: "\033[32m", FAIL: "\033[1;31m", INFRA: "\033[33m", SKIP: "\033[90m"}
ANSI_RESET = "\033[0m"
MISSING = "-"   # a stage the target has no record of
INFRA_PREFIX = "infrastructure: "


# -- trend ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One target whose outcome moved (or stayed red) since the previous run.
    ``before`` is "" for a target the previous run did not have; ``stage``
    is the first stage that did not pass now (red/infra) or before (green)."""

    target: str
    kind: str
    before: str
    after: str
    stage: str = ""


def _first_bad(t: TargetResult | None) -> str:
    if t is None:
        return ""
    bad = next((s for s in t.stages if s.outcome in (FAIL, INFRA)), None)
    return bad.stage if bad else ""


def trend(run: MatrixRun, previous: MatrixRun | None) -> list[Change]:
    """What turned red, turned green or stayed red since ``previous``.
    Targets the previous run did not cover count as having been green, so
    a new red target shows; targets this run did not cover are not news
    (a ``--target`` run covers one cell)."""
    if previous is None:
        return []
    changes = []
    for t in run.targets:
        old = previous.target(t.target.name)
        before = old.outcome if old is not None else ""
        after = t.outcome
        kind = None
        if after == FAIL:
            kind = STILL_RED if before == FAIL else TURNED_RED
        elif after == INFRA:
            kind = STILL_INFRA if before == INFRA else TURNED_INFRA
        elif after == PASS and before in (FAIL, INFRA):
            kind = TURNED_GREEN
        if kind:
            stage = _first_bad(old) if kind == TURNED_GREEN else _first_bad(t)
            changes.append(Change(t.target.name, kind, before, after, stage))
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(changes, key=lambda c: order[c.kind])


def trend_lines(changes: Sequence[Change], previous: MatrixRun | None) -> list[str]:
    """The trend in words, one line per kind that has targets."""
    if previous is None:
        return ["trend: no previous run to compare with"]
    if not changes:
        return [f"trend: no change since {previous.run_id} (nothing red)"]
    lines = [f"trend since {previous.run_id}:"]
    for kind in KINDS:
        these = [c for c in changes if c.kind == kind]
        if these:
            lines.append(f"  {kind}: " + ", ".join(
                f"{c.target}" + (f" ({c.stage})" if c.stage else "") for c in these))
    return lines


# -- the terminal table --------------------------------------------------------------


def _cell_text(s: StageResult | None) -> str:
    if s is None:
        return MISSING
    if s.outcome == SKIP:
        return SKIP
    text = f"{s.outcome} {s.seconds:.0f}s"
    if len(s.attempts) > 1:
        text += f" x{len(s.attempts)}"
    return text


def _paint(text: str, width: int, outcome: str | None, color: bool) -> str:
    padded = f"{text:<{width}}"
    if not color or outcome not in ANSI:
        return padded
    return f"{ANSI[outcome]}{padded}{ANSI_RESET}"


def _seconds_between(start: str, end: str) -> float | None:
    try:
        a = datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ")
        b = datetime.strptime(end, "%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError):
        return None
    return (b - a).total_seconds()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def exit_code(run: MatrixRun) -> int:
    """0: every required target green; 1: a real failure; 3: only the
    machine let us down (the nightly's own exit codes)."""
    return {FAIL: 1, INFRA: 3}.get(run.outcome, 0)


def counts(run: MatrixRun) -> dict[str, int]:
    """How many targets ended in each outcome."""
    found = {o: 0 for o in mx.OUTCOMES}
    for t in run.targets:
        found[t.outcome] += 1
    return found


def footer(run: MatrixRun, previous: MatrixRun | None = None, *,
           with_trend: bool = True) -> list[str]:
    """The run's outcome, counts, time and (``with_trend``) the trend."""
    c = counts(run)
    shown = ", ".join(f"{n} {o}" for o, n in c.items() if n)
    work = sum(s.seconds for t in run.targets for s in t.stages)
    if run.finished:
        elapsed = _seconds_between(run.started, run.finished)
        wall = f"{_duration(elapsed)} wall" if elapsed is not None else "wall time unknown"
    else:   # a partial record, rewritten after every target
        last = max((t.finished for t in run.targets if t.finished), default="")
        elapsed = _seconds_between(run.started, last)
        wall = "still running" + (f", {_duration(elapsed)} so far" if elapsed is not None else "")
    timing = f"{wall}, {_duration(work)} of stage time"
    lines = [(f"run {run.run_id}: {run.outcome.upper()}: {len(run.targets)} targets "
             f"({shown or 'none'}); {timing}")]
    if run.merged_from:
        lines.append(f"merged from {len(run.merged_from)} runs: {', '.join(run.merged_from)}")
    return lines + (trend_lines(trend(run, previous), previous) if with_trend else [])


def table(run: MatrixRun, *, color: bool = False, previous: MatrixRun | None = None) -> str:
    """Target x stage: each cell the outcome and seconds (``x2``: tried
    twice), coloured with ANSI when ``color`` (green pass, red fail, yellow
    infra, grey skip); the target's outcome last; then the footer, with
    the trend when ``previous`` is given (None: the caller did not say)."""
    names = [t.target.name + ("" if t.target.required else " (watched)") for t in run.targets]
    width = max([len(n) for n in names] + [len("target")])
    cells = [[_cell_text(t.stage(s)) for s in run.stages] for t in run.targets]
    widths = [max([len(s)] + [len(row[i]) for row in cells]) for i, s in enumerate(run.stages)]
    head = [f"{'target':<{width}}"] + [f"{s:<{w}}" for s, w in zip(run.stages, widths)]
    lines = ["  ".join(head + ["outcome"])]
    for t, name, row in zip(run.targets, names, cells):
        parts = [f"{name:<{width}}"]
        for stage, text, w in zip(run.stages, row, widths):
            s = t.stage(stage)
            parts.append(_paint(text, w, s.outcome if s else None, color))
        parts.append(_paint(t.outcome.upper() if t.outcome in (FAIL, INFRA) else t.outcome,
                            0, t.outcome, color))
        lines.append("  ".join(parts).rstrip())
    lines += footer(run, previous, with_trend=previous is not None)
    return "\n".join(lines)


# -- JUnit -----------------------------------------------------------------------------


def _links_text(s: StageResult) -> str:
    return "".join(f"{label}: {path}\n" for label, path in s.links.items())


def _attempts_text(s: StageResult) -> str:
    return "".join(f"attempt {a.number}: {a.outcome} after {a.seconds:.1f} s (started "
                   f"{a.started}){': ' + a.error.splitlines()[0] if a.error else ''}\n"
                   for a in s.attempts)


def junit(run: MatrixRun) -> str:
    """One testcase per target x stage: classname the target, name the
    stage; an infra failure is a failure whose message starts with
    ``infrastructure:``; the failure text is the reason and the excerpt."""
    cases = []
    for t in run.targets:
        for stage in run.stages:
            s = t.stage(stage)
            if s is None:
                cases.append(Case(t.target.name, stage, "skip", None, "not recorded"))
                continue
            extra = _attempts_text(s) + _links_text(s)
            if s.outcome == PASS:
                cases.append(Case(t.target.name, stage, "pass", s.seconds, output=extra or None))
            elif s.outcome == SKIP:
                cases.append(Case(t.target.name, stage, "skip", s.seconds,
                                  s.reason or "skipped"))
            else:
                reason = s.reason or f"{stage} {s.outcome}"
                if s.outcome == INFRA:
                    reason = INFRA_PREFIX + reason
                detail = reason + (f"\n\n{s.excerpt}" if s.excerpt else "")
                cases.append(Case(t.target.name, stage, "fail", s.seconds, detail,
                                  output=extra or None))
    elapsed = _seconds_between(run.started, run.finished)
    return junit_xml(f"qemupatch nightly {run.run_id}", cases, seconds=elapsed)


# -- JSON ------------------------------------------------------------------------------


def to_json(run: MatrixRun, previous: MatrixRun | None = None) -> dict:
    """nightly.json: the run, plus the trend when there is a previous run."""
    data = mx.run_to_json(run)
    if previous is not None:
        data["previous_run"] = previous.run_id
        data["trend"] = [asdict(c) for c in trend(run, previous)]
    return data


# -- HTML ------------------------------------------------------------------------------


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 .outcome { font-size: 0.7em; padding: 0.1em 0.5em; border-radius: 0.3em; }
table.matrix { border-collapse: collapse; margin: 1em 0; }
table.matrix th, table.matrix td { border: 1px solid #bbb; padding: 0.35em 0.6em;
  vertical-align: top; text-align: left; }
table.matrix td { min-width: 7em; max-width: 18em; }
.pass { background: #c8ecc8; } .fail { background: #f5b5b5; }
.infra { background: #f7e59a; } .skip { background: #e4e4e4; color: #666; }
.missing { background: #fff; color: #999; }
.cell .label { font-weight: bold; } .cell .secs { color: #444; font-size: 0.9em; }
.cell .reason { font-size: 0.85em; margin-top: 0.2em; overflow-wrap: anywhere; }
.cell .links a, .detail .links a { font-size: 0.85em; margin-right: 0.5em; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.meta dt { font-weight: bold; } dl.meta dd { margin: 0; font-family: monospace; }
pre.excerpt { background: #f6f6f6; border: 1px solid #ddd; padding: 0.6em;
  overflow-x: auto; max-height: 30em; }
section.detail { border-left: 0.4em solid #d33; padding-left: 0.8em; margin: 1em 0; }
section.detail.infra { border-left-color: #cb0; background: none; }
section.detail.fail { background: none; }
.trend li { margin: 0.2em 0; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _href(path: str) -> str:
    return _e(quote(str(path), safe="/"))


def _anchor(target: str, stage: str) -> str:
    return "detail-" + re.sub(r"[^A-Za-z0-9_.-]", "-", f"{target}--{stage}")


def _short(text: str, limit: int = 240) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _links_html(s: StageResult) -> str:
    if not s.links:
        return ""
    return ('<div class="links">' + " ".join(
        f'<a href="{_href(path)}">{_e(label)}</a>' for label, path in s.links.items())
        + "</div>")


def _cell_html(t: TargetResult, stage: str) -> str:
    s = t.stage(stage)
    if s is None:
        return (f'<td class="cell missing" data-outcome="missing" data-stage="{_e(stage)}" '
                f'title="no record">{MISSING}</td>')
    title = s.reason or s.outcome
    body = f'<span class="label">{_e(s.outcome)}</span>'
    if s.outcome != SKIP:
        body += f' <span class="secs">{s.seconds:.0f} s</span>'
        if len(s.attempts) > 1:
            body += f' <span class="secs">({len(s.attempts)} attempts)</span>'
    if s.outcome in (FAIL, INFRA):
        body += (f'<div class="reason">{_e(_short(s.reason or s.outcome))} '
                 f'<a href="#{_anchor(t.target.name, stage)}">details</a></div>')
    body += _links_html(s)
    return (f'<td class="cell {_e(s.outcome)}" data-outcome="{_e(s.outcome)}" '
            f'data-stage="{_e(stage)}" title="{_e(title)}">{body}</td>')


def _detail_html(t: TargetResult, s: StageResult) -> str:
    attempts = "".join(
        f"<li>attempt {a.number}: {_e(a.outcome)} after {a.seconds:.1f} s, started "
        f"{_e(a.started)}{': ' + _e(_short(a.error, 300)) if a.error else ''}</li>"
        for a in s.attempts)
    kind = "infrastructure failure" if s.outcome == INFRA else "failure"
    return (f'<section class="detail {_e(s.outcome)}" id="{_anchor(t.target.name, s.stage)}" '
            f'data-target="{_e(t.target.name)}" data-stage="{_e(s.stage)}">'
            f"<h3>{_e(t.target.name)} · {_e(s.stage)}: {kind}</h3>"
            f'<p class="reason">{_e(s.reason or s.outcome)}</p>'
            + (f'<pre class="excerpt">{_e(s.excerpt)}</pre>' if s.excerpt else "")
            + (f"<ul class=\"attempts\">{attempts}</ul>" if attempts else "")
            + _links_html(s) + "</section>")


def _trend_html(run: MatrixRun, previous: MatrixRun | None) -> str:
    if previous is None:
        return '<p class="trend none">No previous run to compare with.</p>'
    changes = trend(run, previous)
    head = (f"<p>Against run <code>{_e(previous.run_id)}</code> (finished "
            f"{_e(previous.finished)}, {_e(previous.outcome)}).</p>")
    if not changes:
        return head + '<p class="trend none">No change: nothing turned red, nothing is red.</p>'
    items = []
    for c in changes:
        was = c.before or "not in that run"
        at = f" at {_e(c.stage)}" if c.stage else ""
        items.append(f'<li data-kind="{_e(c.kind)}" data-target="{_e(c.target)}">'
                     f"<strong>{_e(c.kind)}</strong>: {_e(c.target)} "
                     f"(was {_e(was)}, now {_e(c.after)}{at})</li>")
    return head + '<ul class="trend">' + "".join(items) + "</ul>"


def html_report(run: MatrixRun, previous: MatrixRun | None = None) -> str:
    """index.html: escaped, self-contained, readable without a script."""
    head_cells = "".join(f'<th scope="col">{_e(s)}</th>' for s in run.stages)
    rows = []
    for t in run.targets:
        name = t.target.name
        watched = "" if t.target.required else ' <small>(watched)</small>'
        up = ", ".join(f"{k} {v}" for k, v in t.upstream.items() if v)
        cells = "".join(_cell_html(t, s) for s in run.stages)
        rows.append(
            f'<tr data-target="{_e(name)}"><th scope="row" title="{_e(up or name)}">'
            f'<a href="{_href(f"{name}/{mx.TARGET_RESULT_NAME}")}">{_e(name)}</a>{watched}</th>'
            f'{cells}<td class="outcome {_e(t.outcome)}" data-outcome="{_e(t.outcome)}">'
            f"<strong>{_e(t.outcome)}</strong></td></tr>")
    details = [_detail_html(t, s) for t in run.targets for s in t.stages
               if s.outcome in (FAIL, INFRA)]
    c = counts(run)
    meta = [("run", run.run_id), ("outcome", run.outcome), ("series hash", run.series_hash),
            ("project commit", run.project_commit or "unknown"), ("started", run.started),
            ("finished", run.finished or "not yet: the run is still going"),
            ("targets", ", ".join(f"{n} {o}" for o, n in c.items() if n) or "none")]
    if run.merged_from:
        meta.append(("merged from", ", ".join(run.merged_from)))
    if run.host:
        meta.append(("host", ", ".join(f"{k}={v}" for k, v in run.host.items())))
    meta_html = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in meta)
    summary = "\n".join(footer(run, previous))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>qemupatch nightly {_e(run.run_id)}: {_e(run.outcome)}</title>"
        f"<style>{CSS}</style></head><body>"
        f'<h1>qemupatch nightly <span class="outcome {_e(run.outcome)}" id="run-outcome">'
        f"{_e(run.outcome)}</span></h1>"
        f'<dl class="meta">{meta_html}</dl>'
        "<h2>Matrix</h2>"
        '<p class="legend"><span class="pass">&nbsp;pass&nbsp;</span> '
        '<span class="fail">&nbsp;fail: the series&nbsp;</span> '
        '<span class="infra">&nbsp;infra: the machine (download, engine, disk)&nbsp;</span> '
        '<span class="skip">&nbsp;skip&nbsp;</span> · each cell links to its stage\'s files; '
        "each target to its target.json</p>"
        f'<table class="matrix" id="matrix"><thead><tr><th scope="col">target</th>{head_cells}'
        f'<th scope="col">outcome</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
        f'<pre class="summary">{_e(summary)}</pre>'
        f'<h2>Trend</h2><div id="trend">{_trend_html(run, previous)}</div>'
        f'<h2>Failures</h2><div id="failures">'
        + ("".join(details) or "<p>None: no stage failed.</p>")
        + "</div></body></html>\n")


# -- writing and merging ------------------------------------------------------------


def summary(run: MatrixRun, previous: MatrixRun | None = None) -> str:
    """summary.txt: the table without colour, and the trend (or that there
    was no previous run)."""
    text = table(run, color=False, previous=previous)
    if previous is None:
        text += "\n" + "\n".join(trend_lines([], None))
    return text + "\n"


def write_reports(run: MatrixRun, run_dir: Path,
                  previous: MatrixRun | None = None) -> dict[str, Path]:
    """nightly.json, nightly.junit.xml, index.html and summary.txt in
    ``run_dir``, each written atomically (a partial run stays readable)."""
    run_dir = Path(run_dir)
    return {
        "json": write_json(run_dir / JSON_NAME, to_json(run, previous)),
        "junit": atomic_write(run_dir / JUNIT_NAME, junit(run)),
        "html": atomic_write(run_dir / HTML_NAME, html_report(run, previous)),
        "summary": atomic_write(run_dir / SUMMARY_NAME, summary(run, previous)),
    }


def _natural(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def _matrix_order(t: TargetResult) -> tuple:
    """Required targets by release then kernel, version-wise (v7.2.0 before
    v10.0.2), then the watched ones, as the matrix lists them."""
    return (not t.target.required, _natural(t.target.release), _natural(t.target.kernel))


def merge(cell_dirs: Sequence[Path], out_dir: Path,
          previous: MatrixRun | None = None) -> MatrixRun:
    """One run from the run folders of cells run apart: the union of their
    targets (each at most once), their target folders copied into
    ``out_dir`` so that every link resolves, and the reports written.  Its
    run id is ``out_dir``'s name (as a nightly's), ``merged_from`` lists the
    cells' run ids, and it spans the first cell's start to the last's end."""
    if not cell_dirs:
        raise UserError("report merge needs at least one nightly run folder")
    out_dir = Path(out_dir)
    runs: list[tuple[Path, MatrixRun]] = []
    for d in cell_dirs:
        d = Path(d)
        if not d.is_dir():
            raise UserError(f"{d}: not a nightly run folder (no such directory)")
        if out_dir.exists() and d.resolve() == out_dir.resolve():
            raise UserError(f"{d}: the merge's output folder cannot also be one of its inputs")
        runs.append((d, mx.load_run(d)))
    hashes = {r.series_hash for _, r in runs}
    if len(hashes) > 1:
        shown = "; ".join(f"{d}: {r.series_hash[:12]}" for d, r in runs)
        raise UserError(f"cannot merge runs of different series: {shown}")
    seen: dict[str, Path] = {}
    targets: list[TargetResult] = []
    for d, r in runs:
        for t in r.targets:
            name = t.target.name
            if name in seen:
                raise UserError(f"target {name} is in two runs to merge: {seen[name]} and {d}")
            if not (d / name).is_dir():
                raise UserError(f"{d}: the run records target {name} but has no {name}/ "
                                f"folder (its links would not resolve)")
            seen[name] = d
            targets.append(t)
    stages = [s for s in mx.STAGES if any(s in r.stages for _, r in runs)]
    stages += [s for _, r in runs for s in r.stages if s not in stages]
    commits = sorted({r.project_commit for _, r in runs if r.project_commit})
    hosts = {r.run_id: r.host for _, r in runs if r.host}
    merged = MatrixRun(
        run_id=out_dir.name,            # as the nightly's: the run folder's name
        series_hash=hashes.pop(),
        started=min(r.started for _, r in runs),
        finished=max(r.finished for _, r in runs),
        targets=tuple(sorted(targets, key=_matrix_order)),
        stages=tuple(dict.fromkeys(stages)),
        project_commit=commits[0] if len(commits) == 1 else ",".join(commits),
        host={"cells": hosts} if hosts else {},
        merged_from=tuple(r.run_id for _, r in runs))
    out_dir.mkdir(parents=True, exist_ok=True)
    for t in merged.targets:
        src, dest = seen[t.target.name] / t.target.name, out_dir / t.target.name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(src, dest, symlinks=True)
    write_reports(merged, out_dir, previous)
    return merged
