"""Pipeline benchmark: the main job cold and warm, each beside a baseline
measured in the same run.  Prints figures; asserts nothing about time.

    pytest -m benchmark -s tests/test_bench_pipeline.py

A copy of the project (same series, same build images, and a private
cache seeded with the shared cache's downloads, so that its work trees and
branches are its own) runs the real pipeline:

    cold   a fresh out dir (fresh build dir) and an empty ccache volume; the
           build images exist (they are made once per machine: their build
           time is printed apart, from build.json)
    warm   the same out dir after a one-line change to the device, made the
           way a maintainer makes it (apply, edit, fixup, export)

Baselines, the strongest setup a performance-minded user would pick to
build and boot the same series by hand, timed on the same tree:

    cold   configure + ``ninja -j2`` on the host with no ccache (a cache only
           costs on a first build), then one plain boot of the same guest
           image with the same servers (``qemu-system-x86_64`` run to its
           exit: no QMP, no console follower)
    warm   ``ninja -j2`` in that build dir after the same one-line change,
           then the same plain boot

The plain boot is also the ceiling of the boot-test stage: the time the
guest itself needs, beside what the boot test adds.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from qemupatch import boottest, build, config, guest, workflow
from qemupatch.pipeline import run_pipeline, summary
from qemupatch.pvh import direct_kernel
from qemupatch.run import git, run
from qemupatch.servers import ServerSet
from tests.conftest import REPO_ROOT

DEVICE = "hw/misc/vmsocket.c"
DEVICE_SUBJECT = "hw/misc: add the vmsocket PCI device"


def _project_copy(dest: Path, cache: Path) -> config.Config:
    for name in ("qemupatch.toml", "Dockerfile"):
        shutil.copy(REPO_ROOT / name, dest / name)
    for name in ("patches", "guest", "ci"):
        shutil.copytree(REPO_ROOT / name, dest / name,
                        ignore=shutil.ignore_patterns("*.o", "*.ko", ".*.cmd", "vmsocket-test"))
    shared = config.load(REPO_ROOT).cache_dir
    for name in ("downloads", "kernels", "busybox"):     # no second download
        if (shared / name).is_dir():
            shutil.copytree(shared / name, cache / name, symlinks=True)
    return config.load(dest, cache)


MARKER = "\nint qemupatch_bench_marker(void);\nint qemupatch_bench_marker(void) { return 1; }\n"


def _change_device(cfg: config.Config, worktree: Path) -> None:
    """A one-line code change to the device, as a maintainer makes it:
    apply, edit, commit as a fixup of the device patch, export."""
    done = workflow.apply(cfg, worktree=worktree)
    wt = done.worktree
    with open(wt / DEVICE, "a") as f:
        f.write(MARKER)
    target = git(wt, "log", "--format=%H", f"--grep=^{DEVICE_SUBJECT}$",
                 f"{done.release.commit}..HEAD").stdout.split()[0]
    git(wt, "commit", "-q", "-a", f"--fixup={target}")
    git(wt, "rebase", "-q", "-i", "--autosquash", done.release.commit,
        env={"GIT_SEQUENCE_EDITOR": "true", "GIT_EDITOR": "true"})
    workflow.export(cfg, worktree=worktree)


def _plain_boot(qemu: Path, image: guest.GuestImage, out: Path) -> float:
    """One boot of the guest as a user would run it: the same servers and
    guest tests, QEMU run to its exit with nothing watching it."""
    out.mkdir(parents=True, exist_ok=True)
    specs = {n: n for n in boottest.VMSOCKET_SERVERS}
    specs.update({f"vs-{k}": k for k in guest.VPORT_NAMES})
    kernel = direct_kernel(image.kernel)
    with ServerSet(specs, fnv_limit=0) as servers:
        argv = boottest.qemu_argv(qemu, image, accel="tcg", console=out / "console.log",
                                  paths=servers.paths, vmsocket=True, spelling="option",
                                  append=f"{boottest.KERNEL_ARGS} qemupatch.tests=1 "
                                         "qemupatch.bench=0 qemupatch.timeout=180",
                                  kernel=kernel)
        argv.remove("-S")
        start = time.monotonic()
        run(argv, timeout=600)
        seconds = time.monotonic() - start
    text = (out / "console.log").read_text(errors="replace")
    assert "QEMUPATCH-GUEST-DONE rc=0" in text, text[-2000:]
    return seconds


def _stages(result) -> str:
    return ", ".join(f"{s.name} {s.seconds:.1f}" for s in result.stages)


@pytest.mark.benchmark
@pytest.mark.real
@pytest.mark.timeout(7200)
def test_bench_pipeline_cold_and_warm(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    cfg = _project_copy(root, tmp_path / "cache")
    workflow.build_source(cfg)      # the release import is not part of a build
    volume = f"qemupatch-ccache-bench-{os.getpid()}"
    options = build.QemuBuildOptions(ccache_volume=volume,
                                     ccache_dir=tmp_path / "ccache-host")
    out = tmp_path / "pipeline"
    say: list[str] = []
    rows: list[tuple[str, float, str]] = []
    try:
        start = time.monotonic()
        cold = run_pipeline(cfg, out, qemu_options=options, say=say.append)
        rows.append(("pipeline cold (empty ccache, fresh build dir)",
                     time.monotonic() - start, _stages(cold)))
        print("\n" + summary(cold), flush=True)
        qemu_stage = next(s for s in cold.stages if s.name == "build-qemu")
        image_s = qemu_stage.figures.get("image_s", 0.0)

        _change_device(cfg, tmp_path / "maintainer-tree")
        start = time.monotonic()
        warm = run_pipeline(cfg, out, qemu_options=options, say=say.append)
        rows.append(("pipeline warm, one-line device change",
                     time.monotonic() - start, _stages(warm)))
        print("\n" + summary(warm), flush=True)
    finally:
        from qemupatch.engine import Engine
        with Engine.get("auto", settings=cfg.settings) as engine:
            engine.remove_volume(volume)

    # Baselines on the same patched tree (the pipeline's own build tree,
    # which now holds the one-line change): copy it back to the series
    # without the change for the cold build, then add the line.
    src = tmp_path / "host-src"
    shutil.copytree(cfg.cache_dir / "pipeline" / cold.release / "src", src,
                    ignore=shutil.ignore_patterns(".git"), symlinks=True)
    device = src / DEVICE
    device.write_text(device.read_text().replace(MARKER, ""))
    for name in build.edk2_standins(src):
        run(["sh", "-c", f"bzip2 -c </dev/null > {src / 'pc-bios' / name}"], timeout=30)
    bdir = tmp_path / "host-build"
    bdir.mkdir()
    image = guest.make_guest_image(cfg, vmsocket_module=out / "work" / "module" /
                                   "kvm_vmsocket.ko",
                                   test_program=out / "work" / "guest-program" / "vmsocket-test")
    start = time.monotonic()
    # configure runs python3 from PATH and needs meson: this venv's.
    venv_path = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run([src / "configure", *build.CONFIGURE_ARGS], cwd=bdir, timeout=1800, env=venv_path)
    configure_s = time.monotonic() - start
    run(["ninja", "-j2", build.QEMU_BINARY], cwd=bdir, timeout=3600)
    host_cold = time.monotonic() - start
    boot_cold = _plain_boot(bdir / build.QEMU_BINARY, image, tmp_path / "boot-cold")
    rows.append(("baseline cold: host configure + ninja, no ccache; plain boot",
                 host_cold + boot_cold,
                 f"configure {configure_s:.1f}, ninja {host_cold - configure_s:.1f}, "
                 f"boot {boot_cold:.1f}"))

    with open(device, "a") as f:
        f.write(MARKER)
    start = time.monotonic()
    run(["ninja", "-j2", build.QEMU_BINARY], cwd=bdir, timeout=1800)
    host_warm = time.monotonic() - start
    boot_warm = _plain_boot(bdir / build.QEMU_BINARY, image, tmp_path / "boot-warm")
    rows.append(("baseline warm: ninja after the same change; plain boot",
                 host_warm + boot_warm, f"ninja {host_warm:.1f}, boot {boot_warm:.1f}"))

    print("\n\npipeline benchmark (QEMU %s, guest %s, TCG, -j2)" % (cold.release, cold.kernel))
    for name, seconds, detail in rows:
        print(f"  {name:62s} {seconds:7.1f} s   ({detail})")
    print(f"  cold: pipeline / baseline = {rows[0][1] / rows[2][1]:.2f}x"
          f"   (target: pipeline <= 300 s; image build once per machine: {image_s:.1f} s)")
    print(f"  warm: pipeline / baseline = {rows[1][1] / rows[3][1]:.2f}x"
          f"   (target: pipeline <= 30 s)")
    print(f"  boot ceiling: the guest itself needs {boot_warm:.1f} s (plain boot); the "
          f"boot-test stage took "
          f"{next(s.seconds for s in warm.stages if s.name == 'boot-test'):.1f} s")
    assert cold.ok and warm.ok
