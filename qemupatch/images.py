"""Build images and their content-hash cache, on any engine (``engine.py``).

::

    ensure_image(engine, dockerfile, buildargs=, timeout=)  -> Image
        built unless an image with the same content hash exists: the tag
        ``<repository>:<suite>-<hash>`` covers the Dockerfile, its
        effective build args, the context files and the base image's ID.
        With ``settings.image_registry`` (QEMUPATCH_IMAGE_REGISTRY) CI
        runners share images: ``<registry>/<tag>`` is pulled before a
        build and pushed after one; a registry failure is only a warning
        (the image is built locally, never a failed build)
    ensure_base_image(engine, "debian:bookworm", timeout=)  -> BaseImage
        the FROM image: local, else pulled (unless settings.no_pull), else
        (debian:<suite> only) debootstrapped by ``debian.py`` and imported
    image_facts(engine, image, timeout)                     -> ImageFacts
        packages, compiler and tools inside an image, for build records
    dockerfile_context_files(dockerfile, ca_bundle)         -> {name: Path}
        the host CA bundle, for Dockerfiles that COPY host-ca.crt (pip
        behind a TLS-intercepting proxy)

Failures to make an image are ``ImageBuildFailed`` (31); the engine's own
failures stay ``EngineError`` (34).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qemupatch import debian
from qemupatch.engine import Engine, LineCallback, LogSink
from qemupatch.errors import (
    CommandFailed,
    CommandTimeout,
    DownloadError,
    EngineError,
    ImageBuildFailed,
)
from qemupatch.records import utc_now

IMAGE_LABEL = "org.qemupatch.image"
BASE_SOURCE_LABEL = "org.qemupatch.base-source"
CA_BUNDLE_NAME = "host-ca.crt"
DEBIAN_REPOSITORY = "docker.io/library/debian"


@dataclass(frozen=True)
class Image:
    id: str
    tag: str
    built: bool            # False: an image with this content hash existed
    seconds: float
    content_hash: str
    base: str              # the FROM image and its origin
    dockerfile: str
    dockerfile_sha256: str
    pulled_from: str = ""  # the registry reference it came from, if pulled
    pushed_to: str = ""    # the registry reference it was pushed to after the build


@dataclass(frozen=True)
class BaseImage:
    name: str
    id: str
    source: str            # "local", "pulled" or "debootstrap ..." and when


@dataclass(frozen=True)
class ImageFacts:
    packages: tuple[str, ...]    # name=version, every package installed
    compiler: str                # gcc --version's first line
    tools: tuple[str, ...]       # ccache, meson, ninja versions (those present)


def ensure_image(engine: Engine, dockerfile: Path, *,
                 buildargs: Mapping[str, str] | None = None,
                 context_files: Mapping[str, Path] | None = None,
                 repository: str = "qemupatch-build", timeout: float = 1800,
                 idle_timeout: float | None = 900, log_path: Path | None = None,
                 on_line: LineCallback | None = None,
                 registry_timeout: float = 600) -> Image:
    """Build ``dockerfile`` unless an image with the same content hash exists
    (here, or in ``engine.settings.image_registry``: see the module docstring).

    ``context_files`` (default: :func:`dockerfile_context_files` with
    ``engine.settings.ca_bundle``) are copied into an otherwise empty
    context, so nothing else on the machine changes the image.
    """
    deadline = time.monotonic() + timeout
    text = dockerfile.read_text()
    if context_files is None:
        context_files = dockerfile_context_files(dockerfile, engine.settings.ca_bundle)
    base = _from_image(text)
    args = {**_arg_defaults(text), **(buildargs or {})}
    base_image = ensure_base_image(engine, base, timeout=max(1.0, deadline - time.monotonic()),
                                   log_path=log_path, on_line=on_line)
    digest = hashlib.sha256()
    digest.update(text.encode())
    digest.update(json.dumps(sorted(args.items())).encode())
    for dest, src in sorted(context_files.items()):
        digest.update(dest.encode() + b"\0" + Path(src).read_bytes())
    digest.update(base_image.id.encode())
    content_hash = digest.hexdigest()
    suite = base.partition(":")[2] or "latest"
    tag = f"{repository}:{suite}-{content_hash[:16]}"
    made = {"tag": tag, "content_hash": content_hash,
            "base": f"{base} ({base_image.source})", "dockerfile": str(dockerfile),
            "dockerfile_sha256": hashlib.sha256(dockerfile.read_bytes()).hexdigest()}
    if existing := engine.image_id(tag):
        return Image(id=existing, built=False, seconds=0.0, **made)
    registry = engine.settings.image_registry
    start = time.monotonic()
    if registry:
        shared = f"{registry}/{tag}"
        if pulled := _pull_shared(engine, shared, tag, content_hash,
                                  min(registry_timeout, deadline - time.monotonic()),
                                  log_path, on_line):
            return Image(id=pulled, built=False, seconds=time.monotonic() - start,
                         pulled_from=shared, **made)
    with tempfile.TemporaryDirectory(prefix="qemupatch-context-") as ctx:
        shutil.copyfile(dockerfile, Path(ctx) / "Dockerfile")
        for dest, src in context_files.items():
            shutil.copyfile(src, Path(ctx) / dest)
        sink = LogSink(log_path, on_line)
        sink.write(f"qemupatch: building image {tag} from {dockerfile}\n")
        sink.close()
        image = engine.build(Path(ctx), tag=tag, buildargs=buildargs,
                             labels={IMAGE_LABEL: content_hash},
                             timeout=max(1.0, deadline - time.monotonic()),
                             idle_timeout=idle_timeout, log_path=log_path, on_line=on_line)
    seconds = time.monotonic() - start
    pushed = ""
    if registry:
        pushed = _push_shared(engine, tag, f"{registry}/{tag}", registry_timeout,
                              log_path, on_line)
    return Image(id=image, built=True, seconds=seconds, pushed_to=pushed, **made)


def _pull_shared(engine: Engine, shared: str, tag: str, content_hash: str, timeout: float,
                 log_path: Path | None, on_line: LineCallback | None) -> str | None:
    """The image another runner pushed as ``shared``, tagged ``tag`` here;
    None (a warning in the log) when the registry has none or fails."""
    sink = LogSink(log_path, on_line)
    repository, _, remote_tag = shared.rpartition(":")
    sink.write(f"qemupatch: pulling {shared} (deadline {timeout:.0f} s)\n")
    try:
        _registry_stream(engine, f"pulling {shared}", max(1.0, timeout),
                         lambda api: api.pull(repository, tag=remote_tag, stream=True,
                                              decode=True))
        found = _exactly(engine, shared)
        if found is None:
            raise EngineError("the registry sent no image")
        image, label = found.id, (found.labels or {}).get(IMAGE_LABEL)
        if label != content_hash:
            _untag(engine, shared)
            raise EngineError(f"its {IMAGE_LABEL} label is {label!r}, not this content "
                              "hash; not used")
        name, _, local_tag = tag.rpartition(":")
        # Fully qualified: podman resolves a short name to the pulled
        # <registry>/.../<name>:<tag> itself and would tag nothing.
        engine._call(lambda: engine.client.api.tag(image, _qualified(name), local_tag),
                     timeout=engine.api_timeout, what=f"tagging {shared} as {tag}")
        _untag(engine, shared)          # one name per image, as a local build has
    except EngineError as exc:
        if engine.closed:
            sink.close()
            raise
        sink.write(f"qemupatch: warning: cannot use {shared} from the registry, building "
                   f"locally: {_first_line(exc)}\n")
        sink.close()
        return None
    sink.write(f"qemupatch: pulled {shared} ({image[:19]}) instead of building it\n")
    sink.close()
    return image


def _push_shared(engine: Engine, tag: str, shared: str, timeout: float,
                 log_path: Path | None, on_line: LineCallback | None) -> str:
    """Push the image just built as ``shared`` for the other runners; its
    reference, or "" (a warning in the log) when the registry fails."""
    sink = LogSink(log_path, on_line)
    repository, _, remote_tag = shared.rpartition(":")
    sink.write(f"qemupatch: pushing {shared} (deadline {timeout:.0f} s)\n")
    try:
        engine._call(lambda: engine.client.api.tag(tag, repository, remote_tag),
                     timeout=engine.api_timeout, what=f"tagging {tag} as {shared}")
        try:
            _registry_stream(engine, f"pushing {shared}", timeout,
                             lambda api: api.push(repository, tag=remote_tag, stream=True,
                                                  decode=True))
        finally:
            _untag(engine, shared)          # the image keeps ``tag``
    except EngineError as exc:
        if engine.closed:
            sink.close()
            raise
        sink.write(f"qemupatch: warning: cannot push {shared}; other runners will build "
                   f"it themselves: {_first_line(exc)}\n")
        sink.close()
        return ""
    sink.write(f"qemupatch: pushed {shared}\n")
    sink.close()
    return shared


def _registry_stream(engine: Engine, what: str, timeout: float, request) -> None:
    """A pull or push with a deadline; the registry's own complaint (sent
    inside the stream, not as an HTTP error) becomes EngineError."""
    errors: list[str] = []

    def handle(item: object) -> None:
        if isinstance(item, dict) and (item.get("error") or item.get("errorDetail")):
            errors.append(str(item.get("error") or item.get("errorDetail")))

    why = engine._stream(what, request, timeout=timeout, idle_timeout=None, handle=handle)
    if why:
        raise EngineError(f"{what} ran past its {timeout:.0f} s deadline and was abandoned")
    if errors:
        raise EngineError(errors[0])


def _qualified(repository: str) -> str:
    """``repository`` with its registry, as the engines store a short name."""
    first = repository.split("/")[0]
    if "/" in repository and ("." in first or ":" in first or first == "localhost"):
        return repository
    return f"docker.io/{repository}" if "/" in repository else f"docker.io/library/{repository}"


def _untag(engine: Engine, name: str) -> None:
    """Drop the registry name ``name``, never an image that other names or
    containers still use (not forced)."""
    engine._call(lambda: engine.client.images.remove(name, force=False, noprune=True),
                 timeout=engine.api_timeout, what=f"untagging {name}")


def _exactly(engine: Engine, name: str):
    """The image called exactly ``name`` (a registry host:port included), or None."""
    import docker.errors

    def find():
        try:
            return engine.client.images.get(name)
        except docker.errors.ImageNotFound:
            return None

    return engine._call(find, timeout=engine.api_timeout, what=f"looking up image {name}")


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def ensure_base_image(engine: Engine, name: str, *, timeout: float = 900,
                      pull_timeout: float = 60, log_path: Path | None = None,
                      on_line: LineCallback | None = None) -> BaseImage:
    """Make sure the base image ``name`` exists: local, pulled, or debootstrapped."""
    if name == "scratch":
        return BaseImage(name, "", "none (FROM scratch)")
    if image := engine.image_id(name):
        return BaseImage(name, image,
                         engine.image_labels(name).get(BASE_SOURCE_LABEL, "local"))
    repository, _, suite = name.partition(":")
    if not engine.settings.no_pull:
        if image := _try_pull(engine, repository, suite or "latest", pull_timeout, on_line):
            return BaseImage(name, image, "pulled")
    if repository.split("/")[-1] != "debian" or not suite:
        raise ImageBuildFailed(
            f"base image {name} is missing, cannot be pulled, and only "
            "debian:<suite> can be made locally with debootstrap")
    return _debootstrap(engine, suite, timeout=timeout, log_path=log_path, on_line=on_line)


def _try_pull(engine: Engine, repository: str, tag: str, timeout: float,
              on_line: LineCallback | None) -> str | None:
    """The pulled image's id, or None (said on ``on_line``): no registry
    answering is normal on a machine like this one."""
    say = on_line or (lambda line: None)
    say(f"qemupatch: pulling {repository}:{tag} (deadline {timeout:.0f} s)")
    try:
        return engine.pull(repository, tag, timeout=timeout)
    except EngineError as exc:
        if engine.closed:
            raise
        say(f"qemupatch: cannot pull {repository}:{tag}: {str(exc).splitlines()[0][:200]}")
        return None


def _debootstrap(engine: Engine, suite: str, *, timeout: float, log_path: Path | None,
                 on_line: LineCallback | None) -> BaseImage:
    name = f"{DEBIAN_REPOSITORY}:{suite}"
    if not shutil.which("debootstrap"):
        raise ImageBuildFailed(
            f"base image debian:{suite} is missing and cannot be pulled; "
            "making it needs debootstrap: apt-get install debootstrap")
    try:
        mirrors = debian.mirrors(engine.settings)
    except DownloadError as exc:
        raise ImageBuildFailed(f"cannot make base image debian:{suite}: {exc}") from exc
    sink = LogSink(log_path, on_line)
    sink.write(f"qemupatch: debian:{suite} missing and not pullable: making it with "
               f"debootstrap --variant=minbase {suite} from {mirrors.main}\n")
    start = time.monotonic()
    deadline = start + timeout
    with tempfile.TemporaryDirectory(prefix=f"qemupatch-base-{suite}-") as tmp:
        try:
            tarball = debian.debootstrap_rootfs(suite, Path(tmp) / "rootfs.tar", mirrors,
                                                timeout=timeout)
        except (CommandFailed, CommandTimeout) as exc:
            sink.close()
            raise ImageBuildFailed(
                f"debootstrap of {suite} from {mirrors.main} failed:\n{exc}") from exc
        source = f"debootstrap --variant=minbase {suite} {mirrors.main} ({utc_now()})"
        image = engine.import_image(
            tarball, DEBIAN_REPOSITORY, suite,
            changes=[f'LABEL {BASE_SOURCE_LABEL}="{source}"', 'CMD ["bash"]'],
            timeout=max(1.0, deadline - time.monotonic()))
    if not image:
        sink.close()
        raise ImageBuildFailed(f"imported {name} but the engine does not list it")
    sink.write(f"qemupatch: made {name} ({image[:19]}) in "
               f"{time.monotonic() - start:.0f} s\n")
    sink.close()
    return BaseImage(name, image, source)


def image_facts(engine: Engine, image: Image, timeout: float) -> ImageFacts:
    """Packages and tool versions inside ``image``: what a build used, for its record."""
    script = ("dpkg-query -W -f='${Package}=${Version}\\n'; echo '#tools'; "
              "gcc --version | head -n1; (ccache --version | head -n1) 2>/dev/null; "
              "(meson --version) 2>/dev/null | sed 's/^/meson /'; "
              "(ninja --version) 2>/dev/null | sed 's/^/ninja /'; true")
    result = engine.run(image.tag, ["sh", "-c", script], timeout=timeout)
    packages, _, tools = result.output.partition("#tools")
    tool_lines = [t for t in tools.strip().splitlines() if t.strip()]
    return ImageFacts(
        packages=tuple(p for p in packages.split() if "=" in p),
        compiler=tool_lines[0] if tool_lines else "",
        tools=tuple(tool_lines[1:]),
    )


def dockerfile_context_files(dockerfile: Path, ca_bundle: Path) -> dict[str, Path]:
    """The host CA bundle as ``host-ca.crt``, for Dockerfiles that use it
    (pip behind a TLS-intercepting proxy); nothing for the others."""
    if CA_BUNDLE_NAME not in dockerfile.read_text():
        return {}
    if not ca_bundle.is_file():
        raise ImageBuildFailed(
            f"{dockerfile} needs the host CA bundle, but {ca_bundle} is not a file; "
            "set QEMUPATCH_CA_BUNDLE to the bundle this machine's HTTPS uses")
    return {CA_BUNDLE_NAME: ca_bundle}


def _from_image(dockerfile_text: str) -> str:
    """The first FROM image, with ARG defaults substituted."""
    args = _arg_defaults(dockerfile_text)
    for line in dockerfile_text.splitlines():
        words = line.split()
        if words and words[0].upper() == "FROM" and len(words) > 1:
            image = words[1]
            for key, value in args.items():
                image = image.replace("${%s}" % key, value).replace("$" + key, value)
            return image
    raise ImageBuildFailed("the Dockerfile has no FROM line")


def _arg_defaults(dockerfile_text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in dockerfile_text.splitlines():
        m = re.match(r"\s*ARG\s+(\w+)=(.*)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip().strip('"')
    return found
