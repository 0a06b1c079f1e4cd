"""Inputs of the real boot tests: the patched QEMU, the guest module and
test program (paths from QEMUPATCH_QEMU, QEMUPATCH_VMSOCKET_KO,
QEMUPATCH_VMSOCKET_TEST; QEMUPATCH_KERNEL_DEB avoids a download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qemupatch.guest import GuestImage


def real_inputs():
    if not os.environ.get("QEMUPATCH_QEMU"):
        pytest.skip("set QEMUPATCH_QEMU to the patched qemu-system-x86_64")
    qemu = Path(os.environ["QEMUPATCH_QEMU"])
    module = Path(os.environ.get("QEMUPATCH_VMSOCKET_KO",
                                 Path(__file__).parents[1] / "guest/kvm_vmsocket/kvm_vmsocket.ko"))
    prog = Path(os.environ.get("QEMUPATCH_VMSOCKET_TEST",
                               Path(__file__).parents[1] / "guest/vmsocket-test"))
    missing = [str(p) for p in (qemu, module, prog) if not p.exists()]
    if missing:
        pytest.skip(f"real boot needs {', '.join(missing)}")
    return qemu, module, prog


def real_image(module: Path | None, prog: Path | None) -> GuestImage:
    from qemupatch import config, guest

    cfg = config.load(Path(__file__).parents[1])
    deb = os.environ.get("QEMUPATCH_KERNEL_DEB")
    return guest.make_guest_image(cfg, vmsocket_module=module, test_program=prog,
                                  kernel_deb=Path(deb) if deb else None)
