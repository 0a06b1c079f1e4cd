"""How a build reports progress: stages and output lines, never results.

    Progress            the protocol build.execute() talks to
    NullProgress        says nothing (tests, library callers)
    TerminalProgress    a rich bar on a terminal, plain lines otherwise
    stage_lines(p)      an on_line callback that also turns the build
                        scripts' ``== <stage>`` markers into p.stage()
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Protocol

NINJA_STEP_RE = re.compile(r"^\[(\d+)/(\d+)\]")
STAGE_MARKER = "== "


class Progress(Protocol):
    def stage(self, name: str) -> None: ...
    def line(self, text: str) -> None: ...
    def close(self) -> None: ...


class NullProgress:
    def stage(self, name: str) -> None:
        pass

    def line(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class LineProgress(NullProgress):
    """A build's stages and every quarter of ninja's steps, as lines to
    ``say`` (the nightly and patch-builds, where many builds share one
    output)."""

    def __init__(self, say: Callable[[str], None], prefix: str):
        self.say, self.prefix, self.quarter = say, prefix, -1

    def stage(self, name: str) -> None:
        self.quarter = -1
        self.say(f"{self.prefix}: {name}")

    def line(self, text: str) -> None:
        if m := NINJA_STEP_RE.match(text):
            done, total = int(m.group(1)), int(m.group(2))
            if (q := done * 4 // max(total, 1)) > self.quarter:
                self.quarter = q
                self.say(f"{self.prefix}: {done}/{total}")


class TerminalProgress:
    """Stage and percent of ninja steps: a rich bar on a terminal, plain
    lines (one per stage and every 10 %) otherwise, so CI logs stay short."""

    def __init__(self, file=None, *, rich: bool | None = None):
        self.file = file or sys.stderr
        use_rich = self.file.isatty() if rich is None else rich
        self._rich = None
        self._task = None
        self._stage = ""
        self._last_tenth = -1
        if use_rich:
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                console=Console(file=self.file), transient=False)
            self._rich.start()

    def stage(self, name: str) -> None:
        self._stage = name
        self._last_tenth = -1
        if self._rich is not None:
            if self._task is not None:
                self._rich.update(self._task, completed=100, total=100)
            self._task = self._rich.add_task(name, total=None)
        else:
            print(f"[qemupatch build] {name}", file=self.file, flush=True)

    def line(self, text: str) -> None:
        if text.startswith("qemupatch: "):      # notices from the engine
            if self._rich is not None:
                self._rich.console.print(text, markup=False, highlight=False)
            else:
                print(text, file=self.file, flush=True)
            return
        m = NINJA_STEP_RE.match(text)
        if not m:
            return
        done, total = int(m.group(1)), int(m.group(2))
        if self._rich is not None and self._task is not None:
            self._rich.update(self._task, completed=done, total=total)
            return
        tenth = done * 10 // max(total, 1)
        if tenth > self._last_tenth:
            self._last_tenth = tenth
            print(f"[qemupatch build] {self._stage}: {done}/{total} "
                  f"({100 * done // max(total, 1)}%)", file=self.file, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


def stage_lines(progress: Progress) -> Callable[[str], None]:
    """Build scripts announce their stages as ``== configure`` lines."""
    def on_line(line: str) -> None:
        if line.startswith(STAGE_MARKER):
            progress.stage(line[len(STAGE_MARKER):])
        progress.line(line)
    return on_line
