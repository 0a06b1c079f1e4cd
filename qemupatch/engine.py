"""The container engine client: one interface, whichever daemon is behind it.

``Engine.get(name, settings=)`` returns an engine with the same methods for
every daemon (tuxmake ``runtime.py`` style), all driven through the Docker
SDK for Python (the Docker REST API)::

    docker   ``settings.docker_host`` or the default Docker socket, if a
             daemon answers
    podman   a private ``podman system service`` started with
             ``run.spawn`` (runtime runc, lowered ulimits: ``PODMAN_CONF``)
             and stopped on ``close()``, or with qemupatch if it dies
    auto     docker if a daemon answers, else podman

    with Engine.get("auto", settings=settings) as engine:
        engine.run(tag, argv, mounts=[Mount(...)], timeout=600) -> RunResult
        engine.build(context, tag=..., timeout=...)             -> image id
        engine.pull / import_image / image_id / image_labels / remove_image
        engine.remove_volume / leftover_containers / describe

Images and their content-hash cache live in ``images.py``; host overlay
mounts in ``overlay.py``.

Rules every call keeps:

* a deadline: blocking SDK calls run through ``_call`` (a helper thread
  and ``_pump``); streams (build, pull, container output) through
  ``_pump`` with a deadline and an idle limit;
* errors say what happened: the API failing or not answering in time is
  ``EngineError`` (34); a container past its deadline or idle limit, or
  killed by a signal or the OOM killer, is ``ContainerKilled`` (33); an
  image build that fails or runs out of time is ``ImageBuildFailed`` (31);
* a runstate guard (QEMU ``machine.py``): the engine is open until
  ``close()``, and any call after that raises ``EngineError``.  A failed
  call never closes the engine: an abandoned stream drops only its own
  connection;
* every container is removed, whatever happens to the run.
"""

from __future__ import annotations

import atexit
import logging
import queue
import re
import shlex
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from qemupatch.config import Settings
from qemupatch.errors import (
    ContainerKilled,
    EngineError,
    ImageBuildFailed,
    NoContainerEngine,
    QemupatchError,
)
from qemupatch.overlay import host_overlay
from qemupatch.run import Process, spawn

log = logging.getLogger(__name__)

ENGINES = ("auto", "docker", "podman")
INSTALL_HINT = "install one: apt-get install podman runc (or a Docker engine)"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
CONTAINER_LABEL = "org.qemupatch.build"
API_TIMEOUT = 120.0
# The podman service lives as long as its engine; this only bounds a
# qemupatch that forgets to close it.
SERVICE_DEADLINE = 24 * 3600.0
SERVICE_STOP_GRACE = 10.0
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
class RunResult:
    exit_code: int
    output: str
    seconds: float
    command: tuple[str, ...]


@dataclass
class LogSink:
    """Writes output lines to a log file (appending) and hands them to a callback."""

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

    def tail(self, lines: int = 25) -> str:
        """The last lines, and where the rest is: for error messages."""
        shown = "\n".join(self.text.rstrip().splitlines()[-lines:])
        return shown + (f"\nfull log: {self.path}" if self.path else "")


_DONE = object()


