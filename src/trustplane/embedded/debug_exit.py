"""Leave QEMU from inside a guest with an exit status: `qemu-exit CODE`.

QEMU's `isa-debug-exit` device ends the emulator when a byte is written to
its I/O port, with status CODE*2+1. The guest kernel has no `/dev/port`
(CONFIG_DEVPORT is off in Debian's cloud kernel) and busybox has no port
I/O applet, so the guest needs a program that calls ioperm(2) and `out`.
Compiling one at test time would make a C toolchain a test dependency; it
is 75 bytes of machine code, so it is written here as a minimal static ELF.
The code, assembled with GNU as (Intel syntax):

    _start: mov  rsi, [rsp+16]      ; argv[1]
            xor  ebx, ebx           ; code = 0
            test rsi, rsi
            jz   2f
    1:      movzx eax, byte ptr [rsi]
            sub  eax, 48            ; '0'
            cmp  eax, 9
            ja   2f                 ; stop at NUL or a non-digit
            imul ebx, ebx, 10
            add  ebx, eax
            inc  rsi
            jmp  1b
    2:      mov  eax, 173           ; ioperm(0xf4, 4, 1)
            mov  edi, 0xf4
            mov  esi, 4
            mov  edx, 1
            syscall
            mov  eax, ebx
            mov  edx, 0xf4
            out  dx, al             ; QEMU exits here
            mov  eax, 60            ; exit(1): no isa-debug-exit device
            mov  edi, 1
            syscall
"""

from __future__ import annotations

import struct

IOBASE = 0xF4
QEMU_ARGS = ("-device", f"isa-debug-exit,iobase={IOBASE:#x},iosize=0x04")
"""The device the program talks to; add these to the QEMU command line."""

_CODE = bytes.fromhex(
    "488b74241031db4885f674150fb60683e83083f809770a6bdb0a01c348ffc6ebeb"
    "b8ad000000bff4000000be04000000ba010000000f0589d8baf4000000ee"
    "b83c000000bf010000000f05"
)
_BASE = 0x400000
_EHDR_SIZE = 64
_PHDR_SIZE = 56


def _elf(code: bytes) -> bytes:
    """A static x86-64 ELF executable with one read+execute segment holding `code`."""
    entry = _BASE + _EHDR_SIZE + _PHDR_SIZE
    size = _EHDR_SIZE + _PHDR_SIZE + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, SysV
    header = struct.pack(
        "<16sHHIQQQIHHHHHH",
        ident,
        2,  # ET_EXEC
        0x3E,  # EM_X86_64
        1,  # EV_CURRENT
        entry,
        _EHDR_SIZE,  # program headers right after this header
        0,  # no section headers
        0,
        _EHDR_SIZE,
        _PHDR_SIZE,
        1,
        0,
        0,
        0,
    )
    segment = struct.pack(
        "<IIQQQQQQ",
        1,  # PT_LOAD
        5,  # PF_R | PF_X
        0,
        _BASE,
        _BASE,
        size,
        size,
        0x1000,
    )
    return header + segment + code


DEBUG_EXIT_PROGRAM = _elf(_CODE)
"""The `qemu-exit` executable (x86-64 Linux)."""


def guest_code(qemu_status: int) -> int | None:
    """The code the guest passed to `qemu-exit`, from QEMU's exit status (None if not odd)."""
    return (qemu_status - 1) // 2 if qemu_status % 2 == 1 else None
