"""The PVH kernel: a bzImage unpacked once, used only when QEMU can boot it."""

from __future__ import annotations

import lzma
import struct

from qemupatch.pvh import direct_kernel, has_pvh_note


def elf_with_note(name: bytes, note_type: int) -> bytes:
    """A 64-bit ELF with one PT_NOTE segment holding one note."""
    desc = b"\0" * 4
    padded = name + b"\0" * (-len(name) % 4)
    note = struct.pack("<III", len(name), len(desc), note_type) + padded + desc
    phoff, note_at = 64, 64 + 56
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_at, 0, 0, len(note), len(note), 4)
    return header + phdr + note


def bzimage(payload: bytes, unpacked_size: int) -> bytes:
    setup_sects = 1
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    blob = payload + struct.pack("<I", unpacked_size)
    struct.pack_into("<II", image, 0x248, 16, len(blob))
    return bytes(image) + b"\0" * 16 + blob


def test_pvh_note_is_found_and_others_are_not():
    assert has_pvh_note(elf_with_note(b"Xen", 18))
    assert not has_pvh_note(elf_with_note(b"Xen", 17))
    assert not has_pvh_note(elf_with_note(b"GNU", 18))
    assert not has_pvh_note(b"MZ not an elf")


def test_xz_bzimage_is_unpacked_once(tmp_path):
    elf = elf_with_note(b"Xen", 18)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ), len(elf)))
    direct = direct_kernel(kernel)
    assert direct == tmp_path / "vmlinuz.pvh" and direct.read_bytes() == elf
    kernel.write_bytes(b"changed")              # cached: not read again
    assert direct_kernel(kernel) == direct


def test_anything_odd_boots_the_bzimage(tmp_path):
    no_note = elf_with_note(b"Xen", 17)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(lzma.compress(no_note, format=lzma.FORMAT_XZ), len(no_note)))
    assert direct_kernel(kernel) == kernel
    kernel.write_bytes(bzimage(b"\x5d\0\0unknown compression", 10))
    assert direct_kernel(kernel) == kernel
    assert direct_kernel(tmp_path / "missing") == tmp_path / "missing"
