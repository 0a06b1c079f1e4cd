"""Inputs of the real boot tests: the patched QEMU, the guest module and the
test program.

They are built for real, once per test session, by the same stages the
pipeline uses (the series applied on its base, compiled in a container), into
``<cache>/test-artifacts/<series digest>``.  QEMUPATCH_QEMU,
QEMUPATCH_VMSOCKET_KO and QEMUPATCH_VMSOCKET_TEST point at ready ones
instead (e.g. a maintainer's own build); QEMUPATCH_KERNEL_DEB avoids a
download.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from qemupatch.guest import GuestImage

REPO = Path(__file__).resolve().parents[1]


QTEST = "tests/qtest/vmsocket-test"


@functools.cache
def _built() -> tuple[Path, Path, Path, Path]:
    from qemupatch import build, config, workflow
    from qemupatch.runner import Runner
    from qemupatch.series import read_series

    cfg = config.load(REPO)
    digest = read_series(cfg.patches_dir).digest()[:12]
    out = cfg.cache_dir / "test-artifacts" / digest
    qemu = out / "qemu" / "qemu-system-x86_64"
    qtest = out / "qemu" / Path(QTEST).name
    kernel = cfg.default_kernel
    with Runner.get("auto", cfg.settings) as runner:
        if not (qemu.exists() and qtest.exists()):
            rel, wt, _ = workflow.build_source(cfg)
            qemu = build.build_qemu(
                wt.path, out / "qemu", release=rel.name, repacked=rel.provenance.repacked,
                runner=runner, project_root=cfg.root, patches=cfg.patches_dir,
                options=build.QemuBuildOptions(extra_targets=(QTEST,))).binary
        module = build.build_module(REPO / "guest" / "kvm_vmsocket", kernel,
                                    out / f"module-{kernel.name}", runner=runner,
                                    project_root=cfg.root, patches=cfg.patches_dir).binary
        prog = build.build_guest_program(REPO / "guest" / "vmsocket-test.c", out / "program",
                                         runner=runner, project_root=cfg.root).binary
    return qemu, module, prog, qtest


def real_inputs() -> tuple[Path, Path, Path]:
    """(qemu, kvm_vmsocket.ko, vmsocket-test), from the environment or built."""
    env = [os.environ.get(k) for k in
           ("QEMUPATCH_QEMU", "QEMUPATCH_VMSOCKET_KO", "QEMUPATCH_VMSOCKET_TEST")]
    if all(env):
        paths = tuple(Path(p) for p in env)
        missing = [str(p) for p in paths if not p.exists()]
        assert not missing, f"QEMUPATCH_* name files that do not exist: {missing}"
        return paths  # type: ignore[return-value]
    return _built()[:3]


def device_qtest() -> tuple[Path, Path]:
    """(patched qemu, the series' own qtest binary), both built from patches/."""
    qemu, _, _, qtest = _built()
    return qemu, qtest


def stock_qemu() -> Path:
    """Debian's own qemu-system-x86_64 (ci/setup-debian.sh installs it)."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "no qemu-system-x86_64 on PATH: run ci/setup-debian.sh"
    return Path(qemu)


def real_image(module: Path | None, prog: Path | None) -> GuestImage:
    from qemupatch import config, guest

    cfg = config.load(REPO)
    deb = os.environ.get("QEMUPATCH_KERNEL_DEB")
    return guest.make_guest_image(cfg, vmsocket_module=module, test_program=prog,
                                  kernel_deb=Path(deb) if deb else None)
