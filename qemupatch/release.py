"""A release: a tag and ``dist/`` only when the whole matrix is green for
the exact series being tagged.

:func:`check_release` collects every reason to refuse (a dirty work tree,
``qemupatch check`` failing, a bad or old version, a matrix run that is
stale, red, incomplete or hit by infrastructure) and raises
:class:`~qemupatch.errors.ReleaseRefused` (exit 1) listing all of them;
there is no ``--force``.  :func:`make_release` then writes ``dist/`` into a
temporary folder, makes the annotated tag ``v<VERSION>`` and renames the
folder into place: a failure at any step leaves neither.

The series is identified by :func:`qemupatch.build.series_hash` of
``patches/`` (every file: base series, resolutions, per-release fix-ups),
the same hash the builds and the nightly record.

Versions are MAJOR.MINOR.PATCH (docs/release.md): dropping a supported
upstream release needs a new MAJOR, adding one at least a new MINOR; the
tag message's ``Supported-Release:`` lines are how the next release knows.

:func:`supported_table` renders the release × kernel table of a green run
for ``qemupatch supported`` and the README block it keeps.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import git as gitpython

from qemupatch import carry, matrix, records, workflow
from qemupatch.build import series_hash
from qemupatch.config import Config
from qemupatch.errors import (
    CheckFailed,
    CommandFailed,
    Failed,
    InfraError,
    ReleaseRefused,
    UserError,
)
from qemupatch.matrix import MatrixRun
from qemupatch.run import git
from qemupatch.series import Patch, read_series
from qemupatch.upstream import add_release
from qemupatch.worktree import WorkTree

SCHEMA = 1
VERSION_RE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")
TAG_PREFIX = "v"
NIGHTLY_DIR = Path("out") / "nightly"        # relative to the project root
LATEST = "latest"
README_BEGIN = "<!-- supported-releases:begin -->"
README_END = "<!-- supported-releases:end -->"
SUPPORTED_RECORD = Path("docs") / "supported-matrix.json"
MARKS = {matrix.PASS: "✓ pass", matrix.FAIL: "✗ fail", matrix.INFRA: "⚠ infra",
         matrix.SKIP: "– skip"}

Version = tuple[int, int, int]


@dataclass(frozen=True)
class Cell:
    """One supported target of the release: what the matrix run proved."""

    release: str
    kernel: str
    target: str


@dataclass(frozen=True)
class ReleasePlan:
    version: str                  # "1.2.0"
    tag: str                      # "v1.2.0"
    previous_tag: str | None
    series_hash: str
    project_commit: str
    run: MatrixRun
    run_dir: Path
    cells: tuple[Cell, ...]       # the required targets, all green

    @property
    def releases(self) -> dict[str, list[str]]:
        """release -> its guest kernels, in matrix order."""
        out: dict[str, list[str]] = {}
        for c in self.cells:
            out.setdefault(c.release, []).append(c.kernel)
        return out


@dataclass(frozen=True)
class Release:
    plan: ReleasePlan
    tag: str
    dist_dir: Path
    files: tuple[str, ...]        # relative to dist_dir, as in SHA256SUMS
    release_mboxes: dict = field(default_factory=dict)   # release -> file


# -- versions and tags -------------------------------------------------------------


def parse_version(text: str) -> Version | None:
    m = VERSION_RE.fullmatch(text.strip())
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def version_tags(root: Path) -> dict[str, Version]:
    """Every tag of the project that is a release version: name -> version."""
    out = git(root, "tag", "--list", f"{TAG_PREFIX}*").stdout.split()
    return {t: v for t in out if t.startswith(TAG_PREFIX) and (v := parse_version(t))}


def last_tag(root: Path) -> str | None:
    tags = version_tags(root)
    return max(tags, key=tags.__getitem__) if tags else None


def tag_trailers(root: Path, tag: str) -> dict[str, list[str]]:
    """``Key: value`` lines of an annotated tag's message, as lists."""
    text = git(root, "for-each-ref", "--format=%(contents)", f"refs/tags/{tag}").stdout
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if m := re.fullmatch(r"([A-Z][A-Za-z-]+): (.+)", line.strip()):
            found.setdefault(m[1], []).append(m[2])
    return found


def supported_in_tag(root: Path, tag: str) -> set[str]:
    return {v.split()[0] for v in tag_trailers(root, tag).get("Supported-Release", [])}


