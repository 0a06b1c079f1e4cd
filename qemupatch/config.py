"""The project's configuration: ``qemupatch.toml`` loaded into frozen data.

The matrix is data, not code: upstream releases (and where each can be
fetched from) and guest kernels are tables in the TOML file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qemupatch.errors import UserError

CONFIG_NAME = "qemupatch.toml"
SOURCE_KINDS = ("debian", "tarball", "git")


@dataclass(frozen=True)
class ReleaseSource:
    """Where one upstream QEMU release can be fetched from."""

    name: str
    debian: str | None = None
    tarball: str | None = None
    sha256: str | None = None
    git_url: str | None = None
    git_ref: str | None = None

    def kinds(self) -> tuple[str, ...]:
        have = {
            "debian": self.debian,
            "tarball": self.tarball,
            "git": self.git_url,
        }
        return tuple(k for k in SOURCE_KINDS if have[k])


@dataclass(frozen=True)
class GuestKernel:
    """A Debian kernel a guest can boot, and the suite that has it."""

    name: str
    suite: str
    image_package: str
    headers_packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class MatrixSpec:
    """``[matrix]``: releases × kernels, plus ``include`` cells (dicts with
    release, kernel and optionally ``required = false``)."""

    releases: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    include: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Settings:
    """This machine's settings, read once from the environment by
    :func:`load` and passed down; nothing below reads the environment."""

    # QEMUPATCH_NO_PULL=1: never try a registry for base images.
    no_pull: bool = False
    # QEMUPATCH_NO_HOST_OVERLAY=1: copy sources instead of overlay mounts.
    host_overlay: bool = True
    # QEMUPATCH_CA_BUNDLE: the CA bundle image builds give pip (proxies).
    ca_bundle: Path = Path("/etc/ssl/certs/ca-certificates.crt")
    # QEMUPATCH_DEBIAN_MIRROR / _SECURITY_MIRROR: instead of apt's own.
    debian_mirror: str | None = None
    debian_security_mirror: str | None = None
    # DOCKER_HOST: the Docker daemon to try first.
    docker_host: str | None = None
    # QEMUPATCH_CCACHE_REMOTE: ccache's remote storage shared by CI runners
    # (file:/mnt/shared/ccache, redis://host, http://host/ccache), given to
    # QEMU builds as CCACHE_REMOTE_STORAGE (a file: folder is mounted).
    ccache_remote: str | None = None
    # QEMUPATCH_IMAGE_REGISTRY: where build images are pulled from before a
    # build and pushed to after one (ghcr.io/org/qemupatch); a failure there
    # is a warning, the image is then built locally.
    image_registry: str | None = None

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> Settings:
        default = cls()
        return cls(
            no_pull=env.get("QEMUPATCH_NO_PULL") == "1",
            host_overlay=env.get("QEMUPATCH_NO_HOST_OVERLAY") != "1",
            ca_bundle=Path(env.get("QEMUPATCH_CA_BUNDLE") or default.ca_bundle),
            debian_mirror=env.get("QEMUPATCH_DEBIAN_MIRROR") or None,
            debian_security_mirror=env.get("QEMUPATCH_DEBIAN_SECURITY_MIRROR") or None,
            docker_host=env.get("DOCKER_HOST") or None,
            ccache_remote=_ccache_remote(env.get("QEMUPATCH_CCACHE_REMOTE", "").strip()),
            image_registry=_image_registry(env.get("QEMUPATCH_IMAGE_REGISTRY", "").strip()),
        )

    @property
    def ccache_remote_dir(self) -> Path | None:
        """The shared folder of a ``file:`` ccache remote (mounted into
        container builds), else None."""
        url = (self.ccache_remote or "").partition("|")[0]
        if not url.startswith("file:"):
            return None
        return Path(url.removeprefix("file:").removeprefix("//"))


CCACHE_REMOTE_SCHEMES = ("file", "http", "redis")


def _ccache_remote(value: str) -> str | None:
    """QEMUPATCH_CCACHE_REMOTE checked: one ccache remote storage URL
    (``|attribute=value`` suffixes allowed) without a password, because
    the URL is written into build records and reproduce.sh, which CI
    publishes."""
    if not value:
        return None
    what = f"QEMUPATCH_CCACHE_REMOTE={value!r}"
    if any(c.isspace() for c in value):
        raise UserError(f"{what}: give one remote storage URL (no spaces)")
    url = value.partition("|")[0]
    scheme, colon, rest = url.partition(":")
    if not colon or scheme not in CCACHE_REMOTE_SCHEMES:
        raise UserError(f"{what}: not a ccache remote storage URL; one of "
                        "file:/shared/folder, http://host/path, redis://host[:port]")
    if scheme == "file":
        if not rest.removeprefix("//").startswith("/"):
            raise UserError(f"{what}: a file: remote needs an absolute folder, "
                            "e.g. file:/mnt/shared/ccache")
    elif not rest.startswith("//") or not rest[2:]:
        raise UserError(f"{what}: {scheme}: needs a host, e.g. {scheme}://host")
    elif "@" in rest[2:].partition("/")[0]:
        raise UserError(f"{what}: has credentials, which would reach the published build "
                        "records; use a cache the runners reach without a password")
    return value


def _image_registry(value: str) -> str | None:
    """QEMUPATCH_IMAGE_REGISTRY checked: a repository prefix such as
    ``ghcr.io/org/qemupatch`` (no scheme, no tag)."""
    if not value:
        return None
    what = f"QEMUPATCH_IMAGE_REGISTRY={value!r}"
    if "://" in value or any(c.isspace() for c in value) or value.endswith("/"):
        raise UserError(f"{what}: give a repository prefix like ghcr.io/org/qemupatch "
                        "(no scheme, no trailing slash)")
    last = value.rsplit("/", 1)[-1]
    if ":" in last or "@" in last:
        raise UserError(f"{what}: no tag or digest; qemupatch tags images by content hash")
    return value


@dataclass(frozen=True)
class Config:
    root: Path
    patches_dir: Path
    cache_dir: Path
    default_release: str
    releases: tuple[ReleaseSource, ...]
    prefer: tuple[str, ...] = SOURCE_KINDS
    kernels: tuple[GuestKernel, ...] = field(default=())
    matrix: MatrixSpec = field(default_factory=MatrixSpec)
    settings: Settings = field(default_factory=Settings)

    def release(self, name: str) -> ReleaseSource | None:
        for rel in self.releases:
            if rel.name == name:
                return rel
        return None

    def kernel(self, name: str) -> GuestKernel:
        for k in self.kernels:
            if k.name == name:
                return k
        known = ", ".join(k.name for k in self.kernels) or "none"
        raise UserError(f"unknown guest kernel '{name}' in {CONFIG_NAME}; known: {known}")

    @property
    def mirror_dir(self) -> Path:
        return self.cache_dir / "upstream.git"

    @property
    def default_kernel(self) -> GuestKernel:
        if not self.kernels:
            raise UserError(f"{self.root / CONFIG_NAME} names no guest kernel: "
                            "add a [[kernel]] table")
        return self.kernels[0]


def default_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    if value := env.get("QEMUPATCH_CACHE"):
        return Path(value)
    base = env.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qemupatch"


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` holding qemupatch.toml."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise UserError(f"no {CONFIG_NAME} found in {here} or any parent folder")


def load(root: Path | None = None, cache_dir: Path | None = None,
         env: Mapping[str, str] | None = None) -> Config:
    """The project at or above ``root`` and this machine's settings
    (``env``, default the process environment: the one place it is read)."""
    env = os.environ if env is None else env
    root = find_root(root)
    path = root / CONFIG_NAME
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from exc
    project = data.get("project", {})
    releases = []
    for entry in data.get("release", []):
        try:
            releases.append(ReleaseSource(**entry))
        except TypeError as exc:
            raise UserError(f"{path}: bad [[release]] entry {entry}: {exc}") from exc
    kernels = []
    for entry in data.get("kernel", []):
        entry = dict(entry)
        entry["headers_packages"] = tuple(entry.get("headers_packages", ()))
        try:
            kernels.append(GuestKernel(**entry))
        except TypeError as exc:
            raise UserError(f"{path}: bad [[kernel]] entry {entry}: {exc}") from exc
    matrix = data.get("matrix", {})
    try:
        matrix_spec = MatrixSpec(
            releases=tuple(matrix.get("releases", (r.name for r in releases))),
            kernels=tuple(matrix.get("kernels", (k.name for k in kernels[:1]))),
            include=tuple(dict(c) for c in matrix.get("include", ())))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: bad [matrix] table: {exc}") from exc
    for cell in matrix_spec.include:
        if not {"release", "kernel"} <= cell.keys():
            raise UserError(f"{path}: [[matrix.include]] {cell} needs release and kernel")
    prefer = tuple(project.get("prefer", SOURCE_KINDS))
    if bad := [p for p in prefer if p not in SOURCE_KINDS]:
        raise UserError(f"{path}: unknown source kind(s) in prefer: {bad}")
    try:
        default_release = project["default_release"]
    except KeyError:
        raise UserError(f"{path}: [project] default_release is missing") from None
    return Config(
        root=root,
        patches_dir=root / project.get("patches", "patches"),
        cache_dir=(cache_dir or default_cache_dir(env)).absolute(),
        default_release=default_release,
        releases=tuple(releases),
        prefer=prefer,
        kernels=tuple(kernels),
        matrix=matrix_spec,
        settings=Settings.from_environ(env),
    )