def _pump(items: Iterable, deadline: float, idle_timeout: float | None,
          handle: Callable[[object], None]) -> str | None:
    """Consume ``items`` (a blocking SDK stream) in a helper thread, so
    that the caller keeps its deadline whatever the daemon does.

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
    """A container engine reached through the Docker REST API; open until
    :meth:`close`."""

    name = "engine"

    def __init__(self, base_url: str, *, settings: Settings = Settings(),
                 api_timeout: float = API_TIMEOUT):
        import docker

        self.base_url = base_url
        self.settings = settings
        self.api_timeout = api_timeout
        self.closed = False
        self.client = docker.DockerClient(base_url=base_url, timeout=int(api_timeout))

    # -- lifecycle ---------------------------------------------------------

    @staticmethod
    def get(name: str = "auto", *, settings: Settings = Settings(),
            api_timeout: float = API_TIMEOUT, start_timeout: float = 60.0) -> "Engine":
        """The engine called ``name``; raise NoContainerEngine if there is none."""
        if name not in ENGINES:
            raise NoContainerEngine(f"unknown container engine '{name}'; "
                                    f"choose one of {', '.join(ENGINES)}")
        tried: list[str] = []
        if name in ("auto", "docker"):
            try:
                return DockerEngine.connect(settings=settings, api_timeout=api_timeout)
            except NoContainerEngine as exc:
                if name == "docker":
                    raise
                tried.append(str(exc))
        try:
            return PodmanEngine.start(settings=settings, api_timeout=api_timeout,
                                      start_timeout=start_timeout)
        except NoContainerEngine as exc:
            tried.append(str(exc))
            raise NoContainerEngine(
                "no container engine found and none could be started:\n  "
                + "\n  ".join(tried) + f"\n{INSTALL_HINT}"
            ) from exc

    def close(self) -> None:
        """End the engine; calls after this raise EngineError.  Idempotent."""
        self.closed = True
        try:
            self.client.close()
        except Exception:  # closing a dead connection: nothing to report
            log.debug("closing the engine client failed", exc_info=True)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_local(self) -> bool:
        """The daemon sees this machine's file system (host overlays work)."""
        return self.base_url.startswith("unix://")

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise EngineError(f"the {self.name} engine is closed; {what} needs an open "
                              "engine (use it inside its 'with' block)")

    def describe(self) -> dict:
        """The engine and its version, for provenance records."""
        try:
            version = self._call(self.client.version, timeout=30, what="describing itself")
        except EngineError as exc:
            if self.closed:
                raise
            return {"engine": self.name, "error": str(exc)}
        return {
            "engine": self.name,
            "server": version.get("Components", [{}])[0].get("Name", "")
            or version.get("Platform", {}).get("Name", ""),
            "version": version.get("Version", ""),
            "api_version": version.get("ApiVersion", ""),
        }

    # -- images ------------------------------------------------------------

    def _find_image(self, name: str):
        import docker.errors

        def find():
            for candidate in _image_names(name):
                try:
                    return self.client.images.get(candidate)
                except docker.errors.NotFound:
                    continue
            return None

        return self._call(find, timeout=self.api_timeout, what=f"looking up image {name}")

    def image_id(self, name: str) -> str | None:
        image = self._find_image(name)
        return image.id if image else None

    def image_labels(self, name: str) -> dict[str, str]:
        image = self._find_image(name)
        return dict(image.labels or {}) if image else {}

    def remove_image(self, name: str, timeout: float = 120) -> None:
        self._call(lambda: self.client.images.remove(name, force=True),
                   timeout=timeout, what=f"removing image {name}")

    def pull(self, repository: str, tag: str, *, timeout: float) -> str | None:
        """Pull ``repository:tag``; its id.  EngineError when the registry
        or the engine fails, or the pull runs past ``timeout``."""
        what = f"pulling {repository}:{tag}"
        why = self._stream(what, lambda api: api.pull(repository, tag=tag, stream=True,
                                                      decode=True),
                           timeout=timeout, idle_timeout=None, handle=lambda item: None)
        if why:
            raise EngineError(f"{what} ran past its {timeout:.0f} s deadline and was abandoned")
        return self.image_id(f"{repository}:{tag}")

    def import_image(self, tarball: Path, repository: str, tag: str, *,
                     changes: Sequence[str] = (), timeout: float) -> str | None:
        """Import a root file system tarball as ``repository:tag``; its id."""
        name = f"{repository}:{tag}"
        reply = self._call(lambda: self.client.api.import_image_from_file(
            str(tarball), repository=repository, tag=tag, changes=list(changes)),
            timeout=timeout, what=f"importing {name}")
        # Podman's compat API ignores the tag (names it :latest): tag the
        # imported ID explicitly, and take :latest back.
        imported = re.findall(r"sha256:[0-9a-f]{64}", str(reply))
        if imported:
            self._call(lambda: self.client.api.tag(imported[-1], repository, tag),
                       timeout=self.api_timeout, what=f"tagging {name}")
            latest = f"{repository}:latest"
            if tag != "latest" and self.image_id(latest) == imported[-1]:
                self.remove_image(latest)
        return self.image_id(name)

    def build(self, context: Path, *, tag: str, buildargs: Mapping[str, str] | None = None,
              labels: Mapping[str, str] | None = None, timeout: float = 1800,
              idle_timeout: float | None = 900, log_path: Path | None = None,
              on_line: LineCallback | None = None) -> str:
        """Build the Dockerfile in ``context`` as ``tag``; the image's id.

        Host networking (apt in RUN steps), never a pull.  A failing step,
        or a build past its deadline or silent past ``idle_timeout``,
        raises ImageBuildFailed with the log's tail (an abandoned build
        drops only its own connection, the engine stays usable); the API
        failing is EngineError.
        """
        sink = LogSink(log_path, on_line)
        errors: list[str] = []

        def handle(item: object) -> None:
            if not isinstance(item, dict):
                return
            if "stream" in item:
                sink.write(str(item["stream"]))
            if "error" in item:
                errors.append(str(item["error"]))
                sink.write(f"ERROR: {item['error']}\n")

        read_timeout = int(max(60.0, idle_timeout or timeout))
        try:
            why = self._stream(
                f"building image {tag}",
                lambda api: api.build(
                    path=str(context), dockerfile="Dockerfile", tag=tag,
                    buildargs=dict(buildargs or {}), network_mode="host", rm=True,
                    forcerm=True, pull=False, decode=True, labels=dict(labels or {}),
                    timeout=read_timeout),
                timeout=timeout, idle_timeout=idle_timeout, handle=handle)
        finally:
            sink.close()
        if why:
            limit = timeout if why == "deadline" else idle_timeout
            raise ImageBuildFailed(
                f"building image {tag} ran past its {why} limit ({limit:.0f} s) and was "
                f"abandoned\n{sink.tail()}")
        image = self.image_id(tag)
        if errors or not image:
            raise ImageBuildFailed(f"building image {tag} failed:\n{sink.tail()}")
        return image

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
        self._check_open("running a container")
        with ExitStack() as overlays:
            mounts = [self._overlaid(m, overlays) for m in mounts]
            return self._run(image, list(command), mounts=mounts, env=env,
                             network=network, workdir=workdir, timeout=timeout,
                             idle_timeout=idle_timeout, log_path=log_path,
                             on_line=on_line)

    def _overlaid(self, mount: Mount, overlays: ExitStack) -> Mount:
        """An overlay mount made on the host (root, local engine): zero-copy,
        and nothing reaches the source.  The Docker API cannot make one
        (podman's rejects ``:O``), so otherwise _binds() mounts the source
        read-only and copies it inside."""
        if mount.mode != "overlay":
            return mount
        merged = overlays.enter_context(host_overlay(
            Path(mount.source), enabled=self.settings.host_overlay and self.is_local))
        return Mount(str(merged), mount.target, "rw") if merged else mount

    def _run(self, image: str, command: list[str], *, mounts: Sequence[Mount],
             env: Mapping[str, str] | None, network: str, workdir: str | None,
             timeout: float, idle_timeout: float | None, log_path: Path | None,
             on_line: LineCallback | None) -> RunResult:
        binds, copies = _binds(mounts)
        if copies:
            command = ["sh", "-c", copies + ' && exec "$@"', "sh", *command]
        shown = " ".join(command)
        sink = LogSink(log_path, on_line)
        start = time.monotonic()
        deadline = start + timeout
        container = self._call(lambda: self.client.containers.create(
            image, command, volumes=binds, environment=dict(env or {}),
            network_mode=network, working_dir=workdir, ulimits=_ulimits(),
            labels={CONTAINER_LABEL: "1"}, detach=True, tty=False),
            timeout=min(timeout, self.api_timeout), what=f"creating a container of {image}")
        try:
            self._call(container.start, timeout=min(timeout, self.api_timeout),
                       what="starting the container")
            try:
                why = _pump(_log_stream(container), deadline, idle_timeout,
                            lambda text: sink.write(str(text)))
            except Exception as exc:
                raise self._failure("reading the container's output", exc) from exc
            if why:
                try:
                    self._call(container.kill, timeout=60, what="killing the container")
                except EngineError:  # already gone; removed below either way
                    log.debug("killing the container failed", exc_info=True)
                sink.close()
                limit = timeout if why == "deadline" else idle_timeout
                raise ContainerKilled(
                    f"container ran past its {why} limit ({limit:.0f} s) and was "
                    f"killed: {shown}\n{sink.tail()}")
            status = self._call(container.wait, timeout=max(5.0, deadline - time.monotonic()),
                                what="waiting for the container")
            sink.close()
            code = int(status.get("StatusCode", -1))
            state = self._call(lambda: self.client.api.inspect_container(container.id),
                               timeout=30, what="inspecting the container")
            oom = bool(state.get("State", {}).get("OOMKilled"))
            if oom or code in (128 + signal.SIGKILL, 128 + signal.SIGTERM):
                raise ContainerKilled(
                    f"container was killed ({'out of memory' if oom else f'exit {code}'}): "
                    f"{shown}\n{sink.tail()}")
            return RunResult(code, sink.text, time.monotonic() - start, tuple(command))
        finally:
            sink.close()
            try:
                self._call(lambda: container.remove(force=True), timeout=60,
                           what="removing the container")
            except EngineError:  # reported, but must not hide the real error
                log.warning("could not remove container %s", container.id, exc_info=True)

    def leftover_containers(self) -> list[str]:
        """Containers qemupatch created that still exist (should be none)."""
        found = self._call(lambda: self.client.containers.list(
            all=True, filters={"label": CONTAINER_LABEL}), timeout=60,
            what="listing containers")
        return [c.id for c in found or []]

    # -- every call goes through these ---------------------------------------

    def _call(self, fn: Callable[[], object], *, timeout: float, what: str):
        """Run one blocking SDK call with a deadline; its result."""
        self._check_open(what)
        result: list[object] = []

        def once() -> Iterator[object]:
            yield fn()

        try:
            why = _pump(once(), time.monotonic() + timeout, None, result.append)
        except QemupatchError:
            raise
        except Exception as exc:
            raise self._failure(what, exc) from exc
        if why:
            raise EngineError(f"the {self.name} engine did not answer {what} "
                              f"within {timeout:.0f} s{self._service_note()}")
        return result[0] if result else None

    def _stream(self, what: str, request: Callable[[object], Iterable], *,
                timeout: float, idle_timeout: float | None,
                handle: Callable[[object], None]) -> str | None:
        """Run one streaming request on a client of its own; None when the
        stream ended, "deadline" or "idle" when it was abandoned.

        Abandoning shuts down that request's socket (the daemon sees the
        client go, the reader thread wakes up) and closes its client: the
        engine's own connections are untouched.
        """
        import docker

        self._check_open(what)
        api = docker.APIClient(base_url=self.base_url, version=self.client.api.api_version,
                               timeout=int(self.api_timeout))
        responses: list[object] = []
        api.hooks["response"].append(lambda response, **kwargs: responses.append(response))

        def items() -> Iterator[object]:
            yield from request(api)     # the request itself, too, in the reader thread

        why = "error"
        try:
            why = _pump(items(), time.monotonic() + timeout, idle_timeout, handle)
        except QemupatchError:
            raise
        except Exception as exc:
            raise self._failure(what, exc) from exc
        finally:
            if why is not None:
                for response in responses:
                    _shut_down(response)
            api.close()
        return why

    def _failure(self, what: str, exc: Exception) -> EngineError:
        return EngineError(f"{what} failed: {exc}{self._service_note()}")

    def _service_note(self) -> str:
        """Why the engine may not answer, when it knows (the podman service died)."""
        return ""


