"""Stage 1: upstream QEMU releases, imported into a local mirror repository.

The mirror is a bare git repository in the cache.  Every imported release is
an annotated tag ``upstream/<name>`` whose message records its provenance
(origin, sha256 of the tarball, import time), so the mirror alone says where
each tree came from.  Three ways in, one model:

* git: a remote URL and a ref, fetched;
* tarball: a local path or URL plus the expected sha256, imported as one
  commit with a fixed date (like ``gbp import-orig``), so the same tarball
  always gives the same commit and three-way merges work across releases;
* debian: a Debian source package version; its ``.orig`` tarball is fetched
  with the machine's own apt mirror and imported as a repacked tarball.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from qemupatch.config import Config
from qemupatch.debian import Apt
from qemupatch.errors import (
    ChecksumMismatch,
    CommandFailed,
    DownloadError,
    UnknownRelease,
    UserError,
)
from qemupatch.records import utc_now
from qemupatch.run import git, run

TAG_PREFIX = "upstream/"
FIXED_DATE = "2000-01-01T00:00:00+0000"
DEBIAN_SUITES = ("bookworm", "bookworm-backports", "trixie", "sid")


@dataclass(frozen=True)
class Provenance:
    kind: str  # "git" | "tarball" | "debian"
    origin: str  # URL, path or Debian version
    sha256: str | None = None  # of the tarball
    ref: str | None = None  # git ref
    repacked: bool = False  # firmware and wheels removed (Debian +ds/+dfsg)
    imported_at: str = ""


@dataclass(frozen=True)
class Release:
    name: str
    commit: str
    provenance: Provenance

    @property
    def tag(self) -> str:
        return TAG_PREFIX + self.name


def release_name_from_debian(version: str) -> str:
    """``1:10.2.2+ds-1`` -> ``v10.2.2``; ``1:7.2+dfsg-7+deb12u18`` -> ``v7.2.0``."""
    upstream = version.split(":", 1)[-1].rsplit("-", 1)[0]
    upstream = re.split(r"[+~]", upstream, maxsplit=1)[0]
    if not re.fullmatch(r"\d+(\.\d+)*", upstream):
        raise UserError(f"cannot read a QEMU version from Debian version '{version}'")
    parts = upstream.split(".")
    parts += ["0"] * (3 - len(parts))
    return "v" + ".".join(parts)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Mirror:
    """The bare repository holding every imported upstream release."""

    def __init__(self, path: Path):
        self.path = path
        if not (path / "HEAD").exists():
            path.mkdir(parents=True, exist_ok=True)
            git(path, "init", "--quiet", "--bare")

    # -- reading -----------------------------------------------------------

    def releases(self) -> list[Release]:
        out = git(
            self.path, "for-each-ref", "--sort=version:refname",
            "--format=%(refname:strip=2)%00%(*objectname)%00%(contents)%01",
            "refs/tags/" + TAG_PREFIX,
        ).stdout
        found = []
        for record in out.split("\x01"):
            record = record.strip("\n")
            if not record:
                continue
            tag, commit, message = record.split("\x00", 2)
            found.append(Release(tag[len(TAG_PREFIX):], commit, _parse_message(message)))
        return found

    def get(self, name: str) -> Release:
        for rel in self.releases():
            if rel.name == name:
                return rel
        raise UnknownRelease(name, [r.name for r in self.releases()])

    def find(self, name: str) -> Release | None:
        return next((r for r in self.releases() if r.name == name), None)

    # -- writing -----------------------------------------------------------

    def remove(self, name: str) -> Release:
        rel = self.get(name)
        git(self.path, "tag", "-d", rel.tag)
        return rel

    def import_tarball(self, name: str, tarball: Path, *, sha256: str | None = None,
                       kind: str = "tarball", origin: str | None = None,
                       repacked: bool = False) -> Release:
        actual = sha256_file(tarball)
        if sha256 and sha256 != actual:
            raise ChecksumMismatch(
                f"{tarball}: sha256 is {actual}, expected {sha256}")
        if existing := self._same_or_conflict(name, actual):
            return existing
        with tempfile.TemporaryDirectory(prefix="qemupatch-import-") as tmp:
            tree = Path(tmp) / "tree"
            tree.mkdir()
            try:
                run(["tar", "-C", tree, "-xf", tarball], timeout=900)
            except CommandFailed as exc:
                raise UserError(f"{tarball}: not a readable tarball: {exc}") from exc
            entries = list(tree.iterdir())
            top = entries[0] if len(entries) == 1 and entries[0].is_dir() else tree
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            git(self.path, "--work-tree", top, "add", "--all", "--force", ".",
                env=env, timeout=900)
            tree_id = git(self.path, "write-tree", env=env).stdout.strip()
        dates = {"GIT_AUTHOR_DATE": FIXED_DATE, "GIT_COMMITTER_DATE": FIXED_DATE}
        message = f"QEMU {name}\n\nImported from {tarball.name}\nsha256: {actual}\n"
        commit = git(self.path, "commit-tree", tree_id, "-m", message,
                     env=dates).stdout.strip()
        prov = Provenance(kind=kind, origin=origin or str(tarball), sha256=actual,
                          repacked=repacked, imported_at=utc_now())
        return self._tag(name, commit, prov)

    def import_git(self, name: str, url: str, ref: str) -> Release:
        try:
            git(self.path, "fetch", "--no-tags", "--depth=1", url, ref, timeout=1800)
        except CommandFailed as exc:
            raise DownloadError(f"cannot fetch {ref} from {url}: {exc}") from exc
        commit = git(self.path, "rev-parse", "FETCH_HEAD^{commit}").stdout.strip()
        if existing := self.find(name):
            if existing.commit == commit:
                return existing
            raise ChecksumMismatch(
                f"release {name} is already imported as {existing.commit} "
                f"(from {existing.provenance.origin}); {url} {ref} is {commit}")
        prov = Provenance(kind="git", origin=url, ref=ref, imported_at=utc_now())
        return self._tag(name, commit, prov)

    def _same_or_conflict(self, name: str, sha256: str) -> Release | None:
        existing = self.find(name)
        if existing is None:
            return None
        if existing.provenance.sha256 == sha256:
            return existing
        raise ChecksumMismatch(
            f"release {name} is already imported from {existing.provenance.origin} "
            f"with sha256 {existing.provenance.sha256}; this tarball has {sha256}. "
            f"Remove it first (qemupatch upstream remove {name}) to replace it")

    def _tag(self, name: str, commit: str, prov: Provenance) -> Release:
        message = f"Upstream QEMU {name}\n\n" + json.dumps(asdict(prov), indent=1) + "\n"
        git(self.path, "tag", "--annotate", "--message", message, TAG_PREFIX + name, commit)
        return Release(name, commit, prov)


def _parse_message(message: str) -> Provenance:
    start = message.find("{")
    try:
        return Provenance(**json.loads(message[start:]))
    except (ValueError, TypeError):
        return Provenance(kind="unknown", origin="(no provenance recorded)")


# -- fetching -----------------------------------------------------------------


def download(url: str, dest: Path, timeout: float = 600) -> Path:
    """Fetch a URL to ``dest`` (a file), atomically."""
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
            shutil.copyfileobj(resp, out)
    except OSError as exc:
        raise DownloadError(f"cannot download {url}: {exc}") from exc
    part.replace(dest)
    return dest


def fetch_debian_orig(version: str, cache: Path, suites=DEBIAN_SUITES,
                      timeout: float = 900, mirror: str | None = None) -> Path:
    """Download the ``.orig`` tarball of Debian's ``qemu`` ``version``,
    checked against the sha256 in Debian's index.

    apt (with a private state, see debian.py) only says where the file is:
    some versions (10.0.2 in bookworm-backports) serve the .orig alone, and
    ``apt-get source`` would fail on their missing .dsc.
    """
    apt = Apt.sources(cache, suites, mirror)
    try:
        listing = apt.run("source", "--print-uris", f"qemu={version}", timeout=timeout)
    except CommandFailed as exc:
        raise DownloadError(f"Debian source qemu={version} is not in the archive: {exc}") from exc
    for line in listing.stdout.splitlines():
        m = re.fullmatch(r"'(\S+)' (qemu_[^ ]+\.orig\.tar\.\w+) \d+ SHA256:([0-9a-f]{64})", line)
        if m:
            url, name, expected = m.groups()
            break
    else:
        raise DownloadError(f"Debian source qemu={version} lists no .orig tarball:\n"
                            f"{listing.output.strip()}")
    dest = cache / "downloads" / "debian"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / name
    if not path.exists() or sha256_file(path) != expected:
        download(url, path, timeout=timeout)
    if (actual := sha256_file(path)) != expected:
        raise DownloadError(f"{url}: sha256 {actual}, Debian's index says {expected}")
    return path


def add_release(cfg: Config, mirror: Mirror, name: str, *, kind: str | None = None,
                tarball: str | None = None, sha256: str | None = None,
                git_url: str | None = None, git_ref: str | None = None,
                debian: str | None = None) -> Release:
    """Import release ``name`` from the source given, or the configured one."""
    if debian or tarball or git_url:
        kind = "debian" if debian else "tarball" if tarball else "git"
    else:
        configured = cfg.release(name)
        if configured is None:
            known = ", ".join(r.name for r in cfg.releases)
            raise UserError(f"release '{name}' is not in qemupatch.toml (configured: {known}); "
                            "give --debian, --tarball or --git to import it anyway")
        kinds = configured.kinds()
        order = [k for k in cfg.prefer if k in kinds]
        if kind is not None:
            if kind not in kinds:
                raise UserError(f"release '{name}' has no {kind} source in qemupatch.toml")
            order = [kind]
        if not order:
            raise UserError(f"release '{name}' has no source in qemupatch.toml")
        kind = order[0]
        debian, tarball, sha256 = configured.debian, configured.tarball, configured.sha256
        git_url, git_ref = configured.git_url, configured.git_ref
    if kind == "debian":
        assert debian
        orig = fetch_debian_orig(debian, cfg.cache_dir, mirror=cfg.settings.debian_mirror)
        return mirror.import_tarball(name, orig, sha256=sha256, kind="debian",
                                     origin=f"debian:qemu={debian}", repacked=True)
    if kind == "tarball":
        assert tarball
        if "://" in tarball:
            dest = cfg.cache_dir / "downloads" / Path(tarball).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            path = download(tarball, dest)
        else:
            path = Path(tarball)
            if not path.is_file():
                raise UserError(f"tarball {path} does not exist")
        return mirror.import_tarball(name, path, sha256=sha256, origin=tarball)
    assert git_url
    return mirror.import_git(name, git_url, git_ref or name)
