"""Blender's break flag (G.is_break: set by Esc, or Ctrl+C in background mode) for tests that
stand in for a user's Esc at a given moment of a render."""

from __future__ import annotations

import ctypes


def blender_break_flag() -> ctypes.c_bool | None:
    """Blender's G.is_break in this process's bpy (set by Esc, or Ctrl+C in background mode),
    located in bpy 5.0.1's library: its default_break() reads it (lea G(%rip),%rax; movzbl
    0xc20(%rax),%eax; ret). Another build lays its library out otherwise: an address is read or
    written only where a mapping grants it (reading an unmapped one would crash the process: a
    failure, not a skip), and only after the code there is that instruction sequence; else
    None (the caller skips)."""
    DEFAULT_BREAK, G, IS_BREAK = 0x167BE80, 0x9C0F5E0, 0xC20
    try:
        with open("/proc/self/maps") as maps_file:
            maps = [line.split() for line in maps_file]
    except OSError:  # not Linux
        return None
    ranges = [(*(int(a, 16) for a in m[0].split("-")), m[1]) for m in maps if len(m) >= 5]

    def granted(address: int, size: int, perms: str) -> bool:
        return any(lo <= address and address + size <= hi and all(p in mode for p in perms)
                   for lo, hi, mode in ranges)

    bases = [int(m[0].split("-")[0], 16) for m in maps
             if len(m) >= 6 and m[5].endswith("/bpy/__init__.so") and int(m[2], 16) == 0]
    if len(bases) != 1:
        return None
    base = bases[0]
    if not (granted(base + DEFAULT_BREAK, 15, "rx") and granted(base + G + IS_BREAK, 1, "rw")):
        return None
    code = ctypes.string_at(base + DEFAULT_BREAK, 15)
    lea = int.from_bytes(code[3:7], "little", signed=True)
    if (code[:3] == bytes.fromhex("488d05") and base + DEFAULT_BREAK + 7 + lea == base + G
            and code[7:] == bytes.fromhex("0fb680200c0000c3")):
        return ctypes.c_bool.from_address(base + G + IS_BREAK)
    return None
