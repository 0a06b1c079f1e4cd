"""The guest image: cpio writer, module handling, /init, caching."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
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
    assert ("vmsocket-test bench $REPS $chans" in script and
            "chans=\"vmsocket /dev/vmsocket0 /dev/vmsocket2 /dev/vmsocket3\"" in script)


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


# ------------------------------------------------- split kernels (Debian sid, 7.x)

ABI = "7.9.1+deb99-amd64"
SID_DEPENDS = (f"dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
               f"linux-base-{ABI} (= 7.9.1-1), linux-binary-{ABI} (= 7.9.1-1), "
               f"linux-modules-{ABI} (= 7.9.1-1)")


def make_deb(folder: Path, package: str, version: str, files: dict[str, bytes],
             depends: str = "") -> Path:
    """A real .deb (dpkg-deb -b) holding ``files``, named as Debian names it."""
    tree = folder / f"tree-{package}"
    (tree / "DEBIAN").mkdir(parents=True)
    control = (f"Package: {package}\nVersion: {version}\nArchitecture: amd64\n"
               f"Maintainer: test <test@example.org>\nDescription: test package\n")
    if depends:
        control += f"Depends: {depends}\n"
    (tree / "DEBIAN/control").write_text(control)
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    deb = folder / f"{package}_{version.partition(':')[2] or version}_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", tree, deb], check=True,
                   capture_output=True, timeout=120)
    shutil.rmtree(tree)
    return deb


def sid_kernel_debs(folder: Path, *, builtin: tuple[str, ...]) -> Path:
    """A split kernel as sid ships it: the metapackage, linux-binary (the
    vmlinuz under usr/lib/modules), linux-base (modules.builtin) and
    linux-modules (.ko.xz).  Returns the metapackage's file."""
    folder.mkdir(parents=True, exist_ok=True)
    mods = f"usr/lib/modules/{ABI}"
    make_deb(folder, f"linux-binary-{ABI}", "7.9.1-1",
             {f"{mods}/vmlinuz": b"split kernel"}, depends=f"linux-base-{ABI} (= 7.9.1-1)")
    make_deb(folder, f"linux-base-{ABI}", "7.9.1-1", {
        f"{mods}/modules.builtin": "".join(
            f"kernel/drivers/virtio/{m}.ko\n" for m in builtin).encode(),
        f"{mods}/config": b"CONFIG_VIRTIO=y\n"})
    make_deb(folder, f"linux-modules-{ABI}", "7.9.1-1", {
        f"{mods}/kernel/drivers/virtio/{m}.ko.xz":
            lzma.compress(fake_module(m, ABI), format=lzma.FORMAT_XZ)
        for m in guest.VIRTIO_MODULES})
    return make_deb(folder, f"linux-image-{ABI}", "7.9.1-1", {}, depends=SID_DEPENDS)


def sid_kernel():
    from qemupatch.config import GuestKernel

    return GuestKernel("7.9", "sid", f"linux-image-{ABI}")


def test_parse_depends_reads_pins_and_leaves_alternatives():
    deps = guest.parse_depends(SID_DEPENDS + ", kmod, libc6:amd64 (>= 2.36)")
    assert deps == {f"linux-base-{ABI}": "7.9.1-1", f"linux-binary-{ABI}": "7.9.1-1",
                    f"linux-modules-{ABI}": "7.9.1-1", "kmod": None, "libc6": None}
    assert guest.parse_depends("") == {}
    with pytest.raises(GuestImageError, match=re.escape("cannot read the dependency 'linux-base ((= 1)'")):
        guest.parse_depends("linux-base ((= 1)")


def test_split_parts_are_the_packages_of_this_abi_only():
    deps = guest.parse_depends(SID_DEPENDS + ", linux-binary-7.0.0-1-amd64 (= 1), kmod")
    assert guest.split_parts(deps, ABI) == {f"linux-base-{ABI}": "7.9.1-1",
                                            f"linux-binary-{ABI}": "7.9.1-1",
                                            f"linux-modules-{ABI}": "7.9.1-1"}
    # bookworm's linux-image-6.1.0-56-amd64: one package, no parts
    assert guest.split_parts({"kmod": None, "linux-base": None}, "6.1.0-56-amd64") == {}


@pytest.mark.parametrize("layout", ["bookworm", "trixie", "sid"])
def test_kernel_layout_finds_every_debian_layout(tmp_path, layout):
    root = tmp_path / "root"
    mods = root / ("lib" if layout == "bookworm" else "usr/lib") / "modules" / "7.0.0-1-amd64"
    (mods / "kernel").mkdir(parents=True)
    vmlinuz = mods / "vmlinuz" if layout == "sid" else root / "boot/vmlinuz-7.0.0-1-amd64"
    vmlinuz.parent.mkdir(parents=True, exist_ok=True)
    vmlinuz.write_bytes(b"k")
    assert guest.kernel_layout(root) == ("7.0.0-1-amd64", vmlinuz, mods)


