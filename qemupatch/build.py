"""The build stage: QEMU, the guest module and the guest test program.

A build is data, executed by one function wherever it runs::

    qemu_spec / module_spec / guest_program_spec  -> BuildSpec (frozen)
    execute(spec, runner, out_dir, progress)      -> BuildResult
        record     build.json written at once, rewritten as facts arrive,
                   and in a ``finally`` (a crash or SIGTERM still says
                   where the build stopped and why)
        reproduce  reproduce.sh: the same Python call, and the bare step
        prepare    the runner's image (container) or compiler (host)
        run        the script; a non-zero exit is CompileFailed (32) with
                   the first error lines, the deadline ContainerKilled (33)
        collect    artifacts from $OUT into out_dir, with sha256

    build_qemu(source, out_dir, ...)           thin entry points over
    build_module(module_src, kernel, ...)      execute(); every one returns
    build_guest_program(src, out_dir, ...)     a BuildResult

runner.py says where a spec runs (this machine or a container); every kind
of build writes build.json with the same keys.  Nothing here prints except
through the progress sink (progress.py), and nothing exits.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import qemupatch
from qemupatch.config import GuestKernel
from qemupatch.errors import (
    CompileFailed,
    ContainerKilled,
    ImageBuildFailed,
    Terminated,
    UserError,
)
from qemupatch.progress import Progress, TerminalProgress, stage_lines
from qemupatch.records import utc_now, write_json
from qemupatch.runner import IMAGE_KEYS, Environment, Mount, Runner
from qemupatch.upstream import sha256_file

SCHEMA = 2
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
# ccache modes (QemuBuildOptions.ccache).  "depend" is the default: on a
# miss ccache runs no preprocessor (it hashes the -MD dependency file meson
# asks gcc for), which is what makes a cold build cost about what a plain
# build costs; hits need the same sources and headers, as in direct mode.
# All modes hash the compiler by content (the same gcc in another image or
# path still hits) and leave the working directory out of the hash, so a
# fresh build directory or another source path hits too.
CCACHE_COMMON = {"CCACHE_COMPILERCHECK": "content", "CCACHE_NOHASHDIR": "1"}
CCACHE_MODES: Mapping[str, Mapping[str, str]] = {
    "depend": {**CCACHE_COMMON, "CCACHE_DEPEND": "1"},
    "direct": {**CCACHE_COMMON},        # ccache's default: direct, preprocessor on miss
    "off": {"CCACHE_DISABLE": "1"},
}
ERROR_RE = re.compile(
    r"(error:|ERROR:|FAILED:|fatal error|undefined reference|Error \d+|"
    r"No such file or directory|not found)")
# What the build scripts exit with, so a failure names its stage.
STAGE_EXITS = {90: "configure", 91: "compile"}


# -- the data ---------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """The Python call that makes a build, written into reproduce.sh
    (the runner is added when it is written)."""

    function: str
    args: tuple[object, ...]
    kwargs: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildSpec:
    """One build, whatever runs it.  The script writes its artifacts to
    ``"$OUT"`` (execute() adds that mount) and reaches every other mount
    through its variable."""

    kind: str                               # "qemu", "module", "guest-program"
    name: str                               # "qemu", "module-6.1", "vmsocket-test"
    script: str
    call: Call
    mounts: tuple[Mount, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    dockerfile: Path | None = None
    buildargs: Mapping[str, str] = field(default_factory=dict)
    network: str = "none"
    artifacts: tuple[str, ...] = ()         # globs in $OUT; the first match of
    main_artifact: str | None = None        # main_artifact (else the first) is .binary
    deadline: float = 3600                  # seconds for image + compile
    idle_timeout: float | None = 900        # killed after this long silent
    facts: Mapping[str, object] = field(default_factory=dict)   # for build.json
    version: str = ""                       # QEMU version or kernel release
    vermagic: str | None = None             # the release every .ko must carry
    host_requires: Mapping[str, str] = field(default_factory=dict)  # path -> hint
    # The files and folders the output depends on, when they are few: the
    # last artifacts are reused while their content (and the environment)
    # is unchanged.  Empty for QEMU: its tree is too big to hash per run,
    # and ninja is its incremental build.
    inputs: tuple[Path, ...] = ()
    # What the caller already knows identifies the inputs (QEMU: the git
    # tree id of its source): reused the same way as ``inputs``, with no
    # file hashed, so an unchanged tree runs no ninja at all.
    inputs_id: str | None = None
    record: str = "build.json"
    reproduce: str = "reproduce.sh"
    log: str = "compile.log"


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
    """Every kind of build ends in one of these."""

    kind: str
    name: str
    runner: str                     # "host", "podman", "docker"
    out_dir: Path
    binary: Path                    # the main artifact
    artifacts: tuple[Path, ...]
    build_json: Path
    reproduce_sh: Path
    log_path: Path
    seconds: float                  # the compile step
    image_id: str | None = None
    image_tag: str | None = None
    image_built: bool = False
    image_seconds: float = 0.0
    ccache: CcacheStats | None = None
    version: str = ""
    sha256: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class QemuBuildOptions:
    """How QEMU is built; the defaults are what the pipeline uses.

    ``build_dir`` (default ``<out_dir>/build-<host|container>``) persists, so
    an unchanged tree rebuilds in seconds.  ``ccache``: a CCACHE_MODES key.
    The compiler cache is the volume ``ccache_volume`` in a container and
    the folder ``ccache_dir`` on the host (default ``<out_dir>/ccache``).
    ``extra_targets``: more ninja targets copied out beside the binary
    (e.g. ``tests/qtest/vmsocket-test``)."""

    jobs: int = 2
    build_dir: Path | None = None
    ccache: str = "depend"
    ccache_volume: str = CCACHE_VOLUME
    ccache_dir: Path | None = None
    extra_targets: tuple[str, ...] = ()
    configure_args: tuple[str, ...] = CONFIGURE_ARGS
    timeout: float = 3600
    idle_timeout: float = 900


# -- small helpers used elsewhere -------------------------------------------------


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


def kernel_release(kernel: GuestKernel) -> str:
    """``6.1.0-56-amd64`` from ``linux-image-6.1.0-56-amd64``."""
    return kernel.image_package.removeprefix("linux-image-")


def dockerfile_for(project_root: Path, suite: str) -> Path:
    """The build environment of a Debian suite: ``Dockerfile`` for bookworm,
    ``ci/Dockerfile.<suite>`` for the others."""
    if suite == "bookworm":
        return project_root / "Dockerfile"
    return project_root / "ci" / f"Dockerfile.{suite}"


# -- spec makers ------------------------------------------------------------------


def qemu_spec(source: Path, *, release: str, repacked: bool, build_dir: Path,
              ccache_dir: Path, project_root: Path,
              options: QemuBuildOptions = QemuBuildOptions(),
              patches: Path | None = None, source_id: str | None = None,
              call: Call) -> BuildSpec:
    """Configure and compile QEMU's x86_64-softmmu; the source is an overlay
    (writable, never written back), so stand-ins never reach the user's tree.
    ``source_id``: the source's identity (a git tree id), for reuse."""
    if options.ccache not in CCACHE_MODES:
        raise UserError(f"unknown ccache mode {options.ccache!r}; "
                        f"one of {', '.join(CCACHE_MODES)}")
    version = (source / "VERSION").read_text().strip() if (source / "VERSION").is_file() else ""
    standins = edk2_standins(source) if repacked else []
    targets = (QEMU_BINARY, *options.extra_targets)
    return BuildSpec(
        kind="qemu", name="qemu", call=call,
        script=_qemu_script(standins, options.jobs, options.configure_args, targets),
        mounts=(Mount("SRC", source, "/src", "overlay", exclude=(".git",)),
                Mount("BUILD", build_dir, "/build", "rw"),
                Mount("CCACHE_DIR", ccache_dir, "/ccache", "volume",
                      volume=options.ccache_volume)),
        env={**CCACHE_MODES[options.ccache]},
        dockerfile=project_root / "Dockerfile",
        artifacts=tuple(Path(t).name for t in targets), main_artifact=QEMU_BINARY,
        deadline=options.timeout, idle_timeout=options.idle_timeout,
        version=version, inputs_id=source_id,
        facts={"release": release, "qemu_version": version, "source": str(source),
               "source_id": source_id, "repacked": repacked, "edk2_standins": standins,
               "series_hash": series_hash(patches),
               "patches": str(patches) if patches else None,
               "configure": list(options.configure_args), "jobs": options.jobs,
               "targets": list(targets), "build_dir": str(build_dir),
               "ccache_mode": options.ccache, "ccache_env": dict(CCACHE_MODES[options.ccache]),
               "runtime_note": ("firmware/ROMs are not bundled: run with -L /usr/share/qemu "
                                "-L /usr/share/seabios (Debian qemu-system-data, seabios)")})


