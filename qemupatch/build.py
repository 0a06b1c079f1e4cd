"""The build stage: QEMU, the guest module and the guest test program.

Library functions returning frozen data; nothing here prints except through
the ``progress`` sink, and nothing exits::

    build_qemu(source, out_dir, release=..., repacked=..., engine="auto")
        -> BuildResult
    build_module(module_src, kernel, out_dir, engine="auto") -> Path (.ko)
    build_guest_program(src, out_dir, engine="auto") -> Path (static binary)

``engine`` is ``"host"`` (build on this machine), a container engine name
(``auto``, ``docker``, ``podman``: see container.py) or an open
``container.Engine`` to share one service between several builds.

In a container, the build image comes from the top-level ``Dockerfile``
(bookworm) or ``ci/Dockerfile.<suite>`` and is rebuilt only when its
content hash changes; the QEMU source is mounted as an overlay (writable in
the container, the user's tree untouched), the build directory is a host
directory, compiler output is cached in a persistent ccache volume, and the
compile runs with no network.

Every build writes ``build.json`` (provenance: image, packages, compiler,
versions, series hash, ccache figures, artifact hashes, command line) before
it compiles and again when it ends, plus ``reproduce.sh``; full logs go to
``<out_dir>/logs/``.

Errors: NoContainerEngine (30), ImageBuildFailed (31), CompileFailed (32),
ContainerKilled (33, also for a build past its deadline).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from qemupatch.config import GuestKernel, default_cache_dir
from qemupatch.container import Engine, Image, Mount
from qemupatch.errors import (
    CommandFailed,
    CommandTimeout,
    CompileFailed,
    ContainerKilled,
    ImageBuildFailed,
    UserError,
)
from qemupatch.run import run, stream
from qemupatch.upstream import sha256_file

REPO_ROOT = Path(__file__).resolve().parent.parent
QEMU_TARGET = "x86_64-softmmu"
QEMU_BINARY = "qemu-system-x86_64"
CONFIGURE_ARGS = (
    "--cc=gcc",
    f"--target-list={QEMU_TARGET}",
    "--without-default-features",
    "--disable-docs",
    # We copy the binary out rather than install; and Debian's repacked
    # tarballs lack the blobs pc-bios/meson.build would install.
    "--disable-install-blobs",
)
CCACHE_VOLUME = "qemupatch-ccache"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SCHEMA = 1
ERROR_RE = re.compile(
    r"(error:|ERROR:|FAILED:|fatal error|undefined reference|Error \d+|"
    r"No such file or directory|not found)")
NINJA_STEP_RE = re.compile(r"^\[(\d+)/(\d+)\]")


# -- results -----------------------------------------------------------------


@dataclass(frozen=True)
class CcacheStats:
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


@dataclass(frozen=True)
class BuildResult:
    kind: str                       # "qemu", "module", "guest-program"
    engine: str                     # "host", "podman", "docker"
    out_dir: Path
    binary: Path                    # the main artifact
    artifacts: tuple[Path, ...]
    build_json: Path
    reproduce_sh: Path
    log_dir: Path
    seconds: float                  # the compile (configure + ninja/make)
    image_id: str | None = None
    image_tag: str | None = None
    image_built: bool = False
    image_seconds: float = 0.0
    ccache: CcacheStats | None = None
    version: str = ""               # QEMU version or kernel release
    sha256: Mapping[str, str] = field(default_factory=dict)


# -- progress ----------------------------------------------------------------


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


class TerminalProgress:
    """Stage and percent of ninja steps: a rich bar on a terminal, plain
    lines (one per stage and every 10 %) otherwise."""

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


# -- helpers -----------------------------------------------------------------


def series_hash(patches: Path | None) -> str | None:
    """sha256 over the relative names and contents of every file in ``patches``."""
    if patches is None or not patches.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in patches.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(patches)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def edk2_standins(source: Path) -> list[str]:
    """The ``pc-bios/edk2-*.fd.bz2`` files pc-bios/meson.build lists and the
    tree lacks (Debian's repacked tarballs drop them)."""
    meson = source / "pc-bios" / "meson.build"
    if not meson.is_file():
        return []
    names = sorted(set(re.findall(r"'(edk2-[\w.-]+\.fd)'", meson.read_text())))
    return [f"{n}.bz2" for n in names if not (source / "pc-bios" / f"{n}.bz2").exists()]


def _first_errors(text: str, count: int = 12) -> str:
    hits = [line for line in text.splitlines() if ERROR_RE.search(line)]
    if not hits:
        hits = text.rstrip().splitlines()[-count:]
    return "\n".join(hits[:count])


def _parse_ccache(text: str) -> CcacheStats | None:
    """Figures from ``ccache --print-stats`` (key<TAB>value lines)."""
    stats: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[1].strip().isdigit():
            stats[parts[0].strip()] = int(parts[1])
    if not stats:
        return None
    hits = stats.get("direct_cache_hit", 0) + stats.get("preprocessed_cache_hit", 0)
    return CcacheStats(hits=hits, misses=stats.get("cache_miss", 0))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _git_describe(path: Path) -> str | None:
    try:
        done = run(["git", "-C", path, "describe", "--always", "--dirty", "--tags"],
                   timeout=30, check=False)
    except (CommandTimeout, OSError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


class _Record:
    """build.json, written early and rewritten as facts arrive."""

    def __init__(self, out_dir: Path, data: dict, name: str = "build"):
        self.path = out_dir / f"{name}.json"
        self.data = {"schema": SCHEMA, "status": "running", "started": _now(), **data}
        self.write()

    def update(self, **data: object) -> None:
        self.data.update(data)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True, default=str) + "\n")
        tmp.replace(self.path)


