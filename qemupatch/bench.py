"""The benchmark's host side: the ceiling of the host servers.

The guest measures vmsocket and virtio-serial against the host servers
(``qemupatch.servers``).  Those servers are Python: had they been the
bottleneck, both channels would show the servers' speed, not their own.
The ceiling says how fast the servers go with no QEMU in between: the
same client program the guest runs (``vmsocket-test bench``, taken out of
the guest's initramfs so that it is byte for byte the same), on the host,
over AF_UNIX, with the same patterns and repetitions, against server
instances of the same code.  Its rows are channel ``host-unix``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Mapping
from pathlib import Path

from qemupatch.console import BenchRow, parse_console
from qemupatch.errors import InfraError
from qemupatch.run import run

CEILING_CHANNEL = "host-unix"
PROGRAM = "bin/vmsocket-test"
_NEWC = b"070701"


def initramfs_file(initramfs: Path, name: str) -> bytes | None:
    """The bytes of ``name`` in a gzip'ed newc cpio archive, or None."""
    data = gzip.decompress(initramfs.read_bytes())
    pos = 0
    while pos + 110 <= len(data) and data[pos:pos + 6] == _NEWC:
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        start = pos + 110
        entry = data[start:start + namesize - 1].decode("utf-8", "replace")
        body = (start + namesize + 3) & ~3
        if entry == "TRAILER!!!":
            break
        if entry.strip("/") == name.strip("/"):
            return data[body:body + size]
        pos = (body + size + 3) & ~3
    return None


def run_ceiling(initramfs: Path, paths: Mapping[str, Path], workdir: Path, *, reps: int,
                timeout: float) -> tuple[BenchRow, ...]:
    """The guest's bench program run on the host against the servers at
    ``paths["echo"|"sink"|"source"]``: ``host-unix`` rows (a failure is a
    row with its error, as for a guest channel)."""
    try:
        data = initramfs_file(initramfs, PROGRAM)
    except (OSError, EOFError, ValueError) as exc:     # gzip.BadGzipFile is an OSError
        return (BenchRow(CEILING_CHANNEL, "open", error=f"{initramfs}: {exc}"),)
    if data is None:
        return (BenchRow(CEILING_CHANNEL, "open", error=f"no {PROGRAM} in {initramfs}"),)
    prog = workdir / "vmsocket-test.host"
    prog.write_bytes(data)
    os.chmod(prog, 0o700)
    argv = [prog, "bench", str(reps), CEILING_CHANNEL,
            *(f"unix:{paths[k]}" for k in ("echo", "sink", "source"))]
    try:
        done = run(argv, timeout=timeout, check=False)
    except InfraError as exc:
        return (BenchRow(CEILING_CHANNEL, "run", error=str(exc).splitlines()[0]),)
    rows = parse_console(done.stdout).bench
    if not rows or (done.returncode != 0 and not any(r.error for r in rows)):
        rows += (BenchRow(CEILING_CHANNEL, "run",
                          error=f"exit {done.returncode}: {done.output.strip()[-200:]}"),)
    return rows
