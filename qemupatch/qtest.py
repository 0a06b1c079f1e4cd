"""The series' own qtest, run against the QEMU it was built with.

The series adds ``tests/qtest/vmsocket-test`` (QEMU's libqtest: it starts
``$QTEST_QEMU_BINARY`` itself, pokes the device's registers and checks
every answer).  The build copies that binary out beside
``qemu-system-x86_64`` (``QemuBuildOptions(extra_targets=(QTEST_TARGET,))``);
here it runs with ``--tap -k`` (every test, even after a failure) against
a wrapper that gives QEMU the firmware folders of this machine (the build
bundles no ROMs).  The TAP goes to ``qtest.tap``, all output to
``qtest.log``; the result counts ``ok`` and ``not ok`` lines.

A test that fails, a binary that does not run, or a run past its deadline
is a failed qtest (:class:`qemupatch.errors.Failed`, exit 1): qtest has
deadlines of its own, so a hang is the device's, not the machine's.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from qemupatch.errors import CommandTimeout, Failed, UserError
from qemupatch.records import atomic_write
from qemupatch.run import run

QTEST_TARGET = "tests/qtest/vmsocket-test"
# Debian's qemu-system-data and seabios: the ROMs a build without
# --enable-install-blobs lacks.
ROM_DIRS = ("/usr/share/qemu", "/usr/share/seabios")
TAP_NAME, LOG_NAME, WRAPPER_NAME = "qtest.tap", "qtest.log", "qemu-system-x86_64"
_OK = re.compile(r"^ok \d+")
_NOT_OK = re.compile(r"^not ok \d+")
_SKIP = re.compile(r"#\s*skip", re.I)


@dataclass(frozen=True)
class QtestResult:
    passed: int
    failed: int
    skipped: int
    tap: str                   # the TAP stream (stdout)
    seconds: float
    exit_code: int
    tap_path: Path
    log_path: Path

    @property
    def failures(self) -> tuple[str, ...]:
        """The ``not ok`` lines."""
        return tuple(line for line in self.tap.splitlines() if _NOT_OK.match(line))

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.failed == 0 and self.passed > 0


def count_tap(tap: str) -> tuple[int, int, int]:
    """(passed, failed, skipped) of a TAP stream; a skipped test is an
    ``ok ... # SKIP`` line and counts only as skipped."""
    passed = failed = skipped = 0
    for line in tap.splitlines():
        if _NOT_OK.match(line):
            failed += 1
        elif _OK.match(line):
            if _SKIP.search(line):
                skipped += 1
            else:
                passed += 1
    return passed, failed, skipped


def run_qtest(qtest: Path, qemu: Path, out_dir: Path, *, timeout: float = 1500,
              rom_dirs: tuple[str, ...] = ROM_DIRS,
              env: dict[str, str] | None = None) -> QtestResult:
    """Run ``qtest --tap -k`` against ``qemu`` (through a wrapper adding
    ``-L`` for each of ``rom_dirs``); writes qtest.tap and qtest.log in
    ``out_dir``; ``env`` is added to the environment (sanitizer options).
    Returns the result when every test passed; raises
    :class:`Failed` (with ``.result``) naming the failures otherwise."""
    qtest, qemu = Path(qtest).resolve(), Path(qemu).resolve()
    for path, what in ((qtest, "qtest binary"), (qemu, "QEMU binary")):
        if not path.is_file():
            raise UserError(f"{path}: no such {what} (was QEMU built with "
                            f"extra_targets=({QTEST_TARGET!r},)?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapper = out_dir / WRAPPER_NAME
    roms = " ".join(f"-L {shlex.quote(d)}" for d in rom_dirs)
    atomic_write(wrapper, f"#!/bin/sh\nexec {shlex.quote(str(qemu))} {roms} \"$@\"\n")
    wrapper.chmod(0o755)
    argv = [str(qtest), "--tap", "-k"]
    env = {**(env or {}), "QTEST_QEMU_BINARY": str(wrapper)}
    try:
        res = run(argv, timeout=timeout, cwd=out_dir, env=env, check=False)
        stdout, stderr, code, seconds = res.stdout, res.stderr, res.returncode, res.seconds
    except CommandTimeout as exc:
        stdout, stderr, code, seconds = exc.output, f"killed after {timeout:.0f} s\n", -9, timeout
    tap_path = atomic_write(out_dir / TAP_NAME, stdout)
    log_path = atomic_write(out_dir / LOG_NAME,
                            f"$ QTEST_QEMU_BINARY={wrapper} {' '.join(argv)}\n"
                            f"# exit code {code}, {seconds:.1f} s\n"
                            f"## stdout\n{stdout}\n## stderr\n{stderr}")
    passed, failed, skipped = count_tap(stdout)
    result = QtestResult(passed, failed, skipped, stdout, round(seconds, 2), code,
                         tap_path, log_path)
    if not result.ok:
        if code == -9:
            why = f"ran past its {timeout:.0f} s deadline"
        elif failed:
            why = f"{failed} of {passed + failed + skipped} tests failed"
        elif not passed:
            why = f"no test passed (exit code {code})"
        else:
            why = f"exit code {code}"
        err = Failed(f"qtest {qtest.name}: {why}\n" + "\n".join(result.failures[:20])
                     + f"\n{_tail(stderr)}\nTAP: {tap_path}; log: {log_path}")
        err.result = result   # type: ignore[attr-defined]
        raise err
    return result


def _tail(text: str, count: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-count:])