def version_reasons(root: Path, version: str, releases: set[str]) -> tuple[list[str], str | None]:
    """Why ``version`` may not be tagged (format, not newer than the last
    tag, already a tag, a dropped release without a new MAJOR, an added
    one without a new MINOR); and the last tag."""
    tags = version_tags(root)
    previous = max(tags, key=tags.__getitem__) if tags else None
    new = parse_version(version)
    if new is None:
        return [f"version '{version}' is not MAJOR.MINOR.PATCH (e.g. 1.2.0; see "
                "docs/release.md)"], previous
    tag = TAG_PREFIX + version_string(new)
    reasons = []
    exists = git(root, "rev-parse", "--verify", "--quiet", f"refs/tags/{tag}", check=False)
    if exists.returncode == 0:
        reasons.append(f"tag {tag} already exists")
    if previous is None:
        return reasons, None
    old = tags[previous]
    if new <= old and tag != previous:
        reasons.append(f"version {version_string(new)} is not greater than the last "
                       f"tag {previous}")
    before = supported_in_tag(root, previous)
    if before and new > old:
        if dropped := sorted(before - releases):
            if new[0] == old[0]:
                reasons.append(f"upstream release(s) {', '.join(dropped)} supported by "
                               f"{previous} are dropped: that needs a new MAJOR version "
                               f"({old[0] + 1}.0.0)")
        elif added := sorted(releases - before):
            if new[:2] == old[:2]:
                reasons.append(f"upstream release(s) {', '.join(added)} are added since "
                               f"{previous}: that needs at least a new MINOR version "
                               f"({old[0]}.{old[1] + 1}.0)")
    return reasons, previous


def version_string(v: Version) -> str:
    return ".".join(map(str, v))


# -- the gate ----------------------------------------------------------------------


def default_matrix_dir(cfg: Config) -> Path:
    return cfg.root / NIGHTLY_DIR / LATEST


def dirty_files(root: Path) -> list[str]:
    """Changed, staged and untracked (not ignored) files of the project repo."""
    out = git(root, "status", "--porcelain=v1", "--untracked-files=all").stdout
    return [line[3:] for line in out.splitlines() if line.strip()]


def matrix_reasons(cfg: Config, run: MatrixRun, run_dir: Path,
                   current_hash: str) -> tuple[list[str], list[Cell]]:
    """Every way ``run`` falls short of proving the current series on every
    required target: stale (another series), a missing cell or stage, a
    red stage, an infrastructure failure, a skipped stage."""
    reasons = []
    if run.series_hash != current_hash:
        reasons.append(f"matrix run {run.run_id} ({run_dir}) is stale: it tested series "
                       f"{run.series_hash[:12]}, patches/ is now {current_hash[:12]} "
                       "(run qemupatch nightly)")
    cells = []
    for t in matrix.targets(cfg):
        if not t.required:
            continue
        cells.append(Cell(t.release, t.kernel, t.name))
        res = run.target(t.name)
        if res is None:
            reasons.append(f"missing cell {t.name}: matrix run {run.run_id} has no result "
                           "for it")
            continue
        if res.series_hash != current_hash and run.series_hash == current_hash:
            reasons.append(f"stale cell {t.name}: it tested series {res.series_hash[:12]}, "
                           f"patches/ is now {current_hash[:12]}")
        bad, other = [], []
        for stage in matrix.STAGES:
            s = res.stage(stage)
            why = f": {s.reason}" if s is not None and s.reason else ""
            if s is None:
                other.append(f"missing stage {t.name} {stage}: not in matrix run "
                             f"{run.run_id}")
            elif s.outcome == matrix.FAIL:
                bad.append(f"red cell {t.name}: {stage} failed{why}")
            elif s.outcome == matrix.INFRA:
                bad.append(f"infra cell {t.name}: {stage} hit an infrastructure "
                           f"failure{why} (re-run the nightly)")
            elif s.outcome != matrix.PASS:
                other.append(f"cell {t.name}: {stage} was {s.outcome}, not pass{why}")
        # the stages skipped after a red or infra one say nothing more
        reasons += bad or other
    return reasons, cells


def _import_base(cfg: Config) -> None:
    series = read_series(cfg.patches_dir)
    name = workflow.series_base(cfg, series, None)
    m = workflow.mirror(cfg)
    if m.find(name) is None:
        add_release(cfg, m, name)


