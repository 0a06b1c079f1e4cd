"""One interface to the container engines qemupatch builds in.

``Engine.get(name)`` returns an engine with the same methods whichever
daemon is behind it (tuxmake ``runtime.py`` style)::

    with Engine.get("auto") as engine:
        base = engine.ensure_base_image("bookworm", timeout=900)
        image = engine.ensure_image(Path("Dockerfile"), timeout=1800)
        result = engine.run(image.tag, ["make"], mounts=[...], timeout=600)

Engines, all driven through the Docker SDK for Python (the Docker REST API):

    docker   ``DOCKER_HOST`` or the default Docker socket, if a daemon answers
    podman   a private ``podman system service`` that qemupatch starts itself
             (runtime runc, lowered ulimits: see ``PODMAN_CONF``) and stops
             when the engine is closed, so no service outlives qemupatch
    auto     docker if a daemon answers, else podman

Every call has a deadline.  Long calls (image build, container run) stream
their output to a log file and to a per-line callback; a container still
running at its deadline is killed and ``ContainerKilled`` is raised.  A
missing base image that cannot be pulled is made with debootstrap from the
Debian mirror this machine's apt configuration names (never a host written
in the repository).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path

from qemupatch.debian import machine_mirrors
from qemupatch.errors import (
    CommandFailed,
    CommandTimeout,
    ContainerKilled,
    DownloadError,
    ImageBuildFailed,
    NoContainerEngine,
)
from qemupatch.run import run

log = logging.getLogger(__name__)

ENGINES = ("auto", "docker", "podman")
INSTALL_HINT = "install one: apt-get install podman runc (or a Docker engine)"
IMAGE_LABEL = "org.qemupatch.image"
BASE_SOURCE_LABEL = "org.qemupatch.base-source"
CONTAINER_LABEL = "org.qemupatch.build"
API_TIMEOUT = 120.0
# Limits the sandbox allows; podman's defaults are higher and fail here.
ULIMITS = (("nofile", 1024, 1024), ("nproc", 1000, 1000))
PODMAN_CONF = """\
# Written by qemupatch for its private podman service.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]

