"""The device under ASan and UBSan: the series' qtest and the seeded fuzzer
run against a sanitized build of the patched QEMU (the default release),
and a crash or a hang is a finding that names its seed."""

import functools
import subprocess
from pathlib import Path

import pytest

from qemupatch import config, fuzz
from qemupatch.runner import Runner

pytestmark = pytest.mark.real
REPO = Path(__file__).resolve().parents[1]


@functools.cache
def sanitized():
    cfg = config.load(REPO)
    with Runner.get("auto", cfg.settings) as runner:
        return fuzz.build_sanitized_qemu(cfg, runner=runner)


def _wrapper(tmp_path: Path, body: str) -> Path:
    """A stand-in for qemu-system-x86_64 that runs the sanitized one."""
    path = tmp_path / "qemu-system-x86_64"
    path.write_text(f"#!/bin/sh\n{body}\n".replace("QEMU", str(sanitized().binary)))
    path.chmod(0o755)
    return path


@pytest.mark.timeout(3600)
def test_series_qtest_passes_under_asan_and_ubsan(tmp_path):
    build = sanitized()
    assert "--enable-asan" in build.out_dir.joinpath("build.json").read_text()
    wrapper = _wrapper(tmp_path, f'exec QEMU {" ".join(fuzz.ROM_ARGS)} "$@"')
    res = subprocess.run([str(build.out_dir / "vmsocket-test"), "--tap", "-k"],
                         capture_output=True, text=True, timeout=1200,
                         env={"PATH": "/usr/bin:/bin", "QTEST_QEMU_BINARY": str(wrapper),
                              **fuzz.SANITIZER_ENV})
    print(res.stdout[-3000:], res.stderr[-3000:])
    assert res.returncode == 0
    assert fuzz.sanitizer_reports(res.stdout + res.stderr) == []
    oks = [line for line in res.stdout.splitlines() if line.startswith("ok ")]
    assert len(oks) >= 9 and "not ok" not in res.stdout


@pytest.mark.timeout(1800)
def test_seeded_fuzz_finds_nothing_under_asan_and_ubsan(tmp_path):
    results = fuzz.run_seeds(sanitized().binary, tmp_path, first_seed=1, seeds=2,
                             operations=3000)
    for r in results:
        print(f"seed {r.seed}: {r.operations} ops in {r.seconds:.1f} s "
              f"= {r.ops_per_second:.0f}/s; {r.op_counts}; server {r.server_modes}")
        assert r.findings == (), r.reproduce(sanitized().binary)
        assert r.operations == 3000
        assert r.op_counts.get("reset", 0) > 0 and r.op_counts.get("unplug", 0) > 0
        # stream mode (ABI v2) is fuzzed too, not only the v1 registers
        assert all(r.op_counts.get(k, 0) > 0 for k in ("mode", "doorbell", "ring", "stream"))
        assert len(r.server_modes) >= 3, "the host server must misbehave in several ways"
        assert (r.out_dir / "fuzz.json").exists() and (r.out_dir / "ops.log").exists()
        assert not list(r.out_dir.glob("*.sock")), "sockets left behind (a run folder is copied)"


@pytest.mark.parametrize("signal, expect", [("SEGV", "exited"), ("STOP", "no answer")])
def test_a_crash_or_a_hang_is_a_finding_with_its_seed(tmp_path, signal, expect):
    qemu = _wrapper(tmp_path, f'QEMU "$@" & pid=$!\nsleep 2\nkill -{signal} $pid\nwait $pid')
    r = fuzz.run_fuzz(qemu, tmp_path / "run", seed=42, seconds=60, hang_seconds=3)
    print(r.findings)
    assert not r.ok
    assert any(expect in f or "closed" in f for f in r.findings), r.findings
    assert "--seed 42" in r.reproduce(qemu)


@pytest.mark.fuzz
@pytest.mark.timeout(7200)
def test_long_fuzz(tmp_path):
    """For maintainers: pytest -m fuzz -s (10 seeds × 2 minutes)."""
    results = fuzz.run_seeds(sanitized().binary, tmp_path, seeds=10, seconds=120)
    for r in results:
        print(f"seed {r.seed}: {r.operations} ops, {r.ops_per_second:.0f}/s, "
              f"findings: {len(r.findings)}")
    assert all(r.ok for r in results), [f for r in results for f in r.findings]
