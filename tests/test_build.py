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
    CcacheStats,
    NullProgress,
    TerminalProgress,
    build_guest_program,
    build_module,
    build_qemu,
    edk2_standins,
    series_hash,
)
from qemupatch.config import GuestKernel, load
from qemupatch.errors import CompileFailed, ContainerKilled, UserError
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


@needs_ninja
def test_host_build_writes_artifacts_provenance_and_leaves_source_alone(
        fake_src: Path, tmp_path: Path) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-x.patch").write_text("x\n")
    before = sorted(p.name for p in (fake_src / "pc-bios").iterdir())
    rec = Recorder()
    out = tmp_path / "out"
    result = build_qemu(fake_src, out, release="v10.2.99", repacked=True, engine="host",
                        timeout=120, progress=rec, patches=patches,
                        ccache_dir=tmp_path / "ccache")
    assert isinstance(result, BuildResult)
    assert result.binary == out / "qemu-system-x86_64"
    assert subprocess.run([result.binary], capture_output=True, text=True,
                          check=True).stdout.startswith("QEMU emulator version 10.2.99")
    # repacked: the stand-ins went into a copy, never into the user's tree
    assert sorted(p.name for p in (fake_src / "pc-bios").iterdir()) == before
    data = _record(out)
    assert data["status"] == "ok"
    assert data["qemu_version"] == "10.2.99"
    assert data["series_hash"] == series_hash(patches)
    assert data["edk2_standins"] == ["edk2-x86_64-code.fd.bz2",
                                     "edk2-x86_64-secure-code.fd.bz2"]
    assert data["sha256"]["qemu-system-x86_64"] == result.sha256["qemu-system-x86_64"]
    assert data["compiler"].startswith("gcc")
    assert "--disable-docs" in data["command"]
    repro = (out / "reproduce.sh").read_text()
    assert "build_qemu(" in repro and "engine='host'" in repro
    assert os.access(out / "reproduce.sh", os.X_OK)
    assert "configure" in rec.stages and "compile" in rec.stages
    assert any(line.startswith("[3/3]") for line in rec.lines)
    assert (out / "logs" / "compile.log").read_text().count("fake configure") >= 1


