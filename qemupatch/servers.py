"""Host socket servers the guest talks to in the boot test and the benchmark.

All servers listen on UNIX sockets in a private (0700) temporary folder and
run on one asyncio loop in a background thread (``qemupatch.aioloop``).
``ServerSet`` is a context manager: leaving it stops the loop, closes every
socket and removes the folder.

Protocols (all integers 8-byte little-endian):

``echo``
    every byte received is sent back.  The server never waits for the peer
    to read (``writer.write`` without ``drain``): it buffers without bound,
    so a client that writes 3 MiB before reading cannot deadlock.
``sink``
    the client sends ``L`` then ``L`` bytes; the server answers ``count``
    (bytes it took) and ``fnv`` (FNV-1a-64 of those bytes).  FNV is per-byte
    work in Python (about 2 s per 3 MiB here), so it is computed only when
    ``L <= fnv_limit``; otherwise ``fnv`` is sent as 0, meaning "not
    computed".  The boot test runs the sink with ``fnv_limit=0`` (the sink
    only serves the benchmark).  Requests repeat until EOF.
``source``
    the client sends ``L``; the server sends ``L`` bytes of the pattern
    ``byte[i] = i % 251`` (counted from the start of each request).
    Requests repeat until EOF.
``refused``
    a socket bound but not listening: ``connect`` gets ``ECONNREFUSED``.
``hangup``
    accepts and closes at once: the guest sees end of file, then ``EPIPE``
    (the driver's poll() tests).

Each server records every connection (bytes in and out, requests, errors).
The echo server keeps its input (up to ``keep_limit`` bytes per connection)
so that ``snapshot(fnv=True)`` can give the FNV-1a-64 of what each client
sent, after the fact and off the hot path.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from qemupatch.aioloop import LoopThread
from qemupatch.errors import InfraError

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1
# Large reads and writes on the hot path (the benchmark's ceiling showed the
# servers near the channels' figures with 64 KiB): one read takes up to 1 MiB,
# the source writes ~1 MiB blocks and drains only above WRITE_HIGH.
CHUNK = 1 << 20
WRITE_HIGH = 4 << 20
KINDS = ("echo", "sink", "source", "refused", "hangup")


def fnv1a64(data: bytes, h: int = FNV_OFFSET) -> int:
    """FNV-1a 64-bit of ``data`` (continuing from ``h``).  Per-byte: slow."""
    p, m = FNV_PRIME, _MASK
    for b in data:
        h = ((h ^ b) * p) & m
    return h


def source_pattern(offset: int, size: int) -> bytes:
    """Bytes ``offset .. offset+size`` of the source pattern ``i % 251``."""
    period = bytes(range(251))
    start = offset % 251
    reps = (start + size) // 251 + 1
    return (period * reps)[start:start + size]


class ServerError(InfraError):
    pass


@dataclass
class _Conn:
    index: int
    bytes_in: int = 0
    bytes_out: int = 0
    requests: int = 0
    error: str | None = None
    closed: bool = False
    kept: bytearray | None = None
    sink_fnvs: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ConnRecord:
    """What one connection did, as seen by the server."""

    index: int
    bytes_in: int
    bytes_out: int
    requests: int
    fnv_in: int | None          # FNV-1a-64 of the input (echo, when asked and kept)
    error: str | None
    closed: bool

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in
             ("index", "bytes_in", "bytes_out", "requests", "error", "closed")}
        d["fnv_in"] = None if self.fnv_in is None else f"{self.fnv_in:016x}"
        return d


@dataclass(frozen=True)
class ServerStats:
    name: str
    kind: str
    path: Path
    connections: tuple[ConnRecord, ...]

    @property
    def bytes_in(self) -> int:
        return sum(c.bytes_in for c in self.connections)

    @property
    def bytes_out(self) -> int:
        return sum(c.bytes_out for c in self.connections)

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": str(self.path),
                "connection_count": len(self.connections),
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "connections": [c.to_json() for c in self.connections]}


class _Server:
    def __init__(self, name: str, kind: str, path: Path, *,
                 fnv_limit: int, keep_limit: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown server kind {kind!r}; known: {', '.join(KINDS)}")
        self.name, self.kind, self.path = name, kind, path
        self.fnv_limit, self.keep_limit = fnv_limit, keep_limit
        self.conns: list[_Conn] = []
        self.lock = threading.Lock()
        self.server: asyncio.AbstractServer | None = None
        self.refused_sock: socket.socket | None = None

    async def start(self) -> None:
        if self.kind == "refused":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(self.path))          # bound, never listening
            self.refused_sock = s
            return
        self.server = await asyncio.start_unix_server(self._handle, path=str(self.path),
                                                      limit=CHUNK)

    async def stop(self) -> None:
        if self.refused_sock is not None:
            self.refused_sock.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            conn = _Conn(index=len(self.conns))
            if self.kind == "echo":
                conn.kept = bytearray()
            self.conns.append(conn)
        try:
            await getattr(self, f"_{self.kind}")(conn, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            conn.error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.closed = True
            writer.close()

    async def _echo(self, conn: _Conn, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            conn.bytes_in += len(data)
            if conn.kept is not None:
                if len(conn.kept) + len(data) <= self.keep_limit:
                    conn.kept += data
                else:
                    conn.kept = None        # too much to keep: no FNV for this one
            writer.write(data)              # no drain: buffer without bound
            conn.bytes_out += len(data)
        # Peer half-closed or closed: flush what it has not read yet.
        await writer.drain()

    @staticmethod
    async def _request_length(conn: _Conn, reader: asyncio.StreamReader) -> int | None:
        """The 8-byte little-endian length that starts a sink or source
        request; None at a clean EOF between requests."""
        try:
            head = await reader.readexactly(8)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return None
        conn.bytes_in += 8
        return struct.unpack("<Q", head)[0]

    async def _sink(self, conn: _Conn, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        while (length := await self._request_length(conn, reader)) is not None:
            compute = 0 < length <= self.fnv_limit
            h, left, got = FNV_OFFSET, length, 0
            while left:
                data = await reader.read(min(left, CHUNK))
                if not data:
                    raise ConnectionError(f"EOF after {got} of {length} bytes")
                if compute:
                    h = fnv1a64(data, h)
                left -= len(data)
                got += len(data)
                conn.bytes_in += len(data)
            conn.requests += 1
            digest = h if compute else 0
            conn.sink_fnvs.append(digest)
            writer.write(struct.pack("<QQ", got, digest))
            conn.bytes_out += 16
            await writer.drain()

    async def _source(self, conn: _Conn, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        block = source_pattern(0, 251 * (CHUNK // 251))   # whole periods, ~1 MiB
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH)
        while (length := await self._request_length(conn, reader)) is not None:
            conn.requests += 1
            left = length
            while left:
                n = min(left, len(block))
                writer.write(block[:n] if n < len(block) else block)
                left -= n
                conn.bytes_out += n
                await writer.drain()

    async def _hangup(self, conn: _Conn, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Nothing: ``_handle`` closes the connection."""

    def stats(self, *, fnv: bool) -> ServerStats:
        with self.lock:
            conns = list(self.conns)
        records = []
        for c in conns:
            fnv_in = None
            if fnv and c.kept is not None and c.closed:
                fnv_in = fnv1a64(bytes(c.kept))
            records.append(ConnRecord(c.index, c.bytes_in, c.bytes_out, c.requests,
                                      fnv_in, c.error, c.closed))
        return ServerStats(self.name, self.kind, self.path, tuple(records))


