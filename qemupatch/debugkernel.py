"""A guest kernel with KASAN, lockdep and UBSAN, for the driver's stress test.

Debian ships no such kernel (its flavours are amd64, cloud and rt; the
``-dbg`` packages only hold debug symbols), so this builds one from
Debian's own ``linux-source-6.1`` in the bookworm build container:
``tinyconfig`` plus :data:`CONFIG_FRAGMENT` (what the busybox guest needs,
and the checkers).  The kernel tree persists in ``<cache>/debug-kernel`` so
that a changed driver only recompiles the module; ccache shares the volume
of the QEMU builds.

The guest image reuses :func:`qemupatch.guest.build_image`: the kernel has
everything built in, so it needs no module besides ``kvm_vmsocket.ko``.
:func:`checker_reports` picks what KASAN, lockdep, UBSAN and the rest
printed out of a console log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qemupatch import build
from qemupatch.config import Config
from qemupatch.guest import GuestImage, KernelFiles, build_image, fetch_busybox
from qemupatch.progress import Progress, TerminalProgress
from qemupatch.runner import Runner

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = "/usr/src/linux-source-6.1.tar.xz"
# Installed into the bookworm build image through its package build arg.
PACKAGES = f"{SOURCE_PACKAGE} bc libelf-dev libssl-dev"

# tinyconfig + this = a kernel for a busybox initramfs on QEMU's pc machine
# (no PVH: with KASAN its PVH entry dies before the first console line, so
# pvh.direct_kernel boots the bzImage; serial console, PCI with MSI, modules, suspend for the
# driver's PM test) with the memory and locking checkers on.
CONFIG_FRAGMENT = """\
CONFIG_64BIT=y
CONFIG_SMP=y
CONFIG_NR_CPUS=4
CONFIG_PCI=y
CONFIG_PCI_MSI=y
CONFIG_PRINTK=y
CONFIG_PRINTK_TIME=y
CONFIG_BUG=y
CONFIG_TTY=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_RD_GZIP=y
CONFIG_DEVTMPFS=y
CONFIG_DEVTMPFS_MOUNT=y
CONFIG_PROC_FS=y
CONFIG_SYSFS=y
CONFIG_TMPFS=y
CONFIG_SHMEM=y
CONFIG_BINFMT_ELF=y
CONFIG_BINFMT_SCRIPT=y
CONFIG_MODULES=y
CONFIG_MODULE_UNLOAD=y
CONFIG_MODULE_FORCE_UNLOAD=y
CONFIG_MULTIUSER=y
CONFIG_FUTEX=y
CONFIG_EPOLL=y
CONFIG_SIGNALFD=y
CONFIG_TIMERFD=y
CONFIG_EVENTFD=y
CONFIG_POSIX_TIMERS=y
CONFIG_HIGH_RES_TIMERS=y
CONFIG_HZ_1000=y
CONFIG_HYPERVISOR_GUEST=y
CONFIG_PARAVIRT=y
CONFIG_KVM_GUEST=y
CONFIG_ACPI=y
CONFIG_PM=y
CONFIG_SUSPEND=y
CONFIG_PM_SLEEP=y
CONFIG_PM_DEBUG=y
CONFIG_PM_SLEEP_DEBUG=y
CONFIG_KALLSYMS=y
CONFIG_KALLSYMS_ALL=y
CONFIG_STACKTRACE=y
CONFIG_FRAME_POINTER=y
CONFIG_UNWINDER_FRAME_POINTER=y
CONFIG_DEBUG_KERNEL=y
CONFIG_DEBUG_INFO_NONE=y
CONFIG_PANIC_TIMEOUT=-1
CONFIG_SLUB=y
CONFIG_KASAN=y
CONFIG_KASAN_GENERIC=y
CONFIG_KASAN_INLINE=y
CONFIG_PROVE_LOCKING=y
CONFIG_DEBUG_ATOMIC_SLEEP=y
CONFIG_DEBUG_LIST=y
CONFIG_DEBUG_OBJECTS=y
CONFIG_UBSAN=y
CONFIG_UBSAN_BOUNDS=y
"""

# Options that must survive olddefconfig (a dependency it could not meet
# would silently drop them, and the test would check nothing).
REQUIRED = ("KASAN", "PROVE_LOCKING", "DEBUG_ATOMIC_SLEEP", "UBSAN", "PCI_MSI",
            "MODULES", "SUSPEND")

# Console lines that mean a checker fired.
CHECKER_LINE = re.compile(
    r"BUG: |UBSAN: |WARNING: |possible circular locking|"
    r"possible recursive locking|inconsistent lock state|lock held when returning|"
    r"sleeping function called from invalid context|Oops|general protection fault|"
    r"list_(add|del) corruption|ODEBUG: |blocked for more than")


@dataclass(frozen=True)
class DebugKernel:
    """The built kernel and the module built against it."""

    bzimage: Path
    module: Path
    release: str            # make kernelrelease, e.g. 6.1.192


def _script(jobs: int) -> str:
    required = " ".join(REQUIRED)
    return "\n".join([
        "set -eu",
        'export PATH="/usr/lib/ccache:$PATH"',
        'cd "$TREE"',
        "if [ ! -f Makefile ]; then",
        "  echo '== unpack linux-source-6.1'",
        f"  tar -xf {SOURCE_TARBALL} --strip-components=1",
        "fi",
        "cat > kernel/configs/qemupatch-debug.config <<'EOF'",
        CONFIG_FRAGMENT.rstrip("\n"),
        "EOF",
        "if ! cmp -s kernel/configs/qemupatch-debug.config .qemupatch-fragment; then",
        "  echo '== configure: tinyconfig + qemupatch-debug.config'",
        "  make -s tinyconfig",
        "  make -s qemupatch-debug.config",
        "  cp kernel/configs/qemupatch-debug.config .qemupatch-fragment",
        "fi",
        f"for o in {required}; do grep -q \"^CONFIG_$o=y\" .config "
        "|| { echo \"CONFIG_$o did not survive olddefconfig\"; exit 92; }; done",
        "echo '== compile kernel'",
        f"make -j{int(jobs)} CC='ccache gcc' bzImage modules "
        "|| { echo 'make failed'; exit 91; }",
        "echo \"release $(make -s kernelrelease)\"",
        'make -s kernelrelease > "$OUT/release"',
        'cp arch/x86/boot/bzImage "$OUT/"',
        "echo '== compile module'",
        'work=$(mktemp -d); trap \'rm -rf "$work"\' EXIT',
        'cp -a "$MODULE/." "$work/"',
        f"make -j{int(jobs)} CC='ccache gcc' M=\"$work\" modules "
        "|| { echo 'module make failed'; exit 91; }",
        'cp "$work"/*.ko "$OUT/"',
    ])


def debug_kernel_spec(module_src: Path, tree: Path, ccache_volume: str, *,
                      project_root: Path, jobs: int = 2, timeout: float = 5400,
                      call: build.Call) -> build.BuildSpec:
    return build.BuildSpec(
        kind="debug-kernel", name="debug-kernel", call=call, script=_script(jobs),
        mounts=(build.Mount("MODULE", module_src, "/module", "ro"),
                build.Mount("TREE", tree, "/tree", "rw"),
                build.Mount("CCACHE_DIR", tree.parent / "ccache", "/ccache", "volume",
                            volume=ccache_volume)),
        dockerfile=build.dockerfile_for(project_root, "bookworm"),
        buildargs={"KERNEL_HEADERS": PACKAGES},
        artifacts=("bzImage", "kvm_vmsocket.ko", "release"), main_artifact="bzImage",
        deadline=timeout, idle_timeout=1800, inputs=(module_src,),
        facts={"source": SOURCE_PACKAGE, "config_fragment": CONFIG_FRAGMENT.splitlines(),
               "module_source": str(module_src), "tree": str(tree)},
        record="build-debug-kernel.json", reproduce="reproduce-debug-kernel.sh",
        log="debug-kernel.log")


def build_debug_kernel(cfg: Config, out_dir: Path, runner: Runner, *,
                       module_src: Path | None = None,
                       progress: Progress | None = None) -> DebugKernel:
    """Build (or reuse) the debug kernel and ``kvm_vmsocket.ko`` for it."""
    module_src = (module_src or cfg.root / "guest" / "kvm_vmsocket").resolve()
    tree = cfg.cache_dir / "debug-kernel" / "linux-6.1"
    tree.mkdir(parents=True, exist_ok=True)
    out_dir = Path(out_dir).resolve()
    call = build.Call("build_debug_kernel", (module_src, out_dir), {})
    spec = debug_kernel_spec(module_src, tree, build.CCACHE_VOLUME,
                             project_root=cfg.root, call=call)
    result = build.execute(spec, runner, out_dir, progress or TerminalProgress())
    folder = result.binary.parent
    return DebugKernel(bzimage=result.binary, module=folder / "kvm_vmsocket.ko",
                       release=(folder / "release").read_text().strip())


def debug_guest_image(cfg: Config, kernel: DebugKernel, test_program: Path) -> GuestImage:
    """The busybox initramfs with the module and the test program, booting
    the debug kernel."""
    empty = cfg.cache_dir / "debug-kernel" / "no-modules"
    empty.mkdir(parents=True, exist_ok=True)
    files = KernelFiles(name="6.1-debug", package=SOURCE_PACKAGE, version=kernel.release,
                        vmlinuz=kernel.bzimage, modules_dir=empty, deb=kernel.bzimage)
    return build_image(files, fetch_busybox(cfg.cache_dir), cfg.cache_dir,
                       vmsocket_module=kernel.module, test_program=test_program, modules=())


def checker_reports(console: str) -> list[str]:
    """The console lines where KASAN, lockdep, UBSAN, a WARN or an oops spoke."""
    return [line for line in console.splitlines() if CHECKER_LINE.search(line)]

