"""What a file is, told from its first bytes, so that a refusal names a file picked by
mistake (a PLY given as a bundle, a bundle given as a checkpoint) instead of calling it
corrupt. Imports nothing beyond the standard library (the add-on's Blender Python calls it)."""

from __future__ import annotations

HEAD_SIZE = 16  # the bytes file_kind needs

KIND_NAMES = {
    "zip": "a zip archive, e.g. a torch checkpoint",
    "pickle": "a pickle, e.g. a torch checkpoint of the legacy format",
    "ply": "a PLY point cloud",
    "safetensors": "a safetensors file (an NPBG++ weights file or neural scene bundle)",
}


def file_kind(head: bytes) -> str | None:
    """The kind (a key of :data:`KIND_NAMES`) of a file starting with ``head`` (its first
    :data:`HEAD_SIZE` bytes); None when it is none of them."""
    if head.startswith(b"PK\x03\x04"):  # torch.save since torch 1.6
        return "zip"
    # safetensors: an 8-byte little-endian header length, then the JSON header. Tested
    # before pickle because a header length of 128 mod 256 starts with the byte 0x80.
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 30:
        return "safetensors"
    # a pickle's PROTO opcode and protocol 2..5: torch.save's legacy format
    if head[:1] == b"\x80" and len(head) >= 2 and head[1:2] in b"\x02\x03\x04\x05":
        return "pickle"
    if head.startswith(b"ply"):
        return "ply"
    return None
