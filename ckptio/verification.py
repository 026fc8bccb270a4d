"""ckptio.verify: integrity checks of a checkpoint, reported, not loaded.

The checks run in C (src/binding/verify.c): the zip container, every
record's CRC-32, the pickle walked for its storages without building
anything, and each storage against its record. When those pass, the loader
itself decodes the file (weights_only, to the CPU, zero-copy) to check the
pickle and every tensor's geometry; legacy files are checked by the loader
alone.
"""
from . import _native
from ._allow import allow_bits as _allow_bits
from ._config import ensure_scan_configured
from .allowlist import user_allowed_globals

_MAP_CPU = 1  # ck_map_kind in src/binding/session.h


class Problem(tuple):
    """One problem: kind ('container', 'crc', 'record', 'storage', 'limit',
    'pickle', 'format'), the record it concerns (or None), the byte offset
    in the file (or None) and a message."""

    __slots__ = ()

    def __new__(cls, kind, record, offset, message):
        return super().__new__(cls, (kind, record, offset, message))

    kind = property(lambda self: self[0])
    record = property(lambda self: self[1])
    offset = property(lambda self: self[2])
    message = property(lambda self: self[3])

    def __str__(self):
        where = []
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        return f"{self.kind}{' (' + ', '.join(where) + ')' if where else ''}: {self.message}"

    def __repr__(self):
        return f"Problem({self.kind!r}, {self.record!r}, {self.offset!r}, {self.message!r})"


class VerifyReport:
    """What ckptio.verify found. ok is True when problems is empty; counts
    holds: bytes, records, compressed, crc_checked, crc_unrecorded (records
    whose CRC torch left as 0), storages, storage_bytes, unused_records."""

    def __init__(self, name, format, problems, counts, notes=()):
        self.name = name
        self.format = format
        self.problems = list(problems)
        self.counts = dict(counts)
        self.notes = list(notes)  # what was not checked, and why

    @property
    def ok(self):
        return not self.problems

    def __bool__(self):
        return self.ok

    def __repr__(self):
        state = "ok" if self.ok else f"{len(self.problems)} problem(s)"
        return f"<VerifyReport {self.name!r} {self.format}: {state}>"

    def summary(self):
        """Several lines fit for a terminal."""
        c = self.counts
        lines = [
            f"{self.name}: {self.format} format, {c.get('bytes', 0)} bytes",
            f"  records: {c.get('records', 0)} ({c.get('compressed', 0)} compressed), "
            f"CRC checked: {c.get('crc_checked', 0)}, not recorded: {c.get('crc_unrecorded', 0)}",
            f"  storages: {c.get('storages', 0)} ({c.get('storage_bytes', 0)} bytes), "
            f"unused data records: {c.get('unused_records', 0)}",
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  ok" if self.ok else f"  {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _strip(name, message):
    prefix = f"{name}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def verify_mapping(mapping, name, strict=False, run_loader=True, weights_only=True,
                   encoding="utf-8", allow=None):
    """verify() on bytes already held in a Mapping (used by load(verify=True),
    which loads the same Mapping afterwards and so skips the loader here)."""
    have_torch = ensure_scan_configured()
    raw = _native.verify(mapping, name, encoding=encoding)
    fmt = raw.pop("format")
    problems = [Problem(*p) for p in raw.pop("problems")]
    notes = []
    foreign = fmt in ("tar", "pytorch1", "unknown")
    wants_loader = foreign or (run_loader and not problems and fmt != "torchscript")
    if wants_loader and not have_torch:
        if fmt in ("legacy", "tar", "pytorch1"):
            notes.append("torch is not installed: a legacy (pre-1.6) file is checked by "
                         "decoding it, which needs torch; nothing was checked")
        else:
            notes.append("torch is not installed: the container, CRCs, pickle and storages "
                         "were checked, the tensors' shapes and strides were not")
        if fmt == "unknown":
            problems.append(Problem("format", None, None,
                                    "not a torch.save file (neither a zip archive nor a pickle)"))
        wants_loader = False
    if wants_loader:
        try:
            result = _native.load(
                mapping,
                name,
                weights_only=weights_only,
                encoding=encoding,
                map_kind=_MAP_CPU,
                user_globals=user_allowed_globals(),
                allow=_allow_bits(allow),
            )
            del result
        except _native.UnpicklingError as exc:
            problems.append(Problem("pickle", None, None, _strip(name, str(exc))))
        except _native.CheckpointError as exc:
            kind = "format" if foreign else "load"
            problems.append(Problem(kind, None, None, _strip(name, str(exc))))
    report = VerifyReport(name, fmt, problems, raw, notes)
    if strict and problems:
        raise _native.CheckpointError(f"{name}: verify: {problems[0]}")
    return report


def verify(f, strict=False, *, weights_only=True, encoding="utf-8", allow=None):
    """Checks a checkpoint's integrity without handing its objects back.

    f: a path, a bytes-like object or a binary file object (as for
    ckptio.load). Checks every record's CRC-32, the zip container, that
    every storage the pickle names lies inside the file and its record has
    the bytes the pickle claims, and that the pickle decodes (weights_only).
    Returns a VerifyReport (report.ok, report.problems, report.counts);
    with strict=True raises ckptio.CheckpointError on the first problem.
    weights_only=False decodes the pickle with any global it names (for
    trusted files whose meta holds objects outside the allowlist: the
    globals are imported and called, as by torch.load(weights_only=False)).
    encoding: how Python 2 byte strings in the pickle decode, as for
    ckptio.load (a file load accepts with encoding='latin1' verifies with it).
    allow: the data sets decoded beyond torch's allowlist, as for
    ckptio.load ('openmmlab': numpy values and mmengine's HistoryBuffer).
    """
    from .serialization import _source

    mapping, name, _ = _source(f, None)
    return verify_mapping(mapping, name, strict=strict, weights_only=weights_only,
                          encoding=encoding, allow=allow)
