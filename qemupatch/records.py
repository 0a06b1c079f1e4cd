"""The one place results are written: atomic files, JUnit XML, the clock.

Every record qemupatch leaves (``build.json``, ``boot-test.json``,
``pipeline.json``, reports) goes through :func:`atomic_write`, so a reader,
or a run killed half-way, never sees half a file.  Every JUnit file comes
from :func:`junit_xml`, and every timestamp from :func:`utc_now`.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

PASS, FAIL, SKIP = "pass", "fail", "skip"


def utc_now() -> str:
    """Now, in UTC, to the second: ``2026-11-27T03:21:25Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_stamp() -> str:
    """Now as a name part that sorts and never repeats within a run:
    ``20261127T032125.123456Z`` (backup refs)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def atomic_write(path: Path, data: str | bytes, *, sync: bool = False) -> Path:
    """Write ``path`` through a sibling temporary file and a rename;
    ``sync``: on disk before the rename (state that must survive a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: Path, data: object) -> Path:
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@dataclass(frozen=True)
class Case:
    """One JUnit testcase.  ``status`` is pass, fail or skip; ``detail`` is
    the failure text (its first line becomes the message); ``output`` goes
    to ``system-out``."""

    classname: str
    name: str
    status: str = PASS
    seconds: float | None = None
    detail: str = ""
    output: str | None = None


def junit_xml(suite: str, cases: Sequence[Case], *, seconds: float | None = None,
              error: str | None = None) -> str:
    """A ``<testsuite>`` document; ``error`` goes to the suite's ``system-err``."""
    root = ET.Element("testsuite", name=suite, tests=str(len(cases)),
                      failures=str(sum(c.status == FAIL for c in cases)),
                      skipped=str(sum(c.status == SKIP for c in cases)))
    if seconds is not None:
        root.set("time", f"{seconds:.3f}")
    for c in cases:
        tc = ET.SubElement(root, "testcase", classname=c.classname, name=c.name)
        if c.seconds is not None:
            tc.set("time", f"{c.seconds:.3f}")
        first = c.detail.splitlines()[0][:200] if c.detail else c.status
        if c.status == FAIL:
            ET.SubElement(tc, "failure", message=first).text = c.detail
        elif c.status == SKIP:
            ET.SubElement(tc, "skipped", message=first)
        if c.output is not None:
            ET.SubElement(tc, "system-out").text = c.output
    if error:
        ET.SubElement(root, "system-err").text = error
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(path: Path, suite: str, cases: Sequence[Case], **kwargs) -> Path:
    return atomic_write(path, junit_xml(suite, cases, **kwargs))
