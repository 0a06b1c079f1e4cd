"""The fuzzer's own parts, fast: report detection, the hostile server's
modes, and the operation stream's dependence on the seed alone (against a
small qtest peer that answers like QEMU's qtest server)."""

import random
import socket

from qemupatch import fuzz


def test_sanitizer_and_assertion_reports_are_found_with_context():
    log = "\n".join([
        "qemu-system-x86_64: warning: ASan doesn't fully support makecontext/swapcontext",
        "==123==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x6020",
        "    #0 0x55 in vmsocket_mmio_write ../hw/misc/vmsocket.c:321",
        "../hw/misc/vmsocket.c:200:9: runtime error: shift exponent 40 is too large",
        "qemu-system-x86_64: ../hw/misc/vmsocket.c:99: vmsocket_reset: Assertion `s' failed.",
    ])
    reports = fuzz.sanitizer_reports(log)
    assert len(reports) == 3
    assert "vmsocket_mmio_write" in reports[0]
    assert "shift exponent" in reports[1]
    assert fuzz.sanitizer_reports("qemu-system-x86_64: warning: ASan doesn't fully support") == []


def _connect(path):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(path))
    c.settimeout(0.3)
    return c


def test_hostile_server_modes_depend_on_the_seed_and_misbehave(tmp_path):
    seen = {}
    for seed in (1, 1, 2):
        with fuzz.HostileServer(tmp_path / "s.sock", seed) as server:
            conns = [_connect(tmp_path / "s.sock") for _ in range(12)]
            for c in conns:
                try:
                    c.sendall(b"ping")
                    c.recv(4)
                except OSError:
                    pass
            for c in conns:
                c.close()
        seen.setdefault(seed, []).append(dict(server.modes))
    assert seen[1][0] == seen[1][1], "the same seed must give the same modes"
    assert sum(seen[1][0].values()) == 12
    assert len(seen[1][0]) >= 3, seen


class _FakeQtest(fuzz.Qtest):
    """Answers like QEMU's qtest server: OK, with a value for reads, the
    vmsocket identity in config space."""

    def __init__(self):
        self.lines = []
        self.cf8 = 0

    def cmd(self, line):
        self.lines.append(line)
        op, *args = line.split()
        if op == "outl" and int(args[0], 16) == 0xCF8:
            self.cf8 = int(args[1], 16)
        if op.startswith("in") or op.startswith("read"):
            if op == "inl" and self.cf8 & 0xFC == 0:
                return f"OK {fuzz.VENDOR_DEVICE:#x}"
            return "OK 0x0"
        return "OK"


def _stream(seed, n=400):
    dev = fuzz._Device(_FakeQtest())
    dev.map()
    rng = random.Random(seed)
    kinds, weights = zip(*((k, w) for k, w, _ in fuzz.OPERATIONS))
    funcs = {k: f for k, _, f in fuzz.OPERATIONS}
    texts = [funcs[k](dev, rng) for k in (rng.choices(kinds, weights)[0] for _ in range(n))]
    return texts, dev.qt.lines


def test_operation_stream_depends_on_the_seed_alone_and_covers_the_attack_surface():
    a, lines_a = _stream(5)
    b, lines_b = _stream(5)
    c, _ = _stream(6)
    assert a == b and lines_a == lines_b
    assert a != c
    text = "\n".join(a)
    for width in (1, 2, 4, 8):
        assert f"write{width} BAR0" in text
    assert any(int(t.split("+")[1].split()[0], 16) % 4 for t in a if t.startswith("write"))
    assert "BAR1" in text and "BAR2" in text and "config " in text
    assert any(line.startswith("writeq") for line in lines_a)


def test_a_silent_qemu_is_a_hang_not_a_wait_forever(tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "q.sock"))
    listener.listen(1)
    peer = _connect(tmp_path / "q.sock")          # connects, never answers
    qt = fuzz.Qtest(listener, hang_seconds=0.3)
    try:
        try:
            qt.cmd("readl 0xe2000000")
        except fuzz.FuzzHang as exc:
            assert "readl 0xe2000000" in str(exc) and "0.3 s" in str(exc)
        else:
            raise AssertionError("no FuzzHang")
    finally:
        qt.close()
        peer.close()
        listener.close()


def test_sanitizers_are_spelled_as_the_release_configure_wants(tmp_path):
    from qemupatch.build import QemuBuildOptions

    (tmp_path / "meson_options.txt").write_text("option('sanitizers', type: 'boolean')\n")
    assert fuzz.sanitizer_args(tmp_path) == ("--enable-sanitizers",)
    (tmp_path / "meson_options.txt").write_text("option('asan', type: 'boolean')\n"
                                                "option('ubsan', type: 'boolean')\n")
    opts = fuzz.sanitizer_options(QemuBuildOptions(), tmp_path)
    assert opts.configure_args[-2:] == ("--enable-asan", "--enable-ubsan")