[engine]
{runtime}
"""

LineCallback = Callable[[str], None]


@dataclass(frozen=True)
class Mount:
    """A host path or named volume inside a container.

    mode: ``rw``, ``ro``, ``overlay`` (writable in the container, changes
    discarded, the host tree untouched) or ``volume`` (``source`` is a
    named volume, created on first use).
    """

    source: str
    target: str
    mode: str = "rw"
    exclude: tuple[str, ...] = ()   # overlay copies only: top-level names to skip


@dataclass(frozen=True)
class Image:
    id: str
    tag: str
    built: bool            # False: an image with this content hash existed
    seconds: float
    content_hash: str
    base: str              # the FROM image and its origin


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    output: str
    seconds: float
    command: tuple[str, ...]


@dataclass(frozen=True)
class BaseImage:
    name: str
    id: str
    source: str            # "local", "pulled" or "debootstrap ..." and when


@dataclass
class _LogSink:
    """Writes lines to a log file and hands them to a callback."""

    path: Path | None
    on_line: LineCallback | None
    lines: list[str] = field(default_factory=list)
    _partial: str = ""

    def __post_init__(self) -> None:
        self._file = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        text = self._partial + text
        *full, self._partial = text.split("\n")
        for line in full:
            self._emit(line)

    def _emit(self, line: str) -> None:
        line = line.rstrip("\r")
        self.lines.append(line)
        if self._file:
            self._file.write(line + "\n")
            self._file.flush()
        if self.on_line:
            self.on_line(line)

    def close(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = ""
        if self._file:
            self._file.close()
            self._file = None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


_DONE = object()


def _pump(items: Iterable, deadline: float, idle_timeout: float | None,
          handle: Callable[[object], None]) -> str | None:
    """Consume ``items`` (a blocking SDK stream) in a helper thread.

    Returns None when the stream ended, or "deadline"/"idle" when the
    caller must give up.  Exceptions from the stream are re-raised here.
    """
    q: queue.Queue = queue.Queue()

    def reader() -> None:
        try:
            for item in items:
                q.put(item)
        except BaseException as exc:  # handed to the caller below
            q.put(exc)
        q.put(_DONE)

    threading.Thread(target=reader, daemon=True).start()
    last = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= deadline:
            return "deadline"
        if idle_timeout and now - last >= idle_timeout:
            return "idle"
        wait = deadline - now
        if idle_timeout:
            wait = min(wait, idle_timeout - (now - last))
        try:
            item = q.get(timeout=max(0.05, min(wait, 1.0)))
        except queue.Empty:
            continue
        if item is _DONE:
            return None
        if isinstance(item, BaseException):
            raise item
        last = time.monotonic()
        handle(item)


def _ulimits():
    import docker.types

    return [docker.types.Ulimit(name=n, soft=s, hard=h) for n, s, h in ULIMITS]


class Engine:
    """A container engine reached through the Docker REST API."""

    name = "engine"
    supports_overlay = False

    def __init__(self, base_url: str, *, api_timeout: float = API_TIMEOUT):
        import docker

        self.base_url = base_url
        self.api_timeout = api_timeout
        self.client = docker.DockerClient(base_url=base_url, timeout=int(api_timeout))

    # -- lifecycle ---------------------------------------------------------

    @staticmethod
    def get(name: str = "auto", *, api_timeout: float = API_TIMEOUT,
            start_timeout: float = 60.0) -> "Engine":
        """The engine called ``name``; raise NoContainerEngine if there is none."""
        if name not in ENGINES:
            raise NoContainerEngine(f"unknown container engine '{name}'; "
                                    f"choose one of {', '.join(ENGINES)}")
        tried: list[str] = []
        if name in ("auto", "docker"):
            try:
                return DockerEngine.connect(api_timeout=api_timeout)
            except NoContainerEngine as exc:
                if name == "docker":
                    raise
                tried.append(str(exc))
        try:
            return PodmanEngine.start(api_timeout=api_timeout, start_timeout=start_timeout)
        except NoContainerEngine as exc:
            tried.append(str(exc))
            raise NoContainerEngine(
                "no container engine found and none could be started:\n  "
                + "\n  ".join(tried) + f"\n{INSTALL_HINT}"
            ) from exc

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a dead connection: nothing to report
            log.debug("closing the engine client failed", exc_info=True)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict:
        try:
            version = self.client.version()
        except Exception as exc:  # provenance only; never fails a build
            return {"engine": self.name, "error": str(exc)}
        return {
            "engine": self.name,
            "server": version.get("Components", [{}])[0].get("Name", "")
            or version.get("Platform", {}).get("Name", ""),
            "version": version.get("Version", ""),
            "api_version": version.get("ApiVersion", ""),
        }

    # -- images ------------------------------------------------------------

    def image_id(self, name: str) -> str | None:
        import docker.errors

        for candidate in _image_names(name):
            try:
                return self.client.images.get(candidate).id
            except docker.errors.ImageNotFound:
                continue
            except docker.errors.APIError as exc:
                if getattr(exc, "status_code", None) == 404:
                    continue
                raise
        return None

    def image_labels(self, name: str) -> dict[str, str]:
        for candidate in _image_names(name):
            try:
                return dict(self.client.images.get(candidate).labels or {})
            except Exception:  # provenance only
                continue
        return {}

    def ensure_base_image(self, name: str, *, timeout: float = 900,
                          pull_timeout: float = 60,
                          log_path: Path | None = None,
                          on_line: LineCallback | None = None) -> BaseImage:
        """Make sure ``debian:<suite>`` exists: local, pulled, or debootstrapped."""
        if name == "scratch":
            return BaseImage(name, "", "none (FROM scratch)")
        if image := self.image_id(name):
            labels = self.image_labels(name)
            return BaseImage(name, image, labels.get(BASE_SOURCE_LABEL, "local"))
        repo, _, suite = name.partition(":")
        if os.environ.get("QEMUPATCH_NO_PULL") != "1":
            if self._try_pull(repo, suite or "latest", pull_timeout, on_line):
                return BaseImage(name, self.image_id(name) or "", "pulled")
        if repo.split("/")[-1] != "debian" or not suite:
            raise ImageBuildFailed(
                f"base image {name} is missing, cannot be pulled, and only "
                "debian:<suite> can be made locally with debootstrap")
        return self._debootstrap(suite, timeout=timeout, log_path=log_path,
                                 on_line=on_line)

    def _try_pull(self, repo: str, tag: str, timeout: float,
                  on_line: LineCallback | None) -> bool:
        say = on_line or (lambda line: None)
        say(f"qemupatch: pulling {repo}:{tag} (deadline {timeout:.0f} s)")
        try:
            stream = self.client.api.pull(repo, tag=tag, stream=True, decode=True)
            why = _pump(stream, time.monotonic() + timeout, None, lambda item: None)
        except Exception as exc:
            say(f"qemupatch: cannot pull {repo}:{tag}: {str(exc).splitlines()[0][:200]}")
            return False
        if why:
            say(f"qemupatch: pulling {repo}:{tag} ran past {timeout:.0f} s; giving up")
            return False
        return self.image_id(f"{repo}:{tag}") is not None

    def _debootstrap(self, suite: str, *, timeout: float, log_path: Path | None,
                     on_line: LineCallback | None) -> BaseImage:
        if not shutil.which("debootstrap"):
            raise ImageBuildFailed(
                f"base image debian:{suite} is missing and cannot be pulled; "
                "making it needs debootstrap: apt-get install debootstrap")
        try:
            mirror, security = astuple(machine_mirrors())
        except DownloadError as exc:
            raise ImageBuildFailed(f"cannot make base image debian:{suite}: {exc}") from exc
        sink = _LogSink(log_path, on_line)
        sink.write(f"qemupatch: debian:{suite} missing and not pullable: making it with "
                   f"debootstrap --variant=minbase {suite} from {mirror}\n")
        start = time.monotonic()
        deadline = start + timeout
        tmp = Path(tempfile.mkdtemp(prefix=f"qemupatch-debootstrap-{suite}-"))
        rootfs = tmp / "rootfs"
        try:
            try:
                run(["debootstrap", "--variant=minbase", suite, rootfs, mirror],
                    timeout=max(1.0, deadline - time.monotonic()))
            except (CommandFailed, CommandTimeout) as exc:
                raise ImageBuildFailed(
                    f"debootstrap of {suite} from {mirror} failed:\n{exc}") from exc
            sources = [f"deb {mirror} {suite} main", f"deb {mirror} {suite}-updates main"]
            security = security or (mirror + "-security" if mirror.endswith("/debian")
                                    else None)
            if security:
                sources.append(f"deb {security} {suite}-security main")
            (rootfs / "etc/apt/sources.list").write_text("\n".join(sources) + "\n")
            tarball = tmp / "rootfs.tar"
            run(["tar", "-C", rootfs, "--numeric-owner", "-cf", tarball, "."],
                timeout=max(1.0, deadline - time.monotonic()))
            made = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            source = f"debootstrap --variant=minbase {suite} {mirror} ({made})"
            name = f"docker.io/library/debian:{suite}"
            reply = self._call(lambda: self.client.api.import_image_from_file(
                str(tarball), repository="docker.io/library/debian", tag=suite,
                changes=[f'LABEL {BASE_SOURCE_LABEL}="{source}"',
                         'CMD ["bash"]']),
                timeout=max(1.0, deadline - time.monotonic()),
                what=f"importing {name}")
            # Podman's compat API ignores the tag (names it :latest): tag
            # the imported ID explicitly.
            imported = re.findall(r"sha256:[0-9a-f]{64}", str(reply))
            if imported:
                self._call(lambda: self.client.api.tag(
                    imported[-1], "docker.io/library/debian", suite),
                    timeout=60, what=f"tagging {name}")
                if suite != "latest" and self.image_id(
                        "docker.io/library/debian:latest") == imported[-1]:
                    self._call(lambda: self.client.api.remove_image(
                        "docker.io/library/debian:latest"),
                        timeout=60, what="untagging debian:latest")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        image = self.image_id(name)
        if not image:
            raise ImageBuildFailed(f"imported {name} but the engine does not list it")
        sink.write(f"qemupatch: made {name} ({image[:19]}) in "
                   f"{time.monotonic() - start:.0f} s\n")
        sink.close()
        return BaseImage(name, image, source)

    def ensure_image(self, dockerfile: Path, *, buildargs: Mapping[str, str] | None = None,
                     context_files: Mapping[str, Path] | None = None,
                     repository: str = "qemupatch-build", timeout: float = 1800,
                     idle_timeout: float | None = 900,
                     log_path: Path | None = None,
                     on_line: LineCallback | None = None) -> Image:
        """Build ``dockerfile`` unless an image with the same content hash exists.

        The tag is ``<repository>:<suite>-<hash>``; the hash covers the
        Dockerfile, its effective build args, the extra context files and the
        base image ID, so a changed input makes a new image and nothing else
        does.  ``context_files`` are copied into an otherwise empty context.
        """
        deadline = time.monotonic() + timeout
        text = dockerfile.read_text()
        base = _from_image(text)
        args = {**_arg_defaults(text), **(buildargs or {})}
        base_image = self.ensure_base_image(
            base, timeout=max(1.0, deadline - time.monotonic()),
            log_path=log_path, on_line=on_line)
        digest = hashlib.sha256()
        digest.update(text.encode())
        digest.update(json.dumps(sorted(args.items())).encode())
        for dest, src in sorted((context_files or {}).items()):
            digest.update(dest.encode() + b"\0" + Path(src).read_bytes())
        digest.update(base_image.id.encode())
        content_hash = digest.hexdigest()
        suite = base.partition(":")[2] or "latest"
        tag = f"{repository}:{suite}-{content_hash[:16]}"
        if existing := self.image_id(tag):
            return Image(existing, tag, False, 0.0, content_hash,
                         f"{base} ({base_image.source})")
        sink = _LogSink(log_path, on_line)
        start = time.monotonic()
        ctx = Path(tempfile.mkdtemp(prefix="qemupatch-context-"))
        try:
            shutil.copyfile(dockerfile, ctx / "Dockerfile")
            for dest, src in (context_files or {}).items():
                shutil.copyfile(src, ctx / dest)
            sink.write(f"qemupatch: building image {tag} from {dockerfile}\n")
            stream = self.client.api.build(
                path=str(ctx), dockerfile="Dockerfile", tag=tag,
                buildargs={k: v for k, v in (buildargs or {}).items()},
                network_mode="host", rm=True, forcerm=True, pull=False,
                decode=True, labels={IMAGE_LABEL: content_hash},
                timeout=int(max(60.0, idle_timeout or timeout)))
            errors: list[str] = []

            def handle(item: object) -> None:
                if not isinstance(item, dict):
                    return
                if "stream" in item:
                    sink.write(str(item["stream"]))
                if "error" in item:
                    errors.append(str(item["error"]))
                    sink.write(f"ERROR: {item['error']}\n")

            try:
                why = _pump(stream, deadline, idle_timeout, handle)
            except Exception as exc:
                sink.close()
                raise ImageBuildFailed(
                    f"building image {tag} from {dockerfile} failed: {exc}\n"
                    f"{_tail(sink.text)}\nfull log: {log_path}") from exc
            if why:
                self.close()  # drops the connection the build streams over
                sink.close()
                raise ImageBuildFailed(
                    f"building image {tag} ran past its "
                    f"{'deadline' if why == 'deadline' else 'idle limit'} and was "
                    f"abandoned\n{_tail(sink.text)}\nfull log: {log_path}")
            sink.close()
            image = self.image_id(tag)
            if errors or not image:
                raise ImageBuildFailed(
                    f"building image {tag} from {dockerfile} failed:\n"
                    f"{_tail(sink.text)}\nfull log: {log_path}")
        finally:
            shutil.rmtree(ctx, ignore_errors=True)
        return Image(image, tag, True, time.monotonic() - start, content_hash,
                     f"{base} ({base_image.source})")

    def remove_image(self, name: str, timeout: float = 120) -> None:
        self._call(lambda: self.client.images.remove(name, force=True),
                   timeout=timeout, what=f"removing image {name}")

    def remove_volume(self, name: str, timeout: float = 120) -> None:
        import docker.errors

        def remove() -> None:
            try:
                self.client.volumes.get(name).remove(force=True)
            except docker.errors.NotFound:
                pass

        self._call(remove, timeout=timeout, what=f"removing volume {name}")

    # -- containers --------------------------------------------------------

    def run(self, image: str, command: Sequence[str], *,
            mounts: Sequence[Mount] = (), env: Mapping[str, str] | None = None,
            network: str = "none", workdir: str | None = None,
            timeout: float = 3600, idle_timeout: float | None = None,
            log_path: Path | None = None, on_line: LineCallback | None = None,
            ) -> RunResult:
        """Run ``command`` in a fresh container of ``image``, always removed.

        Output streams to ``log_path`` and ``on_line``.  A container still
        running at the deadline (or silent past ``idle_timeout``) is killed
        and ContainerKilled is raised; so is one killed by a signal (e.g.
        the OOM killer).  A non-zero exit is returned, not raised.
        """
        command = list(command)
        overlays: list[Path] = []
        try:
            return self._run(image, command, mounts=self._host_overlays(mounts, overlays),
                             env=env, network=network, workdir=workdir, timeout=timeout,
                             idle_timeout=idle_timeout, log_path=log_path, on_line=on_line)
        finally:
            for tmp in overlays:
                _unmount_overlay(tmp)

    def _host_overlays(self, mounts: Sequence[Mount], made: list[Path]) -> list[Mount]:
        """Overlay mounts made on the host when the engine cannot make them
        (root, local engine): zero-copy, and nothing reaches the source.
        Otherwise _binds() falls back to a read-only mount copied inside."""
        if self.supports_overlay or os.geteuid() != 0 or \
                not self.base_url.startswith("unix://") or \
                os.environ.get("QEMUPATCH_NO_HOST_OVERLAY") == "1":
            return list(mounts)
        result = []
        for m in mounts:
            if m.mode != "overlay" or any(c in m.source for c in ",:"):
                result.append(m)
                continue
            tmp = Path(tempfile.mkdtemp(prefix="qemupatch-overlay-"))
            for sub in ("upper", "work", "merged"):
                (tmp / sub).mkdir()
            try:
                run(["mount", "-t", "overlay", "overlay", "-o",
                     f"lowerdir={m.source},upperdir={tmp}/upper,workdir={tmp}/work",
                     tmp / "merged"], timeout=60)
            except (CommandFailed, CommandTimeout, OSError) as exc:
                log.debug("host overlay of %s failed, copying instead: %s", m.source, exc)
                shutil.rmtree(tmp, ignore_errors=True)
                result.append(m)
                continue
            made.append(tmp)
            result.append(Mount(str(tmp / "merged"), m.target, "rw"))
        return result

    def _run(self, image: str, command: list[str], *, mounts: Sequence[Mount],
             env: Mapping[str, str] | None, network: str, workdir: str | None,
             timeout: float, idle_timeout: float | None, log_path: Path | None,
             on_line: LineCallback | None) -> RunResult:
        binds, volumes_prep = self._binds(mounts)
        if volumes_prep:
            command = ["sh", "-c", volumes_prep + ' && exec "$@"', "sh", *command]
        sink = _LogSink(log_path, on_line)
        start = time.monotonic()
        deadline = start + timeout
        container = self._call(lambda: self.client.containers.create(
            image, command, volumes=binds, environment=dict(env or {}),
            network_mode=network, working_dir=workdir, ulimits=_ulimits(),
            labels={CONTAINER_LABEL: "1"}, detach=True, tty=False),
            timeout=min(timeout, self.api_timeout), what="creating a container")
        try:
            self._call(container.start, timeout=min(timeout, self.api_timeout),
                       what="starting the container")
            why = _pump(
                _log_stream(container),
                deadline, idle_timeout, lambda text: sink.write(str(text)))
            if why:
                try:
                    self._call(container.kill, timeout=60, what="killing the container")
                except ContainerKilled:  # already gone; removed below either way
                    pass
                sink.close()
                limit = timeout if why == "deadline" else idle_timeout
                raise ContainerKilled(
                    f"container ran past its {why} limit ({limit:.0f} s) and was "
                    f"killed: {' '.join(command)}\n{_tail(sink.text)}"
                    + (f"\nfull log: {log_path}" if log_path else ""))
            status = self._call(lambda: container.wait(),
                                timeout=max(5.0, deadline - time.monotonic()),
                                what="waiting for the container")
            sink.close()
            code = int(status.get("StatusCode", -1))
            state = self._call(lambda: self.client.api.inspect_container(container.id),
                               timeout=30, what="inspecting the container")
            oom = bool(state.get("State", {}).get("OOMKilled"))
            if oom or code in (128 + signal.SIGKILL, 128 + signal.SIGTERM):
                raise ContainerKilled(
                    f"container was killed ({'out of memory' if oom else f'exit {code}'}): "
                    f"{' '.join(command)}\n{_tail(sink.text)}"
                    + (f"\nfull log: {log_path}" if log_path else ""))
            return RunResult(code, sink.text, time.monotonic() - start, tuple(command))
        finally:
            sink.close()
            try:
                self._call(lambda: container.remove(force=True), timeout=60,
                           what="removing the container")
            except Exception:  # reported, but must not hide the real error
                log.warning("could not remove container %s", container.id, exc_info=True)

    def _binds(self, mounts: Sequence[Mount]) -> tuple[list[str], str]:
        binds: list[str] = []
        prep: list[str] = []
        for m in mounts:
            if m.mode == "overlay" and not self.supports_overlay:
                # No overlay mounts: mount read-only and copy inside.
                staged = "/.qemupatch-ro" + m.target
                binds.append(f"{m.source}:{staged}:ro")
                skip = " ".join(f"--exclude=./{shlex.quote(x)}" for x in m.exclude)
                prep.append(f"mkdir -p {m.target} && tar -C {staged} {skip} -cf - . "
                            f"| tar -C {m.target} -xf -")
            elif m.mode == "overlay":
                binds.append(f"{m.source}:{m.target}:O")
            elif m.mode in ("rw", "ro"):
                binds.append(f"{m.source}:{m.target}:{m.mode}")
            elif m.mode == "volume":
                binds.append(f"{m.source}:{m.target}:rw")
            else:
                raise ValueError(f"unknown mount mode {m.mode!r}")
        return binds, " && ".join(prep)

    def _call(self, fn: Callable[[], object], *, timeout: float, what: str):
        """Run one blocking SDK call with a deadline."""
        result: list[object] = []

        def target() -> Iterable:
            yield fn()

        try:
            why = _pump(target(), time.monotonic() + timeout, None, result.append)
        except Exception as exc:
            if isinstance(exc, (ContainerKilled, ImageBuildFailed, NoContainerEngine)):
                raise
            raise _engine_error(what, exc) from exc
        if why:
            raise ContainerKilled(f"{what} ran past its {timeout:.0f} s deadline")
        return result[0] if result else None

    def leftover_containers(self) -> list[str]:
        """Containers qemupatch created that still exist (should be none)."""
        found = self._call(lambda: self.client.containers.list(
            all=True, filters={"label": CONTAINER_LABEL}), timeout=60,
            what="listing containers")
        return [c.id for c in found or []]


def _engine_error(what: str, exc: Exception) -> Exception:
    import docker.errors

    if isinstance(exc, docker.errors.ImageNotFound):
        return ImageBuildFailed(f"{what}: image not found: {exc}")
    return ContainerKilled(f"{what} failed: {exc}")


def _unmount_overlay(tmp: Path) -> None:
    merged = tmp / "merged"
    try:
        run(["umount", merged], timeout=60)
    except (CommandFailed, CommandTimeout, OSError):
        log.warning("could not unmount %s; detaching it lazily", merged, exc_info=True)
        try:
            run(["umount", "-l", merged], timeout=60)
        except (CommandFailed, CommandTimeout, OSError):
            log.error("overlay %s is still mounted", merged)
            return
    shutil.rmtree(tmp, ignore_errors=True)


def _log_stream(container) -> Iterable[str]:
    """The container's output; opened lazily, in the reader thread, because
    podman answers the logs request only once there is output."""
    for chunk in container.logs(stream=True, follow=True):
        yield chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else str(chunk)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _image_names(name: str) -> list[str]:
    names = [name]
    if "/" not in name.split(":")[0]:
        names += [f"docker.io/library/{name}", f"localhost/{name}"]
    elif name.startswith("docker.io/library/"):
        names.append(name[len("docker.io/library/"):])
    return names


def _from_image(dockerfile_text: str) -> str:
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


class DockerEngine(Engine):
    name = "docker"

    @classmethod
    def connect(cls, *, api_timeout: float = API_TIMEOUT) -> "DockerEngine":
        url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        if url.startswith("unix://") and not Path(url[len("unix://"):]).exists():
            raise NoContainerEngine(f"docker: no daemon socket at {url}")
        try:
            # The client asks the daemon its API version (socket timeout
            # api_timeout), then ping with a deadline.
            engine = cls(url, api_timeout=api_timeout)
        except Exception as exc:
            raise NoContainerEngine(f"docker: daemon at {url} does not answer: {exc}") from exc
        try:
            engine._call(engine.client.ping, timeout=min(api_timeout, 15),
                         what=f"pinging {url}")
        except Exception as exc:
            engine.close()
            raise NoContainerEngine(f"docker: daemon at {url} does not answer: {exc}") from exc
        return engine


class PodmanEngine(Engine):
    """A private ``podman system service`` that lives as long as this object."""

    name = "podman"
    # Podman's CLI knows "-v SRC:DST:O", but its Docker-compatible API (4.3)
    # rejects it ("invalid container path O"): copy inside the container.
    supports_overlay = False

    def __init__(self, base_url: str, *, proc: subprocess.Popen, state_dir: Path,
                 api_timeout: float = API_TIMEOUT):
        self.proc = proc
        self.state_dir = state_dir
        super().__init__(base_url, api_timeout=api_timeout)
        atexit.register(self.close)

    @classmethod
    def start(cls, *, api_timeout: float = API_TIMEOUT,
              start_timeout: float = 60.0) -> "PodmanEngine":
        podman = shutil.which("podman")
        if not podman:
            raise NoContainerEngine("podman: not installed (no 'podman' in PATH)")
        state = Path(tempfile.mkdtemp(prefix="qemupatch-podman-"))
        runtime = 'runtime = "runc"' if shutil.which("runc") else ""
        conf = state / "containers.conf"
        conf.write_text(PODMAN_CONF.format(runtime=runtime))
        sock = state / "podman.sock"
        env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        service_log = open(state / "service.log", "wb")
        argv = [podman, "system", "service", "--time=0", f"unix://{sock}"]
        log.debug("starting %s", " ".join(argv))
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=service_log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
        service_log.close()
        deadline = time.monotonic() + start_timeout
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                text = (state / "service.log").read_text(errors="replace")
                shutil.rmtree(state, ignore_errors=True)
                raise NoContainerEngine(
                    f"podman: '{' '.join(argv)}' did not start "
                    f"(exit {proc.returncode}): {_tail(text, 10)}")
            time.sleep(0.1)
        try:
            engine = cls(f"unix://{sock}", proc=proc, state_dir=state,
                         api_timeout=api_timeout)
        except Exception as exc:
            _stop(proc)
            shutil.rmtree(state, ignore_errors=True)
            raise NoContainerEngine(f"podman: the service does not answer: {exc}") from exc
        try:
            engine._call(engine.client.ping, timeout=max(1.0, deadline - time.monotonic()),
                         what="pinging the podman service")
        except Exception as exc:
            engine.close()
            raise NoContainerEngine(f"podman: the service does not answer: {exc}") from exc
        return engine

    def close(self) -> None:
        super().close()
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None
            shutil.rmtree(self.state_dir, ignore_errors=True)
        atexit.unregister(self.close)


def _die_with_parent() -> None:
    """In the child: SIGTERM when qemupatch dies, even by SIGKILL, so the
    service never outlives it (Linux PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass
