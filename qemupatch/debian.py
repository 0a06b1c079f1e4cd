"""The Debian archive edge: this machine's configured mirror, and private apt
states that reach other suites or source packages without changing anything
on the machine.

Three stages need Debian: upstream (QEMU's source packages), guest (kernel
packages of bookworm, trixie and sid) and build (debootstrap of base images). All
of them take the mirror from here, so no archive host is ever written into
the project::

    mirrors(settings)                        the mirrors to use   -> Mirrors
    machine_mirrors()                        the machine's apt's  -> Mirrors
    Apt.sources(...) / Apt.binaries(...)     private apt states   -> Apt
    debootstrap_rootfs(suite, dest, mirrors, timeout=)
                                             a minbase rootfs as a tarball
                                             (images.py imports it as
                                             debian:<suite>)      -> Path
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qemupatch.config import Settings
from qemupatch.errors import CommandFailed, DownloadError
from qemupatch.run import Completed, run


@dataclass(frozen=True)
class Mirrors:
    main: str
    security: str | None = None


def mirrors(settings: Settings, root: Path = Path("/")) -> Mirrors:
    """The mirrors to use: the ones ``settings`` names (QEMUPATCH_DEBIAN_MIRROR),
    else the machine's own."""
    if settings.debian_mirror:
        return Mirrors(settings.debian_mirror, settings.debian_security_mirror)
    return machine_mirrors(root)


def machine_mirrors(root: Path = Path("/")) -> Mirrors:
    """The Debian mirror (and security mirror) this machine's apt uses: the
    first ``deb`` URI in ``/etc/apt/sources.list.d/*.sources`` (deb822) or
    the one-line lists.
    """
    entries: list[tuple[str, str]] = []  # (uri, suite)
    apt = root / "etc/apt"
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    entries.append((uri, suite))
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], words[2]))
    main = [u for u, s in entries if "security" not in s and "security" not in u]
    security = [u for u, s in entries if "security" in s or "security" in u]
    if not main:
        raise DownloadError(f"no Debian mirror in {apt}/sources.list(.d); "
                            "set QEMUPATCH_DEBIAN_MIRROR=<mirror URL>")
    return Mirrors(main[0].rstrip("/"), security[0].rstrip("/") if security else None)


def host_suite() -> str | None:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return None
    m = re.search(r"^VERSION_CODENAME=(\S+)$", text, re.M)
    return m.group(1) if m else None


class Apt:
    """apt-get with a private state (its own sources, lists and archives),
    or with the machine's own configuration when ``state_dir`` is None."""

    def __init__(self, state_dir: Path | None, lines: list[str] = ()):
        self.state_dir = state_dir
        self.lines = list(lines)

    @classmethod
    def sources(cls, cache_dir: Path, suites: tuple[str, ...],
                mirror: str | None = None) -> "Apt":
        """Reaches the source packages of ``suites`` on ``mirror`` (default:
        the machine's)."""
        mirror = mirror or machine_mirrors().main
        return cls(cache_dir / "apt" / "sources",
                   [f"deb-src {mirror} {suite} main" for suite in suites])

    @classmethod
    def binaries(cls, cache_dir: Path, suite: str, mirror: str | None = None) -> "Apt":
        """Reaches the binary packages of ``suite`` on ``mirror`` (the
        machine's own apt when it is the machine's suite and no mirror is
        named)."""
        if suite == host_suite() and not mirror:
            return cls(None)
        mirror = mirror or machine_mirrors().main
        return cls(cache_dir / "apt" / suite, [f"deb {mirror} {suite} main"])

    def options(self) -> tuple[str, ...]:
        if self.state_dir is None:
            return ()
        base = self.state_dir
        for sub in ("lists/partial", "archives/partial"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        sources = base / "sources.list"
        sources.write_text("".join(line + "\n" for line in self.lines))
        return (
            "-o", f"Dir::Etc::SourceList={sources}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={base / 'lists'}",
            "-o", f"Dir::Cache::Archives={base / 'archives'}",
            "-o", f"Dir::Cache::pkgcache={base / 'pkgcache.bin'}",
            "-o", f"Dir::Cache::srcpkgcache={base / 'srcpkgcache.bin'}",
            "-o", "APT::Sandbox::User=root",
            "-q",
        )

    def run(self, *args: str, cwd: Path | None = None, timeout: float = 900) -> Completed:
        """``apt-get ARGS``; a private state is updated first when it has no
        lists yet, and once more if the command fails (lists go stale)."""
        opts = self.options()
        if self.state_dir is not None and not any((self.state_dir / "lists").glob("*_*")):
            self.update(timeout)
        try:
            return run(["apt-get", *opts, *args], cwd=cwd, timeout=timeout)
        except CommandFailed:
            self.update(timeout)
            return run(["apt-get", *opts, *args], cwd=cwd, timeout=timeout)

    def update(self, timeout: float = 900) -> None:
        run(["apt-get", *self.options(), "update"], timeout=timeout)


# Suites with no -updates and no -security: apt-get update fails on a
# suite the archive does not have, so a sid image must not name them.
ROLLING_SUITES = frozenset({"sid", "unstable", "experimental"})


def apt_sources(suite: str, mirrors: Mirrors) -> list[str]:
    """The ``sources.list`` lines of a ``suite`` rootfs: the suite, and
    its -updates and -security for a release (not for sid)."""
    sources = [f"deb {mirrors.main} {suite} main"]
    if suite in ROLLING_SUITES:
        return sources
    security = mirrors.security or (
        mirrors.main + "-security" if mirrors.main.endswith("/debian") else None)
    sources.append(f"deb {mirrors.main} {suite}-updates main")
    if security:
        sources.append(f"deb {security} {suite}-security main")
    return sources


# The apt options that decide whether a Release file's dates are checked.
DATE_OPTIONS = ("Acquire::Check-Valid-Until", "Acquire::Check-Date")


def machine_date_policy(*, timeout: float = 60) -> dict[str, str]:
    """The machine's apt settings of :data:`DATE_OPTIONS`, where it sets them.

    A mirror that serves a frozen snapshot of the archive (this machine's)
    goes on serving sid's Release file after its Valid-Until, so the
    machine's apt is told not to check; a rootfs made from that mirror
    needs the same setting or its ``apt-get update`` refuses sid ("Release
    file ... is expired").  Stable suites carry no Valid-Until."""
    try:
        dump = run(["apt-config", "dump"], timeout=timeout).stdout
    except CommandFailed:
        return {}
    return parse_date_policy(dump)


def parse_date_policy(dump: str) -> dict[str, str]:
    """:data:`DATE_OPTIONS` from ``apt-config dump`` output."""
    policy = {}
    for line in dump.splitlines():
        m = re.fullmatch(r'\s*([\w:-]+)\s+"([^"]*)";\s*', line)
        if m and m.group(1).lower() in {o.lower() for o in DATE_OPTIONS}:
            policy[next(o for o in DATE_OPTIONS if o.lower() == m.group(1).lower())] = m.group(2)
    return policy


def debootstrap_rootfs(suite: str, dest: Path, mirrors: Mirrors, *, timeout: float) -> Path:
    """A ``debootstrap --variant=minbase`` root file system of ``suite``, its
    apt pointed at ``mirrors``, written as the tarball ``dest``.

    This is how a base image is made when no registry can be pulled.
    Raises CommandFailed or CommandTimeout (a temporary rootfs beside
    ``dest`` is removed either way).
    """
    deadline = time.monotonic() + timeout
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"qemupatch-debootstrap-{suite}-", dir=dest.parent))
    rootfs = work / "rootfs"
    try:
        run(["debootstrap", "--variant=minbase", suite, rootfs, mirrors.main],
            timeout=max(1.0, deadline - time.monotonic()))
        (rootfs / "etc/apt/sources.list").write_text(
            "".join(line + "\n" for line in apt_sources(suite, mirrors)))
        if policy := machine_date_policy(timeout=max(1.0, deadline - time.monotonic())):
            (rootfs / "etc/apt/apt.conf.d/99qemupatch-mirror").write_text(
                "# the machine's apt policy towards its mirror (see qemupatch/debian.py)\n"
                + "".join(f'{key} "{value}";\n' for key, value in policy.items()))
        run(["tar", "-C", rootfs, "--numeric-owner", "-cf", dest, "."],
            timeout=max(1.0, deadline - time.monotonic()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
