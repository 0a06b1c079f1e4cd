"""Boot a guest kernel without its self-decompression: the PVH entry.

Under TCG a Debian bzImage spends about 5 s unpacking itself (xz on 6.1,
zstd on 6.12) before the kernel's clock even starts.  QEMU can instead
load the uncompressed ELF ``vmlinux`` through its PVH entry point (Debian
builds ``CONFIG_PVH=y``): same kernel, same command line, no unpacking.

:func:`direct_kernel` unpacks the payload of a bzImage once, next to it
(``<kernel>.pvh``), and returns it; when anything is off (not a bzImage,
an unknown compression, no PVH note, a read-only folder) it returns the
bzImage itself, which always boots, only slower.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import tempfile
from pathlib import Path

from qemupatch.errors import CommandFailed, CommandTimeout
from qemupatch.records import atomic_write
from qemupatch.run import run

XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4


def direct_kernel(kernel: Path) -> Path:
    """The PVH-bootable ``vmlinux`` of ``kernel``, or ``kernel`` itself."""
    target = kernel.with_name(kernel.name + ".pvh")
    if target.is_file():
        return target
    try:
        elf = _unpack(kernel.read_bytes())
        if elf is None or not has_pvh_note(elf):
            return kernel
        atomic_write(target, elf)
    except (OSError, lzma.LZMAError, EOFError, CommandFailed, CommandTimeout):
        return kernel
    return target


def _unpack(bzimage: bytes) -> bytes | None:
    """The ELF inside a bzImage (see Documentation/x86/boot.rst)."""
    if bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start:start + length - 4]     # the last 4 bytes: unpacked size
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.decompress(payload, format=lzma.FORMAT_XZ)
    if payload.startswith(b"\x1f\x8b"):
        return gzip.decompress(payload)
    if payload.startswith(b"\x28\xb5\x2f\xfd") and shutil.which("zstd"):
        with tempfile.TemporaryDirectory(prefix="qemupatch-pvh-") as tmp:
            packed, unpacked = Path(tmp) / "payload.zst", Path(tmp) / "vmlinux"
            packed.write_bytes(payload)
            run(["zstd", "-d", "-q", "-f", "-o", unpacked, packed], timeout=120)
            return unpacked.read_bytes()
    return None


def has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF has Xen's PHYS32_ENTRY note,
    which QEMU needs to boot it directly."""
    if elf[:6] != b"\x7fELF\x02\x01":
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False