@needs_ninja
def test_reproduce_sh_reruns_the_build(fake_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_qemu(fake_src, out, release="x", repacked=True, engine="host", timeout=120,
               progress=NullProgress(), ccache_dir=tmp_path / "ccache")
    (out / "qemu-system-x86_64").unlink()
    subprocess.run(["sh", out / "reproduce.sh"], check=True, timeout=120,
                   capture_output=True)
    assert (out / "qemu-system-x86_64").is_file()


@needs_ninja
def test_second_build_is_incremental(fake_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    kw = dict(release="x", repacked=True, engine="host", timeout=120,
              progress=NullProgress(), ccache_dir=tmp_path / "ccache")
    build_qemu(fake_src, out, **kw)
    rec = Recorder()
    build_qemu(fake_src, out, **{**kw, "progress": rec})
    assert "configure" not in rec.stages
    assert "ninja: no work to do." in rec.lines


@needs_ninja
def test_compile_error_raises_compile_failed_with_first_errors(
        fake_src: Path, tmp_path: Path) -> None:
    (fake_src / "hello.c").write_text("int main(void) { return syntax error; }\n")
    out = tmp_path / "out"
    with pytest.raises(CompileFailed) as info:
        build_qemu(fake_src, out, release="x", repacked=True, engine="host",
                   timeout=120, progress=NullProgress(), ccache_dir=tmp_path / "ccache")
    assert info.value.exit_code == 32
    message = str(info.value)
    assert "at compile" in message and "error:" in message
    assert str(out / "logs" / "compile.log") in message
    data = _record(out)
    assert data["status"] == "failed" and data["stage"] == "compile"


@needs_ninja
def test_configure_error_is_a_compile_failure_at_configure(
        fake_src: Path, tmp_path: Path) -> None:
    (fake_src / "FAIL_CONFIGURE").touch()
    with pytest.raises(CompileFailed, match="at configure") as info:
        build_qemu(fake_src, tmp_path / "out", release="x", repacked=True, engine="host",
                   timeout=120, progress=NullProgress(), ccache_dir=tmp_path / "ccache")
    assert "fake configure failure requested" in str(info.value)


@needs_ninja
def test_repacked_tree_without_standins_fails_clearly(fake_src: Path, tmp_path: Path) -> None:
    with pytest.raises(CompileFailed, match=r"edk2-x86_64-code\.fd\.bz2 does not exist"):
        build_qemu(fake_src, tmp_path / "out", release="x", repacked=False, engine="host",
                   timeout=120, progress=NullProgress(), ccache_dir=tmp_path / "ccache")


@needs_ninja
def test_build_past_its_deadline_is_killed(fake_src: Path, tmp_path: Path) -> None:
    (fake_src / "SLOW").touch()
    out = tmp_path / "out"
    with pytest.raises(ContainerKilled) as info:
        build_qemu(fake_src, out, release="x", repacked=True, engine="host", timeout=4,
                   progress=NullProgress(), ccache_dir=tmp_path / "ccache")
    assert info.value.exit_code == 33
    assert _record(out)["status"] == "killed"


def test_not_a_qemu_tree_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a QEMU source tree"):
        build_qemu(tmp_path, tmp_path / "out", release="x", repacked=False, engine="host")


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
    ko = build_module(FAKE_MODULE, KERNEL_61, tmp_path / "out", engine="host",
                      timeout=300, progress=NullProgress())
    assert ko.name == "hello.ko"
    data = _record(tmp_path / "out", "build-module-6.1.json")
    assert data["status"] == "ok"
    assert data["vermagic"][0].startswith("6.1.0-56-amd64 ")
    assert not list(FAKE_MODULE.glob("*.o")), "the module source must stay clean"


def test_host_module_build_without_headers_says_what_to_install(tmp_path: Path) -> None:
    kernel = GuestKernel("9.9", "bookworm", "linux-image-9.9.9-1-amd64")
    with pytest.raises(UserError, match="apt-get install linux-headers-9.9.9-1-amd64"):
        build_module(FAKE_MODULE, kernel, tmp_path / "out", engine="host",
                     progress=NullProgress())


@needs_headers_61
def test_host_module_compile_error(tmp_path: Path) -> None:
    src = tmp_path / "mod"
    shutil.copytree(FAKE_MODULE, src)
    (src / "hello.c").write_text((src / "hello.c").read_text() + "\nthis is not C;\n")
    with pytest.raises(CompileFailed, match="error"):
        build_module(src, KERNEL_61, tmp_path / "out", engine="host", timeout=300,
                     progress=NullProgress())


@needs_ninja
def test_host_guest_program(tmp_path: Path) -> None:
    src = tmp_path / "prog.c"
    src.write_text('#include <stdio.h>\nint main(void) { puts("ok"); return 0; }\n')
    binary = build_guest_program(src, tmp_path / "out", engine="host",
                                 progress=NullProgress())
    assert subprocess.run([binary], capture_output=True, text=True).stdout == "ok\n"
    file_out = subprocess.run(["file", binary], capture_output=True, text=True).stdout \
        if shutil.which("file") else "statically linked"
    assert "statically linked" in file_out
    assert _record(tmp_path / "out", "build-prog.json")["status"] == "ok"


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


@pytest.mark.real
def test_real_qemu_in_container(tmp_path: Path) -> None:
    src = _qemu_src(tmp_path)
    out = _out(tmp_path, "qemu")
    result = build_qemu(src, out, release="v10.2.2", repacked=True, engine="auto",
                        jobs=2, timeout=3600, patches=REPO / "patches")
    assert result.engine in ("podman", "docker")
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
    assert any(p.startswith("gcc=") for p in data["packages"])
    assert data["ccache"] is not None
    assert data["qemu_version"] == "10.2.2"
    print(f"\nQEMU {version.splitlines()[0]}: compile {result.seconds:.0f} s, "
          f"image built now {result.image_built} ({result.image_seconds:.0f} s), "
          f"ccache {result.ccache}")


@pytest.mark.real
@pytest.mark.parametrize("kernel_name", ["6.1", "6.12"])
def test_real_module_in_container(kernel_name: str, tmp_path: Path) -> None:
    kernel = _kernels()[kernel_name]
    out = _out(tmp_path, f"module-{kernel_name}")
    ko = build_module(_module_src(), kernel, out, engine="auto", timeout=1800)
    assert ko.suffix == ".ko"
    release = qbuild.kernel_release(kernel)
    data = _record(out, f"build-module-{kernel_name}.json")
    assert data["status"] == "ok"
    assert all(v.startswith(release + " ") for v in data["vermagic"])
    suite_gcc = {"bookworm": "gcc (Debian 12", "trixie": "gcc (Debian 14"}[kernel.suite]
    assert data["compiler"].startswith(suite_gcc)


@pytest.mark.real
def test_real_guest_program_in_container(tmp_path: Path) -> None:
    src = REPO / "guest" / "vmsocket-test.c"
    binary = build_guest_program(src, _out(tmp_path, "guest"), engine="auto")
    assert binary.name == "vmsocket-test"
    head = binary.read_bytes()[:4]
    assert head == b"\x7fELF"
    if shutil.which("file"):
        assert "statically linked" in subprocess.run(
            ["file", binary], capture_output=True, text=True).stdout


@pytest.mark.real
def test_real_compile_failure_in_container(fake_src: Path, tmp_path: Path) -> None:
    """The fake tree, compiled in the real build image, fails like the host."""
    (fake_src / "hello.c").write_text("int main(void) { return syntax error; }\n")
    out = tmp_path / "out"
    from qemupatch.container import Engine

    with Engine.get("auto") as engine:
        try:
            with pytest.raises(CompileFailed, match="error:") as info:
                build_qemu(fake_src, out, release="x", repacked=True, engine=engine,
                           timeout=900, progress=NullProgress(),
                           ccache_volume="qemupatch-ccache-test")
        finally:
            engine.remove_volume("qemupatch-ccache-test")
    assert "at compile" in str(info.value)
    assert _record(out)["image"]["id"]
    assert sorted(p.name for p in (fake_src / "pc-bios").iterdir()) == ["meson.build"]