def _qemu_script(standins: list[str], jobs: int, configure_args: tuple[str, ...],
                 targets: tuple[str, ...]) -> str:
    lines = ["set -eu",
             # Debian's ccache package links no plain "cc"; configure --cc=gcc
             # goes through this wrapper.  HOST_TOOLS (host runner): the
             # folder of qemupatch's own Python, whose venv has meson.
             'export PATH="/usr/lib/ccache:${HOST_TOOLS:+$HOST_TOOLS:}$PATH"',
             'export CCACHE_BASEDIR="$SRC"']
    if standins:
        names = " ".join(shlex.quote(s) for s in standins)
        lines += [
            f"echo '== stand-ins: {len(standins)} empty pc-bios/edk2-*.fd.bz2'",
            f'for f in {names}; do p="$SRC/pc-bios/$f"; '
            '[ -e "$p" ] || { bzip2 -c </dev/null >"$p"; touch -d @0 "$p"; }; done',
        ]
    conf = " ".join(shlex.quote(a) for a in configure_args)
    lines += [
        # A work tree's .git file makes 7.2-era configure update git
        # submodules (no network here): the tree is a release, drop it
        # from the overlay (writable, discarded; the user's tree keeps it).
        'rm -rf "$SRC/.git"',
        'mkdir -p "$BUILD"',
        'cd "$BUILD"',
        "if [ ! -f build.ninja ]; then",
        "  echo '== configure'",
        f'  "$SRC/configure" {conf} || {{ echo "configure failed"; exit 90; }}',
        "fi",
        "command -v ccache >/dev/null && ccache -z >/dev/null || true",
        "echo '== compile'",
        f"ninja -j{int(jobs)} {' '.join(shlex.quote(t) for t in targets)} "
        '|| { echo "ninja failed"; exit 91; }',
        f'cp {" ".join(shlex.quote(t) for t in targets)} "$OUT/"',
        "echo '== ccache'",
        "command -v ccache >/dev/null && ccache --print-stats || true",
    ]
    return "\n".join(lines)


