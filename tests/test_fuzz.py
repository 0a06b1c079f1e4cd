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
    # stream mode: MODE, doorbells, the control page, ring traffic
    for op in ("mode 0x1", "doorbell", "BAR3+", "stream send", "stream recv"):
        assert op in text, op


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


class _MemQtest(_FakeQtest):
    """A fake whose BARs remember what was written (little-endian bytes)."""

    def __init__(self):
        super().__init__()
        self.mem = {}

    def cmd(self, line):
        op, *args = line.split()
        if op in ("writeb", "writew", "writel", "writeq"):
            n = {"b": 1, "w": 2, "l": 4, "q": 8}[op[-1]]
            addr, val = int(args[0], 16), int(args[1], 16)
            for i in range(n):
                self.mem[addr + i] = val >> 8 * i & 0xFF
        elif op == "write":
            addr, data = int(args[0], 16), bytes.fromhex(args[2][2:])
            for i, b in enumerate(data):
                self.mem[addr + i] = b
        elif op in ("readb", "readw", "readl", "readq") and int(args[0], 16) >= fuzz.BAR3:
            n = {"b": 1, "w": 2, "l": 4, "q": 8}[op[-1]]
            addr = int(args[0], 16)
            self.lines.append(line)
            return f"OK {sum(self.mem.get(addr + i, 0) << 8 * i for i in range(n)):#x}"
        return super().cmd(line)


def _ring(qt, field):
    return sum(qt.mem.get(fuzz.BAR3 + field + i, 0) << 8 * i for i in range(4))


def test_stream_steps_stay_in_the_rings_and_move_the_indices_by_what_they_moved():
    qt = _MemQtest()
    dev = fuzz._Device(qt)
    dev.map()
    assert "outl 0xcfc 0xe2010000" in qt.lines            # BAR3 is mapped
    rng = random.Random(3)
    # a device with a full input ring across the end, and 4090 bytes sent
    qt.cmd(f"writel {fuzz.BAR3 + fuzz.RX_CONS:#x} {4000:#x}")
    qt.cmd(f"writel {fuzz.BAR3 + fuzz.RX_PROD:#x} {4000 + fuzz.BUFSIZE:#x}")
    qt.cmd(f"writel {fuzz.BAR3 + fuzz.TX_CONS:#x} {4090:#x}")
    qt.cmd(f"writel {fuzz.BAR3 + fuzz.TX_PROD:#x} {4090:#x}")
    sent = received = 0
    for _ in range(60):
        before = len(qt.lines)
        text = fuzz._op_stream(dev, rng)
        new = qt.lines[before:]
        if text.startswith("stream send"):
            n = int(text.split()[2])
            sent += n
            for line in new:
                if line.startswith("write 0x"):
                    addr, size = int(line.split()[1], 16), int(line.split()[2])
                    assert fuzz.BAR2 <= addr and addr + size <= fuzz.BAR2 + fuzz.BUFSIZE
            # the device "sends" everything at once
            qt.cmd(f"writel {fuzz.BAR3 + fuzz.TX_CONS:#x} {(4090 + sent) & 0xFFFFFFFF:#x}")
        elif text.startswith("stream recv"):
            received += int(text.split()[2])
            for line in new:
                if line.startswith("read 0x"):
                    addr, size = int(line.split()[1], 16), int(line.split()[2])
                    assert fuzz.BAR1 <= addr and addr + size <= fuzz.BAR1 + fuzz.BUFSIZE
        assert _ring(qt, fuzz.TX_PROD) == (4090 + sent) & 0xFFFFFFFF
        assert _ring(qt, fuzz.RX_CONS) == 4000 + received
        assert received <= fuzz.BUFSIZE
    assert sent > fuzz.BUFSIZE and received == fuzz.BUFSIZE   # wrapped, took all
    # a hostile device index: the step takes nothing rather than trusting it
    qt.cmd(f"writel {fuzz.BAR3 + fuzz.RX_PROD:#x} 0x80000000")
    while not fuzz._op_stream(dev, rng).startswith("stream recv"):
        pass
    assert _ring(qt, fuzz.RX_CONS) == 4000 + fuzz.BUFSIZE
    # hostile page writes stay inside BAR3's 4 KiB
    for _ in range(200):
        fuzz._op_ring(dev, rng)
    assert all(fuzz.BAR3 <= a < fuzz.BAR3 + fuzz.RING_SIZE for a in qt.mem
               if a >= fuzz.BAR3)
