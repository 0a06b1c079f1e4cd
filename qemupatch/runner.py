"""Where a build runs: this machine or a container, behind one interface.

build.py describes a build as data (a ``BuildSpec``: a shell script, its
mounts, an image) and never asks where it runs.  A runner does the rest
(tuxmake's ``Runtime``/``NullRuntime``, with deadlines)::

    Runner.get(name, settings)       context manager: "host", or a container
                                     engine ("auto", "docker", "podman")
      HostRunner(settings)           this machine's compiler and headers
      ContainerRunner(engine)        an open engine.Engine, so that several
                                     builds share one podman service
    runner.prepare(spec, ...)     -> Environment (image, packages, compiler)
    runner.run(spec, env, ...)    -> RunResult (a non-zero exit is returned;
                                     the deadline raises ContainerKilled)
    runner.cli_command(spec, env) -> the same step as a shell command line
    runner.describe()             -> what build.json records about the runner

A ``Mount`` names a shell variable; the script uses ``"$VAR"``, which the
container runner sets to the mount's target and the host runner to its
host path, so one script serves both.  On the host an ``overlay`` mount
(writable, the user's tree untouched) is a copy in a stable scratch
folder, made with its mtimes: a build directory configured against it
stays incremental from one build to the next, which a fresh overlay mount
point per build would not allow.  A failed copy is CommandFailed (exit 3).
"""

from __future__ import annotations

import shlex
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qemupatch.config import Settings
from qemupatch.engine import RunResult  # the Docker SDK loads only when an engine opens
from qemupatch.errors import (
    CommandFailed,
    CommandTimeout,
    ContainerKilled,
    UserError,
)
from qemupatch.run import run, stream

if TYPE_CHECKING:       # the Docker SDK loads only when a container is used
    from qemupatch.build import BuildSpec
    from qemupatch.engine import Engine
    from qemupatch.images import ImageFacts

LineCallback = Callable[[str], None]
RUNNER_NAMES = ("auto", "docker", "podman", "host")
# The keys of build.json's "image" block, for every kind of build.
IMAGE_KEYS = ("id", "tag", "base", "content_hash", "built_now", "build_seconds",
              "dockerfile", "dockerfile_sha256")


@dataclass(frozen=True)
class Mount:
    """A folder the build script reaches as ``"$var"``.

    mode: ``ro``, ``rw``, ``overlay`` (writable for the build, changes
    discarded, the host tree untouched) or ``volume`` (in a container, the
    named volume ``volume``; on the host, the folder ``host``).
    ``exclude``: top-level names an overlay copy leaves out (``.git``).
    """

    var: str
    host: Path
    target: str
    mode: str = "rw"
    volume: str | None = None
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Environment:
    """What the build ran with, for build.json: ``image`` is None on the host."""

    image: Mapping[str, object] | None
    packages: tuple[str, ...]
    compiler: str
    tools: tuple[str, ...] = ()

    @property
    def image_tag(self) -> str | None:
        return str(self.image["tag"]) if self.image else None


class Runner(ABC):
    """The interface; ``kind`` is "host" or "container", ``name`` the engine."""

    name: str
    kind: str
    settings: Settings

    @staticmethod
    @contextmanager
    def get(name: str = "auto", settings: Settings | None = None) -> Iterator["Runner"]:
        settings = settings or Settings()
        if name not in RUNNER_NAMES:
            raise UserError(f"unknown runner {name!r}; one of {', '.join(RUNNER_NAMES)}")
        if name == "host":
            yield HostRunner(settings)
            return
        from qemupatch.engine import Engine

        with Engine.get(name, settings=settings) as engine:
            yield ContainerRunner(engine)

    @abstractmethod
    def describe(self) -> dict:
        """What build.json records about where the build ran."""

    @abstractmethod
    def prepare(self, spec: "BuildSpec", *, log_dir: Path, timeout: float,
                on_line: LineCallback | None = None) -> Environment:
        """The build environment (image or host compiler), and its facts."""

    @abstractmethod
    def run(self, spec: "BuildSpec", env: Environment, *, scratch: Path, timeout: float,
            log_path: Path, on_line: LineCallback | None = None) -> RunResult:
        """Run the spec's script: a non-zero exit is returned, never raised
        (on both runners); the deadline raises ContainerKilled."""

    @abstractmethod
    def cli_command(self, spec: "BuildSpec", env: Environment, *, scratch: Path) -> str:
        """The same step as a shell command line, for reproduce.sh."""


# -- this machine ---------------------------------------------------------------