def _shut_down(response: object) -> None:
    """Drop the connection a streaming response reads from."""
    try:
        sock = response.raw.connection.sock
        sock.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        log.debug("could not shut down an abandoned stream", exc_info=True)


def _binds(mounts: Sequence[Mount]) -> tuple[list[str], str]:
    """Bind specifications, and the shell commands that copy overlay mounts
    (made read-only) into place inside the container."""
    binds: list[str] = []
    copies: list[str] = []
    for m in mounts:
        if m.mode == "overlay":
            staged = "/.qemupatch-ro" + m.target
            binds.append(f"{m.source}:{staged}:ro")
            skip = " ".join(f"--exclude=./{shlex.quote(x)}" for x in m.exclude)
            copies.append(f"mkdir -p {m.target} && tar -C {staged} {skip} -cf - . "
                          f"| tar -C {m.target} -xf -")
        elif m.mode in ("rw", "ro"):
            binds.append(f"{m.source}:{m.target}:{m.mode}")
        elif m.mode == "volume":
            binds.append(f"{m.source}:{m.target}:rw")
        else:
            raise ValueError(f"unknown mount mode {m.mode!r}")
    return binds, " && ".join(copies)


def _log_stream(container) -> Iterator[str]:
    """The container's output; opened lazily, in the reader thread, because
    podman answers the logs request only once there is output."""
    for chunk in container.logs(stream=True, follow=True):
        yield chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else str(chunk)


