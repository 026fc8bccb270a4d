"""Writes the hostile checkpoints of tests/attacks/ (one file a case) and
MANIFEST.json, which says for each file what ckptio.load must raise.

Run from the repository root with the venv's Python:
    .venv/bin/python tests/attacks/make_attacks.py
The files are committed; tests/test_attacks.py loads each one and checks
that it ends in ckptio.CheckpointError or ckptio.UnpicklingError, that no
code ran (the payloads would create the file CKPTIO_PWNED in the current
directory) and that the load allocated no more than a small multiple of
the file's size.

Everything is built by hand from opcodes and zip structures (with Python's
pickle and zipfile where they write what is wanted), so that the files are
deterministic and need no torch to regenerate.
"""
import io
import json
import os
import pickle
import struct
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from pickleops import binunicode, int_tuple, pickle_int  # noqa: E402
SENTINEL = "CKPTIO_PWNED"
SHELL = f"touch {SENTINEL}".encode()
PY = f"open({SENTINEL!r}, 'w').close()".encode()

CASES = {}


def case(name, data, error="CheckpointError", match=None, why=""):
    assert name not in CASES, name
    CASES[name] = (data, {"error": error, "match": match, "why": why})


# ---- pickle pieces ---------------------------------------------------------


def short_binunicode(s):
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


P2 = b"\x80\x02"
P4 = b"\x80\x04"
TORCH_TENSOR = b"ctorch._utils\n_rebuild_tensor_v2\n"


def storage_pid(stype="FloatStorage", key="0", numel=4, location="cpu"):
    """BINPERSID of ('storage', torch.<stype>, key, location, numel)."""
    return (
        b"(" + binunicode("storage") + b"ctorch\n" + stype.encode() + b"\n"
        + binunicode(key) + binunicode(location) + pickle_int(numel) + b"tQ"
    )


def tensor(stype="FloatStorage", key="0", numel=4, offset=0, size=(4,), stride=(1,)):
    """A _rebuild_tensor_v2 call, as torch.save pickles a tensor."""
    return (
        TORCH_TENSOR + b"(" + storage_pid(stype, key, numel) + pickle_int(offset)
        + int_tuple(size) + int_tuple(stride) + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"tR"
    )


def state_dict(*items):
    """{'name': <pickled value>, ...} in protocol 2."""
    out = P2 + b"}("
    for k, v in items:
        out += binunicode(k) + v
    return out + b"u."


# ---- archives --------------------------------------------------------------


def archive(pkl, records=None, prefix="archive", compress=False, version=b"3\n", order=None):
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", method) as z:
        items = [("data.pkl", pkl), ("byteorder", b"little")]
        items += list((records or {}).items())
        items.append(("version", version))
        for name, data in items:
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            z.writestr(info, data)
    return buf.getvalue()


FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def good_archive():
    return archive(state_dict(("w", tensor())), {"data/0": FLOATS})


def eocd_offset(data):
    return data.rindex(b"PK\x05\x06")


def central_offsets(data):
    out, pos = [], 0
    while True:
        pos = data.find(b"PK\x01\x02", pos)
        if pos < 0:
            return out
        out.append(pos)
        pos += 4