def module_spec(module_src: Path, kernel: GuestKernel, *, project_root: Path,
                jobs: int = 2, timeout: float = 1800, patches: Path | None = None,
                call: Call) -> BuildSpec:
    """The out-of-tree module against the kernel's headers, built in a
    scratch copy so the source stays clean."""
    if not any(module_src.glob("*.c")) or not (
            (module_src / "Kbuild").is_file() or (module_src / "Makefile").is_file()):
        raise UserError(f"{module_src} is not a module source folder (.c and Kbuild/Makefile)")
    release = kernel_release(kernel)
    headers = f"/usr/src/linux-headers-{release}"
    script = "\n".join([
        "set -eu",
        'work=$(mktemp -d); trap \'rm -rf "$work"\' EXIT',
        'cp -a "$MODULE/." "$work/"',
        "echo '== compile module'",
        f'make -j{int(jobs)} -C {headers} M="$work" modules '
        "|| { echo 'make failed'; exit 91; }",
        'cp "$work"/*.ko "$OUT/"',
        'for ko in "$work"/*.ko; do echo "vermagic $(modinfo -F vermagic "$ko")"; done',
    ])
    return BuildSpec(
        kind="module", name=f"module-{kernel.name}", call=call, script=script,
        mounts=(Mount("MODULE", module_src, "/module", "ro"),),
        dockerfile=dockerfile_for(project_root, kernel.suite),
        buildargs={"KERNEL_HEADERS": _headers_package(kernel)},
        artifacts=("*.ko",), main_artifact="kvm_vmsocket.ko",
        deadline=timeout, version=release, vermagic=release,
        host_requires={f"{headers}/Makefile": (
            f"kernel headers for {release} are not installed on this host; "
            f"apt-get install linux-headers-{release}, or build in a container "
            "(runner 'auto')")},
        facts={"kernel": kernel.name, "kernel_release": release, "suite": kernel.suite,
               "source": str(module_src), "series_hash": series_hash(patches)},
        inputs=(module_src,), record=f"build-module-{kernel.name}.json",
        reproduce=f"reproduce-module-{kernel.name}.sh", log=f"module-{kernel.name}.log")


