"""Guest images for the boot test: a Debian kernel and a busybox initramfs.

The pieces come from Debian packages fetched with ``apt-get download`` (exact
package names from ``qemupatch.toml``) and unpacked with ``dpkg-deb -x`` into
the cache::

    <cache>/kernels/<name>/<package>_<version>_<arch>.deb
    <cache>/kernels/<name>/root/            unpacked package(s)
    <cache>/busybox/busybox-static_*.deb, root/bin/busybox
    <cache>/guest/<hash>/vmlinuz, initramfs.cpio.gz, image.json

Since Linux 7.x (sid) Debian splits a kernel: ``linux-image-<abi>`` is a
metapackage whose ``Depends`` name ``linux-binary-<abi>`` (the vmlinuz, under
``usr/lib/modules/<abi>/``), ``linux-base-<abi>`` (config, modules.builtin)
and ``linux-modules-<abi>`` (110 MB of .ko.xz).  :func:`fetch_kernel` reads
those names from the metapackage itself, fetches the exact versions it pins,
and takes the modules package only when a module the initramfs needs is not
built in, so ``qemupatch.toml`` names a split kernel like any other.

The initramfs is a newc cpio written here in Python (deterministic: fixed
inode numbers, mtime 0, gzip mtime 0), so its name is a content hash of every
input and the same inputs never build twice.  It holds busybox and its applet
links, the virtio modules virtio-serial needs, the optional ``kvm_vmsocket.ko``
and ``vmsocket-test`` and a generated ``/init``.

What ``/init`` runs is chosen per boot on the kernel command line
(``qemupatch.tests=0|1``, ``qemupatch.bench=0|1``), so one image serves the
plain boot test and the benchmark.  It reports on the serial console with the
markers of ``qemupatch.console`` (the protocol is defined there, once).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qemupatch.config import Config, GuestKernel
from qemupatch.console import INIT_MARKERS
from qemupatch.debian import Apt
from qemupatch.errors import CommandFailed, CommandTimeout, GuestImageError
from qemupatch.run import run

# Bump when the image layout or /init changes: it is part of the cache key.
IMAGE_FORMAT = 5

# insmod order for virtio-serial in a 6.1 Debian guest (dependencies first).
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
)

BUSYBOX_PACKAGE = "busybox-static"

# virtserialport names the boot test gives the comparator ports.
VPORT_NAMES = {"echo": "qp.echo", "sink": "qp.sink", "source": "qp.source"}


@dataclass(frozen=True)
class KernelFiles:
    """An unpacked Debian kernel package."""

    name: str
    package: str
    version: str          # uname -r, e.g. 6.1.0-56-amd64
    vmlinuz: Path
    modules_dir: Path     # .../lib/modules/<version>
    deb: Path             # the package file that holds vmlinuz
    parts: tuple[str, ...] = ()   # every package file unpacked (split kernels)


@dataclass(frozen=True)
class GuestImage:
    """What QEMU boots: ``-kernel kernel -initrd initramfs``."""

    kernel: Path
    initramfs: Path
    kernel_version: str
    kernel_name: str
    digest: str                       # content hash of every input
    modules: tuple[str, ...]          # virtio modules in insmod order (not built in)
    vmsocket_module: bool
    test_program: bool

    def to_json(self) -> dict:
        return {
            "kernel": str(self.kernel),
            "initramfs": str(self.initramfs),
            "kernel_version": self.kernel_version,
            "kernel_name": self.kernel_name,
            "digest": self.digest,
            "modules": list(self.modules),
            "vmsocket_module": self.vmsocket_module,
            "test_program": self.test_program,
        }


# --------------------------------------------------------------- packages


def _deb_pattern(package: str, version: str | None) -> str:
    """The glob of ``package``'s files (at ``version``: file names carry it
    without its epoch)."""
    if not version:
        return f"{package}_*.deb"
    return f"{package}_{version.partition(':')[2] or version}_*.deb"


def _download(package: str, dest: Path, *, deb: Path | None, timeout: float,
              apt: Apt | None = None, version: str | None = None) -> Path:
    """The .deb of exactly ``package`` (at ``version`` when given) in
    ``dest``: copied from ``deb`` if given, reused if already there, else
    fetched with apt-get download."""
    dest.mkdir(parents=True, exist_ok=True)
    if deb is not None:
        if not deb.is_file():
            raise GuestImageError(f"{deb}: no such package file")
        target = dest / deb.name
        if not target.exists():
            shutil.copyfile(deb, target)
        return target
    pattern = _deb_pattern(package, version)
    have = sorted(dest.glob(pattern))
    if have:
        return have[-1]
    what = f"{package}={version}" if version else package
    try:
        (apt or Apt(None)).run("download", what, cwd=dest, timeout=timeout)
    except (CommandFailed, CommandTimeout) as exc:
        raise GuestImageError(
            f"could not download Debian package {what} into {dest}: {exc}") from exc
    have = sorted(dest.glob(pattern))
    if not have:
        raise GuestImageError(f"apt-get download {what} left no {pattern} in {dest}")
    return have[-1]


def _unpack(debs: list[Path], root: Path, *, timeout: float = 300) -> Path:
    """``dpkg-deb -x`` of every package file into the one tree ``root``,
    once: a tree stamped with all of them (and maybe more, such as a split
    kernel's modules fetched later) is reused."""
    stamp = root / ".qemupatch-unpacked"
    names = "\n".join(d.name for d in debs)
    if stamp.is_file() and set(names.split("\n")) <= set(stamp.read_text().split("\n")):
        return root
    if root.exists():
        shutil.rmtree(root)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root.parent))
    try:
        for deb in debs:
            run(["dpkg-deb", "-x", deb, tmp], timeout=timeout)
        (tmp / ".qemupatch-unpacked").write_text(names)
        tmp.rename(root)
    except (CommandFailed, CommandTimeout) as exc:
        raise GuestImageError(f"could not unpack {', '.join(d.name for d in debs)}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


# The parts of a split kernel (sid, Linux 7.x) by package name prefix: the
# ones always fetched, and the one fetched only when a module is needed.
SPLIT_PARTS = ("linux-binary-", "linux-base-")
SPLIT_MODULES = "linux-modules-"


def parse_depends(text: str) -> dict[str, str | None]:
    """``Depends`` of a control file as {package: pinned version or None};
    alternatives (``a | b``) are left out: a kernel's parts are never one."""
    out: dict[str, str | None] = {}
    for clause in text.split(","):
        clause = clause.strip()
        if not clause or "|" in clause:
            continue
        m = re.fullmatch(r"([a-z0-9][a-z0-9+.-]*)(?::\S+)?\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?",
                         clause)
        if m is None:
            raise GuestImageError(f"cannot read the dependency '{clause}'")
        out[m.group(1)] = m.group(3) if m.group(2) == "=" else None
    return out


def split_parts(depends: dict[str, str | None], abi: str) -> dict[str, str | None]:
    """The packages of a split kernel named by its metapackage's Depends:
    ``linux-binary-<abi>``, ``linux-base-<abi>`` and ``linux-modules-<abi>``
    (``abi`` as in ``linux-image-<abi>``)."""
    return {name: version for name, version in depends.items()
            if any(name == prefix + abi for prefix in (*SPLIT_PARTS, SPLIT_MODULES))}


def _control_field(deb: Path, field: str) -> str:
    try:
        return run(["dpkg-deb", "-f", deb, field], timeout=60).stdout.strip()
    except (CommandFailed, CommandTimeout) as exc:
        raise GuestImageError(f"could not read {field} of {deb}: {exc}") from exc


def kernel_layout(root: Path) -> tuple[str, Path, Path] | None:
    """(uname -r, vmlinuz, modules folder) of an unpacked kernel, or None
    when ``root`` holds no kernel (a metapackage).  Bookworm ships
    ``boot/vmlinuz-<v>`` and ``lib/modules/<v>``; trixie ``usr/lib/modules``;
    sid's split packages ``usr/lib/modules/<v>/vmlinuz`` and no /boot."""
    found = []
    for mods in sorted([*(root / "lib" / "modules").glob("*"),
                        *(root / "usr" / "lib" / "modules").glob("*")]):
        version = mods.name
        for vmlinuz in (root / "boot" / f"vmlinuz-{version}", mods / "vmlinuz"):
            if vmlinuz.is_file():
                found.append((version, vmlinuz, mods))
                break
    if len(found) > 1:
        raise GuestImageError(
            f"{root}: more than one kernel ({', '.join(v for v, _, _ in found)})")
    return found[0] if found else None


def fetch_kernel(kernel: GuestKernel, cache_dir: Path, *, deb: Path | None = None,
                 mirror: str | None = None, timeout: float = 900,
                 modules: tuple[str, ...] = VIRTIO_MODULES) -> KernelFiles:
    """Download (or reuse) and unpack ``kernel.image_package`` (from
    ``mirror``, default the machine's).

    When that package is a metapackage (sid's split kernels), its parts are
    fetched too, at the versions it pins: the kernel and its base files,
    and the modules only if one of ``modules`` is not built in.  With
    ``deb`` (a local metapackage file) the parts are taken from beside it
    when there, else downloaded."""
    base = cache_dir / "kernels" / kernel.name
    apt = None if deb else Apt.binaries(cache_dir, kernel.suite, mirror)
    debfile = _download(kernel.image_package, base, deb=deb, timeout=timeout, apt=apt)
    abi = kernel.image_package.removeprefix("linux-image-")
    parts = split_parts(parse_depends(_control_field(debfile, "Depends")), abi)
    debs = [debfile]
    kernel_deb = debfile
    if not all(prefix + abi in parts for prefix in SPLIT_PARTS):     # one package
        layout = kernel_layout(_unpack(debs, base / "root"))
        if layout is None:
            raise GuestImageError(
                f"{debfile.name} holds no kernel (no boot/vmlinuz-<version> nor "
                f"usr/lib/modules/<version>/vmlinuz) and its Depends name no "
                f"{' and '.join(p + abi for p in SPLIT_PARTS)}: not a Debian kernel package")
    else:
        def part(name: str) -> Path:
            local = None
            if deb is not None:
                beside = sorted(deb.parent.glob(_deb_pattern(name, parts[name])))
                local = beside[-1] if beside else None
            return _download(name, base, deb=local, timeout=timeout,
                             apt=apt or Apt.binaries(cache_dir, kernel.suite, mirror),
                             version=parts[name])

        debs += [part(prefix + abi) for prefix in SPLIT_PARTS]
        kernel_deb = debs[1]
        root = _unpack(debs, base / "root")
        layout = kernel_layout(root)
        if layout is None:
            raise GuestImageError(f"{debs[1].name}: no usr/lib/modules/<version>/vmlinuz")
        missing = [m for m in modules if m not in builtin_modules(layout[2])]
        if missing:
            name = SPLIT_MODULES + abi
            if name not in parts:
                raise GuestImageError(
                    f"{kernel.image_package}: modules {', '.join(missing)} are not built in "
                    f"and its Depends name no {name}")
            debs.append(part(name))
            root = _unpack(debs, base / "root")
            layout = kernel_layout(root)
            assert layout is not None   # the same tree, one package more
    version, vmlinuz, modules_dir = layout
    return KernelFiles(kernel.name, kernel.image_package, version, vmlinuz,
                       modules_dir, kernel_deb, tuple(d.name for d in debs))


def fetch_busybox(cache_dir: Path, *, deb: Path | None = None, timeout: float = 300) -> Path:
    """The static busybox binary from Debian's busybox-static."""
    base = cache_dir / "busybox"
    debfile = _download(BUSYBOX_PACKAGE, base, deb=deb, timeout=timeout)
    root = _unpack([debfile], base / "root")
    binary = root / "bin" / "busybox"
    if not binary.is_file():
        raise GuestImageError(f"{debfile.name}: no bin/busybox")
    return binary


# ---------------------------------------------------------------- modules


def read_module(path: Path) -> bytes:
    """A kernel module's ELF bytes, decompressed (.ko, .ko.xz, .ko.gz, .ko.zst)."""
    data = path.read_bytes()
    name = path.name
    try:
        if name.endswith(".ko.xz"):
            data = lzma.decompress(data)
        elif name.endswith(".ko.gz"):
            data = gzip.decompress(data)
        elif name.endswith(".ko.zst"):
            with tempfile.TemporaryDirectory() as tmp:
                plain = Path(tmp) / "module.ko"
                run(["zstd", "-q", "-d", path, "-o", plain], timeout=60)
                data = plain.read_bytes()
    except (lzma.LZMAError, OSError, CommandFailed, CommandTimeout) as exc:
        raise GuestImageError(f"could not decompress kernel module {path}: {exc}") from exc
    if data[:4] != b"\x7fELF":
        raise GuestImageError(f"{path}: not an ELF kernel module")
    return data


def find_module(modules_dir: Path, name: str) -> Path:
    hits = sorted(p for p in (modules_dir / "kernel").rglob(f"{name}.ko*")
                  if re.fullmatch(re.escape(name) + r"\.ko(\.xz|\.gz|\.zst)?", p.name))
    if not hits:
        raise GuestImageError(
            f"module {name} not found under {modules_dir}/kernel "
            "(is virtio built into this kernel? then drop it from the list)")
    return hits[0]


def builtin_modules(modules_dir: Path) -> set[str]:
    """Names of the modules this kernel has built in (``modules.builtin``)."""
    try:
        text = (modules_dir / "modules.builtin").read_text()
    except FileNotFoundError:
        return set()
    return {Path(line.strip()).name.split(".ko")[0] for line in text.splitlines() if line.strip()}


def module_vermagic(data: bytes) -> str | None:
    m = re.search(rb"vermagic=([^\0]*)\0", data)
    return m.group(1).decode("ascii", "replace") if m else None


# ------------------------------------------------------------------- cpio


class Cpio:
    """A deterministic newc ("070701") archive writer."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 300
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *,
               rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        name = name.strip("/")
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name}")
        self._names.add(name)
        self._ino += 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._buf.write(header + name.encode() + b"\0")
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def has(self, name: str) -> bool:
        return name.strip("/") in self._names

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        self._pad()
        return self._buf.getvalue()


def _applets(busybox: Path) -> list[str]:
    """``busybox --list-full``: applet paths such as ``sbin/insmod``."""
    out = run([busybox, "--list-full"], timeout=30).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


# ------------------------------------------------------------------- /init


INIT_TEMPLATE = r"""#!/bin/sh
# Generated by qemupatch (image format {fmt}).  Console protocol: see qemupatch/console.py.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
arg() {{ sed -n "s/.*\<qemupatch\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }}
TESTS=$(arg tests); BENCH=$(arg bench); TMO=$(arg timeout)
[ -n "$TMO" ] || TMO=120
echo "{GUEST_START} kernel=$(uname -r) vmsocket_module={has_mod} test_program={has_prog}"
rc=0
step() {{ # step NAME STATUS [key=value...]
    echo "{STEP} $*"
    [ "$2" = FAIL ] && rc=1
    return 0
}}

# virtio-serial, the comparator
ok=PASS
for m in {modules}; do
    insmod /lib/modules/$m.ko || {{ ok=FAIL; echo "insmod $m failed"; }}
done
step insmod-virtio $ok
# Ports appear one by one (and their names a little later): wait for all three.
VP_ECHO=; VP_SINK=; VP_SOURCE=
n=0
while [ $n -lt 100 ]; do
    for p in $(ls /sys/class/virtio-ports 2>/dev/null); do
        case "$(cat /sys/class/virtio-ports/$p/name 2>/dev/null)" in
            {vp_echo}) VP_ECHO=/dev/$p;;
            {vp_sink}) VP_SINK=/dev/$p;;
            {vp_source}) VP_SOURCE=/dev/$p;;
        esac
    done
    [ -n "$VP_ECHO" ] && [ -n "$VP_SINK" ] && [ -n "$VP_SOURCE" ] && [ -c "$VP_SOURCE" ] && break
    sleep 0.1; n=$((n+1))
