"""Build benchmark: prints figures, asserts nothing about time.

    pytest -m benchmark -s tests/test_bench_build.py

Builds QEMU with the shipped series (patches/ applied on its base by the
pipeline's own stage; QEMUPATCH_QEMU_SRC names another tree) from a
private copy of the tree, in a container with a fresh ccache volume:

    cold            fresh build dir, empty ccache
    warm, no change the same build again (nothing to do)
    one-line change a real code line added to one device file
    fresh dir, warm fresh build dir, ccache filled by the builds above
    host cold       the same cold build on the host (empty ccache): the
                    container overhead is cold / host cold

QEMUPATCH_BENCH_CCACHE picks the ccache mode (build.CCACHE_MODES: depend,
the default, direct or off) to compare them.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from qemupatch import config
from qemupatch.build import QemuBuildOptions, build_qemu
from qemupatch.engine import Engine
from qemupatch.progress import NullProgress
from qemupatch.run import run
from qemupatch.runner import ContainerRunner, HostRunner

REPO = Path(__file__).resolve().parents[1]

DEVICE_FILES = ("hw/misc/vmsocket.c", "hw/misc/edu.c", "hw/char/serial.c")


@pytest.mark.benchmark
@pytest.mark.timeout(7200)
def test_bench_build(tmp_path: Path) -> None:
    if os.environ.get("QEMUPATCH_QEMU_SRC"):
        src0 = Path(os.environ["QEMUPATCH_QEMU_SRC"])
    else:
        from qemupatch import workflow
        src0 = workflow.build_source(config.load(REPO))[1].path
    assert (src0 / "configure").is_file(), f"no QEMU tree at {src0}"
    src = tmp_path / "src"
    run(["cp", "-a", f"{src0}/.", str(src)], timeout=600)
    shutil.rmtree(src / ".git", ignore_errors=True)
    device = next(src / f for f in DEVICE_FILES if (src / f).is_file())
    volume = f"qemupatch-ccache-bench-{os.getpid()}"
    rows: list[tuple[str, float, str]] = []

    def row(name: str, seconds: float, result) -> None:
        rate = result.ccache.hit_rate if result.ccache else None
        hits = (f"{rate:.0%} ({result.ccache.hits} hits, {result.ccache.misses} misses)"
                if rate is not None else "n/a (nothing compiled)")
        rows.append((name, seconds, hits))
        print(f"\n{name}: {seconds:.0f} s, ccache {hits}", flush=True)

    settings = config.load(REPO).settings
    mode = os.environ.get("QEMUPATCH_BENCH_CCACHE", "depend")

    def options(build_dir: str) -> QemuBuildOptions:
        return QemuBuildOptions(jobs=2, timeout=3600, build_dir=tmp_path / build_dir,
                                ccache=mode, ccache_volume=volume,
                                ccache_dir=tmp_path / "ccache-host")

    with Engine.get("auto", settings=settings) as engine:
        common = dict(release="bench", repacked=True, runner=ContainerRunner(engine),
                      project_root=REPO, progress=NullProgress())
        try:
            out = tmp_path / "out"
            start = time.monotonic()
            result = build_qemu(src, out, options=options("b1"), **common)
            row("container cold", time.monotonic() - start, result)
            if result.image_built:
                print(f"(image built first: {result.image_seconds:.0f} s, not counted)")
                rows[-1] = (rows[-1][0], rows[-1][1] - result.image_seconds, rows[-1][2])

            start = time.monotonic()
            result = build_qemu(src, out, options=options("b1"), **common)
            row("container warm, no change", time.monotonic() - start, result)

            with open(device, "a") as f:
                f.write("\nint qemupatch_bench_marker(void);\n"
                        "int qemupatch_bench_marker(void) { return 1; }\n")
            start = time.monotonic()
            result = build_qemu(src, out, options=options("b1"), **common)
            row(f"container one-line change ({device.relative_to(src)})",
                time.monotonic() - start, result)

            start = time.monotonic()
            result = build_qemu(src, tmp_path / "out2", options=options("b2"), **common)
            row("container fresh build dir, warm ccache", time.monotonic() - start, result)
        finally:
            engine.remove_volume(volume)

    start = time.monotonic()
    result = build_qemu(src, tmp_path / "out-host", release="bench", repacked=True,
                        runner=HostRunner(settings), project_root=REPO,
                        options=options("b-host"), progress=NullProgress())
    row("host cold", time.monotonic() - start, result)

    print(f"\n\nbuild benchmark (QEMU {result.version}, x86_64-softmmu, -j2, "
          f"ccache mode {mode})")
    for name, seconds, hits in rows:
        print(f"  {name:55s} {seconds:7.0f} s   ccache {hits}")
    cold = rows[0][1]
    host = rows[-1][1]
    print(f"  container overhead (cold / host cold): {cold / host:.2f}x")
