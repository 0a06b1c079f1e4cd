"""The guest image: cpio writer, module handling, /init, caching."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qemupatch import console, debian, guest
from qemupatch.errors import GuestImageError
from qemupatch.guest import Cpio, KernelFiles, build_image, init_script
from tests.conftest import requires

BUSYBOX = shutil.which("busybox")


needs_busybox = requires(lambda: BUSYBOX, "busybox is not installed")
VERSION = "6.1.0-99-test"


def fake_module(name: str, version: str = VERSION) -> bytes:
    return b"\x7fELF" + b"\0" * 60 + f"name={name}\0vermagic={version} SMP mod_unload \0".encode()


@pytest.fixture
def kernel(tmp_path) -> KernelFiles:
    mods = tmp_path / "root/lib/modules" / VERSION
    for sub, names in (("drivers/virtio", guest.VIRTIO_MODULES[:-1]),
                       ("drivers/char", guest.VIRTIO_MODULES[-1:])):
        folder = mods / "kernel" / sub
        folder.mkdir(parents=True, exist_ok=True)
        for n in names:
            data = fake_module(n)
            if n == "virtio_ring":          # as trixie ships them
                (folder / f"{n}.ko.xz").write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ))
            else:
                (folder / f"{n}.ko").write_bytes(data)
    vmlinuz = tmp_path / "root/boot" / f"vmlinuz-{VERSION}"
    vmlinuz.parent.mkdir(parents=True)
    vmlinuz.write_bytes(b"not really a kernel")
    return KernelFiles("test", "linux-image-test", VERSION, vmlinuz, mods, tmp_path / "x.deb")


def cpio_list(blob: bytes, tmp_path: Path) -> list[str]:
    """List the archive with the real cpio tool (verbose: modes and links)."""
    done = subprocess.run(["cpio", "-itv", "--quiet"], input=gzip.decompress(blob),
                          capture_output=True, timeout=60, check=True)
    return done.stdout.decode().splitlines()


def test_cpio_is_read_by_real_cpio(tmp_path):
    c = Cpio()
    c.dir("bin")
    c.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    c.symlink("bin/sh", "/bin/busybox")
    c.chardev("dev/console", 5, 1)
    blob = gzip.compress(c.finish())
    listing = "\n".join(cpio_list(blob, tmp_path))
    assert "-rwxr-xr-x" in listing and "bin/hello" in listing
    assert "bin/sh -> /bin/busybox" in listing
    assert "crw-------" in listing and "dev/console" in listing
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"],
                   input=gzip.decompress(blob), cwd=out, check=True, timeout=60,
                   capture_output=True)
    assert (out / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"


def test_cpio_rejects_duplicates():
    c = Cpio()
    c.file("a", b"")
    with pytest.raises(ValueError):
        c.file("/a", b"")


def test_read_module_decompresses_and_rejects_garbage(tmp_path):
    data = fake_module("m")
    (tmp_path / "m.ko.xz").write_bytes(lzma.compress(data))
    (tmp_path / "g.ko.gz").write_bytes(gzip.compress(data))
    assert guest.read_module(tmp_path / "m.ko.xz") == data
    assert guest.read_module(tmp_path / "g.ko.gz") == data
    (tmp_path / "bad.ko").write_bytes(b"hello")
    with pytest.raises(GuestImageError, match="not an ELF"):
        guest.read_module(tmp_path / "bad.ko")
    assert guest.module_vermagic(data) == f"{VERSION} SMP mod_unload "


def test_find_module_needs_exact_name(kernel):
    assert guest.find_module(kernel.modules_dir, "virtio").name == "virtio.ko"
    with pytest.raises(GuestImageError, match="virtio_nope"):
        guest.find_module(kernel.modules_dir, "virtio_nope")


@needs_busybox
def test_init_script_is_valid_shell():
    script = init_script(modules=guest.VIRTIO_MODULES, has_module=True, has_program=True)
    subprocess.run([BUSYBOX, "sh", "-n", "-c", script], check=True, timeout=30)
    assert script.index("virtio_ring") < script.index("virtio_console")
    assert "QEMUPATCH-GUEST-DONE rc=$rc" in script and "poweroff -f" in script
    assert "vmsocket-test bench vmsocket /dev/vmsocket0 /dev/vmsocket2 /dev/vmsocket3" in script


def test_init_prints_every_marker_the_parser_expects():
    """The marker contract: /init is built from qemupatch.console's constants
    and prints each of them; its own lines, run by a shell, parse back."""
    script = init_script(modules=guest.VIRTIO_MODULES, has_module=True, has_program=True)
    for marker in console.INIT_MARKERS.values():
        assert f'"{marker} ' in script or f"/{marker} /" in script, marker
    lines = script.splitlines()
    step_def = lines.index(next(ln for ln in lines if ln.startswith("step() {")))

    def printing(marker: str) -> str:
        return next(ln.strip() for ln in lines if f'echo "{marker} ' in ln)

    replay = "\n".join([
        "rc=0; nvs=4; uname() { echo 6.1.0-56-amd64; }",
        *lines[step_def:step_def + 5],
        printing(console.GUEST_START),
        "step insmod-virtio PASS",
        printing(console.PCI),
        "step insmod-vmsocket FAIL reason=insmod",
        printing(console.GUEST_DONE)])
    out = subprocess.run(["sh", "-c", replay], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    report = console.parse_console(out)
    assert report.started and report.kernel == "6.1.0-56-amd64"
    assert report.vmsocket_pci == 4 and report.done_rc == 1
    assert [(t.name, t.status) for t in report.tests] == [
        ("init.insmod-virtio", "pass"), ("init.insmod-vmsocket", "fail")]


def test_test_program_prints_the_markers_the_parser_expects():
    source = (Path(__file__).parents[1] / "guest" / "vmsocket-test.c").read_text()
    for marker in console.PROGRAM_MARKERS:
        assert f'printf("{marker} ' in source, marker


@needs_busybox
def test_build_image_contents_and_cache(kernel, tmp_path):
    prog = tmp_path / "vmsocket-test"
    shutil.copyfile(BUSYBOX, prog)            # any static ELF will do
    ko = tmp_path / "kvm_vmsocket.ko"
    ko.write_bytes(fake_module("kvm_vmsocket"))
    cache = tmp_path / "cache"
    img = build_image(kernel, Path(BUSYBOX), cache, vmsocket_module=ko, test_program=prog)
    assert img.kernel.read_bytes() == b"not really a kernel"
    assert img.kernel_version == VERSION and img.vmsocket_module and img.test_program
    listing = "\n".join(cpio_list(img.initramfs.read_bytes(), tmp_path))
    for name in ("init", "bin/busybox", "bin/vmsocket-test", "lib/modules/kvm_vmsocket.ko",
                 "lib/modules/virtio_ring.ko", "lib/modules/virtio_console.ko",
                 "sbin/insmod -> /bin/busybox", "dev/console"):
        assert name in listing, name
    # same inputs: same digest, nothing rebuilt
    mtime = img.initramfs.stat().st_mtime_ns
    again = build_image(kernel, Path(BUSYBOX), cache, vmsocket_module=ko, test_program=prog)
    assert again == img and img.initramfs.stat().st_mtime_ns == mtime
    # another input: another image
    plain = build_image(kernel, Path(BUSYBOX), cache)
    assert plain.digest != img.digest and not plain.vmsocket_module


@needs_busybox
def test_initramfs_is_deterministic(kernel, tmp_path):
    a = build_image(kernel, Path(BUSYBOX), tmp_path / "c1")
    b = build_image(kernel, Path(BUSYBOX), tmp_path / "c2")
    assert a.initramfs.read_bytes() == b.initramfs.read_bytes()


@needs_busybox
def test_module_for_another_kernel_is_refused(kernel, tmp_path):
    ko = tmp_path / "kvm_vmsocket.ko"
    ko.write_bytes(fake_module("kvm_vmsocket", "6.12.0-1-amd64"))
    with pytest.raises(GuestImageError, match="built for kernel '6.12.0-1-amd64"):
        build_image(kernel, Path(BUSYBOX), tmp_path / "c", vmsocket_module=ko)


@needs_busybox
def test_dynamic_test_program_is_refused(kernel, tmp_path):
    dyn = tmp_path / "dyn"
    shutil.copyfile("/bin/true", dyn)
    with pytest.raises(GuestImageError, match="static"):
        build_image(kernel, Path(BUSYBOX), tmp_path / "c", test_program=dyn)


def test_unknown_kernel_deb_path(tmp_path):
    from qemupatch.config import GuestKernel

    k = GuestKernel("x", debian.host_suite() or "bookworm", "linux-image-x")
    with pytest.raises(GuestImageError, match="no such package file"):
        guest.fetch_kernel(k, tmp_path, deb=tmp_path / "missing.deb")


@pytest.mark.real
@pytest.mark.timeout(900)
def test_real_packages_from_debian(tmp_path):
    """apt-get download + dpkg-deb -x of the configured kernel and busybox."""
    from qemupatch import config

    cfg = config.load(Path(__file__).parents[1], cache_dir=tmp_path)
    deb = os.environ.get("QEMUPATCH_KERNEL_DEB")
    img = guest.make_guest_image(cfg, kernel_deb=Path(deb) if deb else None)
    assert img.kernel_version == "6.1.0-56-amd64"
    assert img.kernel.stat().st_size > 1 << 20
    assert list((tmp_path / "busybox").glob("busybox-static_*.deb"))