def check_release(cfg: Config, version: str, matrix_dir: Path | None = None, *,
                  dist_dir: Path | None = None) -> ReleasePlan:
    """The plan of a release of ``version``, or ReleaseRefused naming every
    gate that failed.  Infrastructure errors (git itself failing) raise as
    they are: they say nothing about the release."""
    root = cfg.root
    run_dir = matrix_dir or default_matrix_dir(cfg)
    if run_dir.is_file():                 # its nightly.json: links are relative to its folder
        run_dir = run_dir.parent
    reasons: list[str] = []
    inside = git(root, "rev-parse", "--is-inside-work-tree", check=False)
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        raise ReleaseRefused(version, [f"{root} is not in a git work tree"])
    if dirty := dirty_files(root):
        shown = ", ".join(dirty[:8]) + (" ..." if len(dirty) > 8 else "")
        reasons.append(f"the work tree is not clean ({len(dirty)} file(s): {shown}); "
                       "commit or remove them")
    if git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False).returncode != 0:
        raise ReleaseRefused(version, [*reasons, f"{root} has no commit to tag"])
    head = git(root, "rev-parse", "HEAD").stdout.strip()
    try:
        _import_base(cfg)               # a fresh CI machine: check needs the base release
        workflow.check(cfg)
    except CheckFailed as exc:
        reasons.append("qemupatch check fails: " + str(exc).replace("\n", "; "))
    except UserError as exc:
        reasons.append(f"qemupatch check cannot run: {exc}")
    current = series_hash(cfg.patches_dir)
    if current is None:
        raise ReleaseRefused(version, [*reasons, f"{cfg.patches_dir} is not a folder"])
    try:
        run = matrix.load_run(run_dir)
    except UserError as exc:
        run = None
        reasons.append(f"no matrix run to release from: {exc}")
    cells: list[Cell] = []
    if run is not None:
        more, cells = matrix_reasons(cfg, run, run_dir, current)
        reasons += more
    releases = {c.release for c in cells} or set(cfg.matrix.releases)
    more, previous = version_reasons(root, version, releases)
    reasons += more
    if dist_dir is not None and dist_dir.exists():
        reasons.append(f"{dist_dir} already exists; a release writes a new folder")
    try:
        gitpython.Repo(root, search_parent_directories=True).git.var("GIT_COMMITTER_IDENT")
    except gitpython.GitCommandError:
        reasons.append("git knows no identity for the tagger: set user.name and "
                       "user.email (git config)")
    if reasons:
        raise ReleaseRefused(version, reasons)
    assert run is not None
    v = parse_version(version)
    assert v is not None
    return ReleasePlan(version_string(v), TAG_PREFIX + version_string(v), previous, current,
                       head, run, run_dir, tuple(cells))


# -- the tag -------------------------------------------------------------------------


def tag_message(plan: ReleasePlan) -> str:
    """What the tag records: the series, the matrix run, what is supported;
    ``Key: value`` lines so a later release can read them back."""
    run = plan.run
    lines = [f"qemupatch {plan.version}", "",
             f"The vmsocket series {plan.series_hash[:12]}, green on every supported "
             f"release × guest kernel in matrix run {run.run_id}.", "",
             f"Series-Hash: {plan.series_hash}",
             f"Matrix-Run: {run.run_id}",
             f"Matrix-Outcome: {run.outcome}",
             f"Matrix-Finished: {run.finished}",
             f"Project-Commit: {plan.project_commit}"]
    if plan.previous_tag:
        lines.append(f"Previous-Tag: {plan.previous_tag}")
    for rel, kernels in plan.releases.items():
        lines.append(f"Supported-Release: {rel} linux {' '.join(kernels)}")
    return "\n".join(lines) + "\n"


def _create_tag(root: Path, tag: str, message: str) -> None:
    repo = gitpython.Repo(root, search_parent_directories=True)
    try:
        repo.create_tag(tag, ref="HEAD", message=message)
    except gitpython.GitCommandError as exc:
        raise CommandFailed(["git", "tag", "-a", tag], exc.status or 1,
                            str(exc.stderr or exc)) from exc


def _delete_tag(root: Path, tag: str) -> None:
    git(root, "tag", "-d", tag, check=False)


# -- dist/ -----------------------------------------------------------------------------


