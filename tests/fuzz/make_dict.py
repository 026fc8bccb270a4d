"""Writes tests/fuzz/ckptio.dict, the libFuzzer dictionary of the harnesses
(make fuzz-run passes it with -dict=), from the installed torch:

- every global of torch's weights-only allowlist, as the GLOBAL opcode
  writes it ("c<module>\\n<name>\\n") and as STACK_GLOBAL's two strings;
  the storage types among them as persistent-id tuples too;
- torch's rebuild functions and tensor-type names, the dtypes;
- every pickle opcode byte, and the prefixes of its common arguments;
- the pieces of the containers: zip signatures and record names of
  torch.save's archives, the legacy magic number, protocol and sys_info
  pickles, big-endian markers.

    .venv/bin/python tests/fuzz/make_dict.py          # rewrite
    .venv/bin/python tests/fuzz/make_dict.py --check  # exit 1 if out of date

(tests/test_fuzz_dict.py runs --check: a new torch with new globals makes
the test fail until the dictionary is regenerated.)
"""
import os
import pickle
import pickletools
import struct
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "ckptio.dict")


def _escape(b):
    out = []
    for c in b:
        if 0x20 <= c < 0x7F and c not in (ord('"'), ord("\\")):
            out.append(chr(c))
        else:
            out.append(f"\\x{c:02x}")
    return '"' + "".join(out) + '"'


def _binunicode(s):
    b = s.encode()
    return (b"\x8c" + bytes([len(b)]) + b) if len(b) < 256 else (b"X" + struct.pack("<I", len(b)) + b)


def entries():
    allowed = torch._weights_only_unpickler._get_allowed_globals()
    out = []
    for full in sorted(allowed):
        module, _, name = full.rpartition(".")
        out.append((f"global_{full}", b"c" + module.encode() + b"\n" + name.encode() + b"\n"))
        out.append((f"stack_global_{full}", _binunicode(module) + _binunicode(name) + b"\x93"))
        if isinstance(allowed[full], torch.serialization.StorageType) or name.endswith("Storage"):
            out.append((f"pid_{full}", b"(X\x07\x00\x00\x00storagec" + module.encode() + b"\n"
                        + name.encode() + b"\n"))
    # a set: sorted, so that the file is the same in every run (hash seeds differ)
    rebuilds = torch._weights_only_unpickler._tensor_rebuild_functions()
    for f in sorted(rebuilds, key=lambda f: f.__name__):
        out.append((f"name_{f.__name__}", f.__name__.encode()))
    for dtype in sorted({v for v in allowed.values() if isinstance(v, torch.dtype)}, key=str):
        out.append((f"dtype_{dtype}", str(dtype).encode()))
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")
        out.append((f"op_{op.name}", code))
    out += [
        ("proto2", b"\x80\x02"), ("proto4", b"\x80\x04"), ("proto5", b"\x80\x05"),
        ("storage", b"X\x07\x00\x00\x00storage"), ("cpu", b"X\x03\x00\x00\x00cpu"),
        ("cuda", b"X\x06\x00\x00\x00cuda:0"), ("module", b"X\x06\x00\x00\x00module"),
        ("empty_od", b"ccollections\nOrderedDict\n)R"), ("false_od", b"\x89ccollections\nOrderedDict\n)R"),
        ("size1", b"(K\x04t"), ("stride1", b"(K\x01t"), ("stride0", b"(K\x00t"),
        ("int_big", b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f"), ("binint_neg", b"J\xff\xff\xff\xff"),
        ("long_binput", b"r\xff\xff\xff\xff"), ("long_binget", b"j\xff\xff\xff\xff"),
        ("frame", b"\x95\x00\x00\x00\x00\x00\x00\x00\x00"),
        ("zip_local", b"PK\x03\x04"), ("zip_central", b"PK\x01\x02"), ("zip_eocd", b"PK\x05\x06"),
        ("zip64_eocd", b"PK\x06\x06"), ("zip64_locator", b"PK\x06\x07"), ("zip_dd", b"PK\x07\x08"),
        ("zip64_extra", b"\x01\x00\x10\x00"), ("sat32", b"\xff\xff\xff\xff"), ("sat16", b"\xff\xff"),
        ("rec_data_pkl", b"archive/data.pkl"), ("rec_version", b"archive/version"),
        ("rec_dversion", b"archive/.data/version"), ("rec_byteorder", b"archive/byteorder"),
        ("rec_data0", b"archive/data/0"), ("rec_constants", b"archive/constants.pkl"),
        ("rec_serial", b"archive/.data/serialization_id"), ("little", b"little"), ("big", b"big"),
        ("legacy_magic", pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)),
        ("legacy_proto", pickle.dumps(1001, protocol=2)),
        ("legacy_sysinfo", pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                         "type_sizes": {"short": 2, "int": 4, "long": 4}},
                                        protocol=2)),
        ("legacy_keys", pickle.dumps(["0"], protocol=2)),
        ("legacy_count", struct.pack("<q", 4)),
    ]
    seen, unique = set(), []
    for name, value in out:
        if value not in seen:
            seen.add(value)
            unique.append((name.replace(".", "_"), value))
    return unique


def render():
    lines = [f"# written by tests/fuzz/make_dict.py from torch {torch.__version__}: do not edit"]
    lines += [f"{name}={_escape(value)}" for name, value in entries()]
    return "\n".join(lines) + "\n"


def main():
    text = render()
    if sys.argv[1:] == ["--check"]:
        old = open(PATH).read() if os.path.exists(PATH) else ""
        body = lambda t: t.split("\n", 1)[1]  # noqa: E731 - the header names the torch
        if body(old) != body(text):
            print(f"{PATH} is out of date: run .venv/bin/python tests/fuzz/make_dict.py")
            return 1
        return 0
    with open(PATH, "w") as f:
        f.write(text)
    print(f"wrote {text.count(chr(10)) - 1} entries to {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
