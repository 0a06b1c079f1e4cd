"""The build stage.

Fast tests drive build.py on the host with a tiny fake QEMU-like source
tree (tests/fakeqemusrc, tuxmake "fakelinux" style) whose configure or
compile fails, or hangs, on demand.  Tests marked ``real`` build the image
and compile QEMU 10.2.2 (with the vmsocket series when its branch exists),
the guest module for 6.1 and 6.12 and the guest program in containers.

Real-test inputs (override with environment variables):
    QEMUPATCH_QEMU_SRC     a QEMU source tree (default: 10.2.2 from Debian with
                           the series in patches/ applied, via workflow.build_source)
    QEMUPATCH_MODULE_SRC   the module source (default guest/kvm_vmsocket)
    QEMUPATCH_BUILD_OUT    where real builds go (default: pytest's tmp dir)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qemupatch import build as qbuild
from qemupatch.build import (
    BuildResult,
    Call,
    CcacheStats,
    QemuBuildOptions,
    build_guest_program,
    build_module,
    build_qemu,
    edk2_standins,
    execute,
    guest_program_spec,
    series_hash,
)
from qemupatch.config import GuestKernel, Settings, load
from qemupatch.errors import CommandFailed, CompileFailed, ContainerKilled, Terminated, UserError
from qemupatch.progress import NullProgress, TerminalProgress
from qemupatch.runner import IMAGE_KEYS, ContainerRunner, Environment, HostRunner, Runner
from tests.conftest import requires

REPO = Path(__file__).resolve().parent.parent
FAKE_SRC = Path(__file__).parent / "fakeqemusrc"
FAKE_MODULE = Path(__file__).parent / "fakemodule"
HEADERS_61 = Path("/usr/src/linux-headers-6.1.0-56-amd64")
KERNEL_61 = GuestKernel("6.1", "bookworm", "linux-image-6.1.0-56-amd64",
                        ("linux-headers-6.1.0-56-amd64",))

needs_headers_61 = requires(lambda: (HEADERS_61 / "Makefile").is_file(),
                            f"{HEADERS_61} is missing")
needs_ninja = requires(lambda: shutil.which("ninja") and shutil.which("gcc"),
                       "ninja and gcc are needed on the host")


class Recorder:
    def __init__(self) -> None:
        self.stages: list[str] = []
        self.lines: list[str] = []

    def stage(self, name: str) -> None:
        self.stages.append(name)

    def line(self, text: str) -> None:
        self.lines.append(text)

    def close(self) -> None:
        pass


@pytest.fixture
def fake_src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(FAKE_SRC, src)
    return src


def _record(out: Path, name: str = "build.json") -> dict:
    return json.loads((out / name).read_text())


# -- fast: the fake tree on the host ------------------------------------------

HOST = HostRunner(Settings())


def _qemu(src: Path, out: Path, tmp_path: Path, *, repacked: bool = True,
          timeout: float = 120, progress=None, runner: Runner = HOST, **options):
    """build_qemu on the host with a private ccache folder."""
    return build_qemu(src, out, release=options.pop("release", "x"), repacked=repacked,
                      runner=runner, project_root=REPO,
                      options=QemuBuildOptions(timeout=timeout, ccache_dir=tmp_path / "ccache",
                                               **options),
                      progress=progress or NullProgress(), patches=options.pop("patches", None))


@needs_ninja
def test_host_build_writes_artifacts_provenance_and_leaves_source_alone(
        fake_src: Path, tmp_path: Path) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-x.patch").write_text("x\n")
    before = sorted(p.name for p in (fake_src / "pc-bios").iterdir())
    rec = Recorder()
    out = tmp_path / "out"
    result = build_qemu(fake_src, out, release="v10.2.99", repacked=True, runner=HOST,
                        project_root=REPO, progress=rec, patches=patches,
                        options=QemuBuildOptions(timeout=120, ccache_dir=tmp_path / "ccache"))
    assert isinstance(result, BuildResult)
    assert result.binary == out / "qemu-system-x86_64"
    assert result.runner == "host" and result.version == "10.2.99"
    assert subprocess.run([result.binary], capture_output=True, text=True,
                          check=True).stdout.startswith("QEMU emulator version 10.2.99")
    # repacked: the stand-ins went into a copy, never into the user's tree
    assert sorted(p.name for p in (fake_src / "pc-bios").iterdir()) == before
    data = _record(out)
    assert data["status"] == "ok" and data["stage"] == "done" and data["finished"]
    facts = data["facts"]
    assert facts["qemu_version"] == "10.2.99"
    assert facts["series_hash"] == series_hash(patches)
    assert facts["edk2_standins"] == ["edk2-x86_64-code.fd.bz2",
                                      "edk2-x86_64-secure-code.fd.bz2"]
    assert facts["ccache_mode"] == "depend"
    assert facts["ccache_env"]["CCACHE_DEPEND"] == "1"
    assert data["sha256"]["qemu-system-x86_64"] == result.sha256["qemu-system-x86_64"]
    assert data["compiler"].startswith("gcc")
    assert data["image"] is None
    assert "--disable-docs" in data["command"]
    repro = (out / "reproduce.sh").read_text()
    assert "build_qemu(" in repro and "Runner.get('host'" in repro
    assert os.access(out / "reproduce.sh", os.X_OK)
    assert "configure" in rec.stages and "compile" in rec.stages
    assert any(line.startswith("[3/3]") for line in rec.lines)
    assert (out / "logs" / "compile.log").read_text().count("fake configure") >= 1


@needs_ninja
def test_reproduce_sh_reruns_the_build(fake_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _qemu(fake_src, out, tmp_path)
    (out / "qemu-system-x86_64").unlink()
    subprocess.run(["sh", out / "reproduce.sh"], check=True, timeout=120,
                   capture_output=True)
    assert (out / "qemu-system-x86_64").is_file()


@needs_ninja
def test_second_build_is_incremental(fake_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _qemu(fake_src, out, tmp_path)
    rec = Recorder()
    _qemu(fake_src, out, tmp_path, progress=rec)
    assert "configure" not in rec.stages
    assert "ninja: no work to do." in rec.lines


@needs_ninja
def test_compile_error_raises_compile_failed_with_first_errors(
        fake_src: Path, tmp_path: Path) -> None:
    (fake_src / "hello.c").write_text("int main(void) { return syntax error; }\n")
    out = tmp_path / "out"
    with pytest.raises(CompileFailed) as info:
        _qemu(fake_src, out, tmp_path)
    assert info.value.exit_code == 32
    message = str(info.value)
    assert "at compile" in message and "error:" in message
    assert str(out / "logs" / "compile.log") in message
    data = _record(out)
    assert data["status"] == "failed" and data["stage"] == "compile"
    assert data["exit_code"] == 91


@needs_ninja
def test_configure_error_is_a_compile_failure_at_configure(
        fake_src: Path, tmp_path: Path) -> None:
    (fake_src / "FAIL_CONFIGURE").touch()
    with pytest.raises(CompileFailed, match="at configure") as info:
        _qemu(fake_src, tmp_path / "out", tmp_path)
    assert "fake configure failure requested" in str(info.value)


@needs_ninja
def test_repacked_tree_without_standins_fails_clearly(fake_src: Path, tmp_path: Path) -> None:
    with pytest.raises(CompileFailed, match=r"edk2-x86_64-code\.fd\.bz2 does not exist"):
        _qemu(fake_src, tmp_path / "out", tmp_path, repacked=False)


@needs_ninja
def test_build_past_its_deadline_is_killed(fake_src: Path, tmp_path: Path) -> None:
    (fake_src / "SLOW").touch()
    out = tmp_path / "out"
    with pytest.raises(ContainerKilled) as info:
        _qemu(fake_src, out, tmp_path, timeout=4)
    assert info.value.exit_code == 33
    assert _record(out)["status"] == "killed"


def test_failed_source_copy_is_an_infrastructure_error_not_a_kill(
        fake_src: Path, tmp_path: Path) -> None:
    """A host-side copy that fails is CommandFailed (exit 3): nothing was killed."""
    out = tmp_path / "out"
    (out / ".host-work" / "src" / "hello.c" / "in-the-way").mkdir(parents=True)
    with pytest.raises(CommandFailed) as info:
        _qemu(fake_src, out, tmp_path)
    assert info.value.exit_code == 3
    data = _record(out)
    assert data["status"] == "failed" and data["stage"] == "compile"
    assert "tar" in data["error"]


def test_not_a_qemu_tree_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a QEMU source tree"):
        build_qemu(tmp_path, tmp_path / "out", release="x", repacked=False, runner=HOST,
                   project_root=REPO)


def test_unknown_ccache_mode_is_a_user_error(fake_src: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown ccache mode"):
        _qemu(fake_src, tmp_path / "out", tmp_path, ccache="turbo")


def test_edk2_standins_lists_only_missing_files(fake_src: Path) -> None:
    assert edk2_standins(fake_src) == ["edk2-x86_64-code.fd.bz2",
                                       "edk2-x86_64-secure-code.fd.bz2"]
    (fake_src / "pc-bios" / "edk2-x86_64-code.fd.bz2").touch()
    assert edk2_standins(fake_src) == ["edk2-x86_64-secure-code.fd.bz2"]


def test_series_hash_follows_content(tmp_path: Path) -> None:
    (tmp_path / "a.patch").write_text("1")
    first = series_hash(tmp_path)
    assert first == series_hash(tmp_path)
    (tmp_path / "a.patch").write_text("2")
    assert series_hash(tmp_path) != first
    assert series_hash(None) is None


def test_ccache_stats_parse() -> None:
    text = "direct_cache_hit\t10\npreprocessed_cache_hit\t5\ncache_miss\t5\n"
    stats = qbuild._parse_ccache(text)
    assert stats == CcacheStats(hits=15, misses=5)
    assert stats.hit_rate == 0.75
    assert qbuild._parse_ccache("no stats") is None


def test_plain_progress_prints_stage_and_percent() -> None:
    buf = io.StringIO()
    progress = TerminalProgress(buf, rich=False)
    progress.stage("compile")
    for i in range(1, 101):
        progress.line(f"[{i}/100] CC x{i}.o")
    text = buf.getvalue()
    assert "[qemupatch build] compile" in text
    assert "(50%)" in text and "(100%)" in text
    assert len(text.splitlines()) <= 13


@needs_headers_61
def test_host_module_build(tmp_path: Path) -> None:
    result = build_module(FAKE_MODULE, KERNEL_61, tmp_path / "out", runner=HOST,
                          project_root=REPO, timeout=300, progress=NullProgress())
    assert isinstance(result, BuildResult)
    assert result.binary.name == "hello.ko" and result.version == "6.1.0-56-amd64"
    data = _record(tmp_path / "out", "build-module-6.1.json")
    assert data["status"] == "ok"
    assert data["facts"]["vermagic"][0].startswith("6.1.0-56-amd64 ")
    assert not list(FAKE_MODULE.glob("*.o")), "the module source must stay clean"


def test_host_module_build_without_headers_says_what_to_install(tmp_path: Path) -> None:
    kernel = GuestKernel("9.9", "bookworm", "linux-image-9.9.9-1-amd64")
    with pytest.raises(UserError, match="apt-get install linux-headers-9.9.9-1-amd64"):
        build_module(FAKE_MODULE, kernel, tmp_path / "out", runner=HOST, project_root=REPO,
                     progress=NullProgress())
    assert _record(tmp_path / "out", "build-module-9.9.json")["status"] == "failed"


@needs_headers_61
def test_host_module_compile_error(tmp_path: Path) -> None:
    src = tmp_path / "mod"
    shutil.copytree(FAKE_MODULE, src)
    (src / "hello.c").write_text((src / "hello.c").read_text() + "\nthis is not C;\n")
    with pytest.raises(CompileFailed, match="error"):
        build_module(src, KERNEL_61, tmp_path / "out", runner=HOST, project_root=REPO,
                     timeout=300, progress=NullProgress())


def _guest_program(tmp_path: Path) -> Path:
    src = tmp_path / "prog.c"
    src.write_text('#include <stdio.h>\nint main(void) { puts("ok"); return 0; }\n')
    return src


@needs_ninja
def test_host_guest_program(tmp_path: Path) -> None:
    result = build_guest_program(_guest_program(tmp_path), tmp_path / "out", runner=HOST,
                                 project_root=REPO, progress=NullProgress())
    binary = result.binary
    assert subprocess.run([binary], capture_output=True, text=True).stdout == "ok\n"
    file_out = subprocess.run(["file", binary], capture_output=True, text=True).stdout \
        if shutil.which("file") else "statically linked"
    assert "statically linked" in file_out
    assert _record(tmp_path / "out", "build-prog.json")["status"] == "ok"


def test_unchanged_inputs_reuse_the_artifacts(tmp_path: Path) -> None:
    """A guest program (or module) whose inputs did not change is not
    rebuilt; a changed source, or an artifact changed on disk, is."""
    src = _guest_program(tmp_path)
    out = tmp_path / "out"

    def again():
        return build_guest_program(src, out, runner=HOST, project_root=REPO,
                                   progress=NullProgress())

    first = again()
    record = _record(out, "build-prog.json")
    assert record["reused"] is False and record["inputs_key"]
    second = again()
    record2 = _record(out, "build-prog.json")
    assert record2["reused"] is True and record2["status"] == "ok"
    assert record2["inputs_key"] == record["inputs_key"] and second.sha256 == first.sha256
    src.write_text(src.read_text() + "\n/* changed */\n")
    again()
    record3 = _record(out, "build-prog.json")
    assert record3["reused"] is False and record3["inputs_key"] != record["inputs_key"]
    first.binary.write_bytes(b"tampered")
    fourth = again()
    assert _record(out, "build-prog.json")["reused"] is False
    assert fourth.binary.read_bytes() != b"tampered"


@needs_headers_61
@needs_ninja
def test_every_kind_writes_the_same_record_schema(fake_src: Path, tmp_path: Path) -> None:
    _qemu(fake_src, tmp_path / "q", tmp_path)
    build_module(FAKE_MODULE, KERNEL_61, tmp_path / "m", runner=HOST, project_root=REPO,
                 timeout=300, progress=NullProgress())
    build_guest_program(_guest_program(tmp_path), tmp_path / "g", runner=HOST,
                        project_root=REPO, progress=NullProgress())
    records = [_record(tmp_path / "q"), _record(tmp_path / "m", "build-module-6.1.json"),
               _record(tmp_path / "g", "build-prog.json")]
    assert [r["kind"] for r in records] == ["qemu", "module", "guest-program"]
    assert len({tuple(r) for r in records}) == 1, [sorted(r) for r in records]
    assert all(r["image"] is None for r in records)


class ImageRunner(HostRunner):
    """The host runner, reporting an image as a container runner does."""

    def prepare(self, spec, **kwargs) -> Environment:
        env = super().prepare(spec, **kwargs)
        image = {k: f"fake-{k}" for k in IMAGE_KEYS} | {"built_now": True,
                                                        "build_seconds": 1.5}
        return Environment(image=image,
                           packages=env.packages, compiler=env.compiler)


@needs_ninja
def test_image_block_has_the_same_keys_for_every_kind(tmp_path: Path) -> None:
    result = build_guest_program(_guest_program(tmp_path), tmp_path / "out",
                                 runner=ImageRunner(), project_root=REPO,
                                 progress=NullProgress())
    data = _record(tmp_path / "out", "build-prog.json")
    assert list(data["image"]) == list(IMAGE_KEYS)
    assert result.image_id == "fake-id" and result.image_tag == "fake-tag"
    assert result.image_built and result.image_seconds == 1.5


class BrokenRunner(HostRunner):
    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def run(self, spec, env, **kwargs):
        raise self.error


@pytest.mark.parametrize("error, status", [
    (RuntimeError("engine lost"), "failed"),
    (Terminated(15), "terminated"),
])
def test_execute_records_where_a_raising_run_stopped(
        tmp_path: Path, error: BaseException, status: str) -> None:
    spec = guest_program_spec(_guest_program(tmp_path), project_root=REPO,
                              call=Call("build_guest_program", ()))
    with pytest.raises(type(error)):
        execute(spec, BrokenRunner(error), tmp_path / "out", NullProgress())
    data = _record(tmp_path / "out", "build-prog.json")
    assert data["status"] == status and data["stage"] == "compile"
    assert data["finished"] and data["error"] == str(error)


# -- real: containers, real QEMU and real modules -----------------------------


def _qemu_src(tmp_path: Path) -> Path:
    """QEMUPATCH_QEMU_SRC, else 10.2.2 with the shipped series applied
    (imported from Debian into the cache like the series tests do)."""
    if env := os.environ.get("QEMUPATCH_QEMU_SRC"):
        src = Path(env)
        if not (src / "configure").is_file():
            pytest.fail(f"QEMUPATCH_QEMU_SRC={src} is not a QEMU source tree")
        return src
    from qemupatch import workflow
    from tests.realqemu import real_project

    _release, worktree, _commits = workflow.build_source(real_project(tmp_path))
    return worktree.path


def _out(tmp_path: Path, name: str) -> Path:
    base = os.environ.get("QEMUPATCH_BUILD_OUT")
    return Path(base) / name if base else tmp_path / name


def _kernels() -> dict[str, GuestKernel]:
    kernels = {k.name: k for k in load(REPO).kernels}
    kernels.setdefault("6.1", KERNEL_61)
    kernels.setdefault("6.12", GuestKernel(
        "6.12", "trixie", "linux-image-6.12.117+deb13-amd64",
        ("linux-headers-6.12.117+deb13-amd64",)))
    return kernels


def _module_src() -> Path:
    src = Path(os.environ.get("QEMUPATCH_MODULE_SRC", REPO / "guest" / "kvm_vmsocket"))
    return src if any(src.glob("*.c")) else FAKE_MODULE


def _settings() -> Settings:
    return load(REPO).settings


@pytest.mark.real
def test_real_qemu_in_container(tmp_path: Path) -> None:
    src = _qemu_src(tmp_path)
    out = _out(tmp_path, "qemu")
    with Runner.get("auto", _settings()) as runner:
        result = build_qemu(src, out, release="v10.2.2", repacked=True, runner=runner,
                            project_root=REPO, patches=REPO / "patches",
                            options=QemuBuildOptions(jobs=2, timeout=3600))
    assert result.runner in ("podman", "docker")
    version = subprocess.run([result.binary, "--version"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    assert "version 10.2.2" in version
    if (src / "hw" / "misc" / "vmsocket.c").is_file():
        devices = subprocess.run([result.binary, "-device", "help"], capture_output=True,
                                 text=True, timeout=60).stdout
        assert "vmsocket" in devices
    data = _record(out)
    assert data["status"] == "ok"
    assert data["image"]["id"] == result.image_id
    assert list(data["image"]) == list(IMAGE_KEYS)
    assert any(p.startswith("gcc=") for p in data["packages"])
    assert data["ccache"] is not None
    assert data["facts"]["qemu_version"] == "10.2.2"
    print(f"\nQEMU {version.splitlines()[0]}: compile {result.seconds:.0f} s, "
          f"image built now {result.image_built} ({result.image_seconds:.0f} s), "
          f"ccache {result.ccache}")


@pytest.mark.real
@pytest.mark.parametrize("kernel_name", ["6.1", "6.12"])
def test_real_module_in_container(kernel_name: str, tmp_path: Path) -> None:
    kernel = _kernels()[kernel_name]
    out = _out(tmp_path, f"module-{kernel_name}")
    with Runner.get("auto", _settings()) as runner:
        result = build_module(_module_src(), kernel, out, runner=runner, project_root=REPO,
                              timeout=1800)
    assert result.binary.suffix == ".ko"
    release = qbuild.kernel_release(kernel)
    data = _record(out, f"build-module-{kernel_name}.json")
    assert data["status"] == "ok"
    assert all(v.startswith(release + " ") for v in data["facts"]["vermagic"])
    suite_gcc = {"bookworm": "gcc (Debian 12", "trixie": "gcc (Debian 14"}[kernel.suite]
    assert data["compiler"].startswith(suite_gcc)


@pytest.mark.real
def test_real_guest_program_in_container(tmp_path: Path) -> None:
    src = REPO / "guest" / "vmsocket-test.c"
    with Runner.get("auto", _settings()) as runner:
        binary = build_guest_program(src, _out(tmp_path, "guest"), runner=runner,
                                     project_root=REPO).binary
    assert binary.name == "vmsocket-test"
    head = binary.read_bytes()[:4]
    assert head == b"\x7fELF"
    if shutil.which("file"):
        assert "statically linked" in subprocess.run(
            ["file", binary], capture_output=True, text=True).stdout


@pytest.mark.real
def test_real_compile_failure_in_container(fake_src: Path, tmp_path: Path) -> None:
    """The fake tree, compiled in the real build image, fails like the host;
    the runner wraps an engine the caller keeps open (as the pipeline does)."""
    (fake_src / "hello.c").write_text("int main(void) { return syntax error; }\n")
    out = tmp_path / "out"
    from qemupatch.engine import Engine

    with Engine.get("auto", settings=_settings()) as engine:
        try:
            with pytest.raises(CompileFailed, match="error:") as info:
                build_qemu(fake_src, out, release="x", repacked=True,
                           runner=ContainerRunner(engine), project_root=REPO,
                           progress=NullProgress(), options=QemuBuildOptions(
                               timeout=900, ccache_volume="qemupatch-ccache-test"))
        finally:
            engine.remove_volume("qemupatch-ccache-test")
    assert "at compile" in str(info.value)
    assert _record(out)["image"]["id"]
    assert sorted(p.name for p in (fake_src / "pc-bios").iterdir()) == ["meson.build"]