def _tracked(root: Path, folder: Path) -> list[Path]:
    out = git(root, "ls-files", "-z", "--", folder).stdout
    top = Path(git(root, "rev-parse", "--show-toplevel").stdout.strip())
    return sorted(p for name in out.split("\0") if name
                  if (p := top / name).is_file())


def write_tarball(path: Path, root: Path, patches_dir: Path) -> Path:
    """``patches/`` (tracked files) as a reproducible tar.gz: sorted
    entries, fixed owner and times."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for file in _tracked(root, patches_dir):
            data = file.read_bytes()
            info = tarfile.TarInfo("patches/" + file.relative_to(patches_dir).as_posix())
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    zipped = io.BytesIO()
    with gzip.GzipFile(fileobj=zipped, mode="wb", mtime=0) as gz:
        gz.write(buf.getvalue())
    path.write_bytes(zipped.getvalue())
    return path


def mbox(texts: list[str]) -> str:
    """git format-patch texts as one mbox (each starts with its From line)."""
    return "".join(t if t.endswith("\n") else t + "\n" for t in texts)


def release_stacks(cfg: Config, releases: list[str]) -> dict[str, list[str]]:
    """For each release other than the series' base whose patches differ
    there (fix-ups, or a carried patch whose change is not the base's):
    the whole stack as applied on it, as format-patch texts.  Applied in a
    private work tree ``<cache>/release/<release>``."""
    series = read_series(cfg.patches_dir)
    m = workflow.mirror(cfg)
    out: dict[str, list[str]] = {}
    for name in releases:
        if not carry.is_carried(series, name):
            continue
        assert series.base is not None
        base = m.find(series.base) or add_release(cfg, m, series.base)
        rel = m.find(name) or add_release(cfg, m, name)
        wt = WorkTree(cfg.mirror_dir, cfg.cache_dir / "release" / name,
                      f"qemupatch-release/{name}")
        wt.reset_to(rel.commit, allow_dirty=True)
        stack = carry.apply_stack(wt, series, cfg.patches_dir, name, base.commit)
        texts = wt.format_patches(rel.commit)
        carried = [Patch.parse(f"#{i}", t) for i, t in enumerate(texts, 1)]
        same = (not stack.fixups.patches and len(carried) == len(series.patches)
                and all(a.change_lines() == b.change_lines()
                        for a, b in zip(carried, series.patches)))
        if not same:
            out[name] = texts
    return out


def changelog(root: Path, patches_dir: Path, version: str, previous: str | None,
              created: str) -> str:
    """The history of ``patches/`` since the previous tag, newest first."""
    span = f"{previous}..HEAD" if previous else "HEAD"
    log = git(root, "log", "--format=%H%x00%h%x00%ad%x00%an%x00%s", "--date=short",
              span, "--", patches_dir).stdout
    since = f"since {previous}" if previous else "from the start"
    lines = [f"# qemupatch {version} ({created[:10]})", "",
             f"Changes to the series (`patches/`) {since}:", ""]
    entries = [line.split("\0") for line in log.splitlines() if line]
    for full, short, date, author, subject in entries:
        files = git(root, "diff-tree", "--no-commit-id", "--name-status", "-r", full,
                    "--", patches_dir).stdout.split("\n")
        lines.append(f"- {subject} ({short}, {date}, {author})")
        for f in files:
            if f.strip():
                status, _, name = f.partition("\t")
                lines.append(f"  - {status} `{name}`")
    if not entries:
        lines.append("- (no change to patches/)")
    return "\n".join(lines) + "\n"


def build_records(run: MatrixRun, run_dir: Path) -> list[dict]:
    """The build provenance (``build*.json``) the run links to, per target:
    kind, image, binary hashes."""
    found = []
    for tres in run.targets:
        paths: list[Path] = []
        for s in tres.stages:
            for rel in s.links.values():
                p = run_dir / rel
                if p.suffix == ".json" and p.name.startswith("build") and p.is_file():
                    paths.append(p)
        stage_dir = run_dir / tres.target.name / "build"
        if not paths and stage_dir.is_dir():
            paths = sorted(stage_dir.rglob("build*.json"))
        for p in dict.fromkeys(paths):
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            image = data.get("image") or {}
            facts = {**data, **(data.get("facts") or {})}   # older records: facts on top
            found.append({
                "target": tres.target.name, "kind": data.get("kind"),
                "name": data.get("name") or data.get("kind"),
                "release": facts.get("release"), "kernel": facts.get("kernel"),
                "status": data.get("status"), "series_hash": facts.get("series_hash"),
                "reused": data.get("reused", False),
                "image": {"id": image.get("id"), "tag": image.get("tag")}
                if isinstance(image, dict) else image,
                "sha256": data.get("sha256", {}),
                "record": str(p.relative_to(run_dir)) if p.is_relative_to(run_dir) else str(p),
            })
    return found


def provenance(cfg: Config, plan: ReleasePlan, created: str) -> dict:
    m = workflow.mirror(cfg)
    upstream = {}
    for rel in plan.releases:
        known = m.find(rel)
        from_run = next((t.upstream for t in plan.run.targets
                         if t.target.release == rel and t.upstream), {})
        if known is not None:
            p = known.provenance
            upstream[rel] = {"commit": known.commit, "kind": p.kind, "origin": p.origin,
                             "sha256": p.sha256, "ref": p.ref, "repacked": p.repacked,
                             "imported_at": p.imported_at}
        else:
            upstream[rel] = dict(from_run)
    series = read_series(cfg.patches_dir)
    return {
        "schema": SCHEMA,
        "version": plan.version,
        "tag": plan.tag,
        "previous_tag": plan.previous_tag,
        "created": created,
        "project_commit": plan.project_commit,
        "series_hash": plan.series_hash,
        "series": {"base": series.base, "patches": series.names(),
                   "fixups": {r: carry.read_fixups(cfg.patches_dir, r).names()
                              for r in carry.releases_with_fixups(cfg.patches_dir)}},
        "supported": [{"release": r, "kernels": k} for r, k in plan.releases.items()],
        "matrix_run": {"run_id": plan.run.run_id, "outcome": plan.run.outcome,
                       "started": plan.run.started, "finished": plan.run.finished,
                       "series_hash": plan.run.series_hash,
                       "project_commit": plan.run.project_commit,
                       "targets": {t.target.name: t.outcome for t in plan.run.targets}},
        "upstream": upstream,
        "builds": build_records(plan.run, plan.run_dir),
    }


def sha256sums(folder: Path, files: list[str]) -> str:
    """``sha256sum -c`` format (two spaces: text mode)."""
    lines = []
    for name in files:
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        lines.append(f"{digest}  {name}")
    return "\n".join(lines) + "\n"


def write_dist(cfg: Config, plan: ReleasePlan, folder: Path, created: str) -> tuple[
        list[str], dict[str, str]]:
    """Every file of the release into ``folder`` (empty); SHA256SUMS last."""
    v = plan.version
    files = []
    write_tarball(folder / f"patches-{v}.tar.gz", cfg.root, cfg.patches_dir)
    files.append(f"patches-{v}.tar.gz")
    series = read_series(cfg.patches_dir)
    (folder / f"series-{v}.mbox").write_text(mbox([p.text for p in series.patches]))
    files.append(f"series-{v}.mbox")
    stacks = release_stacks(cfg, list(plan.releases))
    mboxes = {}
    for rel, texts in stacks.items():
        name = f"releases/{rel}/series-{v}-{rel}.mbox"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(mbox(texts))
        files.append(name)
        mboxes[rel] = name
    (folder / "CHANGELOG.md").write_text(
        changelog(cfg.root, cfg.patches_dir, v, plan.previous_tag, created))
    files.append("CHANGELOG.md")
    prov = provenance(cfg, plan, created)
    prov["release_mboxes"] = mboxes
    (folder / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    files.append("provenance.json")
    (folder / "SHA256SUMS").write_text(sha256sums(folder, files))
    return files, mboxes


def default_dist_dir(cfg: Config, version: str) -> Path:
    v = parse_version(version)
    return cfg.root / "dist" / (TAG_PREFIX + (version_string(v) if v else version))


def make_release(cfg: Config, version: str, matrix_dir: Path | None = None,
                 dist_dir: Path | None = None) -> Release:
    """Check, then write dist/ aside, tag, and move dist/ into place; on
    any failure (even a signal) the tag and the half-written folder go."""
    dist_dir = (dist_dir or default_dist_dir(cfg, version)).absolute()
    plan = check_release(cfg, version, matrix_dir, dist_dir=dist_dir)
    created = records.utc_now()
    dist_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dist_dir.name}.new-", dir=dist_dir.parent))
    tagged = False
    try:
        files, mboxes = write_dist(cfg, plan, tmp, created)
        _create_tag(cfg.root, plan.tag, tag_message(plan))
        tagged = True
        os.rename(tmp, dist_dir)
    except BaseException:
        if tagged:
            _delete_tag(cfg.root, plan.tag)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Release(plan, plan.tag, dist_dir, tuple([*files, "SHA256SUMS"]), mboxes)


# -- the supported-releases table ----------------------------------------------------


def runs_under(folder: Path) -> list[Path]:
    """Run folders (holding nightly.json) under ``folder``, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir()
                   if p.name != LATEST and (p / matrix.RESULT_NAME).is_file()),
                  key=lambda p: p.name, reverse=True)