def patch(data, offset, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def rename_entry(data, old, new):
    """Renames a record in both its local and central headers (same length)."""
    assert len(old) == len(new)
    return data.replace(old, new)


# ---- legacy stream ---------------------------------------------------------

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def legacy(obj_pickle, keys=(b"0",), data=None, magic=None, proto=None, sysinfo=None,
           keys_pkl=None):
    """A legacy stream (torch.save(_use_new_zipfile_serialization=False))."""
    magic = pickle.dumps(LEGACY_MAGIC, protocol=2) if magic is None else magic
    proto = pickle.dumps(1001, protocol=2) if proto is None else proto
    if sysinfo is None:
        sysinfo = pickle.dumps(
            {"protocol_version": 1001, "little_endian": True,
             "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    if keys_pkl is None:
        keys_pkl = pickle.dumps([k.decode() for k in keys], protocol=2)
    if data is None:
        data = b"".join(struct.pack("<q", 4) + FLOATS for _ in keys)
    return magic + proto + sysinfo + obj_pickle + keys_pkl + data


def legacy_storage_pid(key="0", numel=4, stype="FloatStorage", view=None):
    view_pkl = b"N" if view is None else (
        b"(" + binunicode(view[0]) + pickle_int(view[1]) + pickle_int(view[2]) + b"t")
    return (
        b"(" + binunicode("storage") + b"ctorch\n" + stype.encode() + b"\n"
        + binunicode(key) + binunicode("cpu") + pickle_int(numel) + view_pkl + b"tQ"
    )


def legacy_tensor(key="0", numel=4, size=(4,), stride=(1,), offset=0, view=None):
    return (
        TORCH_TENSOR + b"(" + legacy_storage_pid(key, numel, view=view) + pickle_int(offset)
        + int_tuple(size) + int_tuple(stride) + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"tR"
    )


def legacy_obj(value):
    return P2 + b"}(" + binunicode("w") + value + b"u."


# ===========================================================================
# 1. globals that would run code, through every opcode that reaches one
# ===========================================================================

UP = "UnpicklingError"

case("global_os_system.pt", archive(P2 + b"cos\nsystem\n" + binunicode(SHELL) + b"\x85R."), UP,
     "os", "GLOBAL os.system then REDUCE")
case("global_posix_system.pt", archive(P2 + b"cposix\nsystem\n" + binunicode(SHELL) + b"\x85R."),
     UP, "posix", "GLOBAL posix.system (what pickle writes for os.system on Linux)")
case("global_builtins_exec.pt", archive(P2 + b"cbuiltins\nexec\n" + binunicode(PY) + b"\x85R."),
     UP, "exec", "GLOBAL builtins.exec")
case("global_builtin_eval_py2.pt",
     archive(P2 + b"c__builtin__\neval\n" + binunicode(PY) + b"\x85R."), UP, "eval",
     "Python 2 name __builtin__.eval")
case("global_builtins_open.pt",
     archive(P2 + b"cbuiltins\nopen\n" + binunicode(SENTINEL) + binunicode("w") + b"\x86R."), UP,
     "open", "builtins.open(SENTINEL, 'w') would create the file")
case("global_getattr_chain.pt",
     archive(P2 + b"cbuiltins\ngetattr\n" + b"ctorch\nload\n" + binunicode("__globals__")
             + b"\x86R."), UP, None, "getattr to walk to a module's globals")
case("global_dotted_name.pt",
     archive(P4 + short_binunicode("torch._utils") + b"\x94"
             + short_binunicode("_rebuild_tensor_v2.__globals__") + b"\x94\x93."), UP, None,
     "STACK_GLOBAL with a dotted attribute path out of an allowed function")
case("global_dotted_name_v2.pt",
     archive(P2 + b"ccollections\nOrderedDict.__init__.__globals__\n."), UP, None,
     "GLOBAL with a dotted attribute path")
case("global_import.pt",
     archive(P2 + b"cbuiltins\n__import__\n" + binunicode("os") + b"\x85R."), UP, "__import__",
     "builtins.__import__")
case("global_torch_load.pt",
     archive(P2 + b"ctorch\nload\n" + binunicode("x.pt") + b"\x85R."), UP, "torch", "torch.load")
case("global_subprocess_popen.pt",
     archive(P2 + b"csubprocess\nPopen\n(" + binunicode("touch") + binunicode(SENTINEL)
             + b"l\x85R."), UP, "subprocess", "subprocess.Popen")
case("stack_global_os_system.pt",
     archive(P4 + short_binunicode("os") + short_binunicode("system") + b"\x93"
             + binunicode(SHELL) + b"\x85R."), UP, "os", "STACK_GLOBAL os.system")
case("stack_global_non_str.pt", archive(P4 + b"K\x01K\x02\x93."), UP, "str",
     "STACK_GLOBAL with ints for names")
case("inst_os_system.pt", archive(b"(" + binunicode(SHELL) + b"ios\nsystem\n."), UP, "os",
     "INST os.system (protocol 0 class call)")
case("obj_os_system.pt", archive(b"(cos\nsystem\n" + binunicode(SHELL) + b"o."), UP, "os",
     "OBJ os.system")
case("obj_no_class.pt", archive(P2 + b"(o."), UP, None, "OBJ with nothing after its MARK")
for op, arg in ((b"\x82", b"\x01"), (b"\x83", b"\x01\x00"), (b"\x84", b"\x01\x00\x00\x00"),
                (b"\x84", b"\xff\xff\xff\x7f"), (b"\x82", b"\x00")):
    name = {b"\x82": "ext1", b"\x83": "ext2", b"\x84": "ext4"}[op]
    code = int.from_bytes(arg, "little")
    case(f"{name}_code_{code}.pt", archive(P2 + op + arg + b"."), UP, "xtension|EXT",
         f"{name.upper()} {code}: the copyreg extension registry")
case("reduce_on_allowed_class_bad_args.pt",
     archive(P2 + b"ccollections\nOrderedDict\n" + binunicode("x") + b"\x85R."), None, None,
     "REDUCE of an allowed class with arguments it rejects")
case("reduce_args_not_tuple.pt",
     archive(P2 + b"ccollections\nOrderedDict\nK\x01R."), UP, "tuple",
     "REDUCE with arguments that are not a tuple")
case("newobj_object.pt", archive(P2 + b"cbuiltins\nobject\n)\x81."), UP, "object",
     "NEWOBJ of builtins.object")
case("newobj_os_wrap_close.pt", archive(P2 + b"cos\n_wrap_close\n)\x81."), UP, "os",
     "NEWOBJ of a class from os")
case("newobj_ex_os.pt", archive(P4 + b"cos\n_wrap_close\n)}\x92."), UP, "os",
     "NEWOBJ_EX of a class from os")
case("newobj_args_not_tuple.pt", archive(P2 + b"ccollections\nOrderedDict\nK\x01\x81."), UP,
     "tuple", "NEWOBJ with arguments that are not a tuple")
case("build_ordereddict_setstate.pt",
     archive(P2 + b"ccollections\nOrderedDict\n)R}" + binunicode("__setstate__")
             + b"ccollections\nOrderedDict\nsb" + b"}b."), UP, None,
     "BUILD on an allowed type that plants __setstate__, then BUILD again")
case("build_ordereddict_class.pt",
     archive(P2 + b"ccollections\nOrderedDict\n)R}" + binunicode("__class__")
             + b"ccollections\nCounter\nsb."), UP, None,
     "BUILD on an allowed type that sets __class__")
case("build_on_int.pt", archive(P2 + b"K\x01}b."), UP, None, "BUILD on an int")
case("build_tensor_bad_state.pt",
     archive(state_dict(("w", tensor() + binunicode("x") + b"b")), {"data/0": FLOATS}), UP, None,
     "BUILD on a tensor with a str for state")
case("persid_protocol0.pt", archive(b"P" + b"0" + b"\n."), UP, None,
     "PERSID (protocol 0 persistent id)")
case("persid_module.pt",
     archive(P2 + b"(" + binunicode("module") + binunicode("os") + b"N\x87Q."), UP, None,
     "a persistent id that asks for a module (TorchScript form)")
case("persid_unknown_storage_type.pt",
     archive(P2 + b"(" + binunicode("storage") + b"cos\nsystem\n" + binunicode("0")
             + binunicode("cpu") + b"K\x04tQ.", {"data/0": FLOATS}), UP, None,
     "a persistent id whose storage type is os.system")
case("location_unknown_storage.pt",
     archive(P2 + storage_pid(location="cup") + b"q\x00.", {"data/0": FLOATS}), None,
     "location|restore", "a storage (reference memoized) whose location tag no device has")
case("location_unknown_tensor.pt",
     archive(state_dict(("w", tensor().replace(binunicode("cpu"), binunicode("cup")))),
             {"data/0": FLOATS}), None, "location|restore",
     "a tensor whose storage's location tag no device has")
case("persid_location_not_str.pt",
     archive(P2 + b"(" + binunicode("storage") + b"ctorch\nFloatStorage\n" + binunicode("0")
             + b"K\x00K\x04tQ.", {"data/0": FLOATS}), UP, None,
     "a persistent id whose location is an int")

# ===========================================================================
# 2. the pickle machine's resources
# ===========================================================================

case("memo_long_binget_huge.pt", archive(P2 + b"K\x01j\xff\xff\xff\xff."), UP, "memo",
     "LONG_BINGET 2**32-1 on an empty memo")
case("memo_get_huge.pt", archive(b"K\x01g99999999999999999999\n."), UP, "memo",
     "GET with a 20-digit index")
case("memo_long_binput_spread.pt",
     archive(P2 + b"K\x01" + b"".join(b"r" + struct.pack("<I", 0xFFFFFFFF - 977 * i)
                                      for i in range(4000)) + b"0j\x00\x00\x00\x00."),
     UP, "memo", "4000 LONG_BINPUTs at scattered huge indices, then GET of an unset one")
case("memo_memoize_storm.pt", archive(P2 + b"K\x01" + b"\x94" * 50_000 + b"1."), UP, None,
     "50000 MEMOIZEs of one object then POP_MARK without a MARK")
# 2**40 visits if the storage-reference walk does not remember what it saw
laughs = P2 + storage_pid() + b"q\x000"
for i in range(60):
    laughs += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
laughs += b"h" + bytes([60]) + b"."
case("memo_billion_laughs_refs.pt", archive(laughs, {"data/0": FLOATS}), None, None,
     "a DAG of tuples 60 deep over a memoized storage reference: 2**60 paths")
case("deep_nesting_lists.pt", archive(P2 + b"]" * 100_000 + b"a" * 99_999 + b"."), None,
     "nest more than", "100000 nested lists (over the 10000-level depth limit)")
case("deep_nesting_tuples_refs.pt",
     archive(P2 + storage_pid() + b"q\x00" + b"\x85" * 50_000 + b".", {"data/0": FLOATS}),
     None, "nest more than", "a memoized storage reference inside 50000 nested 1-tuples")
case("cycle_list_with_ref.pt",
     archive(P2 + b"]q\x00h\x00h\x00a" + storage_pid() + b"q\x01ah\x01a.", {"data/0": FLOATS}),
     "ok", None, "a list holding itself and a memoized storage reference")
case("deep_marks.pt", archive(P2 + b"(" * 100_000 + b"N."), None, None,
     "100000 MARKs never closed")
case("stack_underflow.pt", archive(P2 + b"a."), UP, "underflow|empty|MARK", "APPEND with no list")
case("pickle_truncated.pt", archive(P2 + b"]" + b"K\x01a" * 10), None, "truncated|STOP",
     "no STOP opcode")
case("string_longer_than_pickle.pt", archive(P2 + b"X\xff\xff\xff\x7fabc."), None, None,
     "BINUNICODE claims 2 GiB")
case("binbytes8_huge.pt", archive(P4 + b"\x8e" + struct.pack("<Q", 2**63 - 1) + b"."), None,
     None, "BINBYTES8 claims 2**63 bytes")
case("bytearray8_huge.pt", archive(b"\x80\x05\x96" + struct.pack("<Q", 2**64 - 1) + b"."), None,
     None, "BYTEARRAY8 claims 2**64-1 bytes")
case("frame_huge.pt", archive(P4 + b"\x95" + struct.pack("<Q", 2**63) + b"N."), None, None,
     "FRAME claims 2**63 bytes")
case("long4_huge.pt", archive(P2 + b"\x8b" + struct.pack("<i", 2**31 - 1) + b"."), None, None,
     "LONG4 claims 2 GiB")
case("long_text_huge.pt", archive(b"L" + b"9" * 20_000 + b"L\n."), None, None,
     "a 20000-digit LONG: over Python's int-from-text limit, refused as pickle does")
case("unknown_opcode.pt", archive(P2 + b"\xff."), None, "opcode", "opcode 0xff")
case("proto_too_new.pt", archive(b"\x80\x09N."), None, "protocol", "protocol 9")
case("next_buffer.pt", archive(b"\x80\x05\x97."), None, "buffer", "NEXT_BUFFER (out-of-band)")

# ===========================================================================
# 3. tensors and storages
# ===========================================================================

case("storage_larger_than_record.pt",
     archive(state_dict(("w", tensor(numel=1 << 40, size=(1 << 40,)))), {"data/0": FLOATS}),
     None, None, "a storage claiming 2**40 floats over a 16-byte record")
case("storage_numel_overflow.pt",
     archive(state_dict(("w", tensor(numel=2**62, size=(4,)))), {"data/0": FLOATS}), None,
     None, "2**62 floats: the byte count overflows 64 bits")
case("storage_numel_negative.pt",
     archive(state_dict(("w", tensor(numel=-4, size=(4,)))), {"data/0": FLOATS}), None, None,
     "a negative element count")
case("storage_numel_bignum.pt",
     archive(state_dict(("w", tensor(numel=2**200, size=(4,)))), {"data/0": FLOATS}), None,
     None, "a 200-bit element count")
case("storage_record_missing.pt", archive(state_dict(("w", tensor(key="7")))), None, None,
     "a storage whose record data/7 is absent")
case("storage_key_traversal.pt",
     archive(state_dict(("w", tensor(key="../../etc/passwd"))), {"data/0": FLOATS}), None, None,
     "a storage key with '..'")
case("storage_key_nul.pt",
     archive(state_dict(("w", tensor(key="0\x00x"))), {"data/0": FLOATS}), None, None,
     "a storage key with a NUL byte")
case("storage_two_dtypes_one_key.pt",
     archive(state_dict(("a", tensor()), ("b", tensor(stype="DoubleStorage", numel=4,
                                                    size=(4,)))), {"data/0": FLOATS}),
     None, None, "one record named as 4 floats and as 4 doubles (32 bytes over 16)")
case("shape_product_overflow.pt",
     archive(state_dict(("w", tensor(size=(2**32, 2**32, 2**32), stride=(0, 0, 0)))),
             {"data/0": FLOATS}), None, None, "sizes whose product overflows 64 bits")
case("stride_overflow.pt",
     archive(state_dict(("w", tensor(size=(4, 4), stride=(2**62, 1)))), {"data/0": FLOATS}),
     None, None, "strides whose extent overflows 64 bits")
case("offset_out_of_range.pt",
     archive(state_dict(("w", tensor(offset=2**62))), {"data/0": FLOATS}), None, None,
     "a storage offset of 2**62")
case("tensor_past_storage.pt",
     archive(state_dict(("w", tensor(size=(5,)))), {"data/0": FLOATS}), None, None,
     "5 elements over a storage of 4")
case("negative_size.pt",
     archive(state_dict(("w", tensor(size=(-1,)))), {"data/0": FLOATS}), None, None,
     "a negative size")
case("negative_stride.pt",
     archive(state_dict(("w", tensor(size=(4,), stride=(-1,), offset=3))), {"data/0": FLOATS}),
     None, None, "a negative stride")
case("too_many_dims.pt",
     archive(state_dict(("w", tensor(size=(1,) * 100, stride=(1,) * 100))), {"data/0": FLOATS}),
     None, None, "100 dimensions")
case("sizes_strides_mismatch.pt",
     archive(state_dict(("w", tensor(size=(2, 2), stride=(1,)))), {"data/0": FLOATS}), None,
     None, "2 sizes, 1 stride")
case("size_not_int.pt",
     archive(state_dict(("w", TORCH_TENSOR + b"(" + storage_pid() + b"K\x00("
                         + binunicode("4") + b"t(K\x01t\x89ccollections\nOrderedDict\n)RtR")),
             {"data/0": FLOATS}), None, None, "a size that is a str")

# ===========================================================================
# 4. zip containers
# ===========================================================================

good = good_archive()
eocd = eocd_offset(good)
cds = central_offsets(good)
case("zip_cd_offset_out_of_range.pt", patch(good, eocd + 16, "<I", 0xFFFFFF00), None,
     "central directory", "the central directory starts past the end")
case("zip_cd_size_huge.pt", patch(good, eocd + 12, "<I", 0xFFFFFFF0), None, "central directory",
     "the central directory claims 4 GiB")
case("zip_entry_count_lies.pt", patch(patch(good, eocd + 8, "<H", 65535), eocd + 10, "<H",
                                      65535), None, "entries", "65535 entries announced")
case("zip_record_size_huge.pt",
     patch(patch(good, cds[2] + 20, "<I", 0xFFFFFFF0), cds[2] + 24, "<I", 0xFFFFFFF0), None,
     None, "the tensor record claims 4 GiB")
case("zip_record_offset_out_of_range.pt", patch(good, cds[2] + 42, "<I", 0x7FFFFFFF), None,
     None, "the tensor record's local header lies past the end")
case("zip_overlapping_records.pt",
     patch(patch(good, cds[0] + 20, "<I", 200), cds[0] + 24, "<I", 200), None, "overlap|past",
     "data.pkl's data runs over the next records")
# duplicate names: two records both called archive/data/0
dup = archive(state_dict(("w", tensor())), {"data/0": FLOATS, "data/1": FLOATS})
dup = dup.replace(b"archive/data/1", b"archive/data/0")
case("zip_duplicate_names.pt", dup, None, "duplicate", "two records named archive/data/0")
case("zip_name_dotdot.pt",
     archive(state_dict(("w", tensor())), {"data/0": FLOATS, "../../evil": b"x"}), None, r"\.\.",
     "a record named archive/../../evil")
case("zip_name_nul.pt",
     archive(state_dict(("w", tensor())), {"data/0": FLOATS, "daXta/1": b"x"})
     .replace(b"archive/daXta/1", b"archive/da\x00ta/1"), None, "NUL",
     "a record name with a NUL byte (zipfile cuts names at NUL: patched in after)")
case("zip_name_absolute.pt",
     archive(state_dict(("w", tensor())), {"data/0": FLOATS}).replace(b"archive/", b"/rchive/"),
     None, "absolute", "record names starting with '/'")
mixed = archive(state_dict(("w", tensor())), {"data/0": FLOATS}).replace(b"archive/data/0",
                                                                          b"otherdir/data0")
case("zip_prefix_mismatch.pt", mixed, None, "outside", "a record outside the archive folder")
enc = bytearray(good)
struct.pack_into("<H", enc, cds[2] + 8, 1)
case("zip_encrypted_flag.pt", bytes(enc), None, "encrypted", "a record flagged as encrypted")
case("zip_multi_disk.pt", patch(good, eocd + 4, "<H", 1), None, "multi-disk",
     "a multi-disk archive")
case("zip_stored_size_mismatch.pt", patch(good, cds[2] + 20, "<I", 8), None,
     "compressed size", "a stored record with compressed size != size")
case("zip_truncated_eocd.pt", good[:-5], None, None, "the end record cut short")
case("zip_truncated_half.pt", good[: len(good) // 2], None, None, "the file cut in half")
case("zip_no_version.pt", archive(state_dict(("w", tensor())), {"data/0": FLOATS},
                                  version=b"x\n"), None, "version",
     "a version record without a number")
case("zip_version_huge.pt", archive(state_dict(("w", tensor())), {"data/0": FLOATS},
                                    version=b"99999999999999999999999\n"), None, "version",
     "a 23-digit version")


def zip64_archive():
    """good, with zip64 end records (as written for > 65535 entries)."""
    cd_off = struct.unpack_from("<I", good, eocd + 16)[0]
    cd_size = struct.unpack_from("<I", good, eocd + 12)[0]
    n = struct.unpack_from("<H", good, eocd + 10)[0]
    z64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_off)
    loc = struct.pack("<IIQI", 0x07064B50, 0, eocd, 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return good[:eocd] + z64 + loc + end, eocd


z64, z64_off = zip64_archive()
case("zip64_cd_offset_lies.pt", patch(z64, z64_off + 48, "<Q", 2**63), None,
     "central directory", "the zip64 end record's directory offset is 2**63")
case("zip64_cd_size_lies.pt", patch(z64, z64_off + 40, "<Q", 2**64 - 1), None,
     "central directory", "the zip64 end record's directory size is 2**64-1")
case("zip64_count_lies.pt",
     patch(patch(z64, z64_off + 24, "<Q", 2**62), z64_off + 32, "<Q", 2**62), None, "entries",
     "the zip64 end record announces 2**62 entries")
case("zip64_locator_lies.pt", patch(z64, z64_off + 56 + 8, "<Q", 2**64 - 100), None, "zip64",
     "the zip64 locator points past the end")
case("zip64_record_size_lies.pt", patch(z64, z64_off + 4, "<Q", 2**64 - 1), None, "zip64",
     "the zip64 end record's own size is 2**64-1")
# zip64 extra field in a central entry that claims a huge size
ex = bytearray(good)
name_len = struct.unpack_from("<H", ex, cds[2] + 28)[0]
x_len = struct.unpack_from("<H", ex, cds[2] + 30)[0]
assert x_len == 0
extra = struct.pack("<HHQQ", 1, 16, 2**63, 2**63)
ex = ex[: cds[2] + 46 + name_len] + extra + ex[cds[2] + 46 + name_len:]
struct.pack_into("<II", ex, cds[2] + 20, 0xFFFFFFFF, 0xFFFFFFFF)
struct.pack_into("<H", ex, cds[2] + 30, len(extra))
e2 = eocd_offset(bytes(ex))
struct.pack_into("<I", ex, e2 + 12, struct.unpack_from("<I", ex, e2 + 12)[0] + len(extra))
case("zip64_extra_size_lies.pt", bytes(ex), None, None,
     "a zip64 extra field giving the tensor record 2**63 bytes")

# a compressed-record bomb: 256 MiB of zeros in well under a megabyte
bomb_n = 96 << 20
case("zip_deflate_bomb.pt",
     archive(state_dict(("w", tensor(stype="ByteStorage", numel=bomb_n, size=(bomb_n,)))),
             {"data/0": b"\x00" * bomb_n}, compress=True), None, "inflate|limit",
     "a deflated record inflating to 96 MiB (over 16x the file and 64 MiB)")
# data.pkl itself deflated: an 8 MiB pickle in a few kilobytes (inflated
# before anything else; over 16x the file, over the 1 MiB floor)
case("zip_deflate_pickle_bomb.pt",
     archive(P2 + b"N0" * (4 << 20) + b"N.", compress=True), None, "inflate|limit",
     "a deflated data.pkl inflating to 8 MiB")
# a 2 MiB storage in a few kilobytes: within the 64 MiB a trusted load allows,
# over what weights_only allows (16x the file, at least 1 MiB)
case("zip_deflate_small_bomb.pt",
     archive(state_dict(("w", tensor(stype="ByteStorage", numel=2 << 20, size=(2 << 20,)))),
             {"data/0": b"\x00" * (2 << 20)}, compress=True), None, "inflate|limit",
     "a deflated 2 MiB storage in a file of a few kilobytes")
# data.pkl deflated to nothing: an empty record (was a NULL pointer in the VM)
case("zip_deflate_empty_pickle.pt", archive(b"", compress=True), None, "truncated",
     "a deflated data.pkl of 0 bytes")
# compressed record whose announced size lies (small announced, large real)
small = archive(state_dict(("w", tensor(stype="ByteStorage", numel=16, size=(16,)))),
                {"data/0": b"\x00" * (1 << 20)}, compress=True)
c2 = central_offsets(small)
lie = patch(small, c2[2] + 24, "<I", 16)
case("zip_deflate_size_lies.pt", lie, None, None,
     "a deflated record announcing 16 bytes that inflates to 1 MiB")
bad_crc = patch(archive(state_dict(("w", tensor())), {"data/0": FLOATS}, compress=True),
                central_offsets(archive(state_dict(("w", tensor())), {"data/0": FLOATS},
                                        compress=True))[2] + 16, "<I", 0xDEADBEEF)
case("zip_deflate_bad_crc.pt", bad_crc, None, "CRC|crc", "a deflated record with a wrong CRC")
case("torchscript_archive.pt",
     archive(state_dict(("w", tensor())), {"data/0": FLOATS, "constants.pkl": P2 + b").",
                                           "code/__torch__.py": b"import os\n"}),
     None, "TorchScript", "an archive with constants.pkl: TorchScript, refused when weights_only")

# ===========================================================================
# 5. the legacy stream
# ===========================================================================

case("legacy_magic_reduce.pt",
     legacy(legacy_obj(legacy_tensor()),
            magic=P2 + b"cos\nsystem\n" + binunicode(SHELL) + b"\x85R."), UP, "os",
     "os.system in the magic-number pickle")
case("legacy_sysinfo_reduce.pt",
     legacy(legacy_obj(legacy_tensor()),
            sysinfo=P2 + b"cbuiltins\nexec\n" + binunicode(PY) + b"\x85R."), UP, "exec",
     "builtins.exec in the sys_info pickle")
case("legacy_object_global.pt",
     legacy(P2 + b"cos\nsystem\n" + binunicode(SHELL) + b"\x85R.", keys=(), data=b""), UP,
            "os",
     "os.system in the object pickle")
case("legacy_keys_reduce.pt",
     legacy(legacy_obj(legacy_tensor()),
            keys_pkl=P2 + b"cos\nsystem\n" + binunicode(SHELL) + b"\x85R."), UP, "os",
     "os.system in the storage key list pickle")
case("legacy_bad_magic.pt", legacy(legacy_obj(legacy_tensor()),
                                   magic=pickle.dumps(12345, protocol=2)), None, "magic",
     "a wrong magic number")
case("legacy_bad_protocol.pt", legacy(legacy_obj(legacy_tensor()),
                                      proto=pickle.dumps(1002, protocol=2)), None, "protocol",
     "legacy protocol 1002")
case("legacy_count_huge.pt",
     legacy(legacy_obj(legacy_tensor(numel=2**61, size=(4,))),
            data=struct.pack("<q", 2**61) + FLOATS), None, None,
     "a storage of 2**61 floats (byte count overflows)")
case("legacy_count_mismatch.pt",
     legacy(legacy_obj(legacy_tensor()), data=struct.pack("<q", 1 << 40) + FLOATS), None,
     "elements", "the data says 2**40 elements, the object 4")
case("legacy_data_truncated.pt",
     legacy(legacy_obj(legacy_tensor(numel=1 << 30, size=(4,))),
            data=struct.pack("<q", 1 << 30) + FLOATS), None, "truncated|ends",
     "a storage of 2**30 floats with 16 bytes of data")
case("legacy_keys_not_list.pt",
     legacy(legacy_obj(legacy_tensor()))
     .replace(pickle.dumps(["0"], protocol=2), pickle.dumps({"0": 1}, protocol=2)), None,
     "list", "the storage keys pickle is a dict")
case("legacy_key_twice.pt", legacy(legacy_obj(legacy_tensor()), keys=(b"0", b"0")), None,
     "twice", "one storage key listed twice")
case("legacy_data_without_object.pt", legacy(legacy_obj(legacy_tensor()), keys=(b"0", b"1")),
     None, "no object", "data for a storage no object names")
case("legacy_view_out_of_range.pt",
     legacy(legacy_obj(legacy_tensor(key="0", numel=4, view=("v", 2**40, 4))), keys=(b"0",)),
     None, None, "a storage view at element 2**40 of a 4-element root")
case("legacy_view_of_itself.pt",
     legacy(legacy_obj(legacy_tensor(key="0", numel=4, view=("0", 0, 4))), keys=(b"0",)),
     None, None, "a storage that is a view of itself")
case("legacy_shape_overflow.pt",
     legacy(legacy_obj(legacy_tensor(size=(2**40, 2**40), stride=(1, 1)))), None, None,
     "sizes whose product overflows")
case("legacy_deep_marks.pt", legacy(P2 + b"(" * 100_000 + b"N.", keys=(), data=b""), None, None,
     "100000 MARKs in the object pickle, no storages")
case("legacy_truncated_header.pt", legacy(legacy_obj(legacy_tensor()))[:30], None, None,
     "cut inside the sys_info pickle")

# the tar format of torch 0.1.x: a clear error naming the format
tar = io.BytesIO()
import tarfile  # noqa: E402

with tarfile.open(fileobj=tar, mode="w", format=tarfile.USTAR_FORMAT) as t:
    for name, data in (("sys_info", pickle.dumps({}, protocol=2)), ("pickle", P2 + b"N."),
                       ("tensors", P2 + b"]."), ("storages", P2 + b"].")):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        t.addfile(info, io.BytesIO(data))
case("tar_format.pt", tar.getvalue(), None, "tar format", "torch 0.1.x's tar format")


# ===========================================================================
# 6. second round (issue 9): crashes and quadratic blow-ups from small files
# ===========================================================================


def fnv1a_collisions(n, bits=18, target=0x15555):
    """n record names whose 64-bit FNV-1a hashes agree in their low `bits`
    bits (the slot in an unkeyed 2**bits-slot table): "data/" + 4 base-36
    digits + 3 bytes chosen so. The low bits of FNV-1a depend only on the
    low bits of its state, so the last two bytes can steer them."""
    import itertools

    import numpy as np

    prime, mask = np.uint64(1099511628211), np.uint64((1 << bits) - 1)
    free = np.array([b for b in range(0x21, 0x7F) if b not in b"/.\\"], dtype=np.uint64)
    usable = np.zeros(256, bool)
    usable[free.astype(int)] = True
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    prefixes = [("data/" + "".join(t)).encode()
                for t in itertools.islice(itertools.product(digits, repeat=4), n * 3 // 2)]
    h = np.full(len(prefixes), np.uint64(1469598103934665603), dtype=np.uint64)
    raw = np.frombuffer(b"".join(prefixes), np.uint8).reshape(len(prefixes), -1)
    for col in raw.T.astype(np.uint64):
        h = (h ^ col) * prime
    high, low = np.uint64(target & ~0xFF), target & 0xFF
    found = {}
    for b1 in free:
        h1 = (h ^ b1) * prime
        for b2 in free:
            h2 = (h1 ^ b2) * prime
            hit = np.nonzero((h2 & mask & ~np.uint64(0xFF)) == high)[0]
            b3 = ((h2[hit] & np.uint64(0xFF)) ^ np.uint64(low)).astype(int)
            for i, c in zip(hit[usable[b3]], b3[usable[b3]]):
                found.setdefault(int(i), prefixes[i] + bytes([int(b1), int(b2), c]))
        if len(found) >= n:
            break
    names = [found[k] for k in sorted(found)][:n]
    assert len(names) == n
    return names


collide = {name.decode(): b"" for name in fnv1a_collisions(100_000)}
collide["data/0"] = FLOATS
case("zip_name_collisions.pt", archive(state_dict(("w", tensor())), collide), None, None,
     "100000 records whose names collide in the low 18 bits of FNV-1a (29 s in an unkeyed "
     "hash index; torch 0.13 s): loads in O(n log n)")

# a plain tensor rebuilt over each quantized storage type (was a SIGSEGV in
# load, verify and `ckptio info`; torch fails with an internal assert)
QUANTIZED = {"QInt8Storage": ("qint8", 1), "QUInt8Storage": ("quint8", 1),
             "QInt32Storage": ("qint32", 4), "QUInt4x2Storage": ("quint4x2", 1),
             "QUInt2x4Storage": ("quint2x4", 1)}
for stype, (qdtype, qsize) in QUANTIZED.items():
    case(f"quantized_{stype}_v2.pt",
         archive(state_dict(("w", tensor(stype=stype))), {"data/0": FLOATS[: 4 * qsize]}), None,
         "quantized", f"_rebuild_tensor_v2 over a {stype}")
    v3 = (b"ctorch._utils\n_rebuild_tensor_v3\n(" + storage_pid(stype) + b"K\x00" + int_tuple((4,))
          + int_tuple((1,)) + b"\x89ccollections\nOrderedDict\n)Rctorch\n" + qdtype.encode()
          + b"\ntR")
    case(f"quantized_{stype}_v3.pt", archive(state_dict(("w", v3)), {"data/0": FLOATS[: 4 * qsize]}),
         None, "quantized", f"_rebuild_tensor_v3 over a {stype} with dtype torch.{qdtype}")
case("quantized_dtype_over_float_v3.pt",
     archive(state_dict(("w", b"ctorch._utils\n_rebuild_tensor_v3\n(" + storage_pid() + b"K\x00"
                         + int_tuple((4,)) + int_tuple((1,)) + b"\x89ccollections\nOrderedDict\n)R"
                         + b"ctorch\nqint8\ntR")), {"data/0": FLOATS}), None, "quantized",
     "_rebuild_tensor_v3 with dtype torch.qint8 over a FloatStorage")
case("quantized_v1.pt",
     archive(state_dict(("w", b"ctorch._utils\n_rebuild_tensor\n(" + storage_pid("QInt8Storage")
                         + b"K\x00" + int_tuple((4,)) + int_tuple((1,)) + b"tR")),
             {"data/0": FLOATS[:4]}), None, "quantized", "_rebuild_tensor over a QInt8Storage")
case("storage_record_larger.pt",
     archive(state_dict(("w", tensor(numel=2, size=(2,)))), {"data/0": FLOATS}), None,
     "claims 8 bytes but its record holds 16",
     "a storage of 2 floats over a 16-byte record (torch.load refuses it; mmap=True does not)")

# 20,000 legacy storage views, each a view of the previous one (was a C
# stack overflow: one nested call per link)
chain, prev = b"", "0"
for i in range(1, 20_001):
    chain += (b"(" + binunicode("storage") + (b"ctorch\nFloatStorage\nq\x01" if i == 1 else b"h\x01")
              + binunicode(prev) + (binunicode("cpu") + b"q\x02" if i == 1 else b"h\x02")
              + b"K\x04(" + binunicode(f"v{i}") + b"K\x00K\x04ttQ")
    prev = f"v{i}"
last = chain.rindex(b"(" + binunicode("storage"))
case("legacy_view_chain.pt",
     legacy(P2 + b"}(" + binunicode("views") + b"](" + chain[:last] + b"e" + binunicode("w")
            + TORCH_TENSOR + b"(" + chain[last:] + b"K\x00" + int_tuple((4,)) + int_tuple((1,))
            + b"\x89ccollections\nOrderedDict\n)RtRu."), None, None,
     "20000 storage views, each of the previous one; loads (torch 0.75 s)")


# nesting: 10^6 TUPLE1 as a dict key made both torch.load and ckptio crash in
# CPython's (recursive) tuple hash; the depth limit refuses it at 10000
case("deep_tuple_key.pt", archive(P2 + b"}N" + b"\x85" * 1_000_000 + b"Ns."), None,
     "nest more than", "a tuple nested 10^6 deep used as a dict key (SIGSEGV in torch)")
case("deep_frozenset_key.pt", archive(P4 + b"}" + b"(" * 20_000 + b"N" + b"\x91" * 20_000 + b"Ns."), None,
     "nest more than|more than 4096 dict keys", "frozensets nested 20000 deep used as a dict key")
case("deep_tuple_legacy.pt", legacy(P2 + b"}N" + b"\x85" * 100_000 + b"Ns.", keys=(), data=b""),
     None, "nest more than", "a deep tuple key in a legacy file (the layout scan hashes it too)")
case("legacy_deep_tuple_sysinfo.pt",
     legacy(legacy_obj(b"N"), sysinfo=P2 + b"}N" + b"\x85" * 100_000 + b"Ns."), None,
     "nest more than", "a deep tuple key in the legacy sys_info pickle (read before the objects)")
case("deep_reduce_chain.pt",
     archive(P2 + b"ccollections\nOrderedDict\nq\x00N" + b"h\x00\x86" * 20_000 + b"."),
     None, "nest more than", "20000 nested (OrderedDict, x) pairs")

# a storage reference kept in the memo made every REDUCE/NEWOBJ walk its
# whole argument graph: 95000 NEWOBJ(set, (L,)) over a 30000-item list L
# (minutes; torch 1 s); each is O(1) now. Ends in an unknown opcode, so the
# outcome also proves the machine got to the end.
rewalk = (P2 + b"}q\x03" + storage_pid() + b"q\x00" + b"cbuiltins\nset\nq\x02" + b"](" + b")" * 30_000
          + b"eq\x01" + b"h\x03K\x00h\x02h\x01\x85\x81s" * 95_000 + b"\xff")
case("memo_ref_rewalk.pt", archive(rewalk, {"data/0": FLOATS}), UP, "opcode 0xff",
     "95000 NEWOBJs over one memoized list, with a storage reference in the memo")

# ---- memory: allowlisted builders asked for more than the file could hold
# (each allocated ~1 GiB or more from a few hundred bytes in torch.load)
G30 = pickle_int(1 << 30)
stride0 = tensor(numel=1, size=(1 << 27,), stride=(0,))  # 2**27 elements over one float
case("bytearray_huge.pt", archive(P2 + b"cbuiltins\nbytearray\n" + G30 + b"\x85R."), None,
     "bytearray.*would allocate 1073741824 bytes", "bytearray(2**30) from a 385-byte file")
case("bytearray_newobj.pt", archive(P2 + b"cbuiltins\nbytearray\n" + G30 + b"\x85\x81."), "ok",
     None, "NEWOBJ bytearray.__new__(bytearray, 2**30): makes an empty bytearray, as in torch")
case("device_tensor_stride0.pt",
     archive(state_dict(("w", b"ctorch._utils\n_rebuild_device_tensor_from_cpu_tensor\n(" + stride0
                         + b"ctorch\nfloat64\n" + binunicode("cpu") + b"\x89tR")),
             {"data/0": FLOATS[:4]}), None, "would allocate 1073741824 bytes",
     "_rebuild_device_tensor_from_cpu_tensor over a stride-0 view of 2**27 elements (to float64)")
case("legacy_tensor_ctor_huge.pt",
     archive(P2 + b"ctorch\nFloatTensor\n" + G30 + b"\x85R."), None, "would allocate",
     "torch.FloatTensor(2**30): a 4 GiB legacy constructor")
case("tensor_newobj_huge.pt",
     archive(P2 + b"ctorch\nTensor\n" + G30 + G30 + b"\x86\x81."), None, "more than 2..64 bytes",
     "NEWOBJ torch.Tensor.__new__(Tensor, 2**30, 2**30)")
case("untyped_storage_huge.pt",
     archive(P2 + b"ctorch.storage\nUntypedStorage\n" + pickle_int(1 << 34) + b"\x85R."), None,
     "would allocate", "torch.UntypedStorage(2**34)")
case("qtensor_size_huge.pt",
     archive(P2 + b"ctorch._utils\n_rebuild_qtensor\n(" + storage_pid("QInt8Storage")
             + b"K\x00" + int_tuple((1 << 15, 1 << 15)) + int_tuple((0, 0))
             + b"(ctorch\nper_tensor_affine\nG?\xb9\x99\x99\x99\x99\x99\x9aK\x00t\x89"
             + b"ccollections\nOrderedDict\n)RtR.", {"data/0": FLOATS[:4]}), None,
     "would allocate", "_rebuild_qtensor with size 2**15 x 2**15 over a 4-element storage "
     "(_empty_affine_quantized allocates 1 GiB first)")
for builder in ("builtins\nset", "collections\nCounter", "torch\nSize", "builtins\nbytearray"):
    short = builder.split("\n")[1].lower()
    case(f"iterate_tensor_{short}.pt",
         archive(state_dict(("w", f"c{builder}\n".encode() + b"(" + stride0 + b"tR")),
                 {"data/0": FLOATS[:4]}), None, "element by element",
         f"{builder.replace(chr(10), '.')} over a stride-0 view of 2**27 elements (one object "
         "per element)")
case("from_type_v2_bytearray.pt",
     archive(P2 + b"ctorch._tensor\n_rebuild_from_type_v2\n(cbuiltins\nbytearray\nctorch\nTensor\n("
             + G30 + b"t}tR."), None, "would allocate",
     "_rebuild_from_type_v2(bytearray, Tensor, (2**30,), {}): the builder inside the rebuild")
case("sparse_stride0_values.pt",
     archive(P2 + b"ctorch._utils\n_rebuild_sparse_tensor\n(ctorch.serialization\n_get_layout\n"
             + binunicode("torch.sparse_coo") + b"\x85R("
             + tensor(stype="LongStorage", numel=1, size=(1, 1 << 27), stride=(0, 0)) + stride0
             + int_tuple((1,)) + b"ttR.", {"data/0": FLOATS[:8]}), None, None,
     "a sparse tensor whose indices and values are stride-0 views of 2**27 elements")

# _codecs.encode(x, 'hex') nested 30 deep doubles 1000 bytes 30 times (torch.load
# is killed for memory); refused by the budget, or by the allowlist once
# _codecs.encode takes (str, 'latin1') only
hexed = b"c_codecs\nencode\n(" + binunicode("a" * 1000) + binunicode("latin1") + b"tR"
for _ in range(30):
    hexed = b"c_codecs\nencode\n(" + hexed + binunicode("hex") + b"tR"
case("codecs_hex_nested.pt", archive(P2 + hexed + b"."), None, None,
     "_codecs.encode(..., 'hex') nested 30 deep over 1000 bytes (2**30 times larger)")

# ---- memory: Python objects, one byte of pickle each
case("empty_set_storm.pt", archive(P4 + b"\x8f" * (1 << 20) + b"."), None, "would allocate more",
     "2**20 EMPTY_SETs (216 bytes each: 236x the file)")
case("empty_dict_storm.pt", archive(P4 + b"}" * (1 << 20) + b"."), None, "would allocate more",
     "2**20 EMPTY_DICTs (64 bytes each and a stack slot)")
case("frozenset_storm.pt", archive(P4 + b"(\x91" * (1 << 19) + b"."), None, "would allocate more",
     "2**19 empty FROZENSETs")


# verify inflated a deflated data.pkl twice; the second time did not fit its
# limit and the storage checks were skipped: a 600 KB blob in data.pkl and a
# tensor record cut in half verified clean
blob = b"B" + struct.pack("<I", 600_000) + b"\0" * 600_000
case("verify_deflated_half_record.pt",
     archive(state_dict(("w", tensor(numel=1024, size=(1024,))), ("blob", blob)),
             {"data/0": b"\x01" * 2048}, compress=True), None,
     "claims 4096 bytes but its record holds 2048",
     "deflated: a 600 KB blob in data.pkl and the tensor record cut in half")

# 100000 dict keys with one hash: ints k * (2**61 - 1) + 7 (CPython hashes
# ints modulo 2**61 - 1, without a key): every insertion compares with all
# the keys before it (torch.load: over 100 s for 1.3 MB)
M61 = (1 << 61) - 1
collide_keys = b"".join(pickle_int(k * M61 + 7) + b"N" + (b"u(" if k % 1000 == 0 else b"")
                        for k in range(1, 100_001))
case("dict_int_collisions.pt", archive(P2 + b"}(" + collide_keys + b"u."), None,
     "more than 4096 dict keys",
     "100000 int keys of one hash in a dict (quadratic in CPython's dict)")


# 7. the openmmlab data set (allow='openmmlab'): hostile files that reuse the
#    very globals mmengine's and mmcv's checkpoints name
# ===========================================================================

OMM = "openmmlab"
NP_REC = b"cnumpy._core.multiarray\n_reconstruct\n"
NP_REC_1X = b"cnumpy.core.multiarray\n_reconstruct\n"
NDARRAY = b"cnumpy\nndarray\n"
NP_DTYPE = b"cnumpy\ndtype\n"
NP_SCALAR = b"cnumpy._core.multiarray\nscalar\n"
GETATTR = b"c__builtin__\ngetattr\n"
HB = b"cmmengine.logging.history_buffer\nHistoryBuffer\n"
CODECS = b"c_codecs\nencode\n"
OS_SYSTEM = b"cos\nsystem\n" + binunicode(SHELL) + b"\x85R"
EXEC = b"cbuiltins\nexec\n" + binunicode(PY) + b"\x85R"


def np_bytes(raw):
    """bytes as protocol 2 writes them: _codecs.encode(str, 'latin1')."""
    return CODECS + binunicode(raw.decode("latin1")) + binunicode("latin1") + b"\x86R"


def np_dtype(typestr, endian="<", elsize=-1, align=-1, flags=0, state=None):
    """numpy.dtype(typestr, False, True) + BUILD (3, endian, None, None, None, ...)."""
    if state is None:
        state = (b"(" + pickle_int(3) + binunicode(endian) + b"NNN" + pickle_int(elsize)
                 + pickle_int(align) + pickle_int(flags) + b"t")
    return NP_DTYPE + binunicode(typestr) + b"\x89\x88\x87R" + state + b"b"


def np_array(shape, dtype, data, fortran=False, rec=NP_REC, cls=NDARRAY, rshape=(0,),
             code=None, version=1):
    """_reconstruct(cls, rshape, b'b') + BUILD (version, shape, dtype, fortran, data)."""
    return (rec + cls + int_tuple(rshape) + (np_bytes(b"b") if code is None else code) + b"\x87R"
            + b"(" + pickle_int(version) + int_tuple(shape) + dtype
            + (b"\x88" if fortran else b"\x89") + data + b"tb")


def np_scalar(dtype, data):
    return NP_SCALAR + dtype + data + b"\x86R"


def hb_getattr(name, obj=HB):
    return GETATTR + obj + binunicode(name) + b"\x86R"


def stat_methods(pairs=None):
    """statistics_methods as mmengine writes it: {name: getattr(HistoryBuffer, name)}."""
    pairs = [(n, hb_getattr(n)) for n in ("min", "max", "current", "mean")] if pairs is None \
        else pairs
    return b"}(" + b"".join(binunicode(k) + v for k, v in pairs) + b"u"


def hb_state(**override):
    """The state of a HistoryBuffer, key by key (None drops a key)."""
    items = {
        "max_length": pickle_int(1000000),
        "_log_history": np_array((2,), np_dtype("f8"), np_bytes(struct.pack("<2d", 0.5, 0.25))),
        "_count_history": np_array((2,), np_dtype("i8"), np_bytes(struct.pack("<2q", 1, 1))),
        "statistics_methods": stat_methods(),
    }
    items.update(override)
    return b"}(" + b"".join(binunicode(k) + v for k, v in items.items() if v is not None) + b"u"


def history_buffer(state=None):
    return HB + b")\x81" + (hb_state() if state is None else state) + b"b"


def mm_checkpoint(value):
    """A checkpoint shaped like a Runner's: a state_dict tensor, then value in
    message_hub."""
    return archive(state_dict(("w", tensor()), ("message_hub", value)), {"data/0": FLOATS})


def omm_case(name, value, error=UP, match=None, why="", allow=OMM):
    case(f"omm_{name}.pt", mm_checkpoint(value), error, match, why)
    CASES[f"omm_{name}.pt"][1]["allow"] = allow


# what must load (the builders' own paths, also fuzz seeds through the replay)
omm_case("good_history_buffer", b"}(" + binunicode("train/loss") + history_buffer() + b"u",
         None, None, "a HistoryBuffer as mmengine writes it")
omm_case("good_numpy", b"("
         + np_array((2, 2), np_dtype("f4"), np_bytes(struct.pack("<4f", *range(4))))
         + np_array((2,), np_dtype("i4", ">"), np_bytes(struct.pack(">2i", 1, 2)), rec=NP_REC_1X)
         + np_array((1,), np_dtype("O8", "|", flags=63), b"]" + binunicode("x") + b"a")
         + np_scalar(np_dtype("f8"), np_bytes(struct.pack("<d", 0.5)))
         + np_array((0, 3), np_dtype("f8"), b"c__builtin__\nbytes\n)R") + b"l",
         None, None, "numpy arrays (both spellings, both byte orders, object, empty), a scalar")

# getattr on anything but HistoryBuffer's statistics methods
omm_case("getattr_other_class", GETATTR + b"ccollections\nOrderedDict\n" + binunicode("fromkeys")
         + b"\x86R", UP, "only on mmengine's HistoryBuffer", "getattr on another allowed class")
omm_case("getattr_function_globals", GETATTR + TORCH_TENSOR + binunicode("__globals__")
         + b"\x86R", UP, "only on mmengine's HistoryBuffer",
         "getattr(torch._utils._rebuild_tensor_v2, '__globals__'): a module's namespace")
omm_case("getattr_module_through_builtin", GETATTR + CODECS + binunicode("__self__") + b"\x86R",
         UP, "only on mmengine's HistoryBuffer",
         "getattr(_codecs.encode, '__self__'): the _codecs module, reached through an allowed "
         "object")
omm_case("getattr_chain", hb_getattr("__globals__", obj=hb_getattr("min")), UP,
         "only on mmengine's HistoryBuffer",
         "getattr(getattr(HistoryBuffer, 'min'), '__globals__'): a chain out of an allowed method")
omm_case("getattr_chain_to_os_system",
         GETATTR + hb_getattr("__globals__", obj=hb_getattr("__init__")) + binunicode("os")
         + b"\x86R", UP, "statistics", "getattr(HistoryBuffer.__init__.__globals__, 'os')...")
for dunder in ("__class__", "__dict__", "__init__", "__subclasses__", "__setstate__",
               "__getattribute__", "__reduce_ex__", "__module__"):
    omm_case(f"getattr_dunder{dunder.strip('_')}", hb_getattr(dunder), UP, "statistics methods",
             f"getattr(HistoryBuffer, {dunder!r})")
for method in ("update", "statistics", "register_statistics", "_set_default_statistics",
               "_statistics_methods", "data"):
    omm_case(f"getattr_method_{method.strip('_')}", hb_getattr(method), UP, "statistics methods",
             f"getattr(HistoryBuffer, {method!r}): its own, but not a statistics method")
omm_case("getattr_three_args", GETATTR + HB + binunicode("min") + b"N\x87R", UP, "two arguments",
         "getattr with a default")
omm_case("getattr_name_not_str", GETATTR + HB + b"K\x01\x86R", UP, "statistics methods",
         "getattr(HistoryBuffer, 1)")
omm_case("getattr_on_ndarray", GETATTR + NDARRAY + binunicode("__reduce__") + b"\x86R", UP,
         "only on mmengine's HistoryBuffer", "getattr(numpy.ndarray, '__reduce__')")
omm_case("dotted_global_out_of_history_buffer",
         b"cmmengine.logging.history_buffer\nHistoryBuffer.__init__\n", UP, "not an allowed global",
         "GLOBAL HistoryBuffer.__init__ as a dotted name")
omm_case("global_numpy_of_history_buffer_module", b"cmmengine.logging.history_buffer\nnp\n", UP,
         "not an allowed global", "another name of the HistoryBuffer's module (its numpy)")

# _reconstruct with another first argument, or other arguments
omm_case("reconstruct_tensor", NP_REC + b"ctorch\nTensor\n" + int_tuple((0,)) + np_bytes(b"b")
         + b"\x87R", UP, "numpy.ndarray itself", "_reconstruct(torch.Tensor, ...)")
omm_case("reconstruct_ordereddict", NP_REC_1X + b"ccollections\nOrderedDict\n" + int_tuple((0,))
         + np_bytes(b"b") + b"\x87R", UP, "numpy.ndarray itself",
         "_reconstruct(OrderedDict, ...), numpy 1.x spelling")
omm_case("reconstruct_dtype_class", NP_REC + NP_DTYPE + int_tuple((0,)) + np_bytes(b"b")
         + b"\x87R", UP, "numpy.ndarray itself", "_reconstruct(numpy.dtype, ...)")
omm_case("reconstruct_history_buffer", NP_REC + HB + int_tuple((0,)) + np_bytes(b"b") + b"\x87R",
         UP, "numpy.ndarray itself", "_reconstruct(HistoryBuffer, ...)")
omm_case("reconstruct_huge_shape", NP_REC + NDARRAY + int_tuple((2**40,)) + np_bytes(b"b")
         + b"\x87R", UP, r"shape \(0,\)", "_reconstruct(ndarray, (2**40,), b'b')")
omm_case("reconstruct_other_typecode", NP_REC + NDARRAY + int_tuple((0,)) + np_bytes(b"O")
         + b"\x87R", UP, "typecode", "_reconstruct(ndarray, (0,), b'O')")
omm_case("ndarray_called", NDARRAY + int_tuple((2, 3)) + b"\x85R", UP, "only allowlisted",
         "numpy.ndarray((2, 3)) through REDUCE")
omm_case("dtype_newobj", NP_DTYPE + binunicode("f8") + b"\x85\x81", UP, "only nn.Parameter",
         "NEWOBJ of numpy.dtype")

# object arrays holding what the rules refuse
for label, payload in (("os_system", OS_SYSTEM), ("exec", EXEC),
                       ("getattr_init", hb_getattr("__init__")),
                       ("subprocess", b"csubprocess\nPopen\n(" + binunicode("touch")
                        + binunicode(SENTINEL) + b"l\x85R")):
    omm_case(f"object_array_{label}",
             np_array((2,), np_dtype("O8", "|", flags=63),
                      b"(" + binunicode("ok") + payload + b"l"),
             UP, None, f"an object array whose elements hold a forbidden {label} REDUCE")
omm_case("object_array_short_list",
         np_array((2**30,), np_dtype("O8", "|", flags=63), b"]" + binunicode("x") + b"a"), UP,
         "exactly that many", "an object array of 2**30 elements with a one-item list")
omm_case("object_array_list_for_floats",
         np_array((1,), np_dtype("f8"), b"]" + b"G" + struct.pack(">d", 1.0) + b"a"), UP, "bytes",
         "a list as the data of a float array")
omm_case("object_scalar", np_scalar(np_dtype("O8", "|", flags=63), binunicode("x")), UP,
         "not decoded", "scalar(dtype('O'), obj)")

# _codecs.encode: latin1 of a str only (refused without the set too)
for label, args in (("rot13", binunicode("x") + binunicode("rot13") + b"\x86"),
                    ("utf8", binunicode("x") + binunicode("utf-8") + b"\x86"),
                    ("zlib", binunicode("x") + binunicode("zlib_codec") + b"\x86"),
                    ("hex", binunicode("x") + binunicode("hex") + b"\x86"),
                    ("one_arg", binunicode("x") + b"\x85"),
                    ("three_args", binunicode("x") + binunicode("latin1") + binunicode("strict")
                     + b"\x87"),
                    ("bytes_input", b"C\x01x" + binunicode("latin1") + b"\x86"),
                    ("int_input", b"K\x01" + binunicode("latin1") + b"\x86"),
                    ("not_latin1", binunicode("\u1234") + binunicode("latin1") + b"\x86")):
    omm_case(f"codecs_{label}", CODECS + args + b"R", UP, "_codecs.encode",
             f"_codecs.encode with {label}", allow=None)

# HistoryBuffer state that plays tricks
OD = b"ccollections\nOrderedDict\n"
for label, state, match in (
        ("class", hb_state(__class__=OD), "may hold only"),
        ("dict", hb_state(__dict__=b"}" + binunicode("x") + b"K\x01s"), "may hold only"),
        ("setstate", hb_state(__setstate__=hb_getattr("min")), "may hold only"),
        ("slotstate", b"(" + hb_state() + b"}" + binunicode("__class__") + OD + b"st",
         "must be a dict"),
        ("foreign_callable", hb_state(statistics_methods=stat_methods(
            [("mean", CODECS)])), "HistoryBuffer.mean"),
        ("allowed_torch_function", hb_state(statistics_methods=stat_methods(
            [("mean", TORCH_TENSOR)])), "HistoryBuffer.mean"),
        ("ordereddict_as_method", hb_state(statistics_methods=stat_methods(
            [("min", OD)])), "HistoryBuffer.min"),
        ("swapped_method", hb_state(statistics_methods=stat_methods(
            [("mean", hb_getattr("max"))])), "HistoryBuffer.mean"),
        ("extra_method_name", hb_state(statistics_methods=stat_methods(
            [("evil", hb_getattr("min"))])), "may name only"),
        ("methods_not_dict", hb_state(statistics_methods=b"]"), "must be a dict"),
        ("max_length_str", hb_state(max_length=binunicode("x")), "max_length"),
        ("history_list", hb_state(_log_history=b"]"), "numeric numpy array"),
        ("history_object_array", hb_state(_log_history=np_array(
            (1,), np_dtype("O8", "|", flags=63), b"]" + OS_SYSTEM + b"a")), "os"),
        ("history_2d", hb_state(_log_history=np_array(
            (1, 1), np_dtype("f8"), np_bytes(struct.pack("<d", 1.0)))), "1-d"),
        ("missing_keys", hb_state(_count_history=None), "lacks"),
):
    omm_case(f"history_buffer_{label}", history_buffer(state), UP, match,
             f"HistoryBuffer BUILD: {label}")
omm_case("history_buffer_newobj_args", HB + b"K\x01\x85\x81", UP, "without arguments",
         "HistoryBuffer.__new__(HistoryBuffer, 1)")
omm_case("history_buffer_reduce_init", HB + b"(]]K\x01t" + b"R", UP, "only allowlisted",
         "HistoryBuffer([], [], 1): its __init__ called through REDUCE")
omm_case("history_buffer_built_twice", history_buffer() + hb_state(__class__=OD) + b"b", UP,
         "may hold only", "a valid BUILD, then a second BUILD with __class__")

# huge numpy shapes over small data: refused before anything is allocated
for label, shape, typestr, data in (
        ("huge_over_8_bytes", (2**40,), "f8", struct.pack("<d", 1.0)),
        ("product_overflow", (2**31, 2**31, 2**31), "f8", b""),
        ("zero_dim_with_huge", (0, 2**62), "f8", b""),
        ("negative_dim", (-1,), "f8", b""),
        ("too_many_dims", (1,) * 33, "f8", struct.pack("<d", 1.0)),
        ("data_too_long", (1,), "f8", b"\x00" * 16),
        ("huge_str_itemsize", (2**20,), "U268435456", b"x"),
):
    omm_case(f"array_{label}", np_array(shape, np_dtype(typestr), np_bytes(data)), UP, None,
             f"numpy array of shape {shape if len(shape) < 5 else '(1,)*33'} over "
             f"{len(data)} bytes")
omm_case("array_bad_version", np_array((1,), np_dtype("f8"), np_bytes(b"\x00" * 8), version=2),
         UP, "numpy's", "array state version 2")
omm_case("array_dtype_not_dtype", np_array((1,), binunicode("f8"), np_bytes(b"\x00" * 8)), UP,
         "must be a numpy dtype", "a str where the dtype goes")
omm_case("array_build_on_scalar", np_scalar(np_dtype("f8"), np_bytes(b"\x00" * 8))
         + b"(" + pickle_int(1) + int_tuple((1,)) + np_dtype("f8") + b"\x89"
         + np_bytes(b"\x00" * 8) + b"tb", UP, "BUILD", "BUILD on a numpy scalar")
for label, typestr, state in (
        ("void", "V8", None), ("datetime", "M8", None), ("odd_size", "i3", None),
        ("garbage", "f8 ", None), ("huge_str", "U99999999999", None),
        ("structured_state", "f8", b"(" + pickle_int(3) + binunicode("<") + b"N("
         + binunicode("a") + b"tNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"),
        ("metadata", "f8", b"(" + pickle_int(4) + binunicode("<") + b"NNNJ\xff\xff\xff\xff"
         + b"J\xff\xff\xff\xffK\x00}t"),
        ("pipe_order_multibyte", "f8", b"(" + pickle_int(3) + binunicode("|")
         + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"),
        ("elsize_mismatch", "U5", b"(" + pickle_int(3) + binunicode("<") + b"NNN"
         + pickle_int(40) + pickle_int(4) + pickle_int(8) + b"t"),
        ("state_not_tuple", "f8", b"]"),
):
    omm_case(f"dtype_{label}", np_dtype(typestr, state=state), UP, "dtype",
             f"numpy dtype {typestr!r}: {label}")
omm_case("dtype_align_true", NP_DTYPE + binunicode("f8") + b"\x88\x88\x87R", UP, "dtype",
         "dtype('f8', True, True)")
omm_case("scalar_short_data", np_scalar(np_dtype("f8"), np_bytes(b"\x00" * 4)), UP, "needs 8",
         "a float64 scalar over 4 bytes")
omm_case("scalar_dtype_not_dtype", np_scalar(binunicode("f8"), np_bytes(b"\x00" * 8)), UP,
         "must be a numpy dtype", "scalar('f8', ...)")
omm_case("payload_in_message_hub",
         b"}(" + binunicode("train/loss") + history_buffer() + binunicode("evil") + OS_SYSTEM
         + b"u", UP, "os", "os.system beside a valid HistoryBuffer in a Runner-shaped file")


# valid if extreme: these load (as they do with torch.load); the checks are
# that nothing crashes, runs or allocates past the bound
LOADS = {
    "omm_good_history_buffer.pt",
    "omm_good_numpy.pt",
    "build_ordereddict_class.pt",  # sets an entry of the OrderedDict's __dict__, as torch does
    "build_ordereddict_setstate.pt",  # the same; a planted __setstate__ is never called
    "deep_marks.pt",
    "memo_billion_laughs_refs.pt",
    "storage_two_dtypes_one_key.pt",  # the second use takes the first's dtype, as in torch
    "legacy_view_of_itself.pt",
    "legacy_deep_marks.pt",
    "zip_name_collisions.pt",
    "legacy_view_chain.pt",
}


# structural cases (no globals beyond torch's tensor machinery): refused the
# same way when the caller trusts the file (weights_only=False)
TRUSTED_TOO = (
    "zip_", "zip64_", "storage_", "shape_", "stride_", "offset_", "tensor_past", "negative_",
    "too_many", "sizes_", "size_not", "legacy_count", "legacy_data", "legacy_view_out",
    "legacy_shape", "legacy_truncated", "legacy_key_twice", "legacy_keys_not_list",
    "legacy_bad_", "memo_long_binget", "memo_get", "memo_long_binput", "memo_memoize",
    "string_", "binbytes8", "bytearray8", "frame_", "long4", "stack_underflow",
    "pickle_truncated", "unknown_opcode", "proto_", "next_buffer", "deep_nesting_tuples",
    "tar_format", "quantized_", "legacy_view_chain", "deep_", "memo_ref_rewalk",
    "empty_set_storm",
)
NOT_TRUSTED_TOO = {"zip_deflate_small_bomb.pt", "zip_deflate_pickle_bomb.pt",
                   "storage_two_dtypes_one_key.pt"}


def main():
    if not sys.argv[1:] == ["--check"]:
        for old in os.listdir(HERE):
            if old.endswith(".pt"):
                os.remove(os.path.join(HERE, old))
    manifest = {}
    for name, (data, meta) in sorted(CASES.items()):
        if data is None:
            continue
        meta = dict(meta)
        meta["error"] = "ok" if name in LOADS else meta["error"] or "CheckpointError"
        meta["trusted_too"] = name.startswith(TRUSTED_TOO) and name not in NOT_TRUSTED_TOO
        manifest[name] = meta
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)
    with open(os.path.join(HERE, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(manifest)} cases to {HERE}")


if __name__ == "__main__":
    main()
