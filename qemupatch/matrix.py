"""The nightly matrix as data: its targets, and what a run of them found.

Targets come from ``[matrix]`` in ``qemupatch.toml``: every supported
release × every listed guest kernel, plus ``[[matrix.include]]`` cells (a
newer kernel on one release, a moving git branch).  A target marked
``required = false`` is watched but never gates a release.

A run is plain data: a :class:`MatrixRun` holds one :class:`TargetResult`
per target, each holding one :class:`StageResult` per stage, each holding
every :class:`Attempt` (an infrastructure failure is retried).  The nightly
produces it, the reports render it, ``report merge`` combines cells run
apart, and ``release`` reads it to decide whether a tag may be made.
It round-trips through JSON (:func:`run_to_json`, :func:`run_from_json`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qemupatch.config import CONFIG_NAME, Config
from qemupatch.errors import BuildError, CompileFailed, InfraError, UserError
from qemupatch.run import git

SCHEMA = 1
# The stages of one target, in order.  patch-builds: each patch of the
# series builds on its own (incrementally, after the one before it).
# fuzz: the series' qtest and the seeded fuzzer against an ASan+UBSan build.
STAGES = ("fetch", "rebase", "patch-builds", "build", "boot-test", "qtest", "fuzz")
# What each stage needs to have passed: a failure skips only the stages that
# depend on it (a patch that does not build alone still lets the whole
# series be built, booted and fuzzed).
NEEDS = {"rebase": ("fetch",), "patch-builds": ("rebase",), "build": ("rebase",),
         "boot-test": ("build",), "qtest": ("build",), "fuzz": ("rebase",)}


def needs(stage: str) -> set[str]:
    """Every stage ``stage`` depends on, directly or not."""
    found: set[str] = set()
    todo = list(NEEDS.get(stage, ()))
    while todo:
        s = todo.pop()
        if s not in found:
            found.add(s)
            todo += NEEDS.get(s, ())
    return found

PASS, FAIL, INFRA, SKIP = "pass", "fail", "infra", "skip"
OUTCOMES = (PASS, FAIL, INFRA, SKIP)

RESULT_NAME = "nightly.json"       # a run's (or a merged report's) record
TARGET_RESULT_NAME = "target.json"  # one target's record, in its own folder


@dataclass(frozen=True)
class Target:
    """One cell: an upstream release and a guest kernel."""

    release: str
    kernel: str
    required: bool = True   # False: watched (a moving branch), never gates a release

    @property
    def name(self) -> str:
        return f"{self.release}-linux-{self.kernel}"


@dataclass(frozen=True)
class Attempt:
    number: int
    outcome: str
    seconds: float
    started: str
    error: str = ""


@dataclass(frozen=True)
class StageResult:
    """One stage of one target.  ``reason``: one line a maintainer reads
    first; ``excerpt``: the console or compiler lines behind it; ``links``:
    label -> path relative to the run folder (logs, reports, provenance)."""

    stage: str
    outcome: str
    seconds: float = 0.0
    reason: str = ""
    excerpt: str = ""
    attempts: tuple[Attempt, ...] = ()
    figures: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TargetResult:
    target: Target
    stages: tuple[StageResult, ...]
    series_hash: str
    started: str = ""
    finished: str = ""
    upstream: dict = field(default_factory=dict)   # commit, sha256, origin

    @property
    def outcome(self) -> str:
        """fail if any stage failed, else infra if the machine let it down,
        else pass (stages skipped because they were not asked for do not
        make a target red)."""
        outcomes = {s.outcome for s in self.stages}
        for worst in (FAIL, INFRA):
            if worst in outcomes:
                return worst
        return PASS if PASS in outcomes else SKIP

    def stage(self, name: str) -> StageResult | None:
        return next((s for s in self.stages if s.stage == name), None)


@dataclass(frozen=True)
class MatrixRun:
    run_id: str
    series_hash: str
    started: str
    finished: str
    targets: tuple[TargetResult, ...]
    stages: tuple[str, ...] = STAGES
    project_commit: str = ""
    host: dict = field(default_factory=dict)
    merged_from: tuple[str, ...] = ()
    schema: int = SCHEMA

    @property
    def outcome(self) -> str:
        outcomes = {t.outcome for t in self.targets if t.target.required}
        for worst in (FAIL, INFRA):
            if worst in outcomes:
                return worst
        return PASS if self.targets else SKIP

    def target(self, name: str) -> TargetResult | None:
        return next((t for t in self.targets if t.target.name == name), None)


def targets(cfg: Config) -> tuple[Target, ...]:
    """Every target of the matrix in ``cfg``, in a stable order."""
    matrix = cfg.matrix
    found = [Target(r, k) for r in matrix.releases for k in matrix.kernels]
    found += [Target(c["release"], c["kernel"], c.get("required", True))
              for c in matrix.include]
    for t in found:
        if cfg.release(t.release) is None:
            raise UserError(f"[matrix] names release '{t.release}', which has no "
                            f"[[release]] table in qemupatch.toml")
        cfg.kernel(t.kernel)
    names = [t.name for t in found]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise UserError(f"[matrix] lists the same target twice: {', '.join(dupes)}")
    return tuple(found)


def find_target(cfg: Config, name: str) -> Target:
    for t in targets(cfg):
        if t.name == name:
            return t
    known = ", ".join(t.name for t in targets(cfg))
    raise UserError(f"no matrix target '{name}'; known: {known}")


def classify(exc: BaseException) -> str:
    """INFRA when the machine let us down (download, engine, disk, a killed
    container, a command that could not run), FAIL when the series did."""
    if isinstance(exc, CompileFailed):
        return FAIL
    if isinstance(exc, (InfraError, BuildError)):
        return INFRA
    if isinstance(exc, OSError):   # ENOSPC, EIO, a vanished mount
        return INFRA
    return FAIL


# --- JSON -------------------------------------------------------------------

def run_to_json(run: MatrixRun) -> dict:
    data = asdict(run)
    for t, tres in zip(data["targets"], run.targets):
        t["target"]["name"] = tres.target.name
        t["outcome"] = tres.outcome
    data["outcome"] = run.outcome
    return data


def target_from_json(data: dict) -> TargetResult:
    tgt = data["target"]
    stages = tuple(
        StageResult(**{**s, "attempts": tuple(Attempt(**a) for a in s.get("attempts", ()))})
        for s in data["stages"])
    return TargetResult(Target(tgt["release"], tgt["kernel"], tgt.get("required", True)),
                        stages, data["series_hash"], data.get("started", ""),
                        data.get("finished", ""), data.get("upstream", {}))


def target_to_json(result: TargetResult) -> dict:
    data = asdict(result)
    data["target"]["name"] = result.target.name
    data["outcome"] = result.outcome
    return data


def run_from_json(data: dict) -> MatrixRun:
    if data.get("schema") != SCHEMA:
        raise UserError(f"matrix run record has schema {data.get('schema')!r}; "
                        f"this qemupatch reads schema {SCHEMA}")
    return MatrixRun(
        run_id=data["run_id"], series_hash=data["series_hash"], started=data["started"],
        finished=data["finished"],
        targets=tuple(target_from_json(t) for t in data["targets"]),
        stages=tuple(data.get("stages", STAGES)), project_commit=data.get("project_commit", ""),
        host=data.get("host", {}), merged_from=tuple(data.get("merged_from", ())))


def load_run(path: Path) -> MatrixRun:
    """A run from its folder or its ``nightly.json``; a clear error otherwise."""
    file = path / RESULT_NAME if path.is_dir() else path
    try:
        return run_from_json(json.loads(file.read_text()))
    except FileNotFoundError:
        raise UserError(f"{file}: no matrix run record here (run qemupatch nightly)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{file}: not a matrix run record: {exc}") from exc


def touched_releases(cfg: Config, since: str | None) -> tuple[str, ...]:
    """The matrix releases a change since commit ``since`` can break: all of
    them when the base series, its recorded resolutions or qemupatch.toml
    changed, else those whose fix-up folder changed.  ``since`` None (no
    green run on record) or not in this history: all of them."""
    releases = tuple(dict.fromkeys(t.release for t in targets(cfg)))
    if since is None or git(cfg.root, "merge-base", "--is-ancestor", since, "HEAD",
                            check=False).returncode != 0:
        return releases
    patches = cfg.patches_dir.relative_to(cfg.root).as_posix()
    changed = git(cfg.root, "diff", "--name-only", f"{since}..HEAD", "--",
                  patches, CONFIG_NAME).stdout.split()
    fixups = f"{patches}/releases/"
    if any(not name.startswith(fixups) for name in changed):
        return releases
    folders = {name[len(fixups):].split("/", 1)[0] for name in changed}
    return tuple(r for r in releases if r in folders)