def last_green_run(cfg: Config, matrix_dir: Path | None = None) -> tuple[MatrixRun, Path]:
    """``matrix_dir``'s run if given (green or not: the table shows it),
    else the newest green run under ``out/nightly/``."""
    if matrix_dir is not None:
        return matrix.load_run(matrix_dir), matrix_dir
    folder = cfg.root / NIGHTLY_DIR
    for path in runs_under(folder):
        try:
            run = matrix.load_run(path)
        except UserError:
            continue
        if run.outcome == matrix.PASS:
            return run, path
    raise UserError(f"no green matrix run under {folder} (run qemupatch nightly)")


def supported_table(run: MatrixRun) -> str:
    """Release × guest kernel with pass marks, from one matrix run."""
    releases = list(dict.fromkeys(t.target.release for t in run.targets))
    kernels = list(dict.fromkeys(t.target.kernel for t in run.targets))
    lines = ["| QEMU release | " + " | ".join(f"Linux {k} guest" for k in kernels) + " |",
             "|---|" + "---|" * len(kernels)]
    for rel in releases:
        row = []
        for k in kernels:
            t = next((t for t in run.targets
                      if t.target.release == rel and t.target.kernel == k), None)
            mark = MARKS.get(t.outcome, t.outcome) if t else "not run"
            if t is not None and not t.target.required:
                mark += " (watched)"
            row.append(mark)
        lines.append(f"| {rel} | " + " | ".join(row) + " |")
    stages = ", ".join(run.stages)
    lines += ["", f"Matrix run `{run.run_id}` (finished {run.finished}, outcome "
                  f"**{run.outcome}**, series `{run.series_hash[:12]}`); a pass means "
                  f"every stage passed: {stages}."]
    return "\n".join(lines) + "\n"