class ServerSet:
    """Named servers on one private event loop thread.

    ``ServerSet({"echo": "echo", "vs-echo": "echo", "refused": "refused"})``
    gives ``paths["echo"]`` etc.  Use it as a context manager.
    """

    def __init__(self, servers: Mapping[str, str], *, fnv_limit: int = 4 << 20,
                 keep_limit: int = 16 << 20, start_timeout: float = 10) -> None:
        self._specs = dict(servers)
        self._fnv_limit = fnv_limit
        self._keep_limit = keep_limit
        self._start_timeout = start_timeout
        self.dir: Path | None = None
        self._loop: LoopThread | None = None
        self._servers: dict[str, _Server] = {}

    @property
    def paths(self) -> dict[str, Path]:
        return {name: s.path for name, s in self._servers.items()}

    def __enter__(self) -> ServerSet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if bad := sorted({k for k in self._specs.values() if k not in KINDS}):
            raise ValueError(f"unknown server kind(s) {bad}; known: {', '.join(KINDS)}")
        self.dir = Path(tempfile.mkdtemp(prefix="qemupatch-srv-"))
        try:
            self.dir.chmod(0o700)
            self._loop = LoopThread("qemupatch-servers")
            for name, kind in self._specs.items():
                self._servers[name] = _Server(name, kind, self.dir / f"{name}.sock",
                                              fnv_limit=self._fnv_limit,
                                              keep_limit=self._keep_limit)
            self._call(self._start_all(), self._start_timeout)
        except BaseException:
            self.close()
            raise

    async def _start_all(self) -> None:
        for s in self._servers.values():
            try:
                await s.start()
            except OSError as exc:
                raise ServerError(f"cannot start the {s.kind} server '{s.name}' "
                                  f"at {s.path}: {exc}") from exc

    async def _stop_all(self) -> None:
        for s in self._servers.values():
            await s.stop()

    def _call(self, coro, timeout: float):
        assert self._loop is not None
        try:
            return self._loop.call(coro, timeout)
        except TimeoutError:
            raise ServerError(f"host servers in {self.dir} did not answer "
                              f"within {timeout} s") from None
        except OSError as exc:
            raise ServerError(f"host servers in {self.dir}: {exc}") from exc

    def close(self) -> None:
        if self._loop is not None:
            try:
                self._call(self._stop_all(), 10)
            except ServerError:
                pass
            finally:
                self._loop.close()
                self._loop = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def stats(self, name: str, *, fnv: bool = False) -> ServerStats:
        """What server ``name`` saw so far.  ``fnv=True`` hashes the kept
        input of every closed echo connection (per-byte: call it once, after
        the guest is done)."""
        return self._servers[name].stats(fnv=fnv)

    def input_fnv(self, name: str, index: int, start: int, length: int) -> int | None:
        """FNV-1a-64 of bytes ``start .. start+length`` that connection
        ``index`` of echo server ``name`` received, or None if not kept."""
        srv = self._servers[name]
        with srv.lock:
            if index >= len(srv.conns):
                return None
            kept = srv.conns[index].kept
            if kept is None or len(kept) < start + length:
                return None
            data = bytes(kept[start:start + length])
        return fnv1a64(data)

    def all_stats(self, *, fnv_for: tuple[str, ...] = ()) -> dict[str, ServerStats]:
        return {n: s.stats(fnv=n in fnv_for) for n, s in self._servers.items()}


@contextmanager
def serving(servers: Mapping[str, str], **kwargs) -> Iterator[ServerSet]:
    with ServerSet(servers, **kwargs) as s:
        yield s