def _headers_package(kernel: GuestKernel) -> str:
    for pkg in kernel.headers_packages:
        if pkg.endswith(kernel_release(kernel)):
            return pkg
    return f"linux-headers-{kernel_release(kernel)}"


def guest_program_spec(src: Path, *, project_root: Path, suite: str = "bookworm",
                       timeout: float = 600, call: Call) -> BuildSpec:
    """A static binary for the busybox guest (no libc there)."""
    if not src.is_file():
        raise UserError(f"{src}: no such guest program source")
    name = src.name.removesuffix(".c")
    flags = "-static -O2 -Wall -Wextra"
    return BuildSpec(
        kind="guest-program", name=name, call=call,
        script=f"set -eu\necho '== compile {src.name}'\n"
               f'gcc {flags} -o "$OUT/{name}" "$SRC/{src.name}"',
        mounts=(Mount("SRC", src.parent, "/src", "ro"),),
        dockerfile=dockerfile_for(project_root, suite), artifacts=(name,),
        deadline=timeout, facts={"source": str(src), "suite": suite, "flags": flags},
        inputs=(src,), record=f"build-{name}.json", reproduce=f"reproduce-{name}.sh", log=f"{name}.log")


# -- execute ----------------------------------------------------------------------


class _Record:
    """build.json: the same keys for every kind, rewritten as facts arrive."""

    def __init__(self, path: Path, spec: BuildSpec, runner: Runner):
        self.path = path
        self.data: dict = {
            "schema": SCHEMA, "kind": spec.kind, "name": spec.name,
            "status": "running", "stage": "record", "started": utc_now(), "finished": None,
            "runner": runner.describe(), "image": None, "packages": [], "compiler": "",
            "tools": [], "command": None, "python_call": _call_text(spec.call, runner),
            "facts": dict(spec.facts), "seconds": None, "ccache": None,
            "artifacts": [], "sha256": {}, "exit_code": None, "error": None,
            "inputs_key": None, "reused": False,
        }
        self.write()

    def update(self, **data: object) -> None:
        self.data.update(data)
        self.write()

    def write(self) -> None:
        write_json(self.path, self.data)


def execute(spec: BuildSpec, runner: Runner, out_dir: Path,
            progress: Progress) -> BuildResult:
    """Run ``spec`` on ``runner`` into ``out_dir``; see the module docstring.
    The progress sink is closed when the build ends."""
    out_dir = Path(out_dir).resolve()
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / spec.log
    log_path.unlink(missing_ok=True)
    staging = out_dir / f".out-{spec.name}"
    shutil.rmtree(staging, ignore_errors=True)
    spec = _with_out_mount(spec, staging)
    deadline = time.monotonic() + spec.deadline
    previous = _read_record(out_dir / spec.record)
    record = _Record(out_dir / spec.record, spec, runner)
    ending: dict[str, object] = {"status": "failed"}
    try:
        reproduce = _write_reproduce(out_dir / spec.reproduce, record.data["python_call"])
        record.update(stage="image")
        progress.stage(f"build environment ({runner.name})")
        env = runner.prepare(spec, log_dir=log_dir, timeout=_left(deadline),
                             on_line=progress.line)
        scratch = out_dir / ".host-work"
        command = runner.cli_command(spec, env, scratch=scratch)
        key = inputs_key(spec, env) if spec.inputs or spec.inputs_id else None
        record.update(stage="compile", image=_image_block(env), packages=list(env.packages),
                      compiler=env.compiler, tools=list(env.tools), command=command,
                      inputs_key=key)
        if key and (reused := _reuse(previous, key, out_dir)):
            record.update(stage="done", reused=True, seconds=0.0, exit_code=0,
                          **{k: previous[k] for k in ("artifacts", "sha256", "facts")})
            ending = {"status": "ok"}
            progress.stage(f"{spec.name}: inputs unchanged, artifacts reused")
            return _result(spec, runner, out_dir, reused, record.path, reproduce,
                           log_path, 0.0, env, None, previous["sha256"])
        _write_reproduce(reproduce, record.data["python_call"], command)
        progress.stage(f"compile {spec.name} ({runner.name})")
        result = runner.run(spec, env, scratch=scratch, timeout=_left(deadline),
                            log_path=log_path, on_line=stage_lines(progress))
        record.update(seconds=round(result.seconds, 1), exit_code=result.exit_code)
        if result.exit_code != 0:
            stage = STAGE_EXITS.get(result.exit_code, "build script")
            record.update(stage=stage)
            raise _compile_failed(spec, stage, result.exit_code, result.output, log_path,
                                  record.path)
        record.update(stage="collect")
        ccache = _parse_ccache(result.output.partition("\n== ccache")[2])
        artifacts = _collect(spec, staging, out_dir, result.output, log_path, record.path)
        sums = {a.name: sha256_file(a) for a in artifacts}
        record.update(
            stage="done", artifacts=[a.name for a in artifacts], sha256=sums,
            ccache=(asdict(ccache) | {"hit_rate": ccache.hit_rate}) if ccache else None,
            facts={**record.data["facts"], **_run_facts(spec, result.output)})
        ending = {"status": "ok"}
        return _result(spec, runner, out_dir, artifacts, record.path, reproduce, log_path,
                       result.seconds, env, ccache, sums)
    except BaseException as exc:
        ending = {"status": _status_of(exc), "error": str(exc).splitlines()[0] if str(exc)
                  else type(exc).__name__}
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        record.update(finished=utc_now(), **ending)
        progress.close()