def test_kernel_layout_of_a_metapackage_is_none_and_two_kernels_are_refused(tmp_path):
    root = tmp_path / "root"
    (root / "usr/share/doc/linux-image-x").mkdir(parents=True)
    assert guest.kernel_layout(root) is None
    for v in ("7.0.0-1-amd64", "7.0.0-2-amd64"):
        (root / "usr/lib/modules" / v).mkdir(parents=True)
        (root / "usr/lib/modules" / v / "vmlinuz").write_bytes(b"k")
    with pytest.raises(GuestImageError, match="more than one kernel"):
        guest.kernel_layout(root)


def test_split_kernel_takes_binary_and_base_but_not_the_modules_when_built_in(tmp_path):
    """7.2's virtio is built in: the 110 MB modules package is never fetched."""
    meta = sid_kernel_debs(tmp_path / "debs", builtin=guest.VIRTIO_MODULES)
    files = guest.fetch_kernel(sid_kernel(), tmp_path / "cache", deb=meta)
    assert files.version == ABI
    assert files.vmlinuz.read_bytes() == b"split kernel"
    assert files.vmlinuz == files.modules_dir / "vmlinuz"
    assert files.deb.name.startswith(f"linux-binary-{ABI}_")
    assert [p.split("_")[0] for p in files.parts] == [
        f"linux-image-{ABI}", f"linux-binary-{ABI}", f"linux-base-{ABI}"]
    kept = sorted(p.name.split("_")[0] for p in (tmp_path / "cache/kernels/7.9").glob("*.deb"))
    assert f"linux-modules-{ABI}" not in kept
    assert guest.builtin_modules(files.modules_dir) >= set(guest.VIRTIO_MODULES)


@needs_busybox
def test_split_kernel_image_has_no_virtio_modules_and_boots_the_binary(tmp_path):
    meta = sid_kernel_debs(tmp_path / "debs", builtin=guest.VIRTIO_MODULES)
    files = guest.fetch_kernel(sid_kernel(), tmp_path / "cache", deb=meta)
    img = build_image(files, Path(BUSYBOX), tmp_path / "cache")
    assert img.modules == () and img.kernel_version == ABI
    assert img.kernel.read_bytes() == b"split kernel"
    record = json.loads((img.kernel.parent / "image.json").read_text())
    assert record["kernel_deb"].startswith(f"linux-binary-{ABI}_")
    assert len(record["kernel_debs"]) == 3
    names = cpio_list(img.initramfs.read_bytes(), tmp_path)
    assert not [n for n in names if n.endswith(".ko")]


def test_split_kernel_takes_the_modules_when_one_is_not_built_in(tmp_path):
    meta = sid_kernel_debs(tmp_path / "debs", builtin=guest.VIRTIO_MODULES[2:])
    files = guest.fetch_kernel(sid_kernel(), tmp_path / "cache", deb=meta)
    assert files.parts[-1].startswith(f"linux-modules-{ABI}_")
    found = guest.find_module(files.modules_dir, "virtio_ring")
    assert found.name == "virtio_ring.ko.xz"
    assert guest.module_vermagic(guest.read_module(found)).startswith(ABI)
    # a second call reuses the tree with the modules in it (no unpack again)
    stamp = files.modules_dir.parents[3] / ".qemupatch-unpacked"
    before = stamp.stat().st_mtime_ns
    again = guest.fetch_kernel(sid_kernel(), tmp_path / "cache", deb=meta)
    assert again == files and stamp.stat().st_mtime_ns == before


def test_metapackage_without_parts_is_refused_by_name(tmp_path):
    meta = make_deb(tmp_path, f"linux-image-{ABI}", "7.9.1-1", {}, depends="kmod")
    with pytest.raises(GuestImageError, match=rf"holds no kernel .* no linux-binary-{re.escape(ABI)}"):
        guest.fetch_kernel(sid_kernel(), tmp_path / "cache", deb=meta)


def test_split_kernel_without_modules_package_says_which_modules(tmp_path):
    """A split kernel whose metapackage names no modules package, while a
    needed module is not built in: the error names the modules."""
    folder = tmp_path / "debs"
    sid_kernel_debs(folder, builtin=guest.VIRTIO_MODULES[1:])
    meta = make_deb(folder / "meta", f"linux-image-{ABI}", "7.9.1-1", {},
                    depends=f"linux-base-{ABI} (= 7.9.1-1), linux-binary-{ABI} (= 7.9.1-1)")
    for part in folder.glob("linux-b*.deb"):
        shutil.copy(part, meta.parent)
    with pytest.raises(GuestImageError, match=f"virtio_ring are not built in and its Depends "
                                              f"name no linux-modules-{re.escape(ABI)}"):
        guest.fetch_kernel(sid_kernel(), tmp_path / "cache", deb=meta)


def test_sid_apt_state_is_private():
    apt = debian.Apt.binaries(Path("/nonexistent-cache"), "sid", "http://mirror.example/debian")
    assert apt.state_dir == Path("/nonexistent-cache/apt/sid")
    assert apt.lines == ["deb http://mirror.example/debian sid main"]