def _write_reproduce(out_dir: Path, call: str, container_cmd: str | None,
                     name: str = "reproduce") -> Path:
    """reproduce.sh: re-runs the same build through the same function."""
    path = out_dir / f"{name}.sh"
    lines = [
        "#!/bin/sh",
        "# Re-run this build exactly: same function, same arguments.",
        "# Written by qemupatch; see build.json next to it for what was used.",
        "set -eu",
        f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "exec python3 - <<'QEMUPATCH_EOF'",
        *call.splitlines(),
        "QEMUPATCH_EOF",
    ]
    if container_cmd:
        lines += ["", "# The container step alone, for a shell (the image is tagged by",
                  "# its content hash; qemupatch rebuilds it when needed):"]
        lines += [f"#   {line}" for line in container_cmd.splitlines()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


class _Expr(str):
    """Source text that repr() leaves as it is."""

    def __repr__(self) -> str:
        return str(self)


def _kernel_expr(k: GuestKernel) -> _Expr:
    return _Expr(f"GuestKernel(name={k.name!r}, suite={k.suite!r}, "
                 f"image_package={k.image_package!r}, "
                 f"headers_packages={tuple(k.headers_packages)!r})")


def _call_text(func: str, *args: object, **kwargs: object) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return ("from pathlib import PosixPath\nfrom qemupatch.config import GuestKernel\n"
            f"from qemupatch.build import {func}\nprint({func}(\n    "
            + ",\n    ".join(parts) + "))")


def _cli_run(eng: Engine) -> str:
    """The CLI spelling of a qemupatch container run, for reproduce.sh."""
    if eng.name == "podman":
        return ("podman run --rm --runtime runc --ulimit nofile=1024:1024 "
                "--ulimit nproc=1000:1000")
    return f"{eng.name} run --rm"


@contextmanager
def _engine(engine: "str | Engine") -> Iterator[Engine]:  # noqa: D401
    if isinstance(engine, Engine):
        yield engine
        return
    with Engine.get(engine) as opened:
        yield opened


def _dockerfile_for(suite: str, dockerfile: Path | None) -> Path:
    if dockerfile is not None:
        return dockerfile
    if suite == "bookworm":
        return REPO_ROOT / "Dockerfile"
    path = REPO_ROOT / "ci" / f"Dockerfile.{suite}"
    if not path.is_file():
        raise UserError(f"no build environment for Debian {suite}: {path} is missing")
    return path


def _context_files(dockerfile: Path) -> dict[str, Path]:
    """The host CA bundle, for Dockerfiles that use it (pip behind a proxy).
    ``QEMUPATCH_CA_BUNDLE`` names another bundle."""
    if "host-ca.crt" not in dockerfile.read_text():
        return {}
    bundle = Path(os.environ.get("QEMUPATCH_CA_BUNDLE", HOST_CA_BUNDLE))
    if not bundle.is_file():
        raise ImageBuildFailed(f"CA bundle {bundle} not found; set QEMUPATCH_CA_BUNDLE")
    return {"host-ca.crt": bundle}


def _image(eng: Engine, dockerfile: Path, buildargs: Mapping[str, str],
           log_dir: Path, progress: Progress, timeout: float) -> Image:
    progress.stage(f"image ({dockerfile.name})")
    return eng.ensure_image(dockerfile, buildargs=buildargs,
                            context_files=_context_files(dockerfile),
                            timeout=timeout, log_path=log_dir / "image.log",
                            on_line=progress.line)


def _image_facts(eng: Engine, image: Image, timeout: float) -> dict:
    """Packages and tool versions inside the image (for build.json)."""
    script = ("dpkg-query -W -f='${Package}=${Version}\\n'; echo '#tools'; "
              "gcc --version | head -n1; (ccache --version | head -n1) 2>/dev/null; "
              "(meson --version) 2>/dev/null | sed 's/^/meson /'; "
              "(ninja --version) 2>/dev/null | sed 's/^/ninja /'; true")
    result = eng.run(image.tag, ["sh", "-c", script], timeout=timeout)
    packages, _, tools = result.output.partition("#tools")
    tool_lines = [t for t in tools.strip().splitlines() if t.strip()]
    return {
        "packages": [p for p in packages.split() if "=" in p],
        "compiler": tool_lines[0] if tool_lines else "",
        "tools": tool_lines[1:],
    }


def _host_facts() -> dict:
    facts: dict = {"packages": []}
    try:
        facts["compiler"] = run(["gcc", "--version"], timeout=30).stdout.splitlines()[0]
    except (CommandFailed, CommandTimeout, OSError) as exc:
        facts["compiler"] = f"unknown ({exc})"
    try:
        done = run(["dpkg-query", "-W", "-f=${Package}=${Version}\\n"], timeout=60)
        facts["packages"] = done.stdout.split()
    except (CommandFailed, CommandTimeout, OSError):
        pass
    return facts


def _fail(kind: str, stage: str, code: int, output: str, log_path: Path,
          record: _Record) -> CompileFailed:
    record.update(status="failed", stage=stage, exit_code=code, finished=_now())
    hint = ""
    if "Subproject" in output and ("Git command failed" in output
                                   or "buildable: NO" in output):
        hint = ("\nhint: the source tree lacks meson subprojects (release tarballs "
                "carry them; for a git checkout run 'meson subprojects download' "
                "in it first): the compile runs with no network")
    return CompileFailed(
        f"{kind} build failed at {stage} (exit {code}); first errors:\n"
        f"{_first_errors(output)}\nfull log: {log_path}\n"
        f"build record: {record.path}{hint}")


def _killed(kind: str, exc: Exception, record: _Record) -> ContainerKilled:
    record.update(status="killed", error=str(exc).splitlines()[0], finished=_now())
    return ContainerKilled(f"{kind} build killed: {exc}")


# -- QEMU --------------------------------------------------------------------


def build_qemu(source: Path, out_dir: Path, *, release: str, repacked: bool,
               engine: "str | Engine" = "auto", jobs: int = 2,
               timeout: float = 3600, progress: Progress | None = None,
               patches: Path | None = None, build_dir: Path | None = None,
               ccache_volume: str = CCACHE_VOLUME, ccache_dir: Path | None = None,
               dockerfile: Path | None = None, idle_timeout: float = 900,
               extra_targets: Sequence[str] = (),
               ) -> BuildResult:
    """Configure and compile QEMU's x86_64-softmmu from ``source``.

    ``extra_targets``: more ninja targets to build and copy out beside the
    binary (e.g. ``tests/qtest/vmsocket-test``, the series' own qtest).

    ``repacked``: ``source`` comes from Debian's repacked tarball; empty
    ``pc-bios/edk2-*.fd.bz2`` stand-ins are made (in the container's overlay,
    or in a copy on the host), never in ``source``.  ``patches`` is hashed
    into build.json.  ``build_dir`` (default ``out_dir/build-<engine>``)
    persists between builds, so an unchanged tree rebuilds in seconds.
    ``ccache_volume`` (container) or ``ccache_dir`` (host, default
    ``<cache>/ccache-host``) hold the compiler cache.
    """
    source, out_dir = Path(source).resolve(), Path(out_dir).resolve()
    if not (source / "configure").is_file():
        raise UserError(f"{source} is not a QEMU source tree (no configure)")
    progress = progress or TerminalProgress()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    start = time.monotonic()
    deadline = start + timeout
    version = (source / "VERSION").read_text().strip() if (source / "VERSION").is_file() else ""
    standins = edk2_standins(source) if repacked else []
    common = {
        "kind": "qemu",
        "release": release,
        "qemu_version": version,
        "source": str(source),
        "source_git": _git_describe(source),
        "repacked": repacked,
        "edk2_standins": standins,
        "series_hash": series_hash(patches),
        "patches": str(patches) if patches else None,
        "configure": list(CONFIGURE_ARGS),
        "jobs": jobs,
        "targets": [QEMU_BINARY, *extra_targets],
        "python_call": _call_text(
            "build_qemu", source, out_dir, release=release, repacked=repacked,
            engine=engine if isinstance(engine, str) else engine.name, jobs=jobs,
            timeout=timeout, patches=patches, build_dir=build_dir,
            ccache_volume=ccache_volume, ccache_dir=ccache_dir,
            extra_targets=tuple(extra_targets)),
    }
    try:
        if engine == "host":
            return _qemu_host(source, out_dir, log_dir, build_dir or out_dir / "build-host",
                              standins, jobs, deadline, idle_timeout, progress, common,
                              ccache_dir or default_cache_dir() / "ccache-host", start)
        with _engine(engine) as eng:
            return _qemu_container(eng, source, out_dir, log_dir,
                                   build_dir or out_dir / "build-container",
                                   standins, jobs, deadline, idle_timeout, progress,
                                   common, ccache_volume,
                                   dockerfile or REPO_ROOT / "Dockerfile", start)
    finally:
        progress.close()


def _qemu_script(standins: Sequence[str], jobs: int, src: str, build: str,
                 configure_args: Sequence[str], targets: Sequence[str]) -> str:
    lines = ["set -eu"]
    if standins:
        names = " ".join(shlex.quote(s) for s in standins)
        lines += [
            f"echo '== stand-ins: {len(standins)} empty pc-bios/edk2-*.fd.bz2'",
            f"for f in {names}; do p={src}/pc-bios/$f; "
            "[ -e \"$p\" ] || { bzip2 -c </dev/null >\"$p\"; touch -d @0 \"$p\"; }; done",
        ]
    conf = " ".join(shlex.quote(a) for a in configure_args)
    lines += [
        f"mkdir -p {build}",
        f"cd {build}",
        "if [ ! -f build.ninja ]; then",
        "  echo '== configure'",
        f"  {src}/configure {conf} || {{ echo \"configure failed\"; exit 90; }}",
        "fi",
        "command -v ccache >/dev/null && ccache -z >/dev/null || true",
        "echo '== compile'",
        f"ninja -j{int(jobs)} {' '.join(shlex.quote(t) for t in targets)} "
        "|| { echo \"ninja failed\"; exit 91; }",
        "echo '== ccache'",
        "command -v ccache >/dev/null && ccache --print-stats || true",
    ]
    return "\n".join(lines)


def _stage_of(code: int) -> str:
    return {90: "configure", 91: "compile"}.get(code, "build script")


def _qemu_container(eng: Engine, source: Path, out_dir: Path, log_dir: Path,
                    build_dir: Path, standins: list[str], jobs: int, deadline: float,
                    idle_timeout: float, progress: Progress, common: dict,
                    ccache_volume: str, dockerfile: Path, start: float) -> BuildResult:
    record = _Record(out_dir, {**common, "engine": eng.describe(), "stage": "image"})
    _write_reproduce(out_dir, common["python_call"], None)
    try:
        image = _image(eng, dockerfile, {}, log_dir, progress,
                       max(1.0, deadline - time.monotonic()))
    except ImageBuildFailed:
        record.update(status="image-failed", finished=_now())
        raise
    facts = _image_facts(eng, image, timeout=min(300.0, max(1.0, deadline - time.monotonic())))
    build_dir = build_dir.resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    script = _qemu_script(standins, jobs, "/src", "/build", CONFIGURE_ARGS, common["targets"])
    mounts = [Mount(str(source), "/src", "overlay", exclude=(".git",)),
              Mount(str(build_dir), "/build", "rw"),
              Mount(ccache_volume, "/ccache", "volume")]
    env = {"CCACHE_DIR": "/ccache", "PATH": "/usr/lib/ccache:/usr/local/bin:/usr/bin:/bin"}
    container_cmd = (
        f"{_cli_run(eng)} --network none -v {source}:/src:O -v {build_dir}:/build "
        f"-v {ccache_volume}:/ccache -e CCACHE_DIR=/ccache -e PATH={env['PATH']} "
        f"{image.tag} bash -c {shlex.quote(script)}")
    record.update(stage="compile", image={
        "id": image.id, "tag": image.tag, "content_hash": image.content_hash,
        "built_now": image.built, "build_seconds": round(image.seconds, 1),
        "base": image.base, "dockerfile": str(dockerfile),
        "dockerfile_sha256": sha256_file(dockerfile)}, packages=facts["packages"],
        compiler=facts["compiler"], tools=facts["tools"], build_dir=str(build_dir),
        ccache_volume=ccache_volume, command=container_cmd)
    _write_reproduce(out_dir, common["python_call"], container_cmd)
    progress.stage("compile QEMU")
    log_path = log_dir / "compile.log"
    log_path.unlink(missing_ok=True)
    compile_start = time.monotonic()
    try:
        result = eng.run(image.tag, ["bash", "-c", script], mounts=mounts, env=env,
                         network="none", timeout=max(1.0, deadline - time.monotonic()),
                         idle_timeout=idle_timeout, log_path=log_path,
                         on_line=_stage_lines(progress))
    except ContainerKilled as exc:
        raise _killed("QEMU", exc, record) from exc
    seconds = time.monotonic() - compile_start
    if result.exit_code != 0:
        raise _fail("QEMU", _stage_of(result.exit_code), result.exit_code,
                    result.output, log_path, record)
    return _qemu_finish(out_dir, log_dir, build_dir, record, result.output, seconds,
                        eng.name, image)


def _stage_lines(progress: Progress) -> Callable[[str], None]:
    def on_line(line: str) -> None:
        if line.startswith("== "):
            progress.stage(line[3:])
        progress.line(line)
    return on_line


def _qemu_finish(out_dir: Path, log_dir: Path, build_dir: Path, record: _Record,
                 output: str, seconds: float, engine: str,
                 image: Image | None) -> BuildResult:
    built = build_dir / QEMU_BINARY
    if not built.is_file():
        raise _fail("QEMU", "artifacts", 0, f"{built} missing after the build\n{output}",
                    log_dir / "compile.log", record)
    binary = out_dir / QEMU_BINARY
    shutil.copy2(built, binary)
    artifacts = [binary]
    for target in record.data["targets"][1:]:
        artifacts.append(out_dir / Path(target).name)
        shutil.copy2(build_dir / target, artifacts[-1])
    ccache = _parse_ccache(output.partition("== ccache")[2])
    sums = {a.name: sha256_file(a) for a in artifacts}
    record.update(
        status="ok", stage="done", finished=_now(), compile_seconds=round(seconds, 1),
        ccache=(asdict(ccache) | {"hit_rate": ccache.hit_rate}) if ccache else None,
        sha256=sums, artifacts=[a.name for a in artifacts],
        runtime_note=("firmware/ROMs are not bundled: run with -L /usr/share/qemu "
                      "-L /usr/share/seabios (Debian qemu-system-data, seabios)"))
    return BuildResult(
        kind="qemu", engine=engine, out_dir=out_dir, binary=binary, artifacts=tuple(artifacts),
        build_json=record.path, reproduce_sh=out_dir / "reproduce.sh", log_dir=log_dir,
        seconds=seconds, image_id=image.id if image else None,
        image_tag=image.tag if image else None,
        image_built=bool(image and image.built),
        image_seconds=image.seconds if image else 0.0, ccache=ccache,
        version=record.data.get("qemu_version", ""), sha256=sums)


def _qemu_host(source: Path, out_dir: Path, log_dir: Path, build_dir: Path,
               standins: list[str], jobs: int, deadline: float, idle_timeout: float,
               progress: Progress, common: dict, ccache_dir: Path,
               start: float) -> BuildResult:
    record = _Record(out_dir, {**common, "engine": {"engine": "host"}, "stage": "prepare"})
    _write_reproduce(out_dir, common["python_call"], None)
    record.update(**_host_facts())
    build_dir = build_dir.resolve()
    src = source
    if standins:
        # The stand-ins must not land in the user's tree: build from a copy
        # (mtimes kept, so an unchanged tree stays up to date).
        progress.stage("copy source (repacked tree needs edk2 stand-ins)")
        src = build_dir.parent / (build_dir.name + "-src")
        src.mkdir(parents=True, exist_ok=True)
        try:
            run(["sh", "-c", f"tar -C {shlex.quote(str(source))} --exclude=./.git -cf - . "
                 f"| tar -C {shlex.quote(str(src))} -xf -"],
                timeout=max(1.0, deadline - time.monotonic()))
        except (CommandFailed, CommandTimeout) as exc:
            raise _killed("QEMU", exc, record) from exc
    script = _qemu_script(standins, jobs, shlex.quote(str(src)), shlex.quote(str(build_dir)),
                          CONFIGURE_ARGS, common["targets"])
    ccache_dir.mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PATH", "/usr/bin:/bin")
    env = {"CCACHE_DIR": str(ccache_dir), "PATH": f"/usr/lib/ccache:{path}"}
    record.update(stage="compile", command=f"bash -c {shlex.quote(script)}",
                  build_dir=str(build_dir), ccache_dir=str(ccache_dir))
    progress.stage("compile QEMU (host)")
    log_path = log_dir / "compile.log"
    compile_start = time.monotonic()
    try:
        done = stream(["bash", "-c", script], timeout=max(1.0, deadline - time.monotonic()),
                      log_path=log_path, env=env, on_line=_stage_lines(progress),
                      idle_timeout=idle_timeout)
    except CommandTimeout as exc:
        raise _killed("QEMU", exc, record) from exc
    except CommandFailed as exc:
        raise _fail("QEMU", _stage_of(exc.returncode), exc.returncode, exc.output,
                    log_path, record) from exc
    return _qemu_finish(out_dir, log_dir, build_dir, record, done.output,
                        time.monotonic() - compile_start, "host", None)


# -- guest module ------------------------------------------------------------


def kernel_release(kernel: GuestKernel) -> str:
    """``6.1.0-56-amd64`` from ``linux-image-6.1.0-56-amd64``."""
    return kernel.image_package.removeprefix("linux-image-")


def _headers_package(kernel: GuestKernel) -> str:
    for pkg in kernel.headers_packages:
        if pkg.endswith(kernel_release(kernel)):
            return pkg
    return f"linux-headers-{kernel_release(kernel)}"


def build_module(module_src: Path, kernel: GuestKernel, out_dir: Path, *,
                 engine: "str | Engine" = "auto", timeout: float = 1800,
                 progress: Progress | None = None, patches: Path | None = None,
                 dockerfile: Path | None = None, jobs: int = 2) -> Path:
    """Build the out-of-tree module in ``module_src`` for ``kernel``; return
    the ``.ko`` (``kvm_vmsocket.ko``) copied into ``out_dir``.

    Containers: the image of the kernel's suite (bookworm → ``Dockerfile``,
    trixie → ``ci/Dockerfile.trixie``) with its headers package; host:
    ``/usr/src/linux-headers-<release>`` must be installed.  The source is
    never written to (overlay in a container, a copy on the host).
    """
    return _build_module(module_src, kernel, out_dir, engine=engine, timeout=timeout,
                         progress=progress, patches=patches, dockerfile=dockerfile,
                         jobs=jobs).binary


def _build_module(module_src: Path, kernel: GuestKernel, out_dir: Path, *,
                  engine: "str | Engine", timeout: float, progress: Progress | None,
                  patches: Path | None, dockerfile: Path | None, jobs: int) -> BuildResult:
    module_src, out_dir = Path(module_src).resolve(), Path(out_dir).resolve()
    if not any(module_src.glob("*.c")) or not (
            (module_src / "Kbuild").is_file() or (module_src / "Makefile").is_file()):
        raise UserError(f"{module_src} is not a module source folder (.c and Kbuild/Makefile)")
    progress = progress or TerminalProgress()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    release = kernel_release(kernel)
    headers = f"/usr/src/linux-headers-{release}"
    deadline = time.monotonic() + timeout
    common = {
        "kind": "module", "kernel": kernel.name, "kernel_release": release,
        "suite": kernel.suite, "source": str(module_src),
        "series_hash": series_hash(patches),
        "python_call": _call_text(
            "build_module", module_src, _kernel_expr(kernel), out_dir,
            engine=engine if isinstance(engine, str) else engine.name,
            timeout=timeout, patches=patches, jobs=jobs),
    }
    rec_name = f"build-module-{kernel.name}"
    repro_name = f"reproduce-module-{kernel.name}"
    log_path = log_dir / f"module-{kernel.name}.log"
    log_path.unlink(missing_ok=True)
    make = f"make -j{int(jobs)} -C {headers} M=/work modules"
    script = "\n".join([
        "set -eu",
        "rm -rf /work && mkdir -p /work && cp -a /module/. /work/",
        f"make -C {headers} M=/work clean >/dev/null 2>&1 || true",
        "echo '== compile module'",
        f"{make} || {{ echo 'make failed'; exit 91; }}",
        "cp /work/*.ko /out/",
        "for ko in /work/*.ko; do echo \"vermagic $(modinfo -F vermagic $ko)\"; done",
        "gcc --version | head -n1",
    ])
    try:
        try:
            if engine == "host":
                return _module_host(module_src, out_dir, log_path, headers, release, jobs,
                                    deadline, progress, common, rec_name, repro_name)
            with _engine(engine) as eng:
                record = _Record(out_dir, {**common, "engine": eng.describe(),
                                           "stage": "image"}, rec_name)
                _write_reproduce(out_dir, common["python_call"], None, repro_name)
                dockerfile = _dockerfile_for(kernel.suite, dockerfile)
                try:
                    image = _image(eng, dockerfile, {"KERNEL_HEADERS": _headers_package(kernel)},
                                   log_dir, progress, max(1.0, deadline - time.monotonic()))
                except ImageBuildFailed:
                    record.update(status="image-failed", finished=_now())
                    raise
                facts = _image_facts(eng, image, min(300.0, max(1.0, deadline - time.monotonic())))
                staging = out_dir / f".module-{kernel.name}"
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
                container_cmd = (f"{_cli_run(eng)} --network none -v {module_src}:/module:ro "
                                 f"-v {staging}:/out {image.tag} bash -c {shlex.quote(script)}")
                record.update(stage="compile", image={
                    "id": image.id, "tag": image.tag, "base": image.base,
                    "content_hash": image.content_hash, "dockerfile": str(dockerfile),
                    "dockerfile_sha256": sha256_file(dockerfile)},
                    packages=facts["packages"], compiler=facts["compiler"],
                    command=container_cmd)
                _write_reproduce(out_dir, common["python_call"], container_cmd, repro_name)
                progress.stage(f"compile module for {release}")
                t0 = time.monotonic()
                try:
                    result = eng.run(image.tag, ["bash", "-c", script],
                                     mounts=[Mount(str(module_src), "/module", "ro"),
                                             Mount(str(staging), "/out", "rw")],
                                     network="none",
                                     timeout=max(1.0, deadline - time.monotonic()),
                                     log_path=log_path, on_line=_stage_lines(progress))
                except ContainerKilled as exc:
                    raise _killed("module", exc, record) from exc
                if result.exit_code != 0:
                    raise _fail("module", _stage_of(result.exit_code), result.exit_code,
                                result.output, log_path, record)
                return _module_finish(staging, out_dir, log_path, record, result.output,
                                      time.monotonic() - t0, eng.name, image, release,
                                      repro_name)
        except (CommandFailed, CommandTimeout) as exc:  # host tools around the build
            raise ContainerKilled(f"module build: {exc}") from exc
    finally:
        progress.close()


def _module_finish(staging: Path, out_dir: Path, log_path: Path, record: _Record,
                   output: str, seconds: float, engine: str, image: Image | None,
                   release: str, repro_name: str) -> BuildResult:
    modules = sorted(staging.glob("*.ko"))
    if not modules:
        raise _fail("module", "artifacts", 0, f"no .ko produced\n{output}",
                    log_path, record)
    produced = []
    for ko in modules:
        dest = out_dir / ko.name
        shutil.copy2(ko, dest)
        produced.append(dest)
    shutil.rmtree(staging, ignore_errors=True)
    vermagic = re.findall(r"^vermagic (.*)$", output, re.M)
    if vermagic and not all(v.startswith(release + " ") or v == release for v in vermagic):
        raise _fail("module", "vermagic", 0,
                    f"error: module vermagic {vermagic} does not match {release}",
                    log_path, record)
    sums = {p.name: sha256_file(p) for p in produced}
    compiler = next((line for line in output.splitlines() if line.startswith("gcc")), "")
    record.update(status="ok", stage="done", finished=_now(), sha256=sums,
                  artifacts=[p.name for p in produced], vermagic=vermagic,
                  compile_seconds=round(seconds, 1),
                  **({"compiler": compiler} if compiler else {}))
    main = next((p for p in produced if p.name == "kvm_vmsocket.ko"), produced[0])
    return BuildResult(
        kind="module", engine=engine, out_dir=out_dir, binary=main,
        artifacts=tuple(produced), build_json=record.path,
        reproduce_sh=out_dir / f"{repro_name}.sh", log_dir=log_path.parent,
        seconds=seconds,
        image_id=image.id if image else None, image_tag=image.tag if image else None,
        image_built=bool(image and image.built),
        image_seconds=image.seconds if image else 0.0, version=release, sha256=sums)


def _module_host(module_src: Path, out_dir: Path, log_path: Path, headers: str,
                 release: str, jobs: int, deadline: float, progress: Progress,
                 common: dict, rec_name: str, repro_name: str) -> BuildResult:
    record = _Record(out_dir, {**common, "engine": {"engine": "host"}, "stage": "compile"},
                     rec_name)
    _write_reproduce(out_dir, common["python_call"], None, repro_name)
    if not Path(headers, "Makefile").is_file():
        record.update(status="failed", finished=_now())
        raise UserError(f"kernel headers for {release} are not installed on this host "
                        f"({headers}); apt-get install linux-headers-{release}, or build "
                        "in a container (engine='auto')")
    record.update(**_host_facts())
    work = out_dir / f".module-{release}-work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(module_src, work)
    run(["make", "-C", headers, f"M={work}", "clean"], timeout=120, check=False)
    staging = out_dir / f".module-{release}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    argv = ["make", f"-j{int(jobs)}", "-C", headers, f"M={work}", "modules"]
    record.update(command=" ".join(argv))
    progress.stage(f"compile module for {release} (host)")
    t0 = time.monotonic()
    try:
        done = stream(argv, timeout=max(1.0, deadline - time.monotonic()),
                      log_path=log_path, on_line=progress.line)
    except CommandTimeout as exc:
        raise _killed("module", exc, record) from exc
    except CommandFailed as exc:
        raise _fail("module", "compile", exc.returncode, exc.output, log_path,
                    record) from exc
    output = done.output
    for ko in work.glob("*.ko"):
        shutil.copy2(ko, staging / ko.name)
        magic = run(["modinfo", "-F", "vermagic", ko], timeout=30, check=False).stdout.strip()
        if magic:
            output += f"\nvermagic {magic}"
    shutil.rmtree(work, ignore_errors=True)
    return _module_finish(staging, out_dir, log_path, record, output,
                          time.monotonic() - t0, "host", None, release, repro_name)


# -- guest test program --------------------------------------------------------


def build_guest_program(src: Path, out_dir: Path, *, engine: "str | Engine" = "auto",
                        timeout: float = 600, progress: Progress | None = None,
                        suite: str = "bookworm", dockerfile: Path | None = None) -> Path:
    """``gcc -static -O2`` of ``src`` (guest/vmsocket-test.c) into ``out_dir``;
    returns the binary (named after the source file without ``.c``)."""
    src, out_dir = Path(src).resolve(), Path(out_dir).resolve()
    if not src.is_file():
        raise UserError(f"{src}: no such guest program source")
    progress = progress or TerminalProgress()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    name = src.name.removesuffix(".c")
    deadline = time.monotonic() + timeout
    flags = ["-static", "-O2", "-Wall", "-Wextra"]
    log_path = log_dir / f"{name}.log"
    log_path.unlink(missing_ok=True)
    eng_name = engine if isinstance(engine, str) else engine.name
    common = {"kind": "guest-program", "source": str(src),
              "python_call": _call_text("build_guest_program", src, out_dir,
                                        engine=eng_name, timeout=timeout, suite=suite)}
    rec_name, repro_name = f"build-{name}", f"reproduce-{name}"
    try:
        if engine == "host":
            record = _Record(out_dir, {**common, "engine": {"engine": "host"}}, rec_name)
            _write_reproduce(out_dir, common["python_call"], None, repro_name)
            record.update(**_host_facts())
            argv = ["gcc", *flags, "-o", str(out_dir / name), str(src)]
            record.update(command=" ".join(argv), stage="compile")
            progress.stage(f"compile {src.name} (host)")
            t0 = time.monotonic()
            try:
                stream(argv, timeout=max(1.0, deadline - time.monotonic()),
                       log_path=log_path, on_line=progress.line)
            except CommandTimeout as exc:
                raise _killed(name, exc, record) from exc
            except CommandFailed as exc:
                raise _fail(name, "compile", exc.returncode, exc.output, log_path,
                            record) from exc
            image = None
            seconds = time.monotonic() - t0
            engine_name = "host"
        else:
            with _engine(engine) as eng:
                record = _Record(out_dir, {**common, "engine": eng.describe()}, rec_name)
                _write_reproduce(out_dir, common["python_call"], None, repro_name)
                dockerfile = _dockerfile_for(suite, dockerfile)
                image = _image(eng, dockerfile, {}, log_dir, progress,
                               max(1.0, deadline - time.monotonic()))
                facts = _image_facts(eng, image, min(300.0, max(1.0, deadline - time.monotonic())))
                cmd = ["gcc", *flags, "-o", f"/out/{name}", f"/src/{src.name}"]
                container_cmd = (f"{_cli_run(eng)} --network none -v {src.parent}:/src:ro "
                                 f"-v {out_dir}:/out {image.tag} {' '.join(cmd)}")
                record.update(stage="compile", image={"id": image.id, "tag": image.tag,
                                                      "base": image.base},
                              packages=facts["packages"], compiler=facts["compiler"],
                              command=container_cmd)
                _write_reproduce(out_dir, common["python_call"], container_cmd, repro_name)
                progress.stage(f"compile {src.name}")
                try:
                    result = eng.run(image.tag, cmd,
                                     mounts=[Mount(str(src.parent), "/src", "ro"),
                                             Mount(str(out_dir), "/out", "rw")],
                                     network="none",
                                     timeout=max(1.0, deadline - time.monotonic()),
                                     log_path=log_path, on_line=progress.line)
                except ContainerKilled as exc:
                    raise _killed(name, exc, record) from exc
                if result.exit_code != 0:
                    raise _fail(name, "compile", result.exit_code, result.output,
                                log_path, record)
                seconds = result.seconds
                engine_name = eng.name
        binary = out_dir / name
        if not binary.is_file():
            raise _fail(name, "artifacts", 0, f"{binary} missing", log_path, record)
        record.update(status="ok", stage="done", finished=_now(),
                      sha256={name: sha256_file(binary)}, artifacts=[name],
                      compile_seconds=round(seconds, 1),
                      image_id=image.id if image else None, engine_name=engine_name)
        return binary
    finally:
        progress.close()