done
echo "{VPORTS} echo=$VP_ECHO sink=$VP_SINK source=$VP_SOURCE"

# one line through the virtio-serial echo server, with busybox only
if [ -n "$VP_ECHO" ]; then
    word=qemupatch-ping-$$-$(cat /proc/sys/kernel/random/uuid 2>/dev/null | cut -c1-8)
    # read -t, not "timeout head": busybox timeout's watcher child would keep
    # the port open, and a virtio port takes one opener at a time (EBUSY).
    got=$( (exec 3<>$VP_ECHO; echo $word >&3; read -r -t 10 line <&3; echo "$line") 2>&1)
    if [ "$got" = "$word" ]; then step virtio-serial-echo PASS bytes=$((${{#word}}+1)); else step virtio-serial-echo FAIL got=$(echo $got | tr ' ' _); fi
else
    step virtio-serial-echo FAIL reason=no-port
fi

# PCI view: how many vmsocket functions (1af4:10f0) the guest sees
nvs=0
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x10f0 ] && nvs=$((nvs+1))
done
echo "{PCI} vmsocket=$nvs"

if [ -f /lib/modules/kvm_vmsocket.ko ] && [ $nvs -gt 0 ]; then
    if insmod /lib/modules/kvm_vmsocket.ko; then
        n=0
        while [ ! -c /dev/vmsocket0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
        devs=$(ls /dev/vmsocket* 2>/dev/null | tr '\n' ' ')
        if [ -c /dev/vmsocket0 ]; then step insmod-vmsocket PASS devices=$(echo $devs | tr ' ' ,); else step insmod-vmsocket FAIL reason=no-dev-vmsocket0; fi
    else
        step insmod-vmsocket FAIL reason=insmod
    fi
elif [ $nvs -gt 0 ]; then
    step insmod-vmsocket SKIP reason=no-module
fi

if [ "$TESTS" = 1 ] && [ -c /dev/vmsocket0 ]; then
    # one line through the vmsocket echo server, with busybox only
    word=qemupatch-vmsocket-$$
    got=$( (exec 3<>/dev/vmsocket0; echo $word >&3; read -r -t 10 line <&3; echo "$line") 2>&1)
    if [ "$got" = "$word" ]; then step vmsocket-shell-echo PASS bytes=$((${{#word}}+1)); else step vmsocket-shell-echo FAIL got=$(echo $got | tr ' ' _); fi
    if [ -x /bin/vmsocket-test ]; then
        for t in "selftest /dev/vmsocket0" "refused /dev/vmsocket1" "signal /dev/vmsocket0"; do
            set -- $t
            timeout $TMO /bin/vmsocket-test $t; r=$?
            [ $r = 0 ] && step run-$1 PASS rc=0 || step run-$1 FAIL rc=$r
        done
    else
        step vmsocket-test SKIP reason=no-test-program
    fi
fi

if [ "$BENCH" = 1 ]; then
    # One process for every channel: it interleaves them cell by cell and
    # opens each device once (vmsocket-test bench; qemupatch.bench_reps=N).
    REPS=$(arg bench_reps); [ -n "$REPS" ] || REPS=5
    chans=
    if [ $nvs -gt 0 ]; then
        if [ -c /dev/vmsocket3 ]; then
            chans="vmsocket /dev/vmsocket0 /dev/vmsocket2 /dev/vmsocket3"
        else
            step bench-vmsocket FAIL reason=no-dev-vmsocket3
        fi
    fi
    if [ -n "$VP_ECHO" ] && [ -n "$VP_SINK" ] && [ -n "$VP_SOURCE" ]; then
        chans="$chans virtio-serial $VP_ECHO $VP_SINK $VP_SOURCE"
    else
        step bench-virtio-serial FAIL reason=missing-ports
    fi
    # vmsocket in v1 mode beside stream mode, when the driver has both: it
    # reads its stream parameter at open(), so the shell opens the three
    # v1 devices (4, 5, 6) with it off and hands them over as fd:7..9.
    P=/sys/module/kvm_vmsocket/parameters/stream
    if [ ! -x /bin/vmsocket-test ]; then
        step bench FAIL reason=no-test-program
    elif [ -n "$chans" ] && [ -f $P ] && [ -c /dev/vmsocket6 ]; then
        old=$(cat $P); echo 0 > $P
        {{ echo $old > $P; timeout $((TMO*5)) /bin/vmsocket-test bench $REPS vmsocket-v1 fd:7 fd:8 fd:9 $chans; }} 7<>/dev/vmsocket4 8<>/dev/vmsocket5 9<>/dev/vmsocket6; r=$?
        echo $old > $P
        [ $r = 0 ] && step bench PASS reps=$REPS v1=1 || step bench FAIL rc=$r
    elif [ -n "$chans" ]; then
        timeout $((TMO*5)) /bin/vmsocket-test bench $REPS $chans; r=$?
        [ $r = 0 ] && step bench PASS reps=$REPS || step bench FAIL rc=$r
    fi
fi

dmesg | grep -E 'BUG:|Oops|WARNING:|Call Trace' | head -40 | sed 's/^/{DMESG} /'
echo "{GUEST_DONE} rc=$rc"
sync
poweroff -f
"""


def init_script(*, modules: Iterable[str], has_module: bool, has_program: bool) -> str:
    return INIT_TEMPLATE.format(
        fmt=IMAGE_FORMAT,
        modules=" ".join(modules),
        has_mod=int(has_module),
        has_prog=int(has_program),
        vp_echo=VPORT_NAMES["echo"],
        vp_sink=VPORT_NAMES["sink"],
        vp_source=VPORT_NAMES["source"],
        **INIT_MARKERS,
    )


# ------------------------------------------------------------------ build


def _is_static_elf(data: bytes) -> bool:
    # A dynamically linked program has a PT_INTERP ("/lib64/ld-linux...").
    return data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data[:4096]


def build_image(kernel: KernelFiles, busybox: Path, cache_dir: Path, *,
                vmsocket_module: Path | None = None,
                test_program: Path | None = None,
                modules: tuple[str, ...] = VIRTIO_MODULES) -> GuestImage:
    """Write (or reuse) the initramfs for these inputs under ``cache_dir/guest``."""
    bb = busybox.read_bytes()
    if not _is_static_elf(bb):
        raise GuestImageError(f"{busybox}: not a static ELF binary")
    # Only the modules this kernel does not have built in (6.12 builds virtio in).
    builtin = builtin_modules(kernel.modules_dir)
    modules = tuple(m for m in modules if m not in builtin)
    mods = [(name, read_module(find_module(kernel.modules_dir, name))) for name in modules]
    extra: dict[str, bytes] = {}
    if vmsocket_module is not None:
        try:
            data = read_module(vmsocket_module)
        except OSError as exc:
            raise GuestImageError(f"vmsocket module {vmsocket_module}: {exc}") from exc
        magic = module_vermagic(data)
        if magic is None or magic.split()[0] != kernel.version:
            raise GuestImageError(
                f"{vmsocket_module} was built for kernel '{magic}', "
                f"the guest runs {kernel.version}: rebuild it against that kernel's headers")
        extra["lib/modules/kvm_vmsocket.ko"] = data
    if test_program is not None:
        try:
            data = test_program.read_bytes()
        except OSError as exc:
            raise GuestImageError(f"test program {test_program}: {exc}") from exc
        if not _is_static_elf(data):
            raise GuestImageError(f"{test_program}: not a static ELF binary (build it with -static)")
        extra["bin/vmsocket-test"] = data
    init = init_script(modules=modules, has_module=vmsocket_module is not None,
                       has_program=test_program is not None).encode()

    h = hashlib.sha256()
    h.update(f"format={IMAGE_FORMAT}\n".encode())
    for label, data in (("vmlinuz", kernel.vmlinuz.read_bytes()), ("busybox", bb),
                        ("init", init), *mods, *sorted(extra.items())):
        h.update(label.encode() + b"\0" + hashlib.sha256(data).digest())
    digest = h.hexdigest()[:20]
    out = cache_dir / "guest" / digest
    image = GuestImage(
        kernel=out / "vmlinuz", initramfs=out / "initramfs.cpio.gz",
        kernel_version=kernel.version, kernel_name=kernel.name, digest=digest,
        modules=tuple(modules), vmsocket_module=vmsocket_module is not None,
        test_program=test_program is not None,
    )
    if (out / "image.json").is_file():
        return image

    cpio = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys",
              "tmp", "lib", "lib/modules", "etc", "root"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", bb, 0o755)
    for applet in _applets(busybox):
        if not cpio.has(applet):
            cpio.symlink(applet, "/bin/busybox")
    for name, data in mods:
        cpio.file(f"lib/modules/{name}.ko", data)
    for name, data in sorted(extra.items()):
        cpio.file(name, data, 0o755 if name.startswith("bin/") else 0o644)
    cpio.file("init", init, 0o755)
    blob = gzip.compress(cpio.finish(), compresslevel=6, mtime=0)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=out.parent))
    try:
        shutil.copyfile(kernel.vmlinuz, tmp / "vmlinuz")
        (tmp / "initramfs.cpio.gz").write_bytes(blob)
        (tmp / "init").write_bytes(init)
        (tmp / "image.json").write_text(json.dumps(
            {**image.to_json(), "kernel": "vmlinuz", "initramfs": "initramfs.cpio.gz",
             "kernel_deb": kernel.deb.name,
             "kernel_debs": list(kernel.parts or (kernel.deb.name,))}, indent=2) + "\n")
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "image.json").is_file():   # lost a race: the other one is fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return image


def make_guest_image(cfg: Config, kernel_name: str | None = None, *,
                     vmsocket_module: Path | None = None,
                     test_program: Path | None = None,
                     kernel_deb: Path | None = None,
                     busybox_deb: Path | None = None) -> GuestImage:
    """The guest image for ``kernel_name`` (default: the first kernel in the
    config), fetching the Debian packages into ``cfg.cache_dir`` as needed."""
    if not cfg.kernels:
        raise GuestImageError("qemupatch.toml lists no [[kernel]]")
    kernel = cfg.kernel(kernel_name) if kernel_name else cfg.default_kernel
    files = fetch_kernel(kernel, cfg.cache_dir, deb=kernel_deb,
                         mirror=cfg.settings.debian_mirror)
    busybox = fetch_busybox(cfg.cache_dir, deb=busybox_deb)
    return build_image(files, busybox, cfg.cache_dir,
                       vmsocket_module=vmsocket_module, test_program=test_program)
