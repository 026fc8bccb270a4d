"""Pickle opcodes written by hand, for the hand-built checkpoints of
tests/torchspace.py and tests/attacks/make_attacks.py. Needs no torch (the
attack files regenerate without it), so it is not in tests/helpers.py."""
import struct


def binunicode(s):
    """BINUNICODE of s (a str, or its bytes)."""
    b = s.encode() if isinstance(s, str) else s
    return b"X" + struct.pack("<I", len(b)) + b


def pickle_int(n):
    """The shortest of BININT1, BININT and LONG1 that holds n."""
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def int_tuple(values):
    """A tuple of ints (MARK ... TUPLE)."""
    return b"(" + b"".join(pickle_int(v) for v in values) + b"t"