def _image_names(name: str) -> list[str]:
    """The names an engine may know ``name`` by (podman adds registries)."""
    names = [name]
    if "/" not in name.split(":")[0]:
        names += [f"docker.io/library/{name}", f"localhost/{name}"]
    elif name.startswith("docker.io/library/"):
        names.append(name[len("docker.io/library/"):])
    return names


class DockerEngine(Engine):
    name = "docker"

    @classmethod
    def connect(cls, *, settings: Settings = Settings(),
                api_timeout: float = API_TIMEOUT) -> "DockerEngine":
        url = settings.docker_host or DEFAULT_DOCKER_HOST
        if url.startswith("unix://") and not Path(url[len("unix://"):]).exists():
            raise NoContainerEngine(f"docker: no daemon socket at {url}")
        try:
            # The client asks the daemon its API version (socket timeout
            # api_timeout), then ping with a deadline.
            engine = cls(url, settings=settings, api_timeout=api_timeout)
        except Exception as exc:
            raise NoContainerEngine(f"docker: daemon at {url} does not answer: {exc}") from exc
        try:
            engine._call(engine.client.ping, timeout=min(api_timeout, 15),
                         what=f"pinging {url}")
        except EngineError as exc:
            engine.close()
            raise NoContainerEngine(f"docker: daemon at {url} does not answer: {exc}") from exc
        return engine