def _result(spec: BuildSpec, runner: Runner, out_dir: Path, artifacts: list[Path],
            record: Path, reproduce: Path, log_path: Path, seconds: float,
            env: Environment, ccache: CcacheStats | None,
            sha256: Mapping[str, str]) -> BuildResult:
    main = next((a for a in artifacts if a.name == spec.main_artifact), artifacts[0])
    image = env.image or {}
    return BuildResult(
        kind=spec.kind, name=spec.name, runner=runner.name, out_dir=out_dir,
        binary=main, artifacts=tuple(artifacts), build_json=record,
        reproduce_sh=reproduce, log_path=log_path, seconds=seconds,
        image_id=image.get("id"), image_tag=image.get("tag"),
        image_built=bool(image.get("built_now")),
        image_seconds=float(image.get("build_seconds") or 0.0), ccache=ccache,
        version=spec.version, sha256=dict(sha256))


def inputs_key(spec: BuildSpec, env: Environment) -> str:
    """sha256 over everything the output of a build with ``inputs`` (or an
    ``inputs_id``) depends on: the script and its settings, the environment
    (image ID, or the host's compiler and packages), the inputs' identity
    and every file of its inputs."""
    digest = hashlib.sha256()
    digest.update(json.dumps({
        "schema": SCHEMA, "kind": spec.kind, "name": spec.name, "script": spec.script,
        "env": dict(spec.env), "buildargs": dict(spec.buildargs),
        "artifacts": list(spec.artifacts), "vermagic": spec.vermagic,
        "image": (env.image or {}).get("id"), "compiler": env.compiler,
        "packages": list(env.packages) if env.image is None else None,
        "inputs_id": spec.inputs_id,
    }, sort_keys=True).encode())
    for top in spec.inputs:
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for path in files:
            digest.update(f"{top.name}/{path.relative_to(top)}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _reuse(previous: dict, key: str, out_dir: Path) -> list[Path] | None:
    """The last build's artifacts, if it succeeded with the same inputs
    and every artifact is still there, byte for byte."""
    if previous.get("status") != "ok" or previous.get("inputs_key") != key:
        return None
    artifacts = [out_dir / name for name in previous.get("artifacts", ())]
    sums = previous.get("sha256", {})
    if not artifacts or any(not a.is_file() or sums.get(a.name) != sha256_file(a)
                            for a in artifacts):
        return None
    return artifacts


def _status_of(exc: BaseException) -> str:
    if isinstance(exc, ContainerKilled):
        return "killed"
    if isinstance(exc, ImageBuildFailed):
        return "image-failed"
    if isinstance(exc, (Terminated, KeyboardInterrupt)):
        return "terminated"
    return "failed"


def _left(deadline: float) -> float:
    return max(1.0, deadline - time.monotonic())


def _with_out_mount(spec: BuildSpec, staging: Path) -> BuildSpec:
    return replace(spec, mounts=(*spec.mounts, Mount("OUT", staging, "/out", "rw")))


def _image_block(env: Environment) -> dict | None:
    return None if env.image is None else {k: env.image.get(k) for k in IMAGE_KEYS}


def _collect(spec: BuildSpec, staging: Path, out_dir: Path, output: str,
             log_path: Path, record: Path) -> list[Path]:
    found = sorted({p for pattern in spec.artifacts for p in staging.glob(pattern)})
    if not found:
        raise _compile_failed(spec, "artifacts", 0, f"error: no {' '.join(spec.artifacts)} "
                              f"produced\n{output}", log_path, record)
    if spec.vermagic:
        magic = re.findall(r"^vermagic (.*)$", output, re.M)
        if not all(v == spec.vermagic or v.startswith(spec.vermagic + " ") for v in magic):
            raise _compile_failed(spec, "vermagic", 0, f"error: module vermagic {magic} "
                                  f"does not match {spec.vermagic}", log_path, record)
    artifacts = []
    for path in found:
        dest = out_dir / path.name
        shutil.copy2(path, dest)
        artifacts.append(dest)
    return artifacts


def _run_facts(spec: BuildSpec, output: str) -> dict:
    """Facts the run itself printed."""
    if spec.vermagic:
        return {"vermagic": re.findall(r"^vermagic (.*)$", output, re.M)}
    return {}


def _compile_failed(spec: BuildSpec, stage: str, code: int, output: str, log_path: Path,
                    record: Path) -> CompileFailed:
    hint = ""
    if "Subproject" in output and ("Git command failed" in output
                                   or "buildable: NO" in output):
        hint = ("\nhint: the source tree lacks meson subprojects (release tarballs "
                "carry them; for a git checkout run 'meson subprojects download' "
                "in it first): the compile runs with no network")
    return CompileFailed(
        f"{spec.name} build failed at {stage} (exit {code}); first errors:\n"
        f"{_first_errors(output)}\nfull log: {log_path}\nbuild record: {record}{hint}")


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


# -- reproduce.sh -----------------------------------------------------------------


def _call_text(call: Call, runner: Runner) -> str:
    """Python source that repeats the build with a runner of the same kind."""
    parts = [repr(a) for a in call.args] + [f"{k}={v!r}" for k, v in call.kwargs.items()]
    parts.append("runner=runner")
    return ("from pathlib import PosixPath\n"
            "from qemupatch.config import GuestKernel, Settings\n"
            "from qemupatch.runner import Runner\n"
            f"from qemupatch.build import QemuBuildOptions, {call.function}\n"
            f"with Runner.get({runner.name!r}, {runner.settings!r}) as runner:\n"
            f"    print({call.function}(\n        " + ",\n        ".join(parts) + "))")


def _write_reproduce(path: Path, python_call: str, command: str | None = None) -> Path:
    """reproduce.sh: re-runs the same build through the same function."""
    package_root = Path(qemupatch.__file__).resolve().parent.parent
    lines = [
        "#!/bin/sh",
        "# Re-run this build exactly: same function, same arguments.",
        "# Written by qemupatch; see the build record next to it for what was used.",
        "set -eu",
        f"export PYTHONPATH={shlex.quote(str(package_root))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "exec python3 - <<'QEMUPATCH_EOF'",
        *python_call.splitlines(),
        "QEMUPATCH_EOF",
    ]
    if command:
        lines += ["", "# The build step alone, for a shell (a container image is tagged",
                  "# by its content hash; qemupatch rebuilds it when needed):"]
        lines += [f"#   {line}" for line in command.splitlines()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


# -- entry points -----------------------------------------------------------------


def build_qemu(source: Path, out_dir: Path, *, release: str, repacked: bool,
               runner: Runner, project_root: Path,
               options: QemuBuildOptions = QemuBuildOptions(),
               patches: Path | None = None, progress: Progress | None = None,
               source_id: str | None = None) -> BuildResult:
    """Configure and compile QEMU's x86_64-softmmu from ``source``.

    ``repacked``: ``source`` comes from Debian's repacked tarball; empty
    ``pc-bios/edk2-*.fd.bz2`` stand-ins are made in the build's own view of
    the tree, never in ``source``.  ``patches`` is hashed into build.json.
    ``project_root`` holds the ``Dockerfile``.  ``source_id`` (the git tree
    id of ``source``, which must then be clean): the last artifacts in
    ``out_dir`` are reused, with no ninja run, while it, the options and
    the build image are unchanged.
    """
    source, out_dir = Path(source).resolve(), Path(out_dir).resolve()
    if not (source / "configure").is_file():
        raise UserError(f"{source} is not a QEMU source tree (no configure)")
    build_dir = (options.build_dir or out_dir / f"build-{runner.kind}").resolve()
    ccache_dir = (options.ccache_dir or out_dir / "ccache").resolve()
    call = Call("build_qemu", (source, out_dir), {
        "release": release, "repacked": repacked, "project_root": project_root,
        "options": options, "patches": patches, "source_id": source_id})
    spec = qemu_spec(source, release=release, repacked=repacked, build_dir=build_dir,
                     ccache_dir=ccache_dir, project_root=project_root, options=options,
                     patches=patches, source_id=source_id, call=call)
    spec = with_ccache_remote(spec, runner.settings.ccache_remote,
                              runner.settings.ccache_remote_dir)
    return execute(spec, runner, out_dir, progress or TerminalProgress())


def with_ccache_remote(spec: BuildSpec, remote: str | None,
                       folder: Path | None = None) -> BuildSpec:
    """``spec`` with ccache's remote storage behind its local cache, so CI
    runners share compiles (QEMUPATCH_CCACHE_REMOTE, checked by Settings).
    A ``file:`` remote's ``folder`` is mounted (a container sees it at
    /ccache-remote); a server URL (http:, redis:) is passed as is."""
    if not remote:
        return spec
    facts = {**spec.facts, "ccache_remote": remote}
    if folder is None:
        return replace(spec, env={**spec.env, "CCACHE_REMOTE_STORAGE": remote}, facts=facts)
    _, bar, attrs = remote.partition("|")
    line = 'export CCACHE_REMOTE_STORAGE="file:$CCACHE_REMOTE"' + (
        shlex.quote(bar + attrs) if bar else "")
    return replace(spec, script=f"{line}\n{spec.script}", facts=facts,
                   mounts=(*spec.mounts, Mount("CCACHE_REMOTE", folder, "/ccache-remote", "rw")))


def build_module(module_src: Path, kernel: GuestKernel, out_dir: Path, *,
                 runner: Runner, project_root: Path, jobs: int = 2,
                 timeout: float = 1800, patches: Path | None = None,
                 progress: Progress | None = None) -> BuildResult:
    """Build the out-of-tree module in ``module_src`` for ``kernel``;
    ``.binary`` is the ``.ko`` (``kvm_vmsocket.ko``) in ``out_dir``.

    Containers: the image of the kernel's suite (bookworm → ``Dockerfile``,
    trixie → ``ci/Dockerfile.trixie``) with its headers package; host:
    ``/usr/src/linux-headers-<release>`` must be installed.
    """
    module_src, out_dir = Path(module_src).resolve(), Path(out_dir).resolve()
    call = Call("build_module", (module_src, kernel, out_dir), {
        "project_root": project_root, "jobs": jobs, "timeout": timeout,
        "patches": patches})
    spec = module_spec(module_src, kernel, project_root=project_root, jobs=jobs,
                       timeout=timeout, patches=patches, call=call)
    return execute(spec, runner, out_dir, progress or TerminalProgress())


def build_guest_program(src: Path, out_dir: Path, *, runner: Runner, project_root: Path,
                        suite: str = "bookworm", timeout: float = 600,
                        progress: Progress | None = None) -> BuildResult:
    """``gcc -static -O2`` of ``src`` (guest/vmsocket-test.c); ``.binary`` is
    named after the source file without ``.c``."""
    src, out_dir = Path(src).resolve(), Path(out_dir).resolve()
    call = Call("build_guest_program", (src, out_dir), {
        "project_root": project_root, "suite": suite, "timeout": timeout})
    spec = guest_program_spec(src, project_root=project_root, suite=suite,
                              timeout=timeout, call=call)
    return execute(spec, runner, out_dir, progress or TerminalProgress())
