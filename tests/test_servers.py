"""The host servers, over real UNIX sockets."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import pytest

from qemupatch.servers import ServerError, ServerSet, fnv1a64, source_pattern

ALL = {"echo": "echo", "sink": "sink", "source": "source", "refused": "refused"}


@pytest.fixture
def servers():
    with ServerSet(ALL, fnv_limit=1 << 20) as s:
        yield s


def connect(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(path))
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def wait_closed(servers: ServerSet, name: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = servers.stats(name)
        if len(st.connections) >= count and all(c.closed for c in st.connections):
            return
        time.sleep(0.02)
    raise AssertionError(f"{name}: connections not closed: {servers.stats(name)}")


def test_fnv1a64_reference_vectors():
    # Published FNV-1a 64 test vectors.
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8
    assert fnv1a64(b"bar", fnv1a64(b"foo")) == fnv1a64(b"foobar")


def test_private_dir_and_cleanup():
    with ServerSet(ALL) as s:
        folder = s.dir
        assert folder is not None and oct(folder.stat().st_mode & 0o777) == "0o700"
        assert all(p.exists() for p in s.paths.values())
    assert not folder.exists()


def test_echo_3mib_written_before_any_read_does_not_deadlock(servers):
    data = os.urandom(3 << 20)
    with connect(servers.paths["echo"]) as s:
        s.sendall(data)                 # nothing read yet: the server must buffer
        assert recv_exactly(s, len(data)) == data
    wait_closed(servers, "echo", 1)
    st = servers.stats("echo", fnv=True)
    (conn,) = st.connections
    assert conn.bytes_in == conn.bytes_out == len(data)
    assert conn.fnv_in == fnv1a64(data)
    assert conn.error is None


def test_echo_counts_each_connection(servers):
    for i in range(3):
        with connect(servers.paths["echo"]) as s:
            s.sendall(b"x" * (i + 1))
            assert recv_exactly(s, i + 1) == b"x" * (i + 1)
    wait_closed(servers, "echo", 3)
    st = servers.stats("echo", fnv=True)
    assert [c.bytes_in for c in st.connections] == [1, 2, 3]
    assert st.connections[2].fnv_in == fnv1a64(b"xxx")


def test_sink_replies_count_and_fnv_per_request(servers):
    payloads = [b"hello", os.urandom(200_000), b""]
    with connect(servers.paths["sink"]) as s:
        for p in payloads:
            s.sendall(struct.pack("<Q", len(p)) + p)
            count, digest = struct.unpack("<QQ", recv_exactly(s, 16))
            assert count == len(p)
            assert digest == (fnv1a64(p) if p else 0)
    wait_closed(servers, "sink", 1)
    (conn,) = servers.stats("sink").connections
    assert conn.requests == 3
    assert conn.bytes_in == sum(8 + len(p) for p in payloads)


def test_sink_above_fnv_limit_sends_zero(servers):
    big = os.urandom((1 << 20) + 1)
    with connect(servers.paths["sink"]) as s:
        s.sendall(struct.pack("<Q", len(big)) + big)
        assert struct.unpack("<QQ", recv_exactly(s, 16)) == (len(big), 0)


def test_sink_reports_truncated_request(servers):
    with connect(servers.paths["sink"]) as s:
        s.sendall(struct.pack("<Q", 100) + b"only ten b")
    wait_closed(servers, "sink", 1)
    (conn,) = servers.stats("sink").connections
    assert conn.error and "10 of 100" in conn.error


def test_source_sends_exact_pattern(servers):
    with connect(servers.paths["source"]) as s:
        for n in (1, 251, 70_000, 5 << 20):
            s.sendall(struct.pack("<Q", n))
            assert recv_exactly(s, n) == source_pattern(0, n)
    wait_closed(servers, "source", 1)
    (conn,) = servers.stats("source").connections
    assert conn.requests == 4 and conn.bytes_out == 1 + 251 + 70_000 + (5 << 20)


def test_source_pattern_offsets():
    whole = source_pattern(0, 1000)
    assert source_pattern(300, 200) == whole[300:500]
    assert whole[250:253] == bytes([250, 0, 1])


def test_refused_path_refuses(servers):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s, pytest.raises(OSError) as info:
        s.connect(str(servers.paths["refused"]))
    assert info.value.errno == errno.ECONNREFUSED


def test_unknown_kind_is_rejected_and_nothing_is_left(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)     # re-read TMPDIR
    with pytest.raises(ValueError, match="unknown server kind"):
        ServerSet({"x": "bogus"}).start()
    assert list(tmp_path.iterdir()) == []


def test_start_failure_cleans_up(tmp_path, monkeypatch):
    """A server that cannot bind (path taken by a folder) leaves no folder."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    s = ServerSet({"echo": "echo", "refused": "refused"})
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(**kw):
        d = real_mkdtemp(**kw)
        os.mkdir(os.path.join(d, "refused.sock"))          # bind() will fail
        return d

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(ServerError, match="refused.sock"):
        s.start()
    assert list(tmp_path.iterdir()) == []


def test_throughput_has_no_per_byte_work(servers):
    """64 MiB through sink (FNV off above the limit) and source well above
    the ~12 MB/s a per-byte Python loop allows."""
    total = 64 << 20
    block = os.urandom(1 << 20)
    start = time.monotonic()
    with connect(servers.paths["sink"]) as s:
        s.sendall(struct.pack("<Q", total))
        for _ in range(total // len(block)):
            s.sendall(block)
        assert struct.unpack("<QQ", recv_exactly(s, 16))[0] == total
    with connect(servers.paths["source"]) as s:
        s.sendall(struct.pack("<Q", total))
        recv_exactly(s, total)
    seconds = time.monotonic() - start
    assert 2 * total / seconds > 40e6, f"{2 * total / seconds / 1e6:.1f} MB/s"