class PodmanEngine(Engine):
    """A private ``podman system service`` that lives as long as this object."""

    name = "podman"

    def __init__(self, base_url: str, *, service: Process, state_dir: Path,
                 settings: Settings = Settings(), api_timeout: float = API_TIMEOUT):
        self.service: Process | None = service
        self.state_dir = state_dir
        super().__init__(base_url, settings=settings, api_timeout=api_timeout)
        atexit.register(self.close)

    @classmethod
    def start(cls, *, settings: Settings = Settings(), api_timeout: float = API_TIMEOUT,
              start_timeout: float = 60.0) -> "PodmanEngine":
        podman = shutil.which("podman")
        if not podman:
            raise NoContainerEngine("podman: not installed (no 'podman' in PATH)")
        state = Path(tempfile.mkdtemp(prefix="qemupatch-podman-"))
        runtime = 'runtime = "runc"' if shutil.which("runc") else ""
        conf = state / "containers.conf"
        conf.write_text(PODMAN_CONF.format(runtime=runtime))
        sock = state / "podman.sock"
        argv = [podman, "system", "service", "--time=0", f"unix://{sock}"]
        service = spawn(argv, deadline=SERVICE_DEADLINE, env={"CONTAINERS_CONF": str(conf)},
                        stdout=state / "service.log")
        deadline = time.monotonic() + start_timeout
        while not sock.exists():
            if service.poll() is not None or time.monotonic() > deadline:
                code = service.stop(SERVICE_STOP_GRACE)
                text = (state / "service.log").read_text(errors="replace")
                shutil.rmtree(state, ignore_errors=True)
                raise NoContainerEngine(
                    f"podman: '{' '.join(argv)}' did not start (exit {code}): "
                    + "\n".join(text.rstrip().splitlines()[-10:]))
            time.sleep(0.1)
        try:
            engine = cls(f"unix://{sock}", service=service, state_dir=state,
                         settings=settings, api_timeout=api_timeout)
        except Exception as exc:
            service.stop(SERVICE_STOP_GRACE)
            shutil.rmtree(state, ignore_errors=True)
            raise NoContainerEngine(f"podman: the service does not answer: {exc}") from exc
        try:
            engine._call(engine.client.ping, timeout=max(1.0, deadline - time.monotonic()),
                         what="pinging the podman service")
        except EngineError as exc:
            engine.close()
            raise NoContainerEngine(f"podman: the service does not answer: {exc}") from exc
        return engine

    def close(self) -> None:
        """Close the client, stop the service and remove its state."""
        super().close()
        if self.service is not None:
            self.service.stop(SERVICE_STOP_GRACE)
            self.service = None
            shutil.rmtree(self.state_dir, ignore_errors=True)
        atexit.unregister(self.close)

    def _service_note(self) -> str:
        if self.service is None or self.service.poll() is None:
            return ""
        try:
            text = (self.state_dir / "service.log").read_text(errors="replace")
        except OSError:
            text = ""
        last = "\n".join(text.rstrip().splitlines()[-5:])
        return (f"\nthe podman service ({self.service.pid}) exited with status "
                f"{self.service.poll()}" + (f":\n{last}" if last else ""))