class HostRunner(Runner):
    kind = "host"
    name = "host"

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()

    def describe(self) -> dict:
        return {"engine": "host"}

    def prepare(self, spec: "BuildSpec", *, log_dir: Path, timeout: float,
                on_line: LineCallback | None = None) -> Environment:
        for path, hint in spec.host_requires.items():
            if not Path(path).exists():
                raise UserError(f"{path} is missing on this host: {hint}")
        return Environment(image=None, packages=_host_packages(), compiler=_first_line(
            ["gcc", "--version"]), tools=tuple(filter(None, (
                _first_line(["ccache", "--version"]), _first_line(["ninja", "--version"])))))

    def paths(self, spec: "BuildSpec", scratch: Path) -> dict[str, str]:
        """Each mount's variable and the host folder the script sees."""
        return {m.var: str(scratch / m.var.lower() if m.mode == "overlay" else m.host)
                for m in spec.mounts}

    def run(self, spec: "BuildSpec", env: Environment, *, scratch: Path, timeout: float,
            log_path: Path, on_line: LineCallback | None = None) -> RunResult:
        paths = self.paths(spec, scratch)
        for m in spec.mounts:
            if m.mode == "overlay":
                _copy_tree(m.host, Path(paths[m.var]), m.exclude, timeout)
            elif m.mode in ("rw", "volume"):
                m.host.mkdir(parents=True, exist_ok=True)
        argv = ["bash", "-c", spec.script]
        try:
            done = stream(argv, timeout=timeout, idle_timeout=spec.idle_timeout,
                          log_path=log_path, env={**spec.env, **paths, **self._tools()},
                          on_line=on_line)
        except CommandFailed as exc:
            return RunResult(exc.returncode, exc.output, 0.0, tuple(argv))
        except CommandTimeout as exc:
            raise ContainerKilled(f"build ran past its time limit and was killed: {exc}\n"
                                  f"full log: {log_path}") from exc
        return RunResult(done.returncode, done.output, done.seconds, tuple(argv))

    @staticmethod
    def _tools() -> dict[str, str]:
        """QEMU's configure runs ``python3`` from PATH and needs meson: the
        Python running qemupatch (its venv has meson) comes first."""
        return {"HOST_TOOLS": str(Path(sys.executable).parent)}

    def cli_command(self, spec: "BuildSpec", env: Environment, *, scratch: Path) -> str:
        assigned = {**spec.env, **self.paths(spec, scratch), **self._tools()}
        return " ".join(["env", *(shlex.quote(f"{k}={v}") for k, v in assigned.items()),
                         "bash", "-c", shlex.quote(spec.script)])


def _copy_tree(source: Path, dest: Path, exclude: tuple[str, ...], timeout: float) -> None:
    """``source`` over ``dest``, mtimes kept (so ninja sees only real changes)."""
    dest.mkdir(parents=True, exist_ok=True)
    skip = " ".join(f"--exclude=./{shlex.quote(x)}" for x in exclude)
    run(["bash", "-c", f"set -o pipefail; tar -C {shlex.quote(str(source))} "
         f"{skip} -cf - . | tar -C {shlex.quote(str(dest))} -xf -"], timeout=timeout)


def _first_line(argv: list[str]) -> str:
    try:
        done = run(argv, timeout=30, check=False)
    except (CommandTimeout, OSError):
        return ""
    return done.stdout.partition("\n")[0].strip() if done.returncode == 0 else ""


def _host_packages() -> tuple[str, ...]:
    try:
        done = run(["dpkg-query", "-W", "-f=${Package}=${Version}\\n"], timeout=60,
                   check=False)
    except (CommandTimeout, OSError):
        return ()
    return tuple(done.stdout.split())


# -- a container ----------------------------------------------------------------


class ContainerRunner(Runner):
    """Builds in containers of an engine the caller keeps open."""

    kind = "container"

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.name = engine.name
        self.settings = engine.settings
        self._facts: dict[str, ImageFacts] = {}     # by image ID

    def describe(self) -> dict:
        return self.engine.describe()

    def prepare(self, spec: "BuildSpec", *, log_dir: Path, timeout: float,
                on_line: LineCallback | None = None) -> Environment:
        from qemupatch import images

        if spec.dockerfile is None or not spec.dockerfile.is_file():
            raise UserError(f"no build environment for this build: Dockerfile "
                            f"{spec.dockerfile} is missing")
        image = images.ensure_image(
            self.engine, spec.dockerfile, buildargs=dict(spec.buildargs), timeout=timeout,
            log_path=log_dir / "image.log", on_line=on_line)
        if image.id not in self._facts:       # an image's packages never change
            self._facts[image.id] = images.image_facts(self.engine, image,
                                                       min(300.0, timeout))
        facts = self._facts[image.id]
        return Environment(
            image={"id": image.id, "tag": image.tag, "base": image.base,
                   "content_hash": image.content_hash, "built_now": image.built,
                   "build_seconds": round(image.seconds, 1),
                   "dockerfile": str(spec.dockerfile),
                   "dockerfile_sha256": image.dockerfile_sha256},
            packages=tuple(facts.packages), compiler=facts.compiler,
            tools=tuple(facts.tools))

    def _mounts(self, spec: "BuildSpec") -> list:
        from qemupatch.engine import Mount as EngineMount

        return [EngineMount(m.volume, m.target, "volume") if m.mode == "volume"
                else EngineMount(str(m.host), m.target, m.mode, exclude=m.exclude)
                for m in spec.mounts]

    def _env(self, spec: "BuildSpec") -> dict[str, str]:
        return {**spec.env, **{m.var: m.target for m in spec.mounts}}

    def run(self, spec: "BuildSpec", env: Environment, *, scratch: Path, timeout: float,
            log_path: Path, on_line: LineCallback | None = None) -> RunResult:
        for m in spec.mounts:
            if m.mode == "rw":
                m.host.mkdir(parents=True, exist_ok=True)
        return self.engine.run(
            env.image_tag, ["bash", "-c", spec.script], mounts=self._mounts(spec),
            env=self._env(spec), network=spec.network, timeout=timeout,
            idle_timeout=spec.idle_timeout, log_path=log_path, on_line=on_line)

    def cli_command(self, spec: "BuildSpec", env: Environment, *, scratch: Path) -> str:
        words = [self.name, "run", "--rm"]
        if self.name == "podman":
            words += ["--runtime", "runc", "--ulimit", "nofile=1024:1024",
                      "--ulimit", "nproc=1000:1000"]
        words += ["--network", spec.network]
        for k, v in self._env(spec).items():
            words += ["-e", f"{k}={v}"]
        for m in spec.mounts:
            suffix = {"overlay": ":O", "ro": ":ro"}.get(m.mode, "")
            source = m.volume if m.mode == "volume" else str(m.host)
            words += ["-v", f"{source}:{m.target}{suffix}"]
        words += [str(env.image_tag), "bash", "-c", spec.script]
        return " ".join(shlex.quote(w) for w in words)