def readme_block(run: MatrixRun) -> str:
    """The README's marked block, markers included."""
    return (f"{README_BEGIN}\n"
            f"<!-- generated by `qemupatch supported --write-readme` from "
            f"{SUPPORTED_RECORD.as_posix()}; do not edit by hand -->\n"
            "A release (`qemupatch release`, docs/release.md) supports the QEMU releases × "
            "guest kernels its tag lists, each green in a `qemupatch nightly` run for the "
            "exact series tagged. The last green run:\n\n"
            f"{supported_table(run)}{README_END}")


def replace_block(text: str, block: str) -> str:
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise UserError(f"README has no {README_BEGIN} ... {README_END} block")
    return text[:start] + block + text[end + len(README_END):]


def write_readme(cfg: Config, run: MatrixRun, run_dir: Path) -> tuple[Path, Path]:
    """Copy the run's record to docs/supported-matrix.json and rewrite the
    README block from it, both atomically; only a green run."""
    if run.outcome != matrix.PASS:
        raise Failed(f"matrix run {run.run_id} is {run.outcome}, not green: "
                     "the README lists only what a green run proved")
    record = cfg.root / SUPPORTED_RECORD
    source = run_dir / matrix.RESULT_NAME if run_dir.is_dir() else run_dir
    readme = cfg.root / "README.md"
    try:
        new = replace_block(readme.read_text(), readme_block(run))
    except FileNotFoundError:
        raise UserError(f"{readme} does not exist") from None
    try:
        records.atomic_write(record, source.read_bytes())
    except OSError as exc:
        raise InfraError(f"cannot copy {source} to {record}: {exc}") from exc
    records.atomic_write(readme, new)
    return readme, record
